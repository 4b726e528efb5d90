"""The real export path: ImageNet MobileNetV2 on the digits, every default variant, two heads on one trunk.

Slow (two to three minutes on 2 CPU cores); CI runs it. The run is an ImageNet trunk with a head
fitted on its features (tests/run_factory.py), the case where int8 is hardest: ORT's defaults lose
~20 pp.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.core.bundle import read_manifest, sha256_file
from edgetl.workstation.backbones import get_backbone
from edgetl.workstation.weights import resolve_weights
from tests.helpers import digits_subset
from tests.run_factory import make_run

pytestmark = pytest.mark.slow


def edgetl(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("real")


@pytest.fixture(scope="module")
def digits(root) -> Path:
    """80 images per digit (800; 160 for validation): the full 1,797 only make the test slower."""
    return digits_subset(root, 80)


@pytest.fixture(scope="module")
def bundle(root, digits) -> tuple[Path, dict]:
    spec = get_backbone("mobilenet_v2")
    state, source = resolve_weights(spec, "imagenet")
    run = make_run(
        root / "run",
        digits,
        backbone="mobilenet_v2",
        img_size=96,
        trunk_state=state,
        weights=source.to_dict(),
        val_fraction=0.2,
    )
    doc = edgetl("export", run, "--out", root / "bundle", "--no-progress", "--json")
    return Path(doc["bundle"]), doc


def test_default_export_has_every_variant_within_the_bars(bundle):
    out, doc = bundle
    v = {r["name"]: r for r in doc["results"]}
    assert set(v) == {"onnx-fp32", "onnx-int8", "openvino-fp32", "openvino-int8"}
    for name in ("onnx-fp32", "openvino-fp32"):
        assert v[name]["max_abs_diff"] <= 1e-3 and v[name]["top1_agreement"] == 1.0, v[name]
        assert v[name]["val_top1"] >= 0.9
    for fmt in ("onnx", "openvino"):
        int8, fp32 = v[f"{fmt}-int8"], v[f"{fmt}-fp32"]
        assert int8["top1_drop_pp"] <= 1.0 and int8["bytes"] < fp32["bytes"] / 2, int8
    m = read_manifest(out)
    assert m["variants"]["openvino-fp32"]["inference_precision"] == v["openvino-fp32"]["inference_precision"] == "f32"
    q = m["variants"]["openvino-int8"]["quantization"]
    assert q["calibration"]["size"] == 200 and q["attempts"][-1]["passed"] and v["onnx-fp32"]["n"] == 160


def test_both_runtimes_predict_the_same_labels_and_bench(bundle, digits):
    out, _ = bundle
    images = [str(sorted((digits / str(d)).glob("*.png"))[5]) for d in range(10)]
    labels = {}
    for runtime in ("onnxruntime", "openvino"):
        for precision in ("fp32", "int8"):
            records = edgetl("predict", out, *images, "--runtime", runtime, "--precision", precision, "--json")[
                "results"
            ]
            labels[runtime, precision] = [r["label"] for r in records]
    assert labels["onnxruntime", "fp32"] == labels["openvino", "fp32"]
    assert sum(a == b for a, b in zip(labels["onnxruntime", "fp32"], [str(d) for d in range(10)], strict=False)) >= 9
    for precision in ("fp32", "int8"):
        assert np.mean(np.array(labels["onnxruntime", precision]) == np.array(labels["openvino", precision])) >= 0.9
    doc = edgetl(
        "bench", out, "--runtime", "openvino", "--precision", "int8", "--iterations", "20", "--no-cold-start", "--json"
    )
    [result] = doc["results"]
    assert result["variant"] == "openvino-int8" and result["latency_ms"]["p50"] > 0


def test_a_second_head_shares_the_trunk(bundle, digits, root):
    out, _ = bundle
    parity = root / "parity"
    for d in range(10):
        dest = parity / ("even" if d % 2 == 0 else "odd")
        dest.mkdir(parents=True, exist_ok=True)
        for p in sorted((digits / str(d)).glob("*.png")):
            shutil.copyfile(p, dest / p.name)
    two = shutil.copytree(out, root / "two-heads")
    trunk_sha = {rel: rec["sha256"] for rel, rec in read_manifest(two)["files"].items() if rec["role"] == "trunk"}
    run2 = edgetl(
        "finetune", parity, "--out", root / "run2", "--trunk-from", two, "--epochs", "10", "--no-progress", "--json"
    )["results"][0]
    assert run2["val_top1"] >= 0.85, run2
    add = ["export", run2["run_dir"], "--add-to", two, "--head", "parity", "--no-progress", "--json"]
    strict = CliRunner().invoke(main, [str(a) for a in add])
    # Whether the int8 trunk (chosen for the digits head) also serves the parity head is measured, and
    # depends on the CPU: on a Xeon the OpenVINO int8 trunk loses ~5 pp on parity (its features' SQNR is
    # ~12 dB); on an AMD EPYC (Zen 4, AVX-512 VNNI + BF16) it stays within the bar. Each branch is asserted
    # for what it must be, and the head is added exactly once either way.
    if strict.exit_code != 0:
        # Refused as a whole, naming the variant and the figures; the bundle is untouched.
        assert "int8 (head parity) loses" in strict.stderr and "--partial" in strict.stderr, strict.stderr
        assert read_manifest(two)["heads"].keys() == {"default"}
        doc = edgetl(*add, "--partial")
        assert doc["left_out"] and all("int8" in name for name in doc["left_out"]), doc
        assert read_manifest(two)["heads"]["parity"]["left_out"].keys() == doc["left_out"].keys()
    else:
        # Accepted as a whole: every variant carries the new head, nothing is left out.
        doc = json.loads(strict.stdout)
        assert not doc["left_out"], doc
        assert "left_out" not in read_manifest(two)["heads"]["parity"]
    assert doc["head"] == "parity" and read_manifest(two)["heads"].keys() == {"default", "parity"}
    added = {r["name"]: r for r in doc["results"]}
    assert added["onnx-fp32"]["top1_agreement"] == 1.0
    assert all(r["top1_drop_pp"] <= 1.0 for r in doc["results"] if r["top1_drop_pp"] is not None), doc
    m = read_manifest(two)
    for rel, sha in trunk_sha.items():
        assert m["files"][rel]["sha256"] == sha == sha256_file(two / rel)
    image = str(sorted((digits / "7").glob("*.png"))[3])
    records = edgetl("predict", two, image, "--head", "all", "--runtime", "openvino", "--json")["results"]
    assert [(r["head"], r["label"]) for r in records] == [("default", "7"), ("parity", "odd")]
