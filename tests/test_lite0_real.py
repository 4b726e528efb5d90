"""EfficientNet-Lite0 with its real ImageNet weights through the whole path, offline, on the digits:
every training strategy, every export format with int8, predict and bench on each runtime, probe
against MobileNetV2, and study. Slow (several minutes on 2 CPU cores); CI runs it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.core.bundle import read_manifest
from edgetl.core.formats import runtime_of
from tests.helpers import digits_subset

pytestmark = pytest.mark.slow

LITE0 = "efficientnet_lite0"
# Feature extraction's bar: measured 0.85 (cross-validated 0.925) here and on CI; with 100 validation images
# one image is 1 pp, so the bar leaves five images of margin and still fails a trunk without its weights (~0.3).
FE_BAR = 0.80
FORMATS = "onnx,openvino,litert,ncnn"


def edgetl(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lite0")


@pytest.fixture(scope="module")
def digits(root) -> Path:
    """50 images per digit (500; 100 for validation)."""
    return digits_subset(root, 50)


def finetune(digits, out, *options):
    args = ["finetune", digits, "--out", out, "--backbone", LITE0, "--img-size", "96", "--seed", "0"]
    return edgetl(*args, *options, "--no-progress", "--json")["results"][0]


@pytest.fixture(scope="module")
def feature_extraction(root, digits) -> Path:
    """Feature extraction (searched head); its export is the hard case for int8 (ImageNet trunk, fitted head)."""
    result = finetune(digits, root / "fe", "--strategy", "feature-extraction")
    assert result["strategy"] == "feature-extraction" and result["pretrained"] and result["val_top1"] >= FE_BAR, result
    return root / "fe"


def test_every_strategy_trains_from_the_offline_weights(root, digits, feature_extraction):
    config = json.loads((feature_extraction / "config.json").read_text())
    assert config["weights"]["origin"] == "offline-package"
    assert config["weights"]["sha256"].startswith("57934424")
    pp = config["preprocessing"]
    assert (pp["mean"], pp["std"], pp["interpolation"]) == ([0.5] * 3, [0.5] * 3, "bicubic")
    # Few steps on 400 images: the bars are well above chance (0.1), not what longer training reaches.
    ft = finetune(digits, root / "ft", "--strategy", "fine-tune", "--unfreeze", "3", "--epochs", "4")
    assert ft["strategy"] == "fine-tune" and ft["val_top1"] >= 0.6, ft
    full = finetune(digits, root / "full", "--strategy", "full", "--epochs", "2")
    assert full["strategy"] == "full" and full["val_top1"] >= 0.4, full


def test_export_every_format_and_int8_then_predict_and_bench(root, digits, feature_extraction):
    """Every format in fp32, and the default export (ONNX Runtime and OpenVINO, fp32 and int8).
    LiteRT's int8 of Lite0 misses the 1 pp bar (its post-training int8 loses 13-20 pp; docs/backbones.md).
    On a CPU whose int8 kernels saturate (x86 without VNNI, this CI's kind), ONNX Runtime's int8 is
    held to the bar as written and says what it loses as run here (int8_saturation when over the bar)."""
    from edgetl.core import envinfo

    bundles = [
        (root / "bundle-default", "onnx,openvino", "fp32,int8"),
        (root / "bundle-fp32", "litert,ncnn", "fp32"),
    ]
    variants, manifests = {}, {}
    for out, formats, precisions in bundles:
        doc = edgetl(
            "export", feature_extraction, "--out", out, "--model-format", formats, "--precision", precisions,
            "--no-progress", "--json",
        )  # fmt: skip
        variants.update({r["name"]: (out, r) for r in doc["results"]})
        manifests[out] = read_manifest(out)
        assert manifests[out]["backbone"]["name"] == LITE0
        assert manifests[out]["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    assert set(variants) == {f"{f}-fp32" for f in FORMATS.split(",")} | {"onnx-int8", "openvino-int8"}
    for name, (_, v) in variants.items():
        if name.endswith("-fp32"):
            assert v["max_abs_diff"] <= 1e-3 and v["top1_agreement"] >= 0.99, v
        else:
            # The int8 gate is relative (<= 1 pp below fp32); the floor is the fp32 bar less that 1 pp.
            assert v["top1_drop_pp"] <= 1.0 and v["val_top1"] >= FE_BAR - 0.01, v
    onnx_int8 = manifests[root / "bundle-default"]["variants"]["onnx-int8"]
    saturated = "int8_saturation" in onnx_int8
    if envinfo.int8_saturates():
        assert onnx_int8["metrics"]["scored"] == "as written" and "this_cpu" in onnx_int8["metrics"]
        assert saturated == (onnx_int8["metrics"]["this_cpu"]["top1_drop_pp"] > 1.0)
    else:
        assert "scored" not in onnx_int8["metrics"] and not saturated

    images = [str(sorted((digits / str(d)).glob("*.png"))[-1]) for d in range(10)]
    labels = {}
    for name, (out, v) in variants.items():
        runtime = runtime_of(v["format"])
        records = edgetl("predict", out, *images, "--runtime", runtime, "--precision", v["precision"], "--json")
        labels[name] = np.array([r["label"] for r in records["results"]])
    assert np.mean(labels["onnx-fp32"] == np.array([str(d) for d in range(10)])) >= 0.9
    for name, got in labels.items():
        if name == "onnx-int8" and saturated:
            continue  # as this CPU runs it, it loses more than the bar: what int8_saturation says
        assert np.mean(got == labels["onnx-fp32"]) >= (1.0 if name.endswith("fp32") else 0.8), (name, got)

    for out in manifests:
        bench = edgetl("bench", out, "--all", "--iterations", "10", "--no-cold-start", "--json")
        assert len(bench["results"]) >= len(manifests[out]["variants"]), bench["results"]
        assert all(r["latency_ms"]["p50"] > 0 for r in bench["results"])


def test_probe_ranks_lite0_against_mobilenet_v2(digits):
    doc = edgetl("probe", digits, "--backbones", f"mobilenet_v2,{LITE0}", "--img-size", "64", "--folds", "2", "--json")
    rows = {r["backbone"]: r for r in doc["results"]}
    assert set(rows) == {"mobilenet_v2", LITE0}
    for r in rows.values():
        assert r["pretrained"] and r["linear_top1"] >= 0.6 and r["feature_dim"] == 1280, r


def test_study_runs_on_lite0(digits, root):
    doc = edgetl(
        "study", digits, "--backbone", LITE0, "--img-size", "64", "--samples-per-class", "5,all",
        "--strategies", "feature-extraction,fine-tune", "--epochs", "fine-tune=1", "--out", root / "study",
        "--no-progress", "--json",
    )  # fmt: skip
    rows = doc["results"]
    assert {(r["strategy"], str(r["samples_per_class"])) for r in rows} == {
        (s, n) for s in ("feature-extraction", "fine-tune") for n in ("5", "all")
    }, rows
    assert all(r["pretrained"] and 0 <= r["val_top1"] <= 1 for r in rows), rows
    by = {(r["strategy"], str(r["samples_per_class"])): r for r in rows}
    assert by["feature-extraction", "5"]["train_images"] == 50 and by["fine-tune", "all"]["train_images"] == 400
    assert by["feature-extraction", "all"]["val_top1"] >= 0.8, by["feature-extraction", "all"]
