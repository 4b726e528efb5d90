"""Build tiny but real bundles without torch, for runtime, bench and CLI tests (reusable by others).

The trunk averages each colour channel (GlobalAveragePool) and maps the 3 means to ``feature_dim``
features with a fixed matrix whose first 3 columns are the identity; the ``colour`` head scores
class c by feature c, so a red image is "red", a green one "green": predictions are checkable.
The int8 trunk is the same graph under another name (real quantization is the exporter's test).
The manifest goes through :func:`edgetl.core.bundle.write_manifest`, the exporter's writer.
``formats=("onnx", "openvino")`` adds OpenVINO IR variants converted from the same ONNX graphs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edgetl.core.bundle import file_record, new_manifest, write_manifest
from edgetl.core.formats import variant_name

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
INPUT_SIZE = 32
FEATURE_DIM = 8
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


def _onnx():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    return onnx, TensorProto, helper, numpy_helper


def _save(model, path: Path) -> None:
    onnx, *_ = _onnx()
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def _model(graph):
    _, _, helper, _ = _onnx()
    # IR 9 / opset 17: old enough for any onnxruntime >= 1.18 the package allows.
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def trunk_weight(feature_dim: int = FEATURE_DIM) -> np.ndarray:
    w = np.zeros((3, feature_dim), dtype=np.float32)
    w[:, :3] = np.eye(3, dtype=np.float32)
    w[:, 3:] = np.linspace(-1, 1, 3 * (feature_dim - 3), dtype=np.float32).reshape(3, -1)
    return w


def write_trunk(path: Path, *, input_size: int = INPUT_SIZE, feature_dim: int = FEATURE_DIM, doc: str = "") -> None:
    _, TensorProto, helper, numpy_helper = _onnx()
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["features"]),
        ],
        "trunk",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, input_size, input_size])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", feature_dim])],
        initializer=[numpy_helper.from_array(trunk_weight(feature_dim), "W")],
    )
    graph.doc_string = doc
    _save(_model(graph), path)


def write_head(path: Path, weight: np.ndarray, bias: np.ndarray) -> None:
    _, TensorProto, helper, numpy_helper = _onnx()
    feature_dim, classes = weight.shape
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["features", "W", "b"], ["logits"])],
        "head",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", feature_dim])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        initializer=[
            numpy_helper.from_array(weight.astype(np.float32), "W"),
            numpy_helper.from_array(bias.astype(np.float32), "b"),
        ],
    )
    _save(_model(graph), path)


def colour_head_weights(feature_dim: int = FEATURE_DIM) -> tuple[np.ndarray, np.ndarray]:
    """3 classes (red, green, blue): logit c = 4 * normalised mean of channel c."""
    w = np.zeros((feature_dim, 3), dtype=np.float32)
    w[:3, :3] = 4.0 * np.eye(3, dtype=np.float32)
    return w, np.zeros(3, dtype=np.float32)


def brightness_head_weights(feature_dim: int = FEATURE_DIM) -> tuple[np.ndarray, np.ndarray]:
    """2 classes (dark, bright) from the sum of channel means."""
    w = np.zeros((feature_dim, 2), dtype=np.float32)
    w[:3, 0], w[:3, 1] = -1.0, 1.0
    return w, np.zeros(2, dtype=np.float32)


HEADS = {
    "colour": (["red", "green", "blue"], colour_head_weights),
    "brightness": (["dark", "bright"], brightness_head_weights),
}


def _io(name: str, shape: list) -> list[dict[str, Any]]:
    return [{"name": name, "shape": shape, "dtype": "float32"}]


def write_merged(trunk_path: Path, head_path: Path, out_path: Path) -> None:
    """Trunk and head as one graph (image -> logits), as ``export --merged`` ships them."""
    onnx, *_ = _onnx()
    from onnx import compose

    head = compose.add_prefix(onnx.load(str(head_path)), "head/")
    merged = compose.merge_models(onnx.load(str(trunk_path)), head, io_map=[("features", "head/features")])
    _save(merged, out_path)


def write_openvino_ir(onnx_path: Path, xml_path: Path) -> tuple[str, str]:
    """Convert an ONNX graph to OpenVINO IR (fp32 weights kept); returns the xml and bin paths."""
    import openvino as ov

    xml_path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(ov.convert_model(str(onnx_path)), str(xml_path), compress_to_fp16=False)
    return str(xml_path), str(xml_path.with_suffix(".bin"))


def _add_openvino_variants(
    root: Path, files: dict[str, Any], variants: dict[str, Any], precisions: tuple[str, ...], heads: tuple[str, ...]
) -> None:
    def convert(onnx_rel: str, role: str, head: str | None, precision: str) -> str:
        xml_rel = onnx_rel.replace("onnx/", "openvino/").replace(".onnx", ".xml")
        write_openvino_ir(root / onnx_rel, root / xml_rel)
        bin_rel = xml_rel[: -len(".xml")] + ".bin"
        rec = files[onnx_rel]
        files[xml_rel] = file_record(
            root,
            xml_rel,
            fmt="openvino",
            precision=precision,
            role=role,
            head=head,
            inputs=rec["inputs"],
            outputs=rec["outputs"],
            derived_from=onnx_rel,
            extra_files=(bin_rel,),
        )
        return xml_rel

    head_files = {h: convert(f"onnx/head.{h}.onnx", "head", h, "fp32") for h in heads}
    for prec in precisions:
        onnx_variant = variants[variant_name("onnx", prec)]
        trunk = convert(onnx_variant["trunk"], "trunk", None, prec)
        variants[variant_name("openvino", prec)] = {
            "format": "openvino",
            "precision": prec,
            "trunk": trunk,
            "heads": dict(head_files),
            "inference_precision": "f32",
            "metrics": dict(onnx_variant["metrics"]),
        }
        if "merged" in onnx_variant:
            variants[variant_name("openvino", prec)]["merged"] = {
                h: convert(rel, "merged", h, prec) for h, rel in onnx_variant["merged"].items()
            }


def build_bundle(
    root: Path,
    *,
    heads: tuple[str, ...] = ("colour",),
    precisions: tuple[str, ...] = ("fp32", "int8"),
    default_head: str | None = "colour",
    input_size: int = INPUT_SIZE,
    feature_dim: int = FEATURE_DIM,
    formats: tuple[str, ...] = ("onnx",),
    merged: bool = False,
) -> Path:
    """Write a bundle folder at ``root`` and return it; heads from :data:`HEADS`. ONNX files are
    always written (OpenVINO variants are converted from them); ``formats`` lists the variants;
    ``merged`` adds each head's trunk+head graph per variant (``merged.<head>.<precision>``)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    image_shape = ["batch", 3, input_size, input_size]
    files: dict[str, Any] = {}
    for prec in precisions:
        rel = f"onnx/trunk.{prec}.onnx"
        write_trunk(root / rel, input_size=input_size, feature_dim=feature_dim, doc=f"tiny trunk {prec}")
        files[rel] = file_record(
            root,
            rel,
            fmt="onnx",
            precision=prec,
            role="trunk",
            head=None,
            inputs=_io("image", image_shape),
            outputs=_io("features", ["batch", feature_dim]),
            derived_from="tests/bundle_factory.py" if prec == "fp32" else "onnx/trunk.fp32.onnx",
        )
    head_records = {}
    for name in heads:
        labels, weights = HEADS[name]
        rel = f"onnx/head.{name}.onnx"
        write_head(root / rel, *weights(feature_dim))
        files[rel] = file_record(
            root,
            rel,
            fmt="onnx",
            precision="fp32",
            role="head",
            head=name,
            inputs=_io("features", ["batch", feature_dim]),
            outputs=_io("logits", ["batch", len(labels)]),
            derived_from="tests/bundle_factory.py",
        )
        head_records[name] = {
            "labels": labels,
            "input": _io("features", ["batch", feature_dim])[0],
            "output": _io("logits", ["batch", len(labels)])[0],
        }
    variants = {}
    for i, prec in enumerate(precisions):
        trunk_rel = f"onnx/trunk.{prec}.onnx"
        variants[variant_name("onnx", prec)] = {
            "format": "onnx",
            "precision": prec,
            "trunk": trunk_rel,
            "heads": {h: f"onnx/head.{h}.onnx" for h in heads},
            "metrics": {
                "val_top1": 0.97 - 0.004 * i,
                "max_abs_diff": 1e-6,
                "top1_agreement": 1.0,
                "bytes": files[trunk_rel]["bytes"] + sum(files[f"onnx/head.{h}.onnx"]["bytes"] for h in heads),
            },
        }
    if merged:
        for prec in precisions:
            var = variants[variant_name("onnx", prec)]
            var["merged"] = {}
            for h in heads:
                rel = f"onnx/merged.{h}.{prec}.onnx"
                write_merged(root / var["trunk"], root / var["heads"][h], root / rel)
                files[rel] = file_record(
                    root,
                    rel,
                    fmt="onnx",
                    precision=prec,
                    role="merged",
                    head=h,
                    inputs=files[var["trunk"]]["inputs"],
                    outputs=files[var["heads"][h]]["outputs"],
                    derived_from=var["trunk"],
                )
                var["merged"][h] = rel
    if "openvino" in formats:
        _add_openvino_variants(root, files, variants, precisions, heads)
    if "onnx" not in formats:
        for prec in precisions:
            del variants[variant_name("onnx", prec)]
    manifest = new_manifest(
        created_utc="2024-01-01T00:00:00Z",
        backbone={"name": "tiny_onnx", "feature_dim": feature_dim, "weights": {"kind": "none"}},
        preprocessing={
            "input_size": input_size,
            "resize_size": input_size + 4,
            "interpolation": "bilinear",
            "mean": list(MEAN),
            "std": list(STD),
            "color_mode": "RGB",
            "layout": "NCHW",
            "dtype": "float32",
        },
        trunk={"input": _io("image", image_shape)[0], "output": _io("features", ["batch", feature_dim])[0]},
        heads=head_records,
        files=files,
        variants=variants,
        default_head=default_head,
    )
    write_manifest(root, manifest)
    return root


def write_colour_images(folder: Path, *, size: tuple[int, int] = (40, 48), corrupt: bool = False) -> dict[str, str]:
    """One flat-ish image per colour (``{path: colour}``); ``corrupt`` adds a broken .png too."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {}
    for name, rgb in COLOURS.items():
        arr = np.clip(np.array(rgb, dtype=np.float32) + rng.normal(0, 10, (*size, 3)), 0, 255).astype(np.uint8)
        path = folder / f"{name}.png"
        Image.fromarray(arr).save(path)
        out[str(path)] = name
    if corrupt:
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return out


def colour_folder(root: Path, colours: dict[str, tuple[int, int, int]], per_class: int, *, seed: int = 0) -> Path:
    """A labelled folder ROOT/<colour>/<i>.png: ``per_class`` noisy 40 px images of each colour."""
    rng = np.random.default_rng(seed)
    for name, rgb in colours.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shift = rng.normal(0, 12, 3)
            arr = np.clip(np.array(rgb) + shift + rng.normal(0, 8, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{i}.png")
    return root


def add_colour_stats(bundle: Path, tmp_path: Path, head: str = "colour") -> Path:
    """Store the colour head's statistics as export does (edgetl.device.head_stats.add_stats), from
    noisy red/green/blue images written under ``tmp_path``: the unfamiliar flag and learn --extend work."""
    from edgetl.core.preprocess import load_image, preprocess_batch
    from edgetl.device.bundle_edit import editing_head
    from edgetl.device.head_stats import add_stats
    from edgetl.device.runtime import open_bundle

    train = colour_folder(tmp_path / "stats-train", COLOURS, 12, seed=1)
    val = colour_folder(tmp_path / "stats-val", COLOURS, 6, seed=2)
    labels = list(COLOURS)
    paths = [str(p) for c in labels for p in sorted((train / c).iterdir())]
    y = np.array([labels.index(Path(p).parent.name) for p in paths])
    vpaths = [p for c in labels for p in sorted((val / c).iterdir())]
    yv = np.array([labels.index(p.parent.name) for p in vpaths])
    pp = open_bundle(bundle).preprocessing
    xv = preprocess_batch([load_image(p, pp) for p in vpaths], pp)
    with editing_head(bundle, head) as (tmp, m):
        add_stats(tmp, m, head, paths, y, xv, yv)
    return bundle
