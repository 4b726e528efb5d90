"""NCNN: pnnx-converted fp32 variant pinned to f32, merged graph, predict, export --add-to, bad files.

One export of the tiny run (onnx + ncnn, merged graphs) feeds most tests. pnnx and ncnn are real
(no doubles); without them the module is skipped, unless EDGETL_REQUIRE_NCNN=1 (CI), where a
missing library fails it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

if importlib.util.find_spec("pnnx") is None or importlib.util.find_spec("ncnn") is None:
    if os.environ.get("EDGETL_REQUIRE_NCNN") == "1":
        raise ImportError("EDGETL_REQUIRE_NCNN=1 but pnnx or ncnn is not installed: pip install 'edgetl[ncnn-export]'")
    pytest.skip("pnnx and ncnn are not installed (pip install 'edgetl[ncnn-export]')", allow_module_level=True)

from edgetl.cli import main
from edgetl.core.bundle import read_manifest, sha256_file, write_manifest
from edgetl.core.errors import BundleError, ExportError
from edgetl.device.backends import ncnn as backend
from edgetl.device.runtime import open_bundle
from edgetl.workstation.export import export_bundle, load_arrays, resolve_options
from edgetl.workstation.export.formats import ncnn as fmt
from edgetl.workstation.run import load_run
from tests.helpers import make_image_folder
from tests.run_factory import shared_export, shared_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return shared_run(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, dict]:
    return shared_export(tmp_path_factory, "ncnn", formats=("onnx", "ncnn"), merged=True)


@pytest.fixture(scope="module")
def x_val(run_dir) -> np.ndarray:
    run = load_run(run_dir)
    return load_arrays(run.val_samples, run.preprocessing)[0]


def _rehash(bundle: Path) -> None:
    """Record the files' current checksums, so that loading reaches the back-end's own checks."""
    m = read_manifest(bundle)
    for rel, rec in m["files"].items():
        rec["sha256"], rec["bytes"] = sha256_file(bundle / rel), (bundle / rel).stat().st_size
        for side, srec in (rec.get("extra_files") or {}).items():
            srec["sha256"], srec["bytes"] = sha256_file(bundle / side), (bundle / side).stat().st_size
    write_manifest(bundle, m)


def test_ncnn_fp32_passes_parity_pinned_to_f32(exported):
    out, doc = exported
    v = doc["variants"]["ncnn-fp32"]
    assert v["max_abs_diff"] <= 1e-3 and v["top1_agreement"] == 1.0 and v["n"] == 12
    assert v["inference_precision"] == "f32" and v["merged_max_abs_diff"] <= 1e-3
    m = read_manifest(out)
    var = m["variants"]["ncnn-fp32"]
    assert var["inference_precision"] == "f32"
    assert var["trunk"] == "ncnn/trunk.fp32.param" and var["heads"] == {"default": "ncnn/head.default.param"}
    assert var["merged"] == {"default": "ncnn/merged.default.fp32.param"}
    assert m["files"]["ncnn/trunk.fp32.param"]["extra_files"].keys() == {"ncnn/trunk.fp32.bin"}
    assert m["versions"]["pnnx"] and m["versions"]["ncnn"]
    # Only .param + .bin ship (pnnx's side files stay in the scratch folder).
    assert sorted(p.name for p in (out / "ncnn").iterdir()) == sorted(
        f"{stem}.{ext}" for stem in ("trunk.fp32", "head.default", "merged.default.fp32") for ext in ("param", "bin")
    )
    # fp32 weights (pnnx would store fp16 by default): the tiny trunk has 8*27 + 16*72 + 16*144 weights.
    assert (out / "ncnn/trunk.fp32.bin").stat().st_size >= 4 * (8 * 27 + 16 * 72 + 16 * 144)
    assert "0=32 1=32 2=3" in (out / "ncnn/trunk.fp32.param").read_text()


def test_ncnn_matches_onnxruntime_with_the_options_pinned(exported, x_val):
    out, _ = exported
    bundle = open_bundle(out)
    ort = bundle.load(runtime="onnxruntime")
    nc = bundle.load(runtime="ncnn", threads=2)
    info = nc.runtime_info
    assert info["inference_precision"] == "f32" and info["options"]["num_threads"] == 2
    assert not any(info["options"][f] for f in ("use_fp16_storage", "use_fp16_arithmetic", "use_bf16_storage"))
    a, b = ort.logits(x_val)["default"], nc.logits(x_val)["default"]
    assert np.abs(a - b).max() < 1e-4
    for n in (1, 3):  # NCNN runs one image at a time: any batch size works
        assert np.abs(ort.features(x_val[:n]) - nc.features(x_val[:n])).max() < 1e-4
    merged = bundle.load(runtime="ncnn", merged=True)
    np.testing.assert_allclose(merged.logits(x_val)["default"], b, atol=1e-5)


def test_ran_precision_reads_the_options():
    assert backend.ran_precision(dict.fromkeys(backend.PINNED["f32"], False)) == "f32"
    assert backend.ran_precision({"use_fp16_storage": True}) == "f16"  # NCNN's default (ARM, x86 with F16C)
    assert backend.ran_precision({"use_bf16_storage": True}) == "bf16"


def test_predict_cli_gives_onnxruntime_labels(exported, run_dir):
    out, _ = exported
    images = [s.path for s in load_run(run_dir).val_samples]
    labels = {}
    for runtime in ("onnxruntime", "ncnn"):
        result = CliRunner().invoke(main, ["predict", str(out), *images, "--runtime", runtime, "--json"])
        assert result.exit_code == 0, result.output
        doc = json.loads(result.stdout)
        labels[runtime] = [r["label"] for r in doc["results"]]
        if runtime == "ncnn":
            assert doc["runtime_info"]["inference_precision"] == "f32"
    assert labels["ncnn"] == labels["onnxruntime"] and len(labels["ncnn"]) == 12


def test_export_output_stays_off_stdout_and_pnnx_files_stay_out(run_dir, tmp_path, capfd):
    doc = export_bundle(run_dir, tmp_path / "b", resolve_options("ncnn"), progress=False)
    assert capfd.readouterr().out == ""
    assert set(doc["variants"]) == {"ncnn-fp32"}
    assert {p.name for p in (tmp_path / "b").iterdir()} == {"manifest.json", "ncnn", "stats"}


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p, b: p.write_text("hello\n"), "is not an NCNN .param text file"),
        (lambda p, b: p.write_text(p.read_text().replace("0=32 1=32 2=3", "0=64 1=64 2=3")), "takes [?, 3, 64, 64]"),
        (lambda p, b: p.write_text(p.read_text().replace(" 0=32 1=32 2=3", "")), "declares no shape"),
        (lambda p, b: p.write_text(p.read_text().replace("Convolution ", "Convolutionx", 1)), "unknown layer"),
        (lambda p, b: b.write_bytes(b.read_bytes()[:1000]), "the weights do not match the .param"),
    ],
    ids=["not-param", "other-input-size", "no-input-shape", "unknown-layer", "truncated-bin"],
)
def test_a_bad_trunk_is_refused_with_one_line(exported, run_dir, tmp_path, edit, message):
    out = shutil.copytree(exported[0], tmp_path / "b")
    edit(out / "ncnn/trunk.fp32.param", out / "ncnn/trunk.fp32.bin")
    _rehash(out)
    with pytest.raises(BundleError, match=message.replace("[", r"\[").replace("?", r"\?")) as err:
        open_bundle(out).load(runtime="ncnn")
    assert "\n" not in str(err.value)
    image = load_run(run_dir).val_samples[0].path
    result = CliRunner().invoke(main, ["predict", str(out), str(image), "--runtime", "ncnn"])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_a_head_of_another_width_is_refused(exported, tmp_path):
    out = shutil.copytree(exported[0], tmp_path / "b")
    head = out / "ncnn/head.default.param"
    head.write_text(head.read_text().replace("0=16", "0=8", 1))  # the Input layer: 8 features, not 16
    _rehash(out)
    with pytest.raises(BundleError, match="takes 8 features but the trunk gives 16"):
        open_bundle(out).load(runtime="ncnn")


def test_conversion_failure_names_the_op(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("NonZero", ["x"], ["y"], name="where_is_it")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [2, None])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "m.onnx")
    with pytest.raises(ExportError, match=r"op NonZero \(layer .*\) has no NCNN layer") as err:
        fmt.convert_onnx(tmp_path / "m.onnx", tmp_path / "m.param", tmp_path / "work")
    assert "\n" not in str(err.value) and not (tmp_path / "m.param").exists()
    # A graph pnnx gives up on (here it crashes: ONNX Runtime, inside pnnx, refuses a TopK with one
    # output): one line with pnnx's own complaint.
    k = helper.make_tensor("k", TensorProto.INT64, [1], [2])
    node = helper.make_node("TopK", ["x", "k"], ["y"], name="top")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        initializer=[k],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "t.onnx")
    with pytest.raises(ExportError, match=r"pnnx could not convert t.onnx to NCNN \(.*\): .*TopK") as err:
        fmt.convert_onnx(tmp_path / "t.onnx", tmp_path / "t.param", tmp_path / "work2")
    assert "\n" not in str(err.value)


def test_export_refuses_a_variant_that_does_not_run_f32(run_dir, tmp_path, monkeypatch):
    """The check reads what the back-end's options give: NCNN's defaults (fp16 storage) fail the pin."""
    import dataclasses

    from edgetl.device.backends import BACKENDS

    real = BACKENDS["ncnn"].loader

    def defaults(path, **kw):
        model = real(path, **kw)
        model.runtime_info = {**model.runtime_info, "inference_precision": "f16"}
        return model

    monkeypatch.setitem(BACKENDS, "ncnn", dataclasses.replace(BACKENDS["ncnn"], loader=defaults))
    with pytest.raises(ExportError, match="ran f16 although f32 was pinned"):
        export_bundle(run_dir, tmp_path / "b", resolve_options("ncnn"), progress=False)
    assert not (tmp_path / "b").exists()


def test_add_to_puts_a_head_on_the_ncnn_variant(exported, tmp_path):
    bundle = shutil.copytree(exported[0], tmp_path / "b")
    data2 = make_image_folder(tmp_path / "task2", classes=("cyan", "magenta", "yellow"), per_class=12, seed=5)
    args = ["finetune", str(data2), "--out", str(tmp_path / "run2"), "--trunk-from", str(bundle)]
    result = CliRunner().invoke(main, [*args, "--epochs", "30", "--lr", "0.05", "--no-progress", "--json"])
    assert result.exit_code == 0, result.output
    head_run = json.loads(result.stdout)["results"][0]["run_dir"]
    result = CliRunner().invoke(main, ["export", head_run, "--add-to", str(bundle), "--head", "tint", "--no-progress"])
    assert result.exit_code == 0, result.output
    m = read_manifest(bundle)
    var = m["variants"]["ncnn-fp32"]
    assert var["heads"]["tint"] == "ncnn/head.tint.param" and var["merged"]["tint"] == "ncnn/merged.tint.fp32.param"
    metrics = m["heads"]["tint"]["metrics"]["ncnn-fp32"]
    assert metrics["max_abs_diff"] <= 1e-3 and metrics["inference_precision"] == "f32"
    assert metrics["merged_max_abs_diff"] <= 1e-3
    x = load_arrays(load_run(head_run).val_samples, open_bundle(bundle).preprocessing)[0]
    b = open_bundle(bundle)
    a = b.load(runtime="onnxruntime", heads="all").logits(x)
    n = b.load(runtime="ncnn", heads="all").logits(x)
    for h in ("default", "tint"):
        np.testing.assert_array_equal(a[h].argmax(1), n[h].argmax(1))


def test_write_head_writes_param_and_bin(exported, tmp_path):
    fmt.FORMAT.write_head(exported[0] / "onnx/head.default.onnx", tmp_path / "h.param")
    assert (tmp_path / "h.bin").read_bytes() == (exported[0] / "ncnn/head.default.bin").read_bytes()
    assert (tmp_path / "h.param").read_text() == (exported[0] / "ncnn/head.default.param").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.bin", "h.param"]


def test_backend_runs_without_torch(exported):
    code = textwrap.dedent(
        f"""
        import sys
        class BlockTorch:
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] in ("torch", "torchvision", "pnnx"):
                    raise ImportError(name + " is blocked")
        sys.meta_path.insert(0, BlockTorch())
        import numpy as np
        from edgetl.device.runtime import open_bundle
        p = open_bundle({str(exported[0])!r}).load(runtime="ncnn")
        s = p.bundle.preprocessing.input_size
        print(p.logits(np.zeros((2, 3, s, s), np.float32))["default"].shape, p.runtime_info["inference_precision"])
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(2, 3) f32"


def test_backend_matches_onnxruntime_at_an_odd_input_size(tmp_path):
    """33 px: NCNN's channel step is 16-byte aligned, numpy's is not; the binding must bridge it."""
    import torch

    from edgetl.workstation.export.common import ort_model
    from edgetl.workstation.export.formats.onnx import export_onnx

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 5, 3, 2, 1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    ).eval()
    export_onnx(net, torch.zeros(2, 3, 33, 33), tmp_path / "t.onnx", input_name="image", output_name="features")
    fmt.convert_onnx(tmp_path / "t.onnx", tmp_path / "t.param", tmp_path / "work")
    model = backend.load(tmp_path / "t.param", threads=1)
    assert model.signature == {"inputs": [([None, 3, 33, 33], "float32")], "outputs": [([None, 5], "float32")]}
    x = np.random.default_rng(0).standard_normal((3, 3, 33, 33)).astype(np.float32)
    np.testing.assert_allclose(model(x), ort_model(tmp_path / "t.onnx")(x), atol=1e-5)
    with pytest.raises(ValueError, match="takes"):
        model(x[:, :, :32, :32])
