"""`edgetl info BUNDLE|RUN`: what a bundle or run holds, from its JSON files, torch-free."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.cli.info_cmd import shorten
from edgetl.core.bundle import read_manifest, write_manifest
from edgetl.device.info import describe
from tests.bundle_factory import build_bundle
from tests.run_factory import shared_run
from tests.schemas import validate_document
from tests.test_no_torch import BLOCK_TORCH  # the import system of a device-only install


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("info") / "colours", heads=("colour", "brightness"), merged=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return shared_run(tmp_path_factory)


def info(*args: str):
    return CliRunner().invoke(main, ["info", *map(str, args)])


def info_json(*args: str, exit_code: int = 0) -> dict:
    result = info(*args, "--json")
    assert result.exit_code == exit_code, result.output
    doc = validate_document(result.stdout, "info")
    assert len(doc["results"]) == 1
    return doc


def _tsv(stdout: str) -> dict[str, str]:
    lines = stdout.splitlines()
    assert lines[0] == "key\tvalue"
    assert all(line.count("\t") == 1 for line in lines), [x for x in lines if x.count("\t") != 1]
    pairs = [line.split("\t") for line in lines[1:]]
    keys = [k for k, _ in pairs]
    assert len(keys) == len(set(keys)), "a key appears twice"
    return dict(pairs)


# --- bundles ------------------------------------------------------------------------------------------


def test_info_bundle_json_holds_variants_heads_preprocessing_lineage_and_checksums(bundle):
    doc = info_json(bundle)
    assert doc["kind"] == "bundle" and doc["path"] == str(bundle)
    rec = doc["results"][0]
    manifest = read_manifest(bundle)
    variants = {v["name"]: v for v in rec["variants"]}
    assert list(variants) == list(manifest["variants"]) == ["onnx-fp32", "onnx-int8"]
    int8 = variants["onnx-int8"]
    assert (int8["format"], int8["precision"], int8["runtime"]) == ("onnx", "int8", "onnxruntime")
    assert int8["val_top1"] == pytest.approx(0.966) and int8["max_abs_diff"] == pytest.approx(1e-6)
    assert int8["top1_agreement"] == 1.0 and int8["speedup_vs_fp32"] is None
    assert int8["merged"] == ["brightness", "colour"]
    on_disk = sum((bundle / rel).stat().st_size for rel in int8["files"])
    assert int8["bytes"] == on_disk and "onnx/trunk.int8.onnx" in int8["files"]
    heads = {h["name"]: h for h in rec["heads"]}
    assert heads["colour"]["labels"] == ["red", "green", "blue"] and heads["colour"]["default"]
    assert heads["brightness"]["classes"] == 2 and not heads["brightness"]["default"]
    assert rec["preprocessing"] == manifest["preprocessing"]
    lineage = rec["lineage"]
    assert lineage["backbone"] == "tiny_onnx" and lineage["feature_dim"] == 8
    assert lineage["weights"]["kind"] == "none" and lineage["created_utc"] == "2024-01-01T00:00:00Z"
    assert lineage["versions"]["edgetl"] == lineage["edgetl_version"]
    sums = rec["checksums"]
    listed = len(manifest["files"]) + 1
    assert sums == {**sums, "status": "ok", "checked": True, "count": listed, "mismatched": [], "missing": []}
    assert {f["status"] for f in sums["files"]} == {"ok"} and len(sums["files"]) == listed - 1


def test_info_bundle_table_is_one_screen_and_tsv_one_fact_per_line(bundle):
    table = info(bundle, "--format", "table")
    assert table.exit_code == 0, table.output
    out = table.stdout
    for text in ("onnx-fp32", "onnx-int8", "onnxruntime", "0.9660", "red, green, blue", "tiny_onnx", "checksums"):
        assert text in out, text
    assert "ok (" in out and "merged graphs" in out
    assert len(out.splitlines()) <= 24, out  # one screen
    tsv = info(bundle)  # a pipe: tsv by default
    assert tsv.exit_code == 0, tsv.output
    facts = _tsv(tsv.stdout)
    assert facts["kind"] == "bundle" and facts["checksums.status"] == "ok"
    assert facts["variants.onnx-int8.val_top1"] == "0.966"
    assert facts["variants.onnx-int8.runtime"] == "onnxruntime"
    assert [facts[f"heads.colour.labels.{i}"] for i in range(3)] == ["red", "green", "blue"]
    assert facts["lineage.backbone"] == "tiny_onnx" and facts["preprocessing.input_size"] == "32"


def test_long_and_hostile_labels_are_shortened_and_escaped_on_screen_complete_in_json(bundle, tmp_path):
    copy = shutil.copytree(bundle, tmp_path / "many")
    manifest = read_manifest(copy)
    labels = [f"class-{i:03d}" for i in range(200)]
    labels[1] = "[bold red]markup[/bold red]\x1b[31m"
    labels[2] = "tab\there\nnewline"
    manifest["heads"]["colour"]["labels"] = labels
    manifest["variants"]["onnx-int8"]["quantization"] = {
        "method": "onnxruntime static QDQ",
        "per_channel": True,
        "calibration": {"method": "minmax", "size": 200, "images": ["/home/me/data/0.png"]},
        "excluded_nodes": ["/a", "/b"],
    }
    manifest["variants"]["onnx-int8"]["metrics"]["speedup_vs_fp32"] = 1.8
    write_manifest(copy, manifest)
    doc = info_json(copy)
    int8 = next(v for v in doc["results"][0]["variants"] if v["name"] == "onnx-int8")
    assert int8["speedup_vs_fp32"] == 1.8
    assert int8["quantization"] == {
        "method": "onnxruntime static QDQ",
        "calibration": "minmax",
        "calibration_size": 200,
        "per_channel": True,
        "float_nodes": 2,
    }
    assert next(h for h in doc["results"][0]["heads"] if h["name"] == "colour")["labels"] == labels
    table = info(copy, "--format", "table").stdout
    assert "(+19" in table and "more)" in table and "class-199" not in table  # shortened
    assert "onnx-int8: onnxruntime static QDQ (minmax calibration, 200 images, per-channel, 2 nodes" in table
    assert "vs fp32" in table and "1.80x" in table
    assert "[bold red]markup[/bold red]\\x1b[31m" in table and "\x1b" not in table  # shown as text
    facts = _tsv(info(copy).stdout)
    assert facts["heads.colour.labels.199"] == "class-199"
    assert facts["heads.colour.labels.2"] == "tab\\there\\nnewline"


def test_shorten_keeps_within_the_width_and_counts_what_it_leaves_out():
    assert shorten(["a", "b"]) == "a, b"
    text = shorten([f"label{i}" for i in range(100)], width=40)
    assert len(text) <= 40 and text.endswith("more)")
    shown = text.split(", ... ")[0].split(", ")
    assert text.endswith(f"(+{100 - len(shown)} more)")


def test_a_tampered_or_missing_file_is_reported_and_exits_1(bundle, tmp_path):
    copy = shutil.copytree(bundle, tmp_path / "tampered")
    head = copy / "onnx" / "head.colour.onnx"
    data = head.read_bytes()
    head.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size: only the sha256 can tell
    (copy / "onnx" / "head.brightness.onnx").unlink()
    result = info(copy, "--json")
    assert result.exit_code == 1, result.output
    sums = validate_document(result.stdout, "info")["results"][0]["checksums"]
    assert sums["status"] == "failed"
    assert sums["mismatched"] == ["onnx/head.colour.onnx"] and sums["missing"] == ["onnx/head.brightness.onnx"]
    assert result.stderr.startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "head.colour.onnx does not match" in result.stderr and "head.brightness.onnx is missing" in result.stderr
    table = info(copy, "--format", "table")
    assert table.exit_code == 1 and "FAILED" in table.stdout and "head.colour.onnx (mismatch)" in table.stdout


def test_no_verify_skips_hashing_but_not_presence_or_size(bundle, tmp_path, monkeypatch):
    copy = shutil.copytree(bundle, tmp_path / "b")
    head = copy / "onnx" / "head.colour.onnx"
    data = head.read_bytes()
    head.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    import edgetl.device.info as info_mod

    def no_hashing(path):
        raise AssertionError(f"hashed {path} under --no-verify")

    monkeypatch.setattr(info_mod, "sha256_file", no_hashing)
    doc = info_json(copy, "--no-verify")
    sums = doc["results"][0]["checksums"]
    assert sums["status"] == "not checked" and sums["checked"] is False
    assert {f["status"] for f in sums["files"]} == {"not checked"}
    assert "not checked" in info(copy, "--no-verify", "--format", "table").stdout
    head.write_bytes(data + b"!")  # another size: seen without hashing
    doc = info_json(copy, "--no-verify", exit_code=1)
    assert doc["results"][0]["checksums"]["mismatched"] == ["onnx/head.colour.onnx"]


# --- runs ---------------------------------------------------------------------------------------------


def test_info_run_reads_the_json_files(run):
    doc = info_json(run)
    assert doc["kind"] == "run"
    rec = doc["results"][0]
    config = json.loads((run / "config.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    split = json.loads((run / "split.json").read_text())
    assert rec["backbone"] == "tiny_test" and rec["strategy"] == "feature-extraction"
    assert rec["weights"] == {"kind": "none", "origin": None, "file": None, "sha256": None}
    assert rec["data"]["train_images"] == len(split["train"]) and rec["data"]["val_images"] == len(split["val"])
    assert rec["labels"] == json.loads((run / "labels.json").read_text()) and rec["classes"] == 3
    assert rec["val_top1"] == metrics["val_top1"] and rec["n_val"] == metrics["n"]
    assert rec["preprocessing"] == config["preprocessing"] and rec["complete"] and rec["problems"] == []
    files = {f["name"]: f for f in rec["files"]}
    assert files["model.pt"]["present"] and files["model.pt"]["bytes"] == (run / "model.pt").stat().st_size
    assert files["history.png"] == {"name": "history.png", "required": False, "present": False, "bytes": None}
    table = info(run, "--format", "table")
    assert table.exit_code == 0, table.output
    for text in ("tiny_test", "feature-extraction", f"{len(split['train'])} train / {len(split['val'])} val"):
        assert text in table.stdout, text
    facts = _tsv(info(run).stdout)
    assert facts["kind"] == "run" and facts["files.model.pt.present"] == "true"


def test_an_incomplete_or_broken_run_is_reported_and_exits_1(run, tmp_path):
    copy = shutil.copytree(run, tmp_path / "run")
    (copy / "model.pt").unlink()
    (copy / "metrics.json").write_text("{not json")
    result = info(copy, "--json")
    assert result.exit_code == 1, result.output
    rec = validate_document(result.stdout, "info")["results"][0]
    assert not rec["complete"] and rec["val_top1"] is None and rec["backbone"] == "tiny_test"
    assert any("missing model.pt" in p for p in rec["problems"])
    assert any("metrics.json is not valid JSON" in p for p in rec["problems"])
    assert result.stderr.startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "MISSING" in info(copy, "--format", "table").stdout


def test_a_head_trained_on_a_bundle_trunk_names_the_bundle(run, tmp_path):
    copy = shutil.copytree(run, tmp_path / "head-run")
    config = json.loads((copy / "config.json").read_text())
    config["trunk_from"] = {
        "bundle": "bundles/digits",
        "trunk": "onnx/trunk.fp32.onnx",
        "sha256": "0" * 64,
        "backbone": "mobilenet_v2",
        "feature_dim": 1280,
    }
    (copy / "config.json").write_text(json.dumps(config))
    rec = info_json(copy)["results"][0]
    assert rec["trunk_from"]["bundle"] == "bundles/digits" and rec["trunk_from"]["feature_dim"] == 1280
    assert "head on the trunk of bundle bundles/digits" in info(copy, "--format", "table").stdout


def test_run_values_of_the_wrong_type_are_null_not_a_traceback(run, tmp_path):
    copy = shutil.copytree(run, tmp_path / "run")
    (copy / "config.json").write_text(json.dumps({"backbone": 3, "train": [], "weights": "imagenet", "data": 1}))
    (copy / "split.json").write_text(json.dumps({"train": {}, "val": None}))
    (copy / "labels.json").write_text(json.dumps({"a": 1}))
    rec = info_json(copy, exit_code=1)["results"][0]  # described (nulls), and refused as damaged
    assert rec["backbone"] is None and rec["weights"] is None and rec["data"]["train_images"] is None
    assert rec["labels"] == [] and rec["strategy"] is None
    assert rec["problems"] == [f"run {copy} is damaged or was edited: config.json: 'train' must be an object, not []"]
    table = info(copy, "--format", "table")
    assert table.exit_code == 1 and "Traceback" not in table.output and "damaged or was edited" in table.stderr


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        ({"preprocessing": {"input_size": -5}}, "config.json: invalid preprocessing record"),
        ({"train": {"dropout": 5.0}}, "train.dropout must be a number in [0, 1)"),
    ],
)
def test_a_run_with_impossible_values_is_refused(run, tmp_path, edit, words):
    copy = shutil.copytree(run, tmp_path / "run")
    config = json.loads((copy / "config.json").read_text())
    for key, value in edit.items():
        config[key] = {**config[key], **value}
    (copy / "config.json").write_text(json.dumps(config))
    result = info(copy)
    assert result.exit_code == 1 and words in result.stderr and "Traceback" not in result.output, result.output


# --- anything else ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("what", ["missing", "empty folder", "file", "archive"])
def test_anything_else_is_one_error_line_naming_what_info_takes(tmp_path, what):
    target = {
        "missing": tmp_path / "nothing",
        "empty folder": tmp_path / "empty",
        "file": tmp_path / "notes.txt",
        "archive": tmp_path / "b.tar.gz",
    }[what]
    if what == "empty folder":
        target.mkdir()
    elif what != "missing":
        target.write_text("x")
    result = info(target)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "INFO takes a bundle" in result.stderr and "or a run" in result.stderr
    if what == "archive":
        assert "edgetl unpack" in result.stderr
    doc = validate_document(info(target, "--json").stdout, "info")
    assert doc["error"]["exit_code"] == 1


def test_an_invalid_manifest_is_one_error_line(bundle, tmp_path):
    copy = shutil.copytree(bundle, tmp_path / "bad")
    (copy / "manifest.json").write_text('{"schema": "edgetl.bundle", "schema_version": 1')
    result = info(copy)
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("Error: ") and "manifest.json is not valid JSON" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_describe_is_the_library_call(bundle, run):
    assert describe(bundle)[0] == "bundle" and describe(run)[0] == "run"


# --- a device-only install --------------------------------------------------------------------------------


def test_info_works_with_torch_blocked(bundle, run):
    for target in (bundle, run):
        code = BLOCK_TORCH + textwrap.dedent(
            f"""
            from edgetl.cli import main
            try:
                main(["info", {str(target)!r}, "--json"])
            finally:
                leaked = sorted(m for m in sys.modules if m.partition(".")[0] in ("torch", "torchvision"))
                assert not leaked, leaked
            """
        )
        proc = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=Path(__file__).resolve().parents[1],
        )
        assert proc.returncode == 0, proc.stderr
        doc = validate_document(proc.stdout, "info")
        assert doc["kind"] == ("bundle" if target == bundle else "run")


def test_lineage_names_the_run_and_weights_file_and_reads_older_bundles(bundle, tmp_path):
    """New bundles record the run's name and the weights file's name (no workstation paths); bundles
    written before that recorded paths, and info still shows them."""
    for key, run_key, weights_key in (("new", "name", "file"), ("old", "path", "path")):
        copy = shutil.copytree(bundle, tmp_path / key)
        manifest = read_manifest(copy)
        first = manifest["heads"][manifest["default_head"]]
        first["run"] = {run_key: "digits-ft", "strategy": "fine-tune", "val_top1": 0.98}
        manifest["backbone"]["weights"] = {"kind": "imagenet", weights_key: "mobilenet_v2-b0353104.pth"}
        write_manifest(copy, manifest)
        [rec] = info_json(str(copy))["results"]
        assert rec["lineage"]["run"] == "digits-ft" and rec["lineage"]["strategy"] == "fine-tune", key
        assert rec["lineage"]["weights"]["file"] == "mobilenet_v2-b0353104.pth", key
        head = next(h for h in rec["heads"] if h["default"])
        assert head["run"] == {"name": "digits-ft", "strategy": "fine-tune", "val_top1": 0.98}, key
        assert "digits-ft" in info(str(copy), "--format", "table").stdout
