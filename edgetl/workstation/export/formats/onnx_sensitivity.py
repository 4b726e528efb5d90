"""Where int8 hurts an ONNX trunk, and what keeping it in float would cost.

Every tensor ONNX Runtime quantizes is a noise source, measured end to end (:func:`rank_noise_sources`);
keeping one in float removes its noise but costs speed: its nodes run fp32 kernels and the int8
chain gets a dequantize/quantize pair at each edge of the float island. :func:`exclusion_schedule`
therefore picks islands by **noise removed per cost** (a knapsack's greedy order), not by noise
alone, so that a cheap island that removes most of the noise is tried before an expensive one
that removes a little more. Used by the ONNX Runtime int8 search (``onnx_quantize.py``, the float
island remedy); no per-backbone list.

The cost is an estimate in multiply-accumulates (MACs) per image, written here because no library
gives it for a QDQ island: the MACs of the island's convolutions and matrix products (the work
that moves from int8 to fp32 kernels) plus :data:`BOUNDARY_MACS_PER_ELEMENT` for every element of
each tensor crossing the island's edge (a quantize or dequantize pass). Ranking only needs the
ratio between islands to be right, and the searched attempts are timed anyway.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Activations that ORT's QDQ quantizer folds into the preceding op's output range: to keep a
# tensor produced by one of these in float, the op before it must stay float too.
_FOLDED_ACTIVATIONS = ("Relu", "Clip")
_QUANT_INPUT_SUFFIX = "_QuantizeLinear_Input"  # onnxruntime.quantization.quant_utils naming
_WEIGHT_SUFFIX = "_quantized"
# One quantize or dequantize pass over an element, in MAC-equivalents: an elementwise pass with a
# multiply, a round and a clamp, memory bound; about what a few MACs of a convolution cost.
BOUNDARY_MACS_PER_ELEMENT = 4.0


@dataclasses.dataclass(frozen=True)
class NoiseSource:
    """A place where int8 adds noise: an activation tensor or a weight.

    ``sqnr_db`` is the trunk output's SQNR when only this tensor is quantized (lower = worse);
    ``nodes`` are the nodes to keep in float so that this tensor is no longer quantized.
    """

    kind: str  # "activation" | "weight"
    tensor: str
    sqnr_db: float
    nodes: tuple[str, ...]
    cost_macs: float = math.nan  # estimated cost of keeping ``nodes`` in float (NaN: unknown)

    @property
    def noise(self) -> float:
        """Noise power relative to the output's signal power when only this source is quantized;
        independent sources add up, so this is what keeping it in float removes."""
        if math.isnan(self.sqnr_db):
            return math.inf  # unmeasurable: treat as the worst, never as harmless
        return 10.0 ** (-self.sqnr_db / 10.0)

    @property
    def gain_per_cost(self) -> float:
        """Noise removed per MAC-equivalent of cost (higher first); NaN when the cost is unknown."""
        if not math.isfinite(self.cost_macs) or self.cost_macs <= 0:
            return math.nan
        return self.noise / self.cost_macs

    def to_dict(self) -> dict[str, Any]:
        cost = self.cost_macs if math.isfinite(self.cost_macs) else None
        return {
            "kind": self.kind,
            "tensor": self.tensor,
            "sqnr_db": round(self.sqnr_db, 2),
            "nodes": list(self.nodes),
            "cost_mmacs": None if cost is None else round(cost / 1e6, 3),
        }


# --- sensitivity --------------------------------------------------------------------------------
# Which tensors hurt most when quantized? Local measures (the SQNR of each tensor against its own
# int8 copy) rank the wrong layers on MobileNetV2: noise added early is amplified by everything
# after it. So each noise source is measured end to end: a float copy of the trunk gets a fake
# quantizer (Q -> DQ with the calibrated scale, or the dequantized int8 weight) at every tensor the
# QDQ model quantizes, each behind its own on/off gate, and the trunk runs once per source with
# only that gate on. Noise from independent sources adds up (measured: the sum of the single-source
# noise powers is within 0.1 dB of all sources on), so the sources with the largest single-source
# noise are the ones worth keeping in float.


def _graph_index(graph) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    return producer, consumers


def _nodes_to_float_tensor(tensor: str, producer: dict, consumers: dict) -> tuple[str, ...]:
    """Nodes around ``tensor`` that must stay float for it to stay float (a tensor is quantized
    whenever one node next to it is), walking back through activations ORT folds away."""
    nodes = []
    node = producer.get(tensor)
    while node is not None:
        nodes.append(node.name)
        if node.op_type not in _FOLDED_ACTIVATIONS or not node.input:
            break
        node = producer.get(node.input[0])
    nodes.extend(n.name for n in consumers.get(tensor, ()))
    return tuple(dict.fromkeys(nodes))


def _dequantized_weights(qdq) -> dict[str, np.ndarray]:
    """Float weight name -> its dequantized int8 value, from the QDQ model's weight DQ nodes."""
    from onnx import numpy_helper

    inits = {i.name: i for i in qdq.graph.initializer}
    out = {}
    for node in qdq.graph.node:
        name = node.input[0] if node.op_type == "DequantizeLinear" else ""
        if not name.endswith(_WEIGHT_SUFFIX) or name not in inits:
            continue
        q = numpy_helper.to_array(inits[name])
        if q.dtype == np.int32:  # biases: int32 at the product of the input and weight scales, negligible
            continue
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        zp = (
            numpy_helper.to_array(inits[node.input[2]]).astype(np.float32)
            if len(node.input) > 2
            else np.zeros_like(scale)
        )
        if scale.size > 1:  # per-channel along the DQ axis
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * q.ndim
            shape[axis] = scale.size
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        out[name[: -len(_WEIGHT_SUFFIX)]] = ((q.astype(np.float32) - zp) * scale).astype(np.float32)
    return out


def _activation_qparams(qdq) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Float tensor name -> (scale, zero point) of the QuantizeLinear that quantizes it."""
    from onnx import numpy_helper

    inits = {i.name: i for i in qdq.graph.initializer}
    out = {}
    for node in qdq.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits or len(node.input) < 3:
            continue
        name = node.input[0]
        name = name[: -len(_QUANT_INPUT_SUFFIX)] if name.endswith(_QUANT_INPUT_SUFFIX) else name
        out[name] = (numpy_helper.to_array(inits[node.input[1]]), numpy_helper.to_array(inits[node.input[2]]))
    return out


def build_gated_model(float_model, qdq_model) -> tuple[Any, list[tuple[str, str, str]]]:
    """A float model with a gated fake quantizer at each tensor the QDQ model quantizes.

    Returns the model and its sources as ``(kind, tensor, gate input name)``; each gate is a scalar
    float input, 0 = float, 1 = as quantized.
    """
    import copy

    import onnx
    from onnx import helper, numpy_helper

    model = copy.deepcopy(float_model)
    graph = model.graph
    weights = _dequantized_weights(qdq_model)
    acts = _activation_qparams(qdq_model)
    float_inits = {i.name: i for i in graph.initializer}
    produced = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}

    sources: list[tuple[str, str, str]] = []
    rename: dict[str, str] = {}
    after: dict[str, list[Any]] = defaultdict(list)  # tensor -> nodes to insert once it exists
    front: list[Any] = []

    def gate() -> str:
        name = f"edgetl_gate_{len(sources)}"
        graph.input.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, []))
        return name

    for name, dq in weights.items():
        if name not in float_inits:
            continue
        g = gate()
        sources.append(("weight", name, g))
        delta = dq - numpy_helper.to_array(float_inits[name]).astype(np.float32)
        graph.initializer.append(numpy_helper.from_array(delta, f"{name}__delta"))
        front += [
            helper.make_node("Mul", [f"{name}__delta", g], [f"{name}__gdelta"]),
            helper.make_node("Add", [name, f"{name}__gdelta"], [f"{name}__mixed"]),
        ]
        rename[name] = f"{name}__mixed"
    for name, (scale, zp) in acts.items():
        if name not in produced:
            continue
        g = gate()
        sources.append(("activation", name, g))
        graph.initializer.extend(
            [numpy_helper.from_array(scale, f"{name}__scale"), numpy_helper.from_array(zp, f"{name}__zp")]
        )
        after[name] += [
            helper.make_node("QuantizeLinear", [name, f"{name}__scale", f"{name}__zp"], [f"{name}__q"]),
            helper.make_node("DequantizeLinear", [f"{name}__q", f"{name}__scale", f"{name}__zp"], [f"{name}__dq"]),
            helper.make_node("Sub", [f"{name}__dq", name], [f"{name}__noise"]),
            helper.make_node("Mul", [f"{name}__noise", g], [f"{name}__gnoise"]),
            helper.make_node("Add", [name, f"{name}__gnoise"], [f"{name}__mixed"]),
        ]
        rename[name] = f"{name}__mixed"

    original = list(graph.node)
    for node in original:
        node.input[:] = [rename.get(i, i) for i in node.input]
    nodes = front + [n for i in graph.input for n in after.get(i.name, ())]
    for node in original:
        nodes.append(node)
        nodes.extend(n for out in node.output for n in after.get(out, ()))
    del graph.node[:]
    graph.node.extend(nodes)
    for out in graph.output:
        if out.name in rename:
            out.name = rename[out.name]
    return model, sources


# --- cost -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class _CostModel:
    """Per-image shapes and MACs of a float graph, for :meth:`island_cost`."""

    macs: dict[str, float]  # node name -> MACs per image (0 for ops without weights)
    elements: dict[str, float]  # tensor -> elements per image (NaN: unknown)
    inputs: dict[str, list[str]]  # node name -> its non-initializer inputs
    outputs: dict[str, list[str]]  # node name -> its outputs
    consumers: dict[str, list[str]]  # tensor -> names of the nodes reading it

    def island_cost(self, nodes: Sequence[str]) -> float:
        """MACs of ``nodes`` plus a quantize/dequantize pass over every tensor crossing the island's
        edge: inputs made outside it and outputs read outside it (per image; NaN: unknown node)."""
        island = set(nodes)
        if not island <= self.macs.keys():
            return math.nan
        produced = {t for name in island for t in self.outputs[name]}
        edges = {t for name in island for t in self.inputs[name] if t not in produced}
        edges |= {t for t in produced if any(c not in island for c in self.consumers.get(t, ()))}
        compute = sum(self.macs[name] for name in island)
        return compute + BOUNDARY_MACS_PER_ELEMENT * sum(self.elements.get(t, math.nan) for t in edges)


def cost_model(float_model) -> _CostModel:
    """Shapes by ONNX shape inference (the batch dimension counted as 1) and MACs per node."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(float_model)
    graph = inferred.graph
    inits = {i.name: tuple(i.dims) for i in graph.initializer}

    def per_image(value_info) -> float:
        dims = value_info.type.tensor_type.shape.dim
        if not dims:
            return math.nan
        sizes = [d.dim_value if d.HasField("dim_value") else 1 for d in dims[1:]]
        return float(np.prod(sizes)) if sizes else 1.0

    elements = {v.name: per_image(v) for v in [*graph.input, *graph.value_info, *graph.output]}
    macs: dict[str, float] = {}
    for node in graph.node:
        weight = inits.get(node.input[1]) if len(node.input) > 1 else None
        out = elements.get(node.output[0], math.nan) if node.output else math.nan
        if node.op_type in ("Conv", "ConvTranspose") and weight:
            macs[node.name] = out * float(np.prod(weight[1:]))
        elif node.op_type in ("Gemm", "MatMul") and weight:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            k = weight[-1] if (node.op_type == "Gemm" and trans_b) else weight[0]
            macs[node.name] = out * float(k)
        else:
            macs[node.name] = 0.0
    consumers: dict[str, list[str]] = defaultdict(list)
    for node in graph.node:
        for t in node.input:
            consumers[t].append(node.name)
    return _CostModel(
        macs=macs,
        elements=elements,
        inputs={n.name: [t for t in n.input if t and t not in inits] for n in graph.node},
        outputs={n.name: list(n.output) for n in graph.node},
        consumers=dict(consumers),
    )


def rank_noise_sources(float_path: Path, qdq_path: Path, calib: np.ndarray, *, input_name: str) -> list[NoiseSource]:
    """Every tensor the QDQ model quantizes, in the order the search should keep them in float:
    most noise removed per cost first (:func:`order_by_gain_per_cost`).

    ``sqnr_db`` of a source is the trunk output's SQNR when only that tensor is quantized.
    """
    import onnx
    import onnxruntime as ort

    float_model = onnx.load(str(float_path))
    model, sources = build_gated_model(float_model, onnx.load(str(qdq_path)))
    if not sources:
        return []
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    off = {g: np.array(0.0, dtype=np.float32) for _, _, g in sources}
    x = np.ascontiguousarray(calib, dtype=np.float32)
    reference = session.run(None, {input_name: x, **off})[0].astype(np.float64)
    signal = float((reference**2).sum())
    producer, consumers = _graph_index(float_model.graph)
    costs = cost_model(float_model)
    ranked = []
    for kind, tensor, g in sources:
        out = session.run(None, {input_name: x, **off, g: np.array(1.0, dtype=np.float32)})[0]
        noise = float(((out - reference) ** 2).sum())
        sqnr = math.inf if noise <= 0 else 10.0 * math.log10(max(signal, 1e-30) / noise)
        if kind == "weight":
            nodes = tuple(n.name for n in consumers.get(tensor, ()))
        else:
            nodes = _nodes_to_float_tensor(tensor, producer, consumers)
        if nodes:
            ranked.append(NoiseSource(kind, tensor, sqnr, nodes, costs.island_cost(nodes)))
    return order_by_gain_per_cost(ranked, costs.island_cost)


def worst_first(sources: Sequence[NoiseSource]) -> list[NoiseSource]:
    """``sources`` by the noise each adds alone, most first (what a log calls the worst), whatever
    order the search keeps them in float."""
    return sorted(sources, key=lambda s: -s.noise)


def order_by_gain_per_cost(
    sources: Sequence[NoiseSource], island_cost: Callable[[Sequence[str]], float]
) -> list[NoiseSource]:
    """``sources`` in greedy knapsack order: each next one removes the most noise per unit of
    *added* cost, given those before it are already in float (islands that share nodes or edges
    cost less together). Ties, and every source when a cost is unknown, go to the most noise.
    With every cost equal this is the plain most-noise-first order."""
    by_noise = worst_first(sources)  # a NaN SQNR counts as the most noise
    if any(not math.isfinite(island_cost(s.nodes)) for s in by_noise):
        return by_noise
    ordered: list[NoiseSource] = []
    remaining = by_noise
    kept: set[str] = set()
    spent = 0.0
    while remaining:
        ratios = []
        for s in remaining:
            added = island_cost(tuple(kept | set(s.nodes))) - spent
            ratios.append(math.inf if added <= 0 else s.noise / added)
        pick = remaining[ratios.index(max(ratios))]  # the first (most noise) among equal ratios
        remaining = [s for s in remaining if s is not pick]
        ordered.append(pick)
        kept |= set(pick.nodes)
        spent = island_cost(tuple(kept))
    return ordered


def exclusion_schedule(
    sources: Sequence[NoiseSource], cap: int, counted: Callable[[str], bool] | None = None
) -> list[tuple[str, ...]]:
    """Node sets keeping growing prefixes of ``sources`` (in the order :func:`rank_noise_sources`
    gives) in float, each with at most ``cap`` nodes that ``counted`` accepts (None: every node);
    a step that adds no node is skipped. The quantizer counts only weighted layers: the nodes
    without weights that a prefix also holds (pooling, flatten, concatenation of a trunk's taps)
    cost next to nothing in float, and counting them could use up the cap before the first
    convolution, leaving no step at all.

    Each step is the shortest prefix that removes half of the noise still left (1/2, 3/4, 7/8 ...
    of the total: about 3 dB more output SQNR per step), finally all sources. When a source's noise
    is unmeasurable (infinite), the prefixes double instead (1, 2, 4, 8 ...).
    """
    noises = [s.noise for s in sources]
    total = sum(noises)
    if math.isfinite(total) and total > 0:
        ends, removed, step = [], 0.0, 1
        for i, noise in enumerate(noises):
            removed += noise
            if removed >= total * (1.0 - 2.0**-step) - 1e-12 * total:
                ends.append(i + 1)
                while step < 60 and removed >= total * (1.0 - 2.0**-step) - 1e-12 * total:
                    step += 1
        ends.append(len(sources))
    else:
        ends = []
        k = 1
        while k < len(sources):
            ends.append(k)
            k *= 2
        ends.append(len(sources))
    schedule: list[tuple[str, ...]] = []
    for k in dict.fromkeys(ends):
        nodes = tuple(dict.fromkeys(n for s in sources[:k] for n in s.nodes))
        if sum(1 for n in nodes if counted is None or counted(n)) > cap:
            break
        if nodes and (not schedule or nodes != schedule[-1]):
            schedule.append(nodes)
    return schedule
