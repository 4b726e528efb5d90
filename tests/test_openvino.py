"""OpenVINO: IR variants (fp32 pinned to f32, fp16, bf16, NNCF int8), merged graphs, both runtimes agree.

One export of a tiny run with the ``all`` profile (every format, precision and merged graph) feeds
most tests; the int8 search order is checked with NNCF replaced by a stub (the real search runs in
the module's export and, on MobileNetV2, in the slow test).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import openvino as ov
import pytest
from click.testing import CliRunner

import edgetl.workstation.export.formats.openvino as ovx
import edgetl.workstation.export.formats.openvino_quantize as ovq
from edgetl.cli import main
from edgetl.core.bundle import read_manifest
from edgetl.core.errors import ExportError
from edgetl.device.runtime import open_bundle
from edgetl.workstation.export import export_bundle, load_arrays, resolve_options, select_calibration
from edgetl.workstation.export.common import images_sha256
from edgetl.workstation.export.formats.openvino_quantize import OVQuantConfig, OVQuantizer, float_layers
from edgetl.workstation.export.int8 import search_int8
from edgetl.workstation.run import load_run
from tests.run_factory import all_profile_export, cpu_runs_bf16, shared_run

ALL = {"onnx-fp32", "onnx-fp16", "onnx-int8", "openvino-fp32", "openvino-fp16", "openvino-bf16", "openvino-int8"}
ALL |= {"litert-fp32", "litert-int8", "ncnn-fp32"}  # the all profile holds every format


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return shared_run(tmp_path_factory)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, dict]:
    return all_profile_export(tmp_path_factory)


@pytest.fixture(scope="module")
def x_val(run_dir) -> np.ndarray:
    run = load_run(run_dir)
    return load_arrays(run.val_samples, run.preprocessing)[0]


def test_all_profile_exports_every_variant_with_its_bar(exported):
    out, doc = exported
    # Both branches are asserted: a CPU that runs bf16 ships openvino-bf16; one that does not has it
    # left out by the fixture (export refuses it there: test_bf16_is_refused_when_the_cpu_does_not_run_it).
    bf16 = cpu_runs_bf16()
    assert set(doc["variants"]) == (ALL if bf16 else ALL - {"openvino-bf16"})
    m = read_manifest(out)
    for name, v in doc["variants"].items():
        assert set(v) >= {"val_top1", "max_abs_diff", "top1_agreement", "bytes", "n"}
        if name.endswith("fp32"):
            assert v["max_abs_diff"] <= 1e-3 and v["top1_agreement"] == 1.0
        else:
            assert v["top1_drop_pp"] <= 1.0
        assert v["merged_max_abs_diff"] <= (1e-3 if name != "openvino-bf16" else 1.0)
        assert m["variants"][name]["merged"]["default"] in m["files"]
    # What OpenVINO ran is recorded: f32 pinned everywhere but bf16.
    assert {n: v.get("inference_precision") for n, v in doc["variants"].items() if n.startswith("openvino")} == {
        "openvino-fp32": "f32",
        "openvino-fp16": "f32",
        **({"openvino-bf16": "bf16"} if bf16 else {}),
        "openvino-int8": "f32",
    }
    assert doc["variants"]["ncnn-fp32"]["inference_precision"] == "f32"  # NCNN's fp16 default pinned off
    # bf16 runs the fp32 IR (no file of its own); fp16 weights halve the trunk files.
    if bf16:
        assert m["variants"]["openvino-bf16"]["trunk"] == "openvino/trunk.fp32.xml"
    f = m["files"]
    assert f["onnx/trunk.fp16.onnx"]["bytes"] < 0.7 * f["onnx/trunk.fp32.onnx"]["bytes"]
    assert (
        f["openvino/trunk.fp16.xml"]["extra_files"]["openvino/trunk.fp16.bin"]["bytes"]
        < 0.7 * f["openvino/trunk.fp32.xml"]["extra_files"]["openvino/trunk.fp32.bin"]["bytes"]
    )
    assert f["openvino/merged.default.fp32.xml"]["role"] == "merged"


def test_bench_all_interleaves_every_runtime_in_one_table(exported):
    """`edgetl bench BUNDLE --all` on a bundle of every format: one run, all four runtimes, each
    compared with ONNX Runtime at the same precision."""
    out, _ = exported
    result = CliRunner().invoke(
        main, ["bench", str(out), "--all", "--warmup", "1", "--iterations", "3", "--no-cold-start", "--json"]
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert {r["runtime"] for r in doc["results"]} == {"onnxruntime", "openvino", "litert", "ncnn"}
    assert not doc["skipped"]
    runtime_ratios = {(c["variant"], c["baseline"]) for c in doc["comparison"] if c["kind"] == "runtime"}
    assert {("litert-int8", "onnx-int8"), ("ncnn-fp32", "onnx-fp32"), ("litert-fp32", "onnx-fp32")} <= runtime_ratios
    table = CliRunner().invoke(
        main, ["bench", str(out), "--all", "--warmup", "1", "--iterations", "3", "--no-cold-start"]
    )
    assert table.exit_code == 0, table.output
    for variant in ("litert-fp32", "litert-int8", "ncnn-fp32", "onnx-fp32", "openvino-int8"):
        assert variant in table.stdout


def test_openvino_fp32_matches_onnxruntime_and_pins_f32(exported, x_val):
    out, _ = exported
    bundle = open_bundle(out)
    ort = bundle.load(runtime="onnxruntime", precision="fp32")
    ovp = bundle.load(runtime="openvino", precision="fp32")
    assert ovp.runtime_info == {"device": "CPU", "inference_precision": "f32"} and ort.runtime_info == {}
    a, b = ort.logits(x_val)["default"], ovp.logits(x_val)["default"]
    assert np.abs(a - b).max() < 1e-4
    np.testing.assert_array_equal(a.argmax(1), b.argmax(1))
    # Features too (the trunk alone), and for batch sizes the export did not use.
    for n in (1, 3):
        assert np.abs(ort.features(x_val[:n]) - ovp.features(x_val[:n])).max() < 1e-4


def test_merged_graph_computes_what_trunk_and_head_compute(exported, x_val):
    out, _ = exported
    bundle = open_bundle(out)
    for runtime, precision in (
        ("onnxruntime", "int8"),
        ("openvino", "int8"),
        ("openvino", "fp32"),
        ("litert", "int8"),
        ("ncnn", "fp32"),
    ):
        split = bundle.load(runtime=runtime, precision=precision)
        merged = bundle.load(runtime=runtime, precision=precision, merged=True)
        assert merged.merged and not split.merged
        np.testing.assert_allclose(merged.logits(x_val)["default"], split.logits(x_val)["default"], atol=1e-3)
    with pytest.raises(Exception, match="no separate trunk"):
        merged.features(x_val)


def test_openvino_int8_is_nncf_with_a_record(exported, run_dir):
    out, doc = exported
    m = read_manifest(out)
    q = m["variants"]["openvino-int8"]["quantization"]
    assert q["method"] == "nncf post-training quantization (OpenVINO)" and q["per_channel"] is True
    # The manifest names no workstation path: the calibration set is its size and a hash of the list.
    calibration = select_calibration(load_run(run_dir).train_samples, 200)
    assert q["calibration"]["size"] == len(calibration) == 36
    assert q["calibration"]["images_sha256"] == images_sha256(calibration) and "images" not in q["calibration"]
    assert q["attempts"][-1]["passed"] and q["attempts"][-1]["val_top1"] == doc["variants"]["openvino-int8"]["val_top1"]
    model = ov.Core().read_model(str(out / "openvino/trunk.int8.xml"))
    ops = Counter(op.get_type_name() for op in model.get_ops())
    assert ops["FakeQuantize"] >= 3 and q["excluded_nodes"] == float_layers(model) == []


def test_both_runtimes_predict_the_same_labels_from_the_cli(exported, run_dir):
    out, _ = exported
    images = [s.path for s in load_run(run_dir).val_samples]
    labels = {}
    for runtime in ("onnxruntime", "openvino"):
        for precision in ("fp32", "int8"):
            result = CliRunner().invoke(
                main, ["predict", str(out), *images, "--runtime", runtime, "--precision", precision, "--json"]
            )
            assert result.exit_code == 0, result.output
            labels[runtime, precision] = [r["label"] for r in json.loads(result.stdout)["results"]]
    assert labels["onnxruntime", "fp32"] == labels["openvino", "fp32"]
    agreement = np.mean(np.array(labels["onnxruntime", "int8"]) == np.array(labels["openvino", "int8"]))
    assert agreement >= 0.9


def test_nncf_output_stays_off_stdout(run_dir, tmp_path, capfd):
    export_bundle(run_dir, tmp_path / "b", resolve_options("openvino-int8"), progress=False)
    assert capfd.readouterr().out == ""
    assert set(read_manifest(tmp_path / "b")["variants"]) == {"openvino-int8"}


def test_int8_search_tries_the_remedies_in_order_and_fails_with_the_figures(exported, run_dir, tmp_path, monkeypatch):
    """NNCF replaced by the fp32 model: every attempt scores the baseline, so a negative bar fails them all."""
    out, _ = exported
    fp32_xml = out / "openvino/trunk.fp32.xml"
    seen = []

    def fake_quantize(xml, calib, config, **kwargs):
        seen.append((config, kwargs.get("max_float_layers")))
        return ov.Core().read_model(str(xml))

    monkeypatch.setattr(ovq, "quantize_ir", fake_quantize)
    run = load_run(run_dir)
    x, y = load_arrays(run.val_samples, run.preprocessing)
    head = ovx.compile_f32(out / "openvino/head.default.xml")
    quantizer = OVQuantizer(fp32_xml, x, (x, y, lambda f: head(f)[0]))
    result = search_int8(quantizer, tmp_path / "q.xml", baseline_top1=1.0, max_drop=-1.0)
    configs = [c for c, _ in seen]
    assert configs == [
        OVQuantConfig("mean-minmax", "fast"),
        OVQuantConfig("mean-minmax", "full"),
        OVQuantConfig("minmax", "fast"),
        OVQuantConfig("percentile", "fast"),
        OVQuantConfig("histogram", "fast"),
        OVQuantConfig("mean-minmax", "fast", accuracy_control=True),
    ]
    assert seen[-1][1] == 3  # accuracy control may keep at most a quarter of the layers (min 3) in float
    assert not result.passed and len(result.attempts) == 6 and (tmp_path / "q.xml").is_file()
    record = result.manifest_record(["a.png"])
    assert [a["accuracy_control"] for a in record["attempts"]] == [False] * 5 + [True]

    # Through the export: nothing passed, so (auto) quantization-aware fine-tuning is tried last, on
    # the same NNCF settings; with --qat-epochs 0 it is not.
    for qat_epochs, attempts in ((None, 7), (0, 6)):
        options = resolve_options(formats=("openvino",), max_drop=-1.0, qat_epochs=qat_epochs)
        with pytest.raises(ExportError) as err:
            export_bundle(run_dir, tmp_path / "b", options, progress=False)
        message = str(err.value)
        assert "openvino-int8 loses" in message and "--max-drop -1 pp" in message and "on 12 images" in message
        assert f"best of {attempts} quantization attempts" in message
        assert not (tmp_path / "b").exists()
    sources = [c.source for c, _ in seen]
    assert sources == ["fp32"] * 6 + ["fp32"] * 6 + ["qat"] + ["fp32"] * 6  # direct, auto, --qat-epochs 0


def test_bf16_is_refused_when_the_cpu_does_not_run_it(run_dir, tmp_path, monkeypatch):
    """A bf16 variant must be measured in bf16: if OpenVINO reports another precision, the export fails."""
    import dataclasses

    from edgetl.device.backends import BACKENDS

    real = BACKENDS["openvino"].loader

    def f32_only(path, **kw):
        model = real(path, **kw)
        model.runtime_info["inference_precision"] = "f32"
        return model

    monkeypatch.setitem(BACKENDS, "openvino", dataclasses.replace(BACKENDS["openvino"], loader=f32_only))
    with pytest.raises(ExportError, match="openvino-bf16: OpenVINO ran f32 although bf16 was pinned"):
        export_bundle(
            run_dir, tmp_path / "b", resolve_options(formats=("openvino",), precisions=("bf16",)), progress=False
        )
