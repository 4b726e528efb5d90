"""int8 on CPUs whose kernels saturate: ONNX Runtime's U8S8 kernels on x86 without VNNI or AMX add
pairs of products in 16 bits (VPMADDUBSW), so a QDQ graph can compute something else than it says
(EfficientNet-Lite0 on the digits: 37.6 pp lost as run on such a CPU, 1.4 pp as written).

The export then holds ONNX int8 attempts to the bar as written (what ARM and VNNI CPUs compute),
scores them as run here too, prefers attempts that pass both, tries uint8 weights (U8U8 kernels, exact
sums) as a remedy, and marks a shipped variant that still loses more here (``int8_saturation``); the
device side warns on such CPUs (runtime and ``deploy --check``). Every branch is tested on any CPU:
the real-kernel test asserts the saturation where :func:`envinfo.int8_saturates` says it happens and
its absence elsewhere.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgetl.core import envinfo
from edgetl.core.bundle import validate_manifest
from edgetl.core.errors import BundleError
from edgetl.device.bundle_loading import warn_saturation
from edgetl.device.deploy import check_fit
from edgetl.workstation.export.common import ort_model
from edgetl.workstation.export.formats.onnx_quantize import OrtQuantizer, QuantConfig
from edgetl.workstation.export.int8 import Attempt, choose, search_int8, settled
from edgetl.workstation.export.session import ExportSession
from tests.test_int8_speed import Cfg, FakeQuantizer
from tests.test_quantize import calib, trunk_onnx  # noqa: F401  (fixtures)

# --- which CPUs saturate ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "isa, machine, expected",
    [
        (["avx2", "fma"], "x86_64", True),
        (["avx2", "fma", "avx512f"], "x86_64", True),  # AVX-512 without VNNI: still VPMADDUBSW
        (["avx2", "avx512_vnni"], "x86_64", False),
        (["avx2", "avx_vnni"], "x86_64", False),
        (["avx2", "amx_int8"], "x86_64", False),
        (["asimd"], "aarch64", False),  # a Pi 4: no dot product, but exact 32-bit sums
        (["asimd", "asimddp"], "aarch64", False),
        (None, "x86_64", None),
    ],
)
def test_int8_saturates_by_cpu_features(isa, machine, expected):
    if isa is None:
        assert envinfo.int8_saturates(None, "riscv64") is None  # an unknown platform says nothing
        return
    assert envinfo.int8_saturates(isa, machine) is expected


# --- the real kernels ------------------------------------------------------------------------------

CHANNELS = 64


def _saturating_conv(path: Path, weight_type: int) -> Path:
    """A QDQ 1x1 convolution over 64 channels whose every product is 255 x 127 (uint8 input at its
    maximum, int8 weight at its maximum): each pair of products (64770) overflows a 16-bit sum. Real
    values: input 1.0, weights 1.0, output 64.0 (quantized with scale 0.5: 128)."""
    if weight_type == TensorProto.INT8:
        w_q, w_zp = np.full((1, CHANNELS, 1, 1), 127, np.int8), np.array(0, np.int8)
    else:  # uint8 weights, zero point 128: the same real value 1.0 (255 - 128 = 127)
        w_q, w_zp = np.full((1, CHANNELS, 1, 1), 255, np.uint8), np.array(128, np.uint8)
    inits = [
        numpy_helper.from_array(np.array(1 / 255, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.uint8), "x_zp"),
        numpy_helper.from_array(w_q, "w_q"),
        numpy_helper.from_array(np.array(1 / 127, np.float32), "w_scale"),
        numpy_helper.from_array(w_zp, "w_zp"),
        numpy_helper.from_array(np.array(0.5, np.float32), "y_scale"),
        numpy_helper.from_array(np.array(0, np.uint8), "y_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["wd"]),
        helper.make_node("Conv", ["xd", "wd"], ["y"]),
        helper.make_node("QuantizeLinear", ["y", "y_scale", "y_zp"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "y_scale", "y_zp"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "saturating_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, CHANNELS, 4, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 1, 4, 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def test_u8s8_kernels_saturate_exactly_where_envinfo_says_and_uint8_weights_never(tmp_path):
    x = np.ones((1, CHANNELS, 4, 4), np.float32)
    s8 = _saturating_conv(tmp_path / "s8.onnx", TensorProto.INT8)
    written = ort_model(s8, as_written=True)(x)
    assert np.allclose(written, 64.0)  # the graph as written: 64 products of 1.0
    here = ort_model(s8)(x)
    if envinfo.int8_saturates():
        # Each pair sums to 32767 instead of 64770: about half the value (ONNX Runtime's fused kernel).
        assert float(here.max()) < 40.0, here.ravel()[:4]
    else:
        assert np.allclose(here, written)
    # uint8 weights run on the U8U8 kernels: exact everywhere, the remedy the search tries.
    u8 = _saturating_conv(tmp_path / "u8.onnx", TensorProto.UINT8)
    assert np.allclose(ort_model(u8)(x), 64.0) and np.allclose(ort_model(u8, as_written=True)(x), 64.0)


# --- the search: held to the bar as written, portable attempts preferred ---------------------------


class HereQuantizer(FakeQuantizer):
    """Scores as written from ``scores`` and as run here from ``here``."""

    def __init__(self, configs, scores, here):
        super().__init__(configs, scores)
        self._here = here

    def evaluate_here(self, model):
        return self._here[model]


def test_search_goes_on_past_an_attempt_that_passes_only_as_written_and_ships_the_portable_one(tmp_path):
    configs = [Cfg("s8"), Cfg("u8"), Cfg("later")]
    q = HereQuantizer(configs, {"s8": 0.90, "u8": 0.895, "later": 0.5}, {"s8": 0.50, "u8": 0.89, "later": 0.5})
    result = search_int8(q, tmp_path / "m", baseline_top1=0.90, max_drop=1.0)
    names = [a.config.name for a in result.attempts]
    assert names == ["s8", "u8"]  # without a timer the first portable pass ends the search
    s8, u8 = result.attempts
    assert s8.passed and s8.passed_here is False and not s8.portable
    assert u8.passed and u8.passed_here is True and u8.portable
    assert result.chosen is u8 and q.saved == "u8"
    record = result.manifest_record([])
    assert record["attempts"][0]["passed_this_cpu"] is False
    assert record["attempts"][0]["top1_drop_pp_this_cpu"] == pytest.approx(40.0)
    assert record["attempts"][1]["passed_this_cpu"] is True


def test_without_a_portable_attempt_the_best_as_written_is_shipped(tmp_path):
    q = HereQuantizer([Cfg("a"), Cfg("b")], {"a": 0.85, "b": 0.899}, {"a": 0.2, "b": math.nan})
    result = search_int8(q, tmp_path / "m", baseline_top1=0.90, max_drop=1.0)
    assert result.passed and result.chosen.config.name == "b" and result.chosen.passed_here is False


def test_choose_and_settled_count_only_portable_passes():
    def attempt(name, passed, here, floats=0):
        return Attempt(Cfg(name, floats), 0.9, 0.0, passed, 0.1, ("n",) * floats, None, None, 0.0, here)

    assert not settled([attempt("s8", True, False)])
    assert settled([attempt("s8", True, False), attempt("u8", True, True)])
    assert not settled([attempt("island", True, True, floats=2)])
    assert settled([attempt("plain", True, None)])  # scored as run: nothing else to say
    assert choose([attempt("s8", True, False), attempt("u8", True, True)]) == 1
    assert choose([attempt("s8", True, False), attempt("x", False, False)]) == 0


def test_speed_decides_and_portability_breaks_ties():
    """uint8 weights are exact everywhere but ran at 0.3x fp32 on an AVX2 CPU (U8U8 kernels): a
    variant that passes as written and is much faster ships, marked; within the speed tie the
    portable one wins."""
    from edgetl.workstation.export.speed import Timing

    def attempt(name, here, speedup):
        timing = Timing((1,), (1.0,), (1.0 / speedup,), 10)
        return Attempt(Cfg(name), 0.9, 0.0, True, 0.1, (), timing, 10.0, 0.0, here)

    def u8(here, speedup):
        timing = Timing((1,), (1.0,), (1.0 / speedup,), 10)
        config = QuantConfig("minmax", True, weight_type="uint8")
        return Attempt(config, 0.9, 0.0, True, 0.1, (), timing, 10.0, 0.0, here)

    assert choose([attempt("s8", False, 1.21), u8(True, 0.30)]) == 0
    assert choose([attempt("s8", False, 1.21), u8(True, 1.20)]) == 1
    # A graph as lean (same int8 kernels, no more layers in float) is as fast: the measured gap is noise.
    assert choose([attempt("s8", False, 1.60), attempt("nncf", True, 1.30)]) == 1

    # A leaner non-portable graph: accurate on every CPU is worth up to PORTABLE_TIE (15%) of speed.
    def island(name, here, speedup, floats):
        timing = Timing((1,), (1.0,), (1.0 / speedup,), 10)
        return Attempt(Cfg(name, floats), 0.9, 0.0, True, 0.1, ("n",) * floats, timing, 10.0, 0.0, here)

    assert choose([island("s8", False, 1.21, 0), island("nncf", True, 1.05, 5)]) == 1
    assert choose([island("s8", False, 1.21, 0), island("nncf", True, 1.00, 5)]) == 0


def test_a_passing_uint8_weight_attempt_does_not_end_the_ort_search():
    """U8U8 kernels are slower on x86 than U8S8: an int8-weight attempt could still be faster."""
    from edgetl.workstation.export.formats.onnx_quantize import _settled

    u8 = Attempt(QuantConfig("minmax", True, weight_type="uint8"), 0.9, 0.0, True, 0.1, passed_here=True)
    s8 = Attempt(QuantConfig("minmax", True), 0.9, 0.0, True, 0.1, passed_here=True)
    assert settled([u8]) and not _settled([u8]) and _settled([u8, s8])


def test_ort_quantizer_tries_uint8_weights_when_attempts_are_scored_both_ways(trunk_onnx, calib, tmp_path):  # noqa: F811
    here = iter([0.10, 0.10, 0.90])

    def written(path):
        return 0.90

    q = OrtQuantizer(trunk_onnx, calib, written, workdir=tmp_path / "w", evaluate_here=lambda p: next(here))
    result = search_int8(q, tmp_path / "int8.onnx", baseline_top1=0.90, max_drop=1.0)
    configs = [a.config for a in result.attempts]
    assert [c.weight_type for c in configs] == ["int8", "int8", "uint8"]
    assert configs[2] == QuantConfig("minmax", True, activation_type="uint8", weight_type="uint8")
    assert result.chosen.config.weight_type == "uint8" and result.chosen.portable
    record = result.manifest_record([])
    assert record["weight_type"] == "uint8"
    # The file really holds uint8 weights: every weight DequantizeLinear reads a uint8 initializer.
    model = onnx.load(str(tmp_path / "int8.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    weights = [inits[n.input[0]] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    conv_weights = [w for w in weights if len(w.dims) == 4]
    assert conv_weights and all(w.data_type == TensorProto.UINT8 for w in conv_weights)


def test_ort_quantizer_scored_as_run_never_tries_uint8_weights(trunk_onnx, calib, tmp_path):  # noqa: F811
    scores = iter([0.1] * 40)
    q = OrtQuantizer(trunk_onnx, calib, lambda p: next(scores), workdir=tmp_path / "w", whole_int8=())
    result = search_int8(q, tmp_path / "int8.onnx", baseline_top1=0.90, max_drop=1.0)
    assert all(a.config.weight_type == "int8" and a.passed_here is None for a in result.attempts)


# --- the variant record, and the device side ------------------------------------------------------


def _session(max_drop=1.0):
    return types.SimpleNamespace(max_drop=max_drop)


def test_a_variant_that_loses_more_here_is_marked_and_one_that_does_not_is_not(caplog):
    var, metrics = {"format": "onnx", "precision": "int8"}, {"val_top1": 0.98, "top1_drop_pp": 0.3}
    here = {"val_top1": 0.60, "top1_agreement": 0.6}
    ExportSession._record_saturation(_session(), "onnx-int8", var, metrics, here, 0.983)
    assert metrics["this_cpu"]["top1_drop_pp"] == pytest.approx(38.3)
    assert var["int8_saturation"]["top1_drop_pp"] == pytest.approx(38.3)
    assert var["int8_saturation"]["machine"]["isa"] == envinfo.cpu_features()
    assert "saturate" in caplog.text and "openvino-int8" in caplog.text
    fine = {"format": "onnx", "precision": "int8"}
    metrics = {"val_top1": 0.98, "top1_drop_pp": 0.3}
    ExportSession._record_saturation(_session(), "onnx-int8", fine, metrics, {**here, "val_top1": 0.98}, 0.983)
    assert "int8_saturation" not in fine and metrics["this_cpu"]["top1_drop_pp"] == pytest.approx(0.3)


def test_saturation_is_judged_only_for_onnx_runtime_int8(monkeypatch):
    monkeypatch.setattr(envinfo, "int8_saturates", lambda *a, **k: True)
    s = types.SimpleNamespace()
    assert ExportSession.int8_as_written(s, "onnx") is True
    assert ExportSession.int8_as_written(s, "openvino") is False and ExportSession.int8_as_written(s, "litert") is False
    monkeypatch.setattr(envinfo, "int8_saturates", lambda *a, **k: None)
    assert ExportSession.int8_as_written(s, "onnx") is False


def _doctor(isa, arch="x86_64"):
    return {
        "machine": {"arch": arch, "isa": isa},
        "runtimes": {"onnxruntime": {"installed": True, "version": "1.22"}},
        "profiles": {"best": None},
        "int8": {"hardware": "?", "expect": "uncertain"},
        "warnings": [],
    }


MARKED = {"format": "onnx", "precision": "int8", "int8_saturation": {"top1_drop_pp": 38.3}}


@pytest.mark.parametrize(
    "isa, arch, warned",
    [
        (["avx2", "fma"], "x86_64", True),
        (["avx2", "avx512_vnni"], "x86_64", False),
        (["asimd"], "aarch64", False),
        (None, "x86_64", False),  # the device did not say: no guess
    ],
)
def test_deploy_check_warns_on_a_device_whose_cpu_saturates(isa, arch, warned):
    manifest = {"variants": {"onnx-int8": MARKED, "onnx-fp32": {"format": "onnx", "precision": "fp32"}}}
    fit = check_fit(manifest, _doctor(isa, arch))
    found = [c for c in fit["checks"] if c["check"] == "int8 accuracy"]
    assert bool(found) is warned
    if warned:
        assert found[0]["status"] == "warn" and "38.30 pp" in found[0]["detail"] and fit["ok"]


def test_loading_a_marked_variant_warns_only_where_the_cpu_saturates(monkeypatch):
    monkeypatch.setattr(envinfo, "int8_saturates", lambda *a, **k: True)
    assert "38.30 pp" in warn_saturation("onnx-int8", MARKED)
    assert warn_saturation("onnx-int8", {"format": "onnx", "precision": "int8"}) is None
    monkeypatch.setattr(envinfo, "int8_saturates", lambda *a, **k: False)
    assert warn_saturation("onnx-int8", MARKED) is None


@pytest.fixture(scope="module")
def manifest_and_dir(tmp_path_factory):
    from tests.bundle_factory import build_bundle

    out = build_bundle(tmp_path_factory.mktemp("b") / "bundle", precisions=("fp32", "int8"))
    return json.loads((out / "manifest.json").read_text()), out


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("int8_saturation", {"top1_drop_pp": math.nan}, "int8_saturation must record"),
        ("int8_saturation", {"top1_drop_pp": "38"}, "int8_saturation must record"),
        ("int8_saturation", [], "int8_saturation must record"),
        ("this_cpu", {"val_top1": 1.5}, "metrics.this_cpu must record"),
        ("this_cpu", {"val_top1": math.nan}, "metrics.this_cpu must record"),
    ],
)
def test_manifest_refuses_a_bad_saturation_record(manifest_and_dir, field, value, match):
    m, out = manifest_and_dir
    validate_manifest(copy.deepcopy(m), out)
    m = copy.deepcopy(m)
    var = m["variants"]["onnx-int8"]
    if field == "this_cpu":
        var.setdefault("metrics", {})["this_cpu"] = value
    else:
        var[field] = value
    with pytest.raises(BundleError, match=match):
        validate_manifest(m, out)


def test_attempt_record_without_a_here_score_has_no_this_cpu_fields():
    a = Attempt(Cfg("x"), 0.9, 0.0, True, 0.1)
    d = a.to_dict()
    assert "passed_this_cpu" not in d and "top1_drop_pp_this_cpu" not in d
    assert dataclasses.replace(a, passed_here=True, top1_drop_here_pp=0.5).to_dict()["passed_this_cpu"] is True


def test_onnx_runtime_warnings_on_the_root_logger_do_not_double_every_log_line():
    """ORT's quantizer calls ``logging.warning`` (root logger); with no root handler that would install
    basicConfig's, and every edgetl line after it would print twice (rich, then plain)."""
    import logging

    from edgetl.workstation.export.formats.onnx_quantize import quiet_onnxruntime

    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()
    try:
        with quiet_onnxruntime():
            logging.warning("Quantized bias `b` exceeds the range of a int32. The bias scale is too small.")
        assert root.handlers == []
    finally:
        root.handlers[:] = saved


def test_info_says_how_a_saturation_marked_variant_was_scored(manifest_and_dir, tmp_path):
    import shutil

    from click.testing import CliRunner

    from edgetl.cli import main
    from edgetl.device.info import bundle_info

    _, src = manifest_and_dir
    out = tmp_path / "bundle"
    shutil.copytree(src, out)
    m = json.loads((out / "manifest.json").read_text())
    var = m["variants"]["onnx-int8"]
    var["metrics"] = {**var.get("metrics", {}), "scored": "as written", "this_cpu": {"val_top1": 0.5}}
    var["int8_saturation"] = {"top1_drop_pp": 38.3, "affects": "x86 CPUs without VNNI or AMX"}
    (out / "manifest.json").write_text(json.dumps(m))
    shown = {v["name"]: v for v in bundle_info(out)["variants"]}
    assert shown["onnx-int8"]["scored"] == "as written" and shown["onnx-int8"]["int8_saturation_drop_pp"] == 38.3
    assert shown["onnx-fp32"]["scored"] is None and shown["onnx-fp32"]["int8_saturation_drop_pp"] is None
    result = CliRunner().invoke(main, ["info", str(out), "--format", "table"])
    assert result.exit_code == 0, result.output
    assert "loses 38.30 pp on x86 CPUs without VNNI or AMX" in " ".join(result.output.split())
