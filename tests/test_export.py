"""`edgetl export`: bundle layout and manifest, parity and int8 bars, atomicity, the CLI.

The module's bundle is the default export (ONNX and OpenVINO, fp32 and int8) of a tiny run; the
OpenVINO specifics are in test_openvino.py, profiles in test_export_profiles.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import edgetl.workstation.export.int8 as int8_mod
import edgetl.workstation.export.pipeline as pipeline_mod
from edgetl.cli import main
from edgetl.core.bundle import read_manifest, sha256_file, validate_manifest, verify_files
from edgetl.core.errors import ConfigError, ExportError, OutputExistsError, RunError
from edgetl.device.runtime import open_bundle
from edgetl.workstation.export import ONNX_OPSET, check_options, export_bundle, resolve_options, select_calibration
from edgetl.workstation.export.common import images_sha256, weights_lineage
from edgetl.workstation.run import load_run
from tests.run_factory import shared_export, shared_run
from tests.schemas import validate_document

# stats/default.npz: the head's feature statistics (learn --extend, the unfamiliar flag; docs/on-device.md)
ONNX_LAYOUT = {
    "manifest.json",
    "onnx/trunk.fp32.onnx",
    "onnx/trunk.int8.onnx",
    "onnx/head.default.onnx",
    "stats/default.npz",
}
LAYOUT = ONNX_LAYOUT | {
    f"openvino/{name}.{ext}" for name in ("trunk.fp32", "trunk.int8", "head.default") for ext in ("xml", "bin")
}
VARIANTS = {"onnx-fp32", "onnx-int8", "openvino-fp32", "openvino-int8"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return shared_run(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, dict]:
    return shared_export(tmp_path_factory, "default")


def files_under(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    # Neither temporary folders nor output locks (.NAME.lock) may be left behind.
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_bundle_layout_and_manifest_validate(exported, run_dir):
    out, doc = exported
    assert doc["bundle"] == str(out) and set(doc["variants"]) == VARIANTS
    assert files_under(out) == LAYOUT
    m = read_manifest(out)
    verify_files(out, m)
    assert set(m["files"]) == {p for p in LAYOUT if p.endswith((".onnx", ".xml", ".npz"))}
    assert m["heads"]["default"]["stats"]["trunk_variant"] == "onnx-fp32"
    assert m["heads"]["default"]["origin"]["where"] == "workstation"
    run = load_run(run_dir)
    weights = {"kind": "none", "file": None, "sha256": None, "origin": None}  # the run's, without its path
    assert run.config["weights"] == {"kind": "none", "path": None, "sha256": None, "origin": None}
    assert m["backbone"] == {"name": "tiny_test", "feature_dim": 16, "features": "last", "weights": weights}
    assert m["preprocessing"] == run.preprocessing.to_dict()
    assert m["trunk"]["input"] == {"name": "image", "shape": ["batch", 3, 32, 32], "dtype": "float32"}
    assert m["trunk"]["output"] == {"name": "features", "shape": ["batch", 16], "dtype": "float32"}
    head = m["heads"]["default"]
    assert head["labels"] == run.labels and head["output"]["shape"] == ["batch", 3]
    assert head["run"] == {"name": run_dir.name, "strategy": "feature-extraction", "val_top1": run.metrics["val_top1"]}
    hashes = sorted(sha256_file(s.path)[:16] for s in run.train_samples)
    assert head["training_data"] == {
        "folder": "images",
        "classes": 3,
        "train_images": 36,
        "val_images": 12,
        "train_sha256_prefixes": "".join(hashes),
    }
    assert m["default_head"] == "default"
    f = m["files"]
    assert f["onnx/trunk.fp32.onnx"]["derived_from"] == f"run:{run_dir.name}/model.pt"  # a name, not a path
    assert f["onnx/trunk.int8.onnx"]["derived_from"] == "onnx/trunk.fp32.onnx"
    assert (f["onnx/head.default.onnx"]["role"], f["onnx/head.default.onnx"]["head"]) == ("head", "default")
    assert (f["onnx/trunk.int8.onnx"]["precision"], f["onnx/trunk.int8.onnx"]["role"]) == ("int8", "trunk")
    assert f["openvino/trunk.fp32.xml"]["derived_from"] == "onnx/trunk.fp32.onnx"
    assert f["openvino/trunk.int8.xml"]["derived_from"] == "openvino/trunk.fp32.xml"
    assert set(f["openvino/trunk.fp32.xml"]["extra_files"]) == {"openvino/trunk.fp32.bin"}
    for v in m["variants"].values():
        fmt = v["format"]
        head = f"{fmt}/head.default.{'onnx' if fmt == 'onnx' else 'xml'}"
        assert v["heads"] == {"default": head}  # the head stays fp32 in every variant
        assert v.get("inference_precision") == (None if fmt == "onnx" else "f32")
    assert set(m["heads"]["default"]["metrics"]) == VARIANTS
    assert m["export"]["formats"] == ["onnx", "openvino"] and m["export"]["precisions"] == ["fp32", "int8"]
    assert set(m["versions"]) == {"edgetl", "torch", "torchvision", "onnx", "onnxruntime", "openvino", "nncf"}


def test_manifest_holds_no_workstation_path(exported, run_dir, tmp_path_factory):
    """A bundle goes to every device: names, counts and hashes, never where things live here."""
    out, _ = exported
    text = (out / "manifest.json").read_text()
    for private in {str(tmp_path_factory.getbasetemp()), str(run_dir.resolve()), str(Path.home()), "/tmp/"}:
        if private not in ("", "/"):
            assert private not in text, private
    assert "/model.pt" in text and "run:run/model.pt" in text  # lineage is still there, by name
    user_file = {"kind": "file", "path": "/home/me/w/x-1234abcd.pth", "sha256": "12" * 32, "origin": "user-file"}
    assert weights_lineage(user_file) == {
        "kind": "file",
        "file": "x-1234abcd.pth",
        "sha256": "12" * 32,
        "origin": "user-file",
    }


@pytest.mark.parametrize("variant", ["onnx-fp32", "openvino-fp32"])
def test_fp32_parity_is_measured_and_recorded(exported, variant):
    out, doc = exported
    fp32 = read_manifest(out)["variants"][variant]["metrics"]
    assert fp32 == doc["variants"][variant]
    assert fp32["max_abs_diff"] <= 1e-3 and fp32["top1_agreement"] == 1.0
    assert fp32["n"] == 12 and 0.0 <= fp32["val_top1"] <= 1.0
    assert set(fp32) >= {"val_top1", "max_abs_diff", "top1_agreement", "bytes"}
    assert fp32["features_sqnr_db"] is None or fp32["features_sqnr_db"] > 60  # the trunk alone matches too


def test_int8_variant_is_smaller_and_reports_its_drop(exported, run_dir):
    out, doc = exported
    m = read_manifest(out)
    fp32, int8 = doc["variants"]["onnx-fp32"], doc["variants"]["onnx-int8"]
    assert int8 == m["variants"]["onnx-int8"]["metrics"]
    assert m["files"]["onnx/trunk.int8.onnx"]["bytes"] < m["files"]["onnx/trunk.fp32.onnx"]["bytes"]
    assert int8["bytes"] < fp32["bytes"]
    assert int8["top1_drop_pp"] == pytest.approx((fp32["val_top1"] - int8["val_top1"]) * 100, abs=1e-3)
    assert int8["top1_drop_pp"] <= 1.0 and {"max_abs_diff", "top1_agreement", "n"} <= set(int8)
    assert 0 < int8["features_sqnr_db"] < (fp32["features_sqnr_db"] or float("inf"))
    q = m["variants"]["onnx-int8"]["quantization"]
    assert q["method"] == "onnxruntime static QDQ" and isinstance(q["per_channel"], bool)
    calibration = select_calibration(load_run(run_dir).train_samples, 200)
    assert q["calibration"]["method"] in ("minmax", "entropy", "percentile")
    assert q["calibration"]["size"] == len(calibration) == 36  # all 36 training images (< 200)
    assert q["calibration"]["images_sha256"] == images_sha256(calibration) and "images" not in q["calibration"]
    assert q["attempts"] and q["attempts"][-1]["passed"] and q["attempts"][-1]["val_top1"] == int8["val_top1"]
    assert q["excluded_nodes"] == q["attempts"][-1]["excluded_nodes"]
    ops = {n.op_type for n in onnx.load(str(out / "onnx/trunk.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert "QuantizeLinear" not in {n.op_type for n in onnx.load(str(out / "onnx/head.default.onnx")).graph.node}


@pytest.mark.parametrize(
    "rel, io",
    [
        ("onnx/trunk.fp32.onnx", ("image", "features")),
        ("onnx/trunk.int8.onnx", ("image", "features")),
        ("onnx/head.default.onnx", ("features", "logits")),
    ],
)
def test_graphs_have_opset_and_a_dynamic_batch(exported, rel, io):
    out, _ = exported
    model = onnx.load(str(out / rel))
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= ONNX_OPSET >= 17
    (inp,), (outp,) = model.graph.input, model.graph.output
    assert (inp.name, outp.name) == io
    assert inp.type.tensor_type.shape.dim[0].dim_param == "batch"
    session = ort.InferenceSession(str(out / rel), providers=["CPUExecutionProvider"])
    shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
    for batch in (1, 5):
        x = np.zeros([batch, *shape[1:]], dtype=np.float32)
        assert session.run(None, {io[0]: x})[0].shape[0] == batch


def test_bundle_predicts_through_the_runtime(exported, run_dir):
    out, _ = exported
    run = load_run(run_dir)
    sample = run.val_samples[0]
    for runtime in ("onnxruntime", "openvino"):
        for precision in ("fp32", "int8"):
            record = open_bundle(out).load(runtime=runtime, precision=precision).predict([sample.path])[0]
            assert record["label"] in run.labels and 0.0 < record["score"] <= 1.0


def test_failure_mid_export_leaves_no_bundle_and_no_temp_dir(run_dir, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("injected failure in the int8 step")

    monkeypatch.setattr(int8_mod, "search_int8", broken)
    with pytest.raises(RuntimeError, match="injected"):
        export_bundle(run_dir, tmp_path / "b", resolve_options(formats=("onnx",)), progress=False)
    assert not (tmp_path / "b").exists() and leftovers(tmp_path) == []


def test_existing_bundle_is_refused_untouched_and_replaced_only_with_force(run_dir, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(OutputExistsError, match="--force"):
        export_bundle(run_dir, out, resolve_options(formats=("onnx",), precisions=("fp32",)), progress=False)
    assert (out / "keep.txt").read_text() == "old"
    # --force replaces a bundle only: a folder without manifest.json is someone's, and stays.
    with pytest.raises(OutputExistsError, match="only a bundle folder"):
        export_bundle(
            run_dir, out, resolve_options(formats=("onnx",), precisions=("fp32",)), force=True, progress=False
        )
    assert (out / "keep.txt").read_text() == "old"
    out = tmp_path / "b2"
    export_bundle(run_dir, out, resolve_options(formats=("onnx",), precisions=("fp32",)), progress=False)
    (out / "extra.txt").write_text("from the old bundle")
    export_bundle(run_dir, out, resolve_options(formats=("onnx",), precisions=("fp32",)), force=True, progress=False)
    assert files_under(out) == {"manifest.json", "onnx/trunk.fp32.onnx", "onnx/head.default.onnx", "stats/default.npz"}
    assert leftovers(tmp_path) == []


def test_int8_over_max_drop_fails_naming_the_variant_and_figures(run_dir, tmp_path):
    with pytest.raises(ExportError) as err:
        export_bundle(run_dir, tmp_path / "b", resolve_options(formats=("onnx",), max_drop=-1.0), progress=False)
    message = str(err.value)
    assert "onnx-int8" in message and "--max-drop -1 pp" in message and " pp validation top-1" in message
    assert "->" in message and "12 images" in message
    assert not (tmp_path / "b").exists() and leftovers(tmp_path) == []


def test_fp32_parity_failure_fails_naming_the_variant(run_dir, tmp_path, monkeypatch):
    real = pipeline_mod.torch_logits
    monkeypatch.setattr(pipeline_mod, "torch_logits", lambda model, x: real(model, x) + 0.01)
    with pytest.raises(ExportError, match=r"onnx-fp32 .*max abs logit diff 1\.00e-02"):
        export_bundle(run_dir, tmp_path / "b", resolve_options(formats=("onnx",)), progress=False)
    assert not (tmp_path / "b").exists()


def test_int8_only_bundle_ships_no_fp32_trunk(run_dir, tmp_path):
    doc = export_bundle(
        run_dir, tmp_path / "b", resolve_options(formats=("onnx",), precisions=("int8",)), progress=False
    )
    assert set(doc["variants"]) == {"onnx-int8"} and "top1_drop_pp" in doc["variants"]["onnx-int8"]
    m = read_manifest(tmp_path / "b")
    assert set(m["files"]) == {"onnx/trunk.int8.onnx", "onnx/head.default.onnx", "stats/default.npz"}
    assert m["heads"]["default"]["stats"]["trunk_variant"] == "onnx-int8"  # the statistics of the trunk it ships
    assert m["files"]["onnx/trunk.int8.onnx"]["derived_from"] == f"run:{run_dir.name}/model.pt"
    assert files_under(tmp_path / "b") == {"manifest.json", *m["files"]}


@pytest.mark.parametrize(
    "formats, precisions, calib, match",
    [
        (("tflite",), ("fp32",), 200, "unknown --model-format 'tflite'"),
        (("onnx",), ("fp8",), 200, "unsupported --precision 'fp8'"),
        (
            ("onnx",),
            ("bf16",),
            200,
            "--precision bf16 is not available for --model-format onnx; it needs --model-format openvino",
        ),
        (("onnx",), (), 200, "no --precision"),
        (("onnx",), ("int8",), 0, "--calib-size must be"),
    ],
)
def test_bad_options_are_config_errors(formats, precisions, calib, match):
    with pytest.raises(ConfigError, match=match):
        check_options(formats, precisions, calib)


def test_bad_options_fail_before_any_work(tmp_path):
    with pytest.raises(ConfigError):
        export_bundle(tmp_path / "no-run", tmp_path / "b", resolve_options(formats=("onnx",), precisions=("bf16",)))
    with pytest.raises(RunError, match="does not exist"):
        export_bundle(tmp_path / "no-run", tmp_path / "b")


def test_manifest_validation_catches_a_tampered_bundle(exported):
    out, _ = exported
    m = json.loads((out / "manifest.json").read_text())
    validate_manifest(m, out)
    m["variants"]["onnx-int8"]["trunk"] = "onnx/missing.onnx"
    with pytest.raises(Exception, match="trunk file not listed"):
        validate_manifest(m, out)


# --- CLI ----------------------------------------------------------------------------------------


def cli(*args):
    return CliRunner().invoke(main, ["export", *[str(a) for a in args]])


def test_cli_json_document(run_dir, tmp_path):
    args = ("--model-format", "onnx", "--precision", "fp32", "--no-progress", "--json")
    result = cli(run_dir, "--out", tmp_path / "b", *args)
    assert result.exit_code == 0, result.output
    doc = validate_document(result.stdout, "export")
    assert (doc["bundle"], doc["run"], doc["head"]) == (str(tmp_path / "b"), str(run_dir), "default")
    [fp32] = doc["results"]
    assert (fp32["name"], fp32["format"], fp32["precision"], fp32["runtime"]) == (
        "onnx-fp32",
        "onnx",
        "fp32",
        "onnxruntime",
    )
    assert fp32["max_abs_diff"] <= 1e-3 and fp32["top1_agreement"] == 1.0 and fp32["top1_drop_pp"] is None
    models = read_manifest(tmp_path / "b")["files"].values()
    assert fp32["bytes"] == sum(f["bytes"] for f in models if f["role"] != "stats")


def test_cli_table_and_help(run_dir, tmp_path):
    args = ("--model-format", "onnx", "--calib-size", "8", "--no-progress", "--format", "table")
    result = cli(run_dir, "--out", tmp_path / "b", *args)
    assert result.exit_code == 0, result.output
    assert "onnx-fp32" in result.stdout and "onnx-int8" in result.stdout and "drop" in result.stdout
    help_text = cli("--help").output
    assert "Example:" in help_text and "--max-drop" in help_text and "--calib-size" in help_text
    assert read_manifest(tmp_path / "b")["variants"]["onnx-int8"]["quantization"]["calibration"]["size"] == 8


@pytest.mark.parametrize(
    "extra, pattern, code",
    [
        (["--model-format", "tflite"], "'tflite' is not one of onnx, openvino", 2),
        (["--precision", "fp8"], "'fp8' is not one of fp32, fp16, bf16, int8", 2),
        (["--model-format", "onnx", "--max-drop", "-1"], "onnx-int8", 1),  # a failed export, not a usage error
        (["--head", "x"], "--head applies to a head added with --add-to", 2),
        (["--export-profile", "nope"], "unknown export-profile 'nope'", 2),
    ],
)
def test_cli_user_errors_are_one_line(run_dir, tmp_path, extra, pattern, code):
    result = cli(run_dir, "--out", tmp_path / "b", "--no-progress", *extra)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and pattern in errors[0], result.stderr
    assert not (tmp_path / "b").exists()


def test_cli_refuses_an_existing_bundle(exported, run_dir):
    out, _ = exported
    before = (out / "manifest.json").read_bytes()
    result = cli(run_dir, "--out", out, "--no-progress")
    assert result.exit_code == 1 and "already exists" in result.stderr
    assert (out / "manifest.json").read_bytes() == before


# --- the shared checks and the format plug-ins --------------------------------------------------


@pytest.mark.parametrize(
    ("precision", "metrics"),
    [
        ("fp32", {"val_top1": 1.0, "max_abs_diff": float("nan"), "top1_agreement": 1.0, "n": 4}),
        ("fp32", {"val_top1": float("nan"), "max_abs_diff": 0.0, "top1_agreement": 1.0, "n": 4}),
        ("int8", {"val_top1": float("nan"), "max_abs_diff": 0.1, "top1_agreement": 1.0, "n": 4}),
        ("int8", {"val_top1": 0.9, "max_abs_diff": float("nan"), "top1_agreement": 1.0, "n": 4}),
    ],
)
def test_nan_fails_every_gate(precision, metrics):
    from edgetl.workstation.export.checks import check_bar

    var = {"format": "onnx", "precision": precision}
    with pytest.raises(ExportError, match="NaN"):
        check_bar("onnx-x", var, metrics, 0.9, max_drop=100.0)
    with pytest.raises(ExportError):  # a NaN reference top-1 cannot pass a drop bar either
        check_bar(
            "onnx-int8",
            {"format": "onnx", "precision": "int8"},
            {**metrics, "max_abs_diff": 0.0, "val_top1": 0.9},
            float("nan"),
            max_drop=100.0,
        )


def test_nan_merged_graph_fails_and_bf16_merged_gets_the_variants_bar():
    from edgetl.workstation.export.checks import check_merged

    y = np.array([0, 1, 0, 1])
    split = np.eye(2)[y].astype(np.float32)
    ref = split.astype(np.float64)
    nan = np.full_like(split, np.nan)
    with pytest.raises(ExportError, match="differs from trunk"):
        check_merged("onnx-fp32", {"precision": "fp32"}, nan, split, what="m", reference=(ref, y, None), max_drop=1.0)
    bf16 = {"format": "openvino", "precision": "bf16", "inference_precision": "bf16"}
    # bf16: small differences are fine, a lost label is not (the variant's own accuracy bar).
    near = check_merged("openvino-bf16", bf16, split + 0.01, split, what="m", reference=(ref, y, 1.0), max_drop=1.0)
    assert near["merged_val_top1"] == 1.0
    wrong = split[::-1].copy()
    with pytest.raises(ExportError, match=r"openvino-bf16 \(merged graph\) loses"):
        check_merged("openvino-bf16", bf16, wrong, split, what="m", reference=(ref, y, 1.0), max_drop=1.0)


def test_precision_pin_is_checked():
    from edgetl.workstation.export.checks import check_precision_pin

    assert check_precision_pin("onnx-fp32", {"precision": "fp32"}, {}) is None
    assert (
        check_precision_pin(
            "openvino-fp32", {"precision": "fp32", "inference_precision": "f32"}, {"inference_precision": "f32"}
        )
        == "f32"
    )
    with pytest.raises(ExportError, match="OpenVINO ran bf16 although f32 was pinned"):
        check_precision_pin(
            "openvino-fp32", {"precision": "fp32", "inference_precision": "f32"}, {"inference_precision": "bf16"}
        )


def test_format_registry_matches_the_format_table():
    from edgetl.core.formats import FORMATS
    from edgetl.workstation.export import formats

    assert set(formats.registry()) == set(FORMATS)
    with pytest.raises(ValueError, match="registered twice"):
        formats.register(formats.get("onnx"))


@pytest.mark.parametrize("name", sorted(__import__("edgetl.core.formats").core.formats.FORMATS))
def test_each_format_plugin_implements_the_protocol(name):
    from edgetl.core.formats import FORMATS
    from edgetl.workstation.export import formats

    plugin = formats.get(name)
    assert plugin.name == name and name in FORMATS
    for method in ("write", "quantize", "write_head", "merge"):
        assert callable(getattr(plugin, method))
