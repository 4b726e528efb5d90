"""Where int8 hurts an ONNX trunk: every tensor ONNX Runtime quantizes, ranked by its end-to-end noise.

Used by the ONNX Runtime int8 search (``onnx_quantize.py``, remedy 3) to choose the nodes to keep
in float; no per-backbone list.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Activations that ORT's QDQ quantizer folds into the preceding op's output range: to keep a
# tensor produced by one of these in float, the op before it must stay float too.
_FOLDED_ACTIVATIONS = ("Relu", "Clip")
_QUANT_INPUT_SUFFIX = "_QuantizeLinear_Input"  # onnxruntime.quantization.quant_utils naming
_WEIGHT_SUFFIX = "_quantized"


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

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "tensor": self.tensor, "sqnr_db": round(self.sqnr_db, 2), "nodes": list(self.nodes)}


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


def rank_noise_sources(float_path: Path, qdq_path: Path, calib: np.ndarray, *, input_name: str) -> list[NoiseSource]:
    """Every tensor the QDQ model quantizes, largest end-to-end noise first.

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
            ranked.append(NoiseSource(kind, tensor, sqnr, nodes))
    return sorted(ranked, key=lambda s: s.sqnr_db)


def exclusion_schedule(sources: Sequence[NoiseSource], cap: int) -> list[tuple[str, ...]]:
    """Node sets keeping the worst 1, 2, 4, 8 ... (finally all) sources in float, each at most
    ``cap`` nodes; a step that adds no node is skipped."""
    schedule: list[tuple[str, ...]] = []
    k = 1
    while sources:
        k = min(k, len(sources))
        nodes = tuple(dict.fromkeys(n for s in sources[:k] for n in s.nodes))
        if len(nodes) > cap:
            break
        if not schedule or nodes != schedule[-1]:
            schedule.append(nodes)
        if k == len(sources):
            break
        k *= 2
    return schedule
