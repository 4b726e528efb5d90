"""int8 quantization of a trunk: calibration data, sensitivity from data, the search and its record."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from edgetl.core.imagefolder import Sample
from edgetl.workstation.backbones import get_backbone
from edgetl.workstation.export import export_onnx
from edgetl.workstation.export.formats.onnx_quantize import (
    ArrayReader,
    OrtQuantizer,
    QuantConfig,
    prepare_for_quantization,
    quantize_trunk,
    quiet_onnxruntime,
)
from edgetl.workstation.export.formats.onnx_sensitivity import (
    BOUNDARY_MACS_PER_ELEMENT,
    NoiseSource,
    build_gated_model,
    cost_model,
    exclusion_schedule,
    order_by_gain_per_cost,
    rank_noise_sources,
)
from edgetl.workstation.export.int8 import search_int8, select_calibration
from edgetl.workstation.model import build_trunk
from tests.helpers import TINY


@pytest.fixture(scope="module")
def trunk_onnx(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    trunk = build_trunk(get_backbone(TINY)).eval()
    path = tmp_path_factory.mktemp("trunk") / "trunk.onnx"
    export_onnx(trunk, torch.zeros(2, 3, 32, 32), path, input_name="image", output_name="features")
    return path


@pytest.fixture(scope="module")
def calib() -> np.ndarray:
    return np.random.default_rng(0).normal(0, 1, (24, 3, 32, 32)).astype(np.float32)


def run_onnx(path, x, **extra) -> np.ndarray:
    session = ort.InferenceSession(
        str(path) if not isinstance(path, bytes) else path, providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"image": x, **extra})[0]


def test_calibration_is_deterministic_stratified_and_capped():
    samples = [Sample(f"/d/{c}/{i:03d}.png", c) for c in range(3) for i in range(40 if c == 0 else 10)]
    first = select_calibration(samples, 12)
    assert first == select_calibration(list(reversed(samples)), 12)  # order of the split does not matter
    assert Counter(s.label for s in first) == {0: 4, 1: 4, 2: 4}
    assert len(set(first)) == 12
    # A class running out leaves its share to the others; never more than asked or available.
    assert Counter(s.label for s in select_calibration(samples, 40)) == {0: 20, 1: 10, 2: 10}
    assert len(select_calibration(samples, 1000)) == len(samples)
    assert select_calibration(samples, 12, seed=1) != first


def test_array_reader_yields_fixed_batches_and_supports_ranges():
    x = np.arange(10, dtype=np.float32).reshape(10, 1)
    reader = ArrayReader(x, "image", batch_size=4)
    assert len(reader) == 3
    assert [b["image"].shape[0] for b in reader] == [4, 4, 2]
    reader.set_range(1, 2)
    assert reader.get_next()["image"][0, 0] == 4.0 and reader.get_next() is None


def test_quantize_trunk_writes_qdq_and_keeps_stdout_clean(trunk_onnx, calib, tmp_path, capfd):
    with quiet_onnxruntime():
        # Entropy calibration prints progress on stdout inside ORT: it must not reach ours (--json).
        out = quantize_trunk(
            trunk_onnx, tmp_path / "q.onnx", calib, QuantConfig("entropy", True), input_name="image", cache_dir=tmp_path
        )
    assert capfd.readouterr().out == ""
    ops = Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    assert (tmp_path / "calibration.entropy.json").is_file()  # ranges cached for later attempts
    a, b = run_onnx(trunk_onnx, calib), run_onnx(out, calib)
    assert a.shape == b.shape and np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99


def test_gated_model_is_float_when_off_and_quantized_when_on(trunk_onnx, calib, tmp_path):
    with quiet_onnxruntime():
        prepared = prepare_for_quantization(trunk_onnx, tmp_path / "prepared.onnx")
        qdq = quantize_trunk(
            prepared, tmp_path / "q.onnx", calib, QuantConfig("minmax", True), input_name="image", cache_dir=tmp_path
        )
    model, sources = build_gated_model(onnx.load(str(prepared)), onnx.load(str(qdq)))
    onnx.checker.check_model(model)
    kinds = Counter(kind for kind, _, _ in sources)
    assert kinds["weight"] == 3 and kinds["activation"] >= 4  # three convolutions; image, their outputs, features
    blob = model.SerializeToString()
    off = {g: np.array(0.0, np.float32) for _, _, g in sources}
    on = {g: np.array(1.0, np.float32) for _, _, g in sources}
    np.testing.assert_allclose(run_onnx(blob, calib, **off), run_onnx(prepared, calib), atol=1e-5)
    simulated, real = run_onnx(blob, calib, **on), run_onnx(qdq, calib)
    assert not np.allclose(simulated, run_onnx(prepared, calib), atol=1e-5)
    assert np.abs(simulated - real).max() < 0.1 * np.abs(real).max()


def test_rank_noise_sources_returns_nodes_of_the_graph(trunk_onnx, calib, tmp_path):
    with quiet_onnxruntime():
        prepared = prepare_for_quantization(trunk_onnx, tmp_path / "prepared.onnx")
        qdq = quantize_trunk(
            prepared, tmp_path / "q.onnx", calib, QuantConfig("minmax", False), input_name="image", cache_dir=tmp_path
        )
        ranked = rank_noise_sources(prepared, qdq, calib[:8], input_name="image")
    graph = onnx.load(str(prepared)).graph
    names = {n.name for n in graph.node}
    assert ranked and all(s.nodes and set(s.nodes) <= names for s in ranked)
    assert all(np.isfinite(s.sqnr_db) and np.isfinite(s.cost_macs) and s.cost_macs > 0 for s in ranked)
    # ordered by noise removed per cost, which is not the plain most-noise-first order here
    assert ranked[0].gain_per_cost == max(s.gain_per_cost for s in ranked)
    image = next(s for s in ranked if s.tensor == "image")
    assert image.kind == "activation" and image.nodes == (graph.node[0].name,)  # the first conv reads it
    weight = next(s for s in ranked if s.kind == "weight")
    assert len(weight.nodes) == 1 and weight.nodes[0].endswith("Conv")


def _source(tensor: str, sqnr_db: float, nodes: tuple[str, ...], cost: float = math.nan) -> NoiseSource:
    return NoiseSource("activation", tensor, sqnr_db, nodes, cost)


def test_exclusion_schedule_halves_the_remaining_noise_dedupes_and_caps():
    # noise powers 8, 4, 2, 1, 1 (10 dB = 0.1): halving what is left takes 1, then 2, 3, 4, 5 sources
    s = [
        _source(f"t{i}", -10 * math.log10(p), nodes)
        for i, (p, nodes) in enumerate(
            [(0.8, ("a", "b")), (0.4, ("b",)), (0.2, ("c",)), (0.1, ("d",)), (0.1, ("e", "f", "g", "h"))]
        )
    ]
    # the second prefix adds no node: no duplicate attempt
    assert exclusion_schedule(s, cap=10) == [
        ("a", "b"),
        ("a", "b", "c"),
        ("a", "b", "c", "d"),
        ("a", "b", "c", "d", "e", "f", "g", "h"),
    ]
    assert exclusion_schedule(s, cap=4) == [("a", "b"), ("a", "b", "c"), ("a", "b", "c", "d")]
    assert exclusion_schedule(s, cap=1) == []
    # one source with most of the noise is a step of its own; the small ones follow, all at the end
    big = [_source("x", 0.0, ("x",)), *(_source(f"y{i}", 40.0, (f"y{i}",)) for i in range(6))]
    steps = exclusion_schedule(big, cap=10)
    assert steps[0] == ("x",) and len(steps[-1]) == 7


def test_exclusion_schedule_doubles_when_a_noise_is_unmeasurable():
    s = [_source("nan", math.nan, ("a",)), *(_source(f"t{i}", 20.0, (f"n{i}",)) for i in range(4))]
    assert [len(n) for n in exclusion_schedule(s, cap=10)] == [1, 2, 4, 5]


def test_sources_are_ordered_by_noise_removed_per_cost():
    # "big" removes the most noise but costs 100x; "cheap" removes half as much for 1
    big, cheap, tiny = _source("big", 10.0, ("B",)), _source("cheap", 13.0, ("C",)), _source("tiny", 40.0, ("T",))
    cost = {"B": 100.0, "C": 1.0, "T": 1.0}
    ordered = order_by_gain_per_cost([big, cheap, tiny], lambda nodes: sum(cost[n] for n in nodes))
    assert [s.tensor for s in ordered] == ["cheap", "big", "tiny"]  # noise per cost: 0.05, 0.001, 0.0001
    # a source whose nodes are already in float costs nothing more: it comes right after
    shared = _source("shared", 30.0, ("C",))
    ordered = order_by_gain_per_cost([big, cheap, shared], lambda nodes: sum(cost[n] for n in set(nodes)))
    assert [s.tensor for s in ordered][:2] == ["cheap", "shared"]
    # equal costs: plain most-noise-first; an unknown cost: most-noise-first too, a NaN SQNR first
    flat = order_by_gain_per_cost([tiny, cheap, big], lambda nodes: float(len(nodes)))
    assert [s.tensor for s in flat] == ["big", "cheap", "tiny"]
    unknown = order_by_gain_per_cost([tiny, _source("nan", math.nan, ("N",)), big], lambda nodes: math.nan)
    assert [s.tensor for s in unknown] == ["nan", "big", "tiny"]


def test_island_cost_counts_the_float_convolutions_and_the_edges(trunk_onnx, tmp_path):
    with quiet_onnxruntime():
        prepared = prepare_for_quantization(trunk_onnx, tmp_path / "prepared.onnx")
    model = onnx.load(str(prepared))
    costs = cost_model(model)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    first = convs[0]
    weight = next(i for i in model.graph.initializer if i.name == first.input[1])
    out = costs.elements[first.output[0]]
    assert costs.macs[first.name] == out * float(np.prod(weight.dims[1:])) > 0
    one = costs.island_cost([first.name])
    # compute plus a quantize/dequantize pass over its input and output
    assert one == pytest.approx(
        costs.macs[first.name] + BOUNDARY_MACS_PER_ELEMENT * (costs.elements[first.input[0]] + out)
    )
    # two adjacent nodes in float: the tensor between them is no longer an edge
    second = next(n for n in model.graph.node if first.output[0] in n.input)
    both = costs.island_cost([first.name, second.name])
    assert both < one + costs.island_cost([second.name])
    assert math.isnan(costs.island_cost(["no such node"]))


def test_search_stops_at_the_first_attempt_within_the_bar(trunk_onnx, calib, tmp_path):
    out = tmp_path / "int8.onnx"
    result = search_int8(
        OrtQuantizer(trunk_onnx, calib, lambda p: 0.9, workdir=tmp_path / "w"), out, baseline_top1=0.9, max_drop=1.0
    )
    assert result.passed and len(result.attempts) == 1
    assert result.chosen.config == QuantConfig("minmax", False, activation_type="uint8") and out.is_file()
    record = result.manifest_record(["a.png"])
    assert record["method"] == "onnxruntime static QDQ" and record["per_channel"] is False
    assert record["calibration"] == {"method": "minmax", "size": len(calib), "images": ["a.png"]}
    assert record["excluded_nodes"] == [] and record["attempts"][0]["passed"] is True


def test_search_tries_every_remedy_and_keeps_the_best(trunk_onnx, calib, tmp_path):
    scores = itertools.chain([0.50, 0.70, 0.80, 0.75], itertools.repeat(0.60))
    seen = []

    def evaluate(path):
        seen.append(path)
        return next(scores)

    out = tmp_path / "int8.onnx"
    result = search_int8(
        OrtQuantizer(trunk_onnx, calib, evaluate, workdir=tmp_path / "w", whole_int8=()),
        out,
        baseline_top1=0.9,
        max_drop=1.0,
    )
    configs = [a.config for a in result.attempts]
    assert not result.passed and len(configs) == len(seen)
    u8 = {"activation_type": "uint8"}
    assert configs[:2] == [QuantConfig("minmax", False, **u8), QuantConfig("minmax", True, **u8)]
    # Remedies continue from the better granularity (per-channel scored 0.70 > 0.50).
    assert all(c.per_channel for c in configs[2:])
    assert any(c.excluded_nodes for c in configs) and {"percentile", "entropy"} <= {c.method for c in configs}
    assert result.chosen.val_top1 == 0.80 and result.chosen.config.excluded_nodes
    assert abs(result.chosen.top1_drop_pp - 10.0) < 1e-9
    record = result.manifest_record([])
    assert record["sensitivity"] and out.is_file()
    assert record["excluded_nodes"] == list(result.chosen.config.excluded_nodes)
    assert [a["val_top1"] for a in record["attempts"]] == [a.val_top1 for a in result.attempts]


def test_exclusion_schedule_caps_only_the_counted_nodes():
    # a tapped trunk: cheap pooling/flatten islands come first in cost order, then the convolutions
    flat = [_source(f"flat{i}", 60.0, (f"Flatten_{i}",)) for i in range(20)]
    convs = [_source("stem", 10.0, ("Conv_0",)), _source("dw", 13.0, ("Conv_1", "Clip_1"))]
    counted = {"Conv_0", "Conv_1"}.__contains__
    assert exclusion_schedule([*flat, *convs], cap=3) == []  # every node counted: the cap is spent on flattens
    steps = exclusion_schedule([*flat, *convs], cap=3, counted=counted)
    assert steps and "Conv_0" in steps[0] and "Conv_1" in steps[-1]
    assert exclusion_schedule([*flat, *convs], cap=1, counted=counted)[-1][-1] == "Conv_0"


def test_search_keeps_convolutions_of_a_tapped_trunk_in_float(calib, tmp_path):
    # every block's pooled output in the features (finetune --features blocks): the float-island
    # remedy must still reach the convolutions behind the taps' pooling and flatten nodes
    from edgetl.workstation.model import tap_positions

    torch.manual_seed(0)
    trunk = build_trunk(get_backbone(TINY)).eval()
    trunk.set_taps(tap_positions(trunk))
    path = tmp_path / "trunk.onnx"
    export_onnx(trunk, torch.zeros(2, 3, 32, 32), path, input_name="image", output_name="features")
    result = search_int8(
        OrtQuantizer(path, calib, lambda p: 0.5, workdir=tmp_path / "w", whole_int8=()),
        tmp_path / "int8.onnx",
        baseline_top1=0.9,
        max_drop=1.0,
    )
    convs = {n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"}
    islands = [set(a.float_layers) for a in result.attempts if a.float_layers]
    assert islands and any(island & convs for island in islands)
