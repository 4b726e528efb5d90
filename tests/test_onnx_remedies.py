"""int8 remedies that keep the int8 chain whole for the ONNX variant: cross-layer equalization, NNCF's
ONNX backend as a second quantizer, uint8 activations, their place in the search, and the hook for a
quantization-aware fine-tuned trunk."""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgetl.workstation.export.formats.onnx_equalize import equalize_model, find_pairs, range_spread
from edgetl.workstation.export.formats.onnx_quantize import (
    WHOLE_INT8,
    OrtQuantizer,
    QuantConfig,
    quantize_trunk,
    quiet_onnxruntime,
)
from edgetl.workstation.export.int8 import Attempt, QatHook, search_int8

RNG = np.random.default_rng(0)


@pytest.fixture(scope="module", autouse=True)
def _nncf_imported_outside_capfd():
    """NNCF's log handler keeps the stdout it was imported under: import it before any test's capfd
    (which is closed after its test) can be that stdout."""
    try:
        import nncf  # noqa: F401
    except ImportError:  # the NNCF tests skip
        pass


def run(model: onnx.ModelProto | Path, x: np.ndarray, *, optimize: bool = True) -> np.ndarray:
    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def conv(name, x, w, out, *, group=1, pad=1, bias=True, inits):
    """A Conv node whose weights (output channels scaled over four decades) and bias are initializers."""
    w = w * np.logspace(-2, 2, w.shape[0]).reshape(-1, 1, 1, 1)[RNG.permutation(w.shape[0])]
    inits.append(numpy_helper.from_array(w.astype(np.float32), f"{name}.w"))
    inputs = [x, f"{name}.w"]
    if bias:
        inits.append(numpy_helper.from_array(RNG.normal(0, 1, w.shape[0]).astype(np.float32), f"{name}.b"))
        inputs.append(f"{name}.b")
    k = w.shape[2]
    return helper.make_node("Conv", inputs, [out], name=name, group=group, pads=[pad if k > 1 else 0] * 4)


def graph(nodes, inits, channels_out: int, extra_outputs=()) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 8, 8])
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, channels_out, 8, 8])]
    outputs += [helper.make_tensor_value_info(o, TensorProto.FLOAT, [None] * 4) for o in extra_outputs]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], outputs, inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    onnx.checker.check_model(model)
    return model


def conv_relu_conv() -> onnx.ModelProto:
    inits: list = []
    nodes = [
        conv("a", "x", RNG.normal(0, 1, (8, 4, 3, 3)), "a.out", inits=inits),
        helper.make_node("Relu", ["a.out"], ["a.act"], name="a.relu"),
        conv("b", "a.act", RNG.normal(0, 1, (6, 8, 1, 1)), "y", inits=inits),
    ]
    return graph(nodes, inits, 6)


def depthwise_block(activation: str = "Relu") -> onnx.ModelProto:
    """expand 1x1 -> act -> depthwise 3x3 -> act -> project 1x1 (MobileNetV2's block)."""
    inits: list = []

    def act(name, src, dst):
        if activation == "Relu":
            return [helper.make_node("Relu", [src], [dst], name=name)]
        inits.extend(
            [
                numpy_helper.from_array(np.array(0.0, np.float32), f"{name}.lo"),
                numpy_helper.from_array(np.array(6.0, np.float32), f"{name}.hi"),
            ]
        )
        return [helper.make_node("Clip", [src, f"{name}.lo", f"{name}.hi"], [dst], name=name)]

    nodes = [
        conv("expand", "x", RNG.normal(0, 0.05, (8, 4, 1, 1)), "e.out", inits=inits),
        *act("e.act", "e.out", "e.a"),
        conv("dw", "e.a", RNG.normal(0, 0.05, (8, 1, 3, 3)), "d.out", group=8, inits=inits),
        *act("d.act", "d.out", "d.a"),
        conv("project", "d.a", RNG.normal(0, 1, (5, 8, 1, 1)), "y", inits=inits),
    ]
    return graph(nodes, inits, 5)


# --- cross-layer equalization -------------------------------------------------------------------


@pytest.mark.parametrize("build", [conv_relu_conv, depthwise_block], ids=["conv-relu-conv", "depthwise"])
def test_equalization_keeps_the_function_and_evens_the_channel_ranges(build):
    model = build()
    x = RNG.normal(0, 1, (3, 4, 8, 8)).astype(np.float32)
    before, spread = run(model, x), range_spread(model)
    pairs = find_pairs(model)
    assert len(pairs) == (1 if build is conv_relu_conv else 2) and not any(p.clip for p in pairs)
    result = equalize_model(model)
    onnx.checker.check_model(model)
    assert len(result.pairs) == len(pairs) and result.relu6_replaced == ()
    after = run(model, x)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * np.abs(before).max())
    assert range_spread(model) < spread - 0.5  # four decades of channel ranges: at least half a decade less
    # The first pair's channels now have the same range on both sides: sqrt(r1 * r2).
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    first, second = pairs[0].first, pairs[0].second
    r1 = np.abs(inits[f"{first}.w"]).reshape(8, -1).max(1)
    w2 = inits[f"{second}.w"]
    r2 = np.abs(w2).reshape(8, -1).max(1) if w2.shape[1] == 1 else np.abs(w2).max(axis=(0, 2, 3))
    if build is conv_relu_conv:  # a conv in two pairs is balanced between both, not equal to either
        np.testing.assert_allclose(r1, r2, rtol=1e-4)


def test_relu6_becomes_relu_only_between_equalized_convs_and_is_exact_below_six():
    model = depthwise_block("Clip")
    x = 0.01 * RNG.normal(0, 1, (3, 4, 8, 8)).astype(np.float32)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(
        helper.make_tensor_value_info(t, TensorProto.FLOAT, [None] * 4) for t in ("e.out", "d.out")
    )
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    _, e, d = session.run(None, {"x": x})
    assert 0 < max(e.max(), d.max()) < 6  # the Clips never reach 6 on these inputs: ReLU is then exact
    before = run(model, x)
    result = equalize_model(model)
    ops = {n.name: n.op_type for n in model.graph.node}
    assert result.relu6_replaced == ("e.act", "d.act") and ops["e.act"] == ops["d.act"] == "Relu"
    assert result.to_dict()["relu6_replaced_by_relu"] == ["e.act", "d.act"]
    np.testing.assert_allclose(run(model, x), before, rtol=1e-4, atol=1e-5)


def test_a_middle_tensor_read_elsewhere_is_not_equalized():
    model = conv_relu_conv()
    # The ReLU's output is also a graph output: scaling it would change what the graph returns.
    model.graph.output.append(helper.make_tensor_value_info("a.act", TensorProto.FLOAT, [None] * 4))
    assert find_pairs(model) == []
    assert equalize_model(model).pairs == ()


# --- uint8 activations, NNCF's ONNX backend -----------------------------------------------------


def test_uint8_reencoding_of_activations_is_exact(tiny_trunk, tmp_path):
    from edgetl.workstation.export.formats.onnx_nncf import to_uint8_activations

    trunk, calib = tiny_trunk
    with quiet_onnxruntime():
        q = quantize_trunk(trunk, tmp_path / "q.onnx", calib, QuantConfig(), input_name="image", cache_dir=tmp_path)
    model = onnx.load(str(q))
    before = run(model, calib, optimize=False)
    inits = {i.name for i in model.graph.initializer}
    weights = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"} & inits
    types = {i.name: i.data_type for i in model.graph.initializer if i.name in weights}
    # Types recorded for the zero points (NNCF writes them after full bias correction) must not
    # contradict the re-encoded graph: ONNX's full check failed on EfficientNet-Lite0 this way.
    model.graph.value_info.extend(
        helper.make_tensor_value_info(i.name, i.data_type, list(i.dims))
        for i in model.graph.initializer
        if i.name.endswith("zero_point")
    )
    assert to_uint8_activations(model) > 0
    onnx.checker.check_model(model, full_check=True)
    zero_points = [i.data_type for i in model.graph.initializer if i.name.endswith("zero_point")]
    assert TensorProto.UINT8 in zero_points
    assert {i.name: i.data_type for i in model.graph.initializer if i.name in weights} == types  # weights as they were
    np.testing.assert_array_equal(run(model, calib, optimize=False), before)


def test_nncf_onnx_quantizer_runs_in_onnxruntime_as_int8(tiny_trunk, tmp_path, capfd):
    pytest.importorskip("nncf")
    from edgetl.workstation.export.formats.onnx_nncf import float_nodes, quantize_nncf_onnx

    trunk, calib = tiny_trunk
    config = QuantConfig("mean-minmax", True, quantizer="nncf", bias_correction="fast", activation_type="uint8")
    capfd.readouterr()
    out = quantize_nncf_onnx(trunk, tmp_path / "nncf.onnx", calib, config)
    assert capfd.readouterr().out == ""  # NNCF's progress bars and logs stay off stdout (--json)
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    assert float_nodes(model) == []
    ref, got = run(trunk, calib), run(out, calib)
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.99
    # What ONNX Runtime runs: every convolution as QLinearConv, none in float.
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    assert ops["QLinearConv"] == 3 and ops["Conv"] + ops["FusedConv"] == 0


@pytest.mark.slow
def test_search_reports_the_nncf_attempt_on_a_real_run(tmp_path_factory, tmp_path):
    """On the tiny real run, ORT's attempts are made to fail (NaN), so the search reaches NNCF's: its
    top-1 is the shipped model's real top-1, and the record names NNCF as the quantizer."""
    pytest.importorskip("nncf")
    import torch

    from edgetl.workstation.export.common import batches, load_arrays, ort_model
    from edgetl.workstation.export.formats.onnx import export_onnx
    from edgetl.workstation.run import load_run
    from tests.run_factory import shared_run

    run_ = load_run(shared_run(tmp_path_factory))
    model = run_.build_model()
    trunk, head = tmp_path / "trunk.onnx", tmp_path / "head.onnx"
    export_onnx(model.trunk, torch.zeros(2, 3, 32, 32), trunk, input_name="image", output_name="features")
    export_onnx(model.head, torch.zeros(2, 16), head, input_name="features", output_name="logits")
    x_val, y_val = load_arrays(run_.val_samples, run_.preprocessing)
    x_cal, _ = load_arrays(run_.train_samples, run_.preprocessing)
    head_model = ort_model(head)

    def top1(path: Path) -> float:
        t = ort_model(path)
        return float((np.concatenate([head_model(t(b)).argmax(1) for b in batches(x_val)]) == y_val).mean())

    nncf_config = QuantConfig("mean-minmax", True, quantizer="nncf", bias_correction="fast")
    q = OrtQuantizer(trunk, x_cal, lambda p: 0.0, workdir=tmp_path / "w", whole_int8=(nncf_config,))

    def evaluate(path: Path) -> float:
        config = next(c for c, p in q._paths.items() if p == path)
        return top1(path) if config.quantizer == "nncf" else float("nan")

    q.evaluate_path = evaluate
    baseline = top1(trunk)
    result = search_int8(q, tmp_path / "int8.onnx", baseline_top1=baseline, max_drop=100.0)
    u8 = {"activation_type": "uint8"}
    assert [a.config for a in result.attempts] == [
        QuantConfig(**u8),
        QuantConfig("minmax", True, **u8),
        dataclasses.replace(nncf_config, **u8),
    ]
    assert result.chosen is result.attempts[2] and result.passed
    assert result.chosen.val_top1 == top1(tmp_path / "int8.onnx")
    record = result.manifest_record([])
    assert record["method"] == "nncf post-training quantization (ONNX)" and record["quantizer"] == "nncf"
    assert record["bias_correction"] == "fast" and record["calibration"]["method"] == "mean-minmax"
    assert record["activation_type"] == "uint8" and record["weight_type"] == "int8"
    assert record["attempts"][2]["val_top1"] == result.chosen.val_top1


# --- the search: order of remedies, the QAT hook ------------------------------------------------


def failing(config, passed=False) -> Attempt:
    return Attempt(config, 0.9 if passed else 0.1, 0.0 if passed else 80.0, passed, 0.1)


def test_whole_int8_remedies_come_after_ort_and_before_float_islands(tiny_trunk, tmp_path):
    trunk, calib = tiny_trunk
    q = OrtQuantizer(trunk, calib, lambda p: 0.0, workdir=tmp_path / "w")
    attempts: list[Attempt] = []
    gen = q.configs(attempts)
    seen = []
    for _ in range(2 + len(WHOLE_INT8)):
        seen.append(next(gen))
        attempts.append(failing(seen[-1]))
    u8 = {"activation_type": "uint8"}  # the default: whole int8 in ONNX Runtime on x86
    assert seen[:2] == [QuantConfig("minmax", False, **u8), QuantConfig("minmax", True, **u8)]
    assert seen[2:] == [dataclasses.replace(c, **u8) for c in WHOLE_INT8]
    assert all(not c.excluded_nodes for c in seen)
    assert {c.quantizer for c in WHOLE_INT8} == {"nncf", "onnxruntime"} and any(c.equalize for c in WHOLE_INT8)
    # A whole-int8 remedy that passes ends the search: nothing after it could be faster.
    attempts.clear()
    gen = q.configs(attempts)
    for _ in range(3):
        attempts.append(failing(next(gen), passed=len(attempts) == 2))
    with pytest.raises(StopIteration):
        next(gen)


def test_the_record_keeps_the_old_keys_and_names_the_new_settings():
    old = QuantConfig("minmax", True).to_dict()
    assert {"method", "per_channel", "excluded_nodes"} <= old.keys()
    assert old["quantizer"] == "onnxruntime" and old["source"] == "fp32" and old["equalize"] is False
    cfg = QuantConfig("mean-minmax", True, quantizer="nncf", bias_correction="full", equalize=True, source="qat")
    assert cfg.describe() == "nncf, mean-minmax, per-channel, full bias correction, equalized, qat trunk"


def test_a_qat_source_is_prepared_once_and_quantized(tiny_trunk, tmp_path):
    import torch

    from edgetl.workstation.backbones import get_backbone
    from edgetl.workstation.export import export_onnx
    from edgetl.workstation.model import build_trunk
    from tests.helpers import TINY

    trunk, calib = tiny_trunk
    torch.manual_seed(1)  # other weights than the fp32 trunk's: which one was quantized shows
    qat = tmp_path / "qat.onnx"
    export_onnx(
        build_trunk(get_backbone(TINY)).eval(),
        torch.zeros(2, 3, 32, 32),
        qat,
        input_name="image",
        output_name="features",
    )
    calls = []

    def source():
        calls.append(1)
        return qat

    q = OrtQuantizer(trunk, calib, lambda p: 0.0, workdir=tmp_path / "w", qat=QatHook(lambda a: True, source))
    config = QuantConfig("minmax", True, source="qat")
    path, floats = q.quantize(config, max_drop=1.0)
    q.quantize(QuantConfig("minmax", False, source="qat"), max_drop=1.0)
    assert calls == [1] and floats == () and q.base(config) == tmp_path / "w" / "trunk.qat.prepared.onnx"
    got, from_qat, from_fp32 = run(path, calib), run(qat, calib), run(trunk, calib)
    assert np.abs(got - from_qat).mean() < 0.2 * np.abs(got - from_fp32).mean()
    # Without a QAT trunk the remedy cannot run here: the driver skips it.
    assert OrtQuantizer(trunk, calib, lambda p: 0.0, workdir=tmp_path / "v").quantize(config, max_drop=1.0) is None
    nothing = OrtQuantizer(
        trunk, calib, lambda p: 0.0, workdir=tmp_path / "u", qat=QatHook(lambda a: True, lambda: None)
    )
    assert nothing.quantize(config, max_drop=1.0) is None
    # The remedy itself: the best attempt with nothing in float, on the QAT trunk; only when wanted.
    tried = [
        Attempt(QuantConfig("minmax", False), 0.5, 40.0, False, 0.1),
        Attempt(QuantConfig("minmax", True), 0.8, 10.0, False, 0.1),
        Attempt(QuantConfig("minmax", True, ("n1",)), 0.85, 5.0, False, 0.1, ("n1",)),
    ]
    assert q.qat_config(tried) == QuantConfig("minmax", True, source="qat")
    assert (
        OrtQuantizer(
            trunk, calib, lambda p: 0.0, workdir=tmp_path / "t", qat=QatHook(lambda a: False, source)
        ).qat_config(tried)
        is None
    )
    assert OrtQuantizer(trunk, calib, lambda p: 0.0, workdir=tmp_path / "t").qat_config(tried) is None


def test_uint8_activations_keep_a_residual_block_whole_int8_in_onnxruntime(tmp_path):
    """ONNX Runtime fuses a QDQ residual Add into QLinearAdd with uint8 activations: with the
    quantizer's default, nothing of a MobileNetV2-style block runs in float."""
    inits: list = []
    nodes = [
        conv("a", "x", RNG.normal(0, 0.3, (8, 4, 3, 3)), "a.out", inits=inits),
        helper.make_node("Relu", ["a.out"], ["a.act"], name="a.relu"),
        conv("b", "a.act", RNG.normal(0, 0.3, (4, 8, 1, 1)), "b.out", inits=inits),
        helper.make_node("Add", ["x", "b.out"], ["y"], name="residual"),
    ]
    model = graph(nodes, inits, 4)
    src = tmp_path / "block.onnx"
    onnx.save(model, str(src))
    calib = RNG.normal(0, 1, (16, 4, 8, 8)).astype(np.float32)
    assert OrtQuantizer(src, calib, lambda p: 0.0, workdir=tmp_path).activation_type == "uint8"
    config = QuantConfig("minmax", True, activation_type="uint8")
    with quiet_onnxruntime():
        q = quantize_trunk(src, tmp_path / "q.onnx", calib, config, input_name="x", cache_dir=tmp_path)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(q), so, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    assert ops["QLinearConv"] == 2 and ops["QLinearAdd"] == 1
    assert ops["Conv"] + ops["FusedConv"] + ops["Add"] == 0
