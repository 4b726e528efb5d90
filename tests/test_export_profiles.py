"""Export profiles (export/*.yaml): shipped ones are valid, unknown keys fail, options override them;
and the options of `edgetl export` (names, deprecated spellings, usage errors, output formats)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from click.testing import CliRunner

import edgetl.workstation.export as export_pkg
from edgetl.cli import main
from edgetl.core import shipped as profiles
from edgetl.core.errors import ConfigError
from edgetl.workstation.export import ExportProfile, check_options, load_profile, resolve_options
from tests.schemas import validate_document

SHIPPED = {"default", "onnx-int8", "openvino-int8", "fp32-only", "all", "litert", "ncnn", "pi"}


def test_shipped_profiles_are_valid_and_documented():
    assert set(profiles.list_shipped("export-profile")) >= SHIPPED
    for name in SHIPPED:
        values, path = load_profile(name)
        assert "description" in profiles.read_yaml(path, "export-profile"), name
        options = check_options(**values)
        assert options.formats and options.precisions


@pytest.mark.parametrize(
    "name, formats, precisions",
    [
        ("default", ("onnx", "openvino"), ("fp32", "int8")),
        ("onnx-int8", ("onnx",), ("int8",)),
        ("openvino-int8", ("openvino",), ("int8",)),
        ("fp32-only", ("onnx", "openvino"), ("fp32",)),
        ("all", ("onnx", "openvino", "litert", "ncnn"), ("fp32", "fp16", "bf16", "int8")),
        ("litert", ("litert",), ("fp32", "int8")),
        ("ncnn", ("ncnn",), ("fp32",)),
        ("pi", ("onnx", "litert", "ncnn"), ("fp32", "int8")),
    ],
)
def test_profiles_say_what_they_export(name, formats, precisions):
    options = resolve_options(name)
    assert (options.formats, options.precisions) == (formats, precisions)
    assert options.merged is (name == "all")


def test_options_override_the_profile_and_a_named_format_is_required(monkeypatch):
    options = resolve_options("all", precisions=["fp32"], calib_size=16, max_drop=0.5, merged=False)
    assert (options.precisions, options.calib_size, options.max_drop, options.merged) == (("fp32",), 16, 0.5, False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    # default: everything available -> OpenVINO is left out with a warning; named: it is an error.
    assert resolve_options().formats == ("onnx",)
    with pytest.raises(
        ConfigError,
        match=r"--model-format openvino needs openvino, which is not installed \(pip install 'edgetl\[openvino\]'\)",
    ):
        resolve_options(formats=["onnx", "openvino"])
    with pytest.raises(ConfigError, match="--model-format openvino needs openvino"):
        resolve_options("openvino-int8")


@pytest.mark.parametrize(
    "module, fmt, extra",
    [
        ("litert_torch", "litert", "litert-export"),
        ("pnnx", "ncnn", "ncnn-export"),
        ("torchao", "litert", "litert-export"),
    ],
)
def test_pi_profile_leaves_out_a_missing_converter_and_a_named_one_is_required(monkeypatch, caplog, module, fmt, extra):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    options = resolve_options("pi")  # skip_unavailable: the format is left out with a warning naming the extra
    assert fmt not in options.formats and "onnx" in options.formats
    assert any(f"pip install 'edgetl[{extra}]'" in r.getMessage() for r in caplog.records)
    with pytest.raises(ConfigError, match=rf"--model-format {fmt} needs {module}, which is not installed"):
        resolve_options("pi", formats=["onnx", fmt])


def test_profile_files_by_path_with_unknown_keys_and_bad_values(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text("description: mine\nformats: onnx\nprecisions: [fp32, fp16]\nmax_drop: 0.25\n")
    assert resolve_options(str(good)) == ExportProfile(("onnx",), ("fp32", "fp16"), 200, 0.25, False, False)
    bad = tmp_path / "bad.yaml"
    bad.write_text("formats: [onnx]\ncalib: 10\n")
    with pytest.raises(ConfigError, match="unknown key 'calib'"):
        resolve_options(str(bad))
    bad.write_text("merged: yes please\n")
    with pytest.raises(ConfigError, match="merged must be true or false"):
        resolve_options(str(bad))
    bad.write_text("calib_size: 0\n")
    with pytest.raises(ConfigError, match="--calib-size must be"):
        resolve_options(str(bad))
    with pytest.raises(ConfigError, match="unknown export-profile 'nope'; choose one of: .*default"):
        resolve_options("nope")


def test_cli_profile_errors_are_one_line_usage_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("precision: [int8]\n")
    result = CliRunner().invoke(
        main, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "b"), "--export-profile", str(bad)]
    )
    assert result.exit_code == 2 and "unknown key 'precision'" in result.stderr and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["export", str(tmp_path / "run")])
    assert result.exit_code == 2 and "export needs --out BUNDLE" in result.stderr


# --- the command line, on a stand-in export (the real one: tests/test_export.py) --------------------

FAKE_VARIANTS = {
    "onnx-fp32": {
        "val_top1": 0.75,
        "max_abs_diff": 1.5e-6,
        "top1_agreement": 1.0,
        "n": 12,
        "bytes": 40_000,
        "features_sqnr_db": 120.5,
    },
    "onnx-int8": {
        "val_top1": 0.7,
        "top1_drop_pp": 5.0,
        "max_abs_diff": 0.25,
        "top1_agreement": 0.9,
        "n": 12,
        "bytes": 12_000,
        "features_sqnr_db": 30.0,
        "speedup_vs_fp32": 0.93,
    },
    "openvino-bf16": {
        "val_top1": 0.75,
        "top1_drop_pp": 0.0,
        "max_abs_diff": 0.01,
        "top1_agreement": 1.0,
        "n": 12,
        "bytes": 41_000,
        "features_sqnr_db": 60.0,
        "inference_precision": "bf16",
        "merged_max_abs_diff": 0.0,
        "merged_val_top1": 0.75,
        "merged_bytes": 41_500,
    },
}


@pytest.fixture
def fake_export(monkeypatch):
    """export_bundle replaced: records the options it was given, returns fixed figures."""
    seen = {}

    def fake(run, out, options, *, force=False, progress=True):
        seen.update(run=run, out=out, options=options, force=force, progress=progress)
        return {"bundle": str(out), "profile": options.to_dict(), "variants": json.loads(json.dumps(FAKE_VARIANTS))}

    monkeypatch.setattr(export_pkg, "export_bundle", fake)
    return seen


def _export(*args):
    return CliRunner().invoke(main, ["export", "runs/r", "--out", "bundles/b", *args])


def test_cli_json_is_one_record_per_variant(fake_export):
    result = _export("--model-format", "onnx,openvino", "--precision", "fp32,int8,bf16", "--json")
    assert result.exit_code == 0, result.output
    doc = validate_document(result.stdout, "export")
    assert (doc["bundle"], doc["run"], doc["head"], doc["left_out"]) == ("bundles/b", "runs/r", "default", {})
    assert doc["profile"]["formats"] == ["onnx", "openvino"] and doc["profile"]["precisions"] == [
        "fp32",
        "int8",
        "bf16",
    ]
    by_name = {r["name"]: r for r in doc["results"]}
    assert list(by_name) == ["onnx-fp32", "onnx-int8", "openvino-bf16"]
    fp32, int8, bf16 = by_name.values()
    assert (fp32["format"], fp32["precision"], fp32["runtime"]) == ("onnx", "fp32", "onnxruntime")
    assert fp32["top1_drop_pp"] is None and fp32["inference_precision"] is None and fp32["bytes"] == 40_000
    assert (int8["precision"], int8["top1_drop_pp"]) == ("int8", 5.0)
    assert (bf16["runtime"], bf16["inference_precision"], bf16["merged_bytes"]) == ("openvino", "bf16", 41_500)
    assert list(doc)[-1] == "results"
    # --format json is the same document
    assert (
        _export("--model-format", "onnx", "--format", "json").stdout
        == _export("--model-format", "onnx", "--json").stdout
    )


def test_cli_tsv_in_a_pipe_and_a_table_on_request(fake_export):
    tsv = _export("--model-format", "onnx")  # CliRunner's stdout is not a terminal: tsv
    assert tsv.exit_code == 0, tsv.output
    lines = tsv.stdout.splitlines()
    assert lines[0].split("\t") == [
        "name",
        "format",
        "precision",
        "val_top1",
        "top1_drop_pp",
        "max_abs_diff",
        "top1_agreement",
        "bytes",
        "inference_precision",
        "speedup_vs_fp32",
    ]
    assert lines[1].split("\t") == ["onnx-fp32", "onnx", "fp32", "0.75", "", "1.5e-06", "1.0", "40000", "", ""]
    assert lines[2].split("\t")[-1] == "0.93"  # int8: its measured speed-up over fp32
    assert lines[3].split("\t")[-2:] == ["bf16", ""] and len(lines) == 4
    assert all(line.count("\t") == 9 for line in lines)
    table = _export("--model-format", "onnx", "--format", "table")
    assert table.exit_code == 0, table.output
    assert "Bundle bundles/b" in table.stdout and " 5.00 " in table.stdout and " 0.04 " in table.stdout
    # 80 columns (CliRunner's): the table fits, no cell is broken across lines
    assert "0.93x" in table.stdout and "onnx-int8" in table.stdout and "1.5e-06" in table.stdout
    assert max(len(line) for line in table.stdout.splitlines()) <= 80
    assert "\t" not in table.stdout


def test_cli_old_option_names_still_work_with_a_warning(fake_export):
    result = _export("--format", "onnx", "--profile", "fp32-only", "--json")
    assert result.exit_code == 0, result.output
    assert fake_export["options"].formats == ("onnx",) and fake_export["options"].precisions == ("fp32",)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 2 and any("--model-format onnx" in w for w in warnings)
    assert any("--profile is deprecated" in w and "--export-profile" in w for w in warnings)
    validate_document(result.stdout, "export")
    result = _export("--format", "onnx,openvino", "--format", "tsv")  # the last --format wins, as with any option
    assert result.exit_code == 0 and result.stdout.startswith("name\tformat")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--precision", "fp32,fp8"], "Invalid value for '--precision': 'fp8' is not one of fp32, fp16, bf16, int8"),
        (["--precision", ","], "'--precision': is empty"),
        (["--model-format", "tflite"], "Invalid value for '--model-format': 'tflite' is not one of onnx, openvino"),
        (["--format", "tflite"], "'tflite' is not one of table, tsv, json (model formats go to --model-format"),
        (["--format", "onnx", "--model-format", "openvino"], "old spelling of --model-format"),
        (["--format", "tsv", "--json"], "--json and --format tsv disagree"),
        (["--calib-size", "0"], "Invalid value for '--calib-size'"),
        (["--export-profile", "nope"], "unknown export-profile 'nope'"),
        (["--add-to", "bundles/x", "--head", "h"], "--add-to writes into BUNDLE"),
        (["--partial"], "--partial applies to a head added with --add-to"),
        (["--max-drop", "nan"], "--max-drop must be a finite number"),
    ],
)
def test_cli_usage_errors_exit_2_in_one_line(fake_export, extra, message):
    result = _export(*extra)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.output and not fake_export


def test_cli_usage_error_under_json_is_a_json_error_document(fake_export):
    result = _export("--precision", "fp8", "--json")
    assert result.exit_code == 2
    doc = validate_document(result.stdout)
    assert doc["schema"] == "edgetl.export" and doc["error"]["exit_code"] == 2 and "fp8" in doc["error"]["message"]


def test_cli_add_to_document(monkeypatch):
    import edgetl.workstation.add_head as add_head_mod

    def fake_add_head(run, bundle, head, **kw):
        variants = {k: {**v, "features_sqnr_db": None} for k, v in FAKE_VARIANTS.items() if k != "onnx-int8"}
        for v in variants.values():
            del v["features_sqnr_db"]
        return {"bundle": str(bundle), "head": head, "variants": variants, "left_out": {"onnx-int8": "loses 5 pp"}}

    monkeypatch.setattr(add_head_mod, "add_head", fake_add_head)
    args = ["export", "runs/parity", "--add-to", "bundles/b", "--head", "parity", "--partial"]
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    doc = validate_document(result.stdout, "export")
    assert (doc["head"], doc["profile"], doc["left_out"]) == ("parity", None, {"onnx-int8": "loses 5 pp"})
    assert [r["name"] for r in doc["results"]] == ["onnx-fp32", "openvino-bf16"]
    assert doc["results"][0]["features_sqnr_db"] is None
    table = CliRunner().invoke(main, [*args, "--format", "table"])
    assert "head parity added (left out of onnx-int8)" in table.stdout
