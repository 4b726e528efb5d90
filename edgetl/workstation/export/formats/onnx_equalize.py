"""Cross-layer equalization of an ONNX graph before int8 calibration (data-free quantization).

Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction": for
two convolutions joined by a scale-equivariant activation (``f(x / s) = f(x) / s`` for ``s > 0``:
ReLU, or nothing), dividing output channel ``i`` of the first by ``s_i`` and multiplying input
channel ``i`` of the second by ``s_i`` leaves the function unchanged. With
``s_i = sqrt(r1_i * r2_i) / r2_i`` (``r``: the largest absolute weight of the channel) both
channels end up with the range ``sqrt(r1_i * r2_i)``: per-tensor int8 weights then lose far less of
the small channels, which is what breaks per-tensor int8 on depthwise-separable networks such as
MobileNetV2 (a depthwise kernel's channels differ in range by orders of magnitude).

Written here (numpy + onnx): no library usable by edgetl implements it for ONNX graphs. ONNX
Runtime's quantization tools have no equalization; NNCF's ONNX backend has none either (its
ChannelAlignment is OpenVINO-only and aligns Conv -> Add -> Conv, not Conv -> ReLU -> Conv);
AIMET's ``aimet_onnx`` has one, but it is an 85 MB wheel that pulls in torch, onnx2torch, bokeh,
pandas, osqp and more for one function.

ReLU6 (``Clip(0, 6)``) is not scale-equivariant. As in the paper (and AIMET), a Clip(0, max) between
an equalized pair is replaced by ReLU, which changes the float model wherever an activation went
above ``max``; the caller records which nodes were replaced, and the int8 search's accuracy bar
(scored against the original fp32 model) decides whether the result is kept. Bias absorption (the
paper's second step) is not done.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

ROUNDS = 6  # sweeps over all pairs: a conv in two pairs (expand -> depthwise -> project) couples them
ACTIVATIONS = ("Relu", "Clip")


@dataclasses.dataclass(frozen=True)
class Pair:
    """Two convolutions joined by at most one activation, whose middle tensors feed only this chain."""

    first: str
    second: str
    activation: str | None  # the node between them (None: directly connected)
    clip: bool  # whether that node is a Clip(0, max) (ReLU6): replaced by ReLU when equalized


@dataclasses.dataclass(frozen=True)
class Equalization:
    """What :func:`equalize_model` did: the pairs it equalized, the Clip nodes it turned into ReLU."""

    pairs: tuple[Pair, ...]
    relu6_replaced: tuple[str, ...]
    rounds: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "cross-layer equalization (Nagel et al. 2019), no bias absorption",
            "pairs": len(self.pairs),
            "rounds": self.rounds,
            "relu6_replaced_by_relu": list(self.relu6_replaced),
        }


def _constant(model, name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    if not name:
        return None
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
    return None


def _attr(node, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def find_pairs(model) -> list[Pair]:
    """Conv -> (Relu | Clip(0, max) | nothing) -> Conv chains that can be equalized exactly (before the
    Clip is replaced): both weights are initializers used by this node only, the middle tensors are
    not graph outputs and feed only the chain, and the second conv is ordinary (group 1) or depthwise
    (one group per input channel)."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    outputs = {o.name for o in graph.output}

    def only_consumer(tensor: str):
        users = consumers.get(tensor, [])
        return users[0] if len(users) == 1 and tensor not in outputs else None

    def own_initializer(name: str) -> bool:
        return name in inits and len(consumers[name]) == 1

    def conv_ok(node) -> bool:
        return (
            node.op_type == "Conv"
            and own_initializer(node.input[1])
            and (len(node.input) < 3 or not node.input[2] or own_initializer(node.input[2]))
        )

    pairs = []
    for first in graph.node:
        if not conv_ok(first):
            continue
        middle = only_consumer(first.output[0])
        if middle is None:
            continue
        activation, clip = None, False
        if middle.op_type in ACTIVATIONS:
            if middle.op_type == "Clip":
                low = _constant(model, middle.input[1]) if len(middle.input) > 1 else None
                if low is None or float(np.asarray(low).reshape(-1)[0]) != 0.0:
                    continue  # only Clip(0, max): ReLU6 and friends
                high = middle.input[2] if len(middle.input) > 2 else ""
                clip = bool(high)  # Clip(0, None) is a ReLU already
            activation = middle.name
            second = only_consumer(middle.output[0])
        else:
            second = middle
        if (
            second is None
            or not conv_ok(second)
            or second.input[0] != (middle.output[0] if activation else first.output[0])
        ):
            continue
        w1 = np.asarray(_constant(model, first.input[1]))
        w2 = np.asarray(_constant(model, second.input[1]))
        channels = w1.shape[0]
        group = int(_attr(second, "group", 1))
        if group == 1 and w2.shape[1] != channels:
            continue
        if group != 1 and not (group == channels and w2.shape[1] == 1 and w2.shape[0] % channels == 0):
            continue
        pairs.append(Pair(first.name, second.name, activation, clip))
    return pairs


def _ranges_in(w2: np.ndarray, depthwise: bool, channels: int) -> np.ndarray:
    """Largest |weight| per input channel of the second conv."""
    if depthwise:
        return np.abs(w2.reshape(channels, -1)).max(axis=1)
    return np.abs(np.moveaxis(w2, 1, 0).reshape(channels, -1)).max(axis=1)


def equalize_model(model, *, rounds: int = ROUNDS, replace_relu6: bool = True) -> Equalization:
    """Equalize ``model`` (an ``onnx.ModelProto``, BN already folded) in place; see the module docstring.

    ``replace_relu6=False`` skips pairs joined by a Clip(0, max) instead (then the float model is
    unchanged up to rounding).
    """
    from onnx import numpy_helper

    graph = model.graph
    pairs = [p for p in find_pairs(model) if replace_relu6 or not p.clip]
    nodes = {n.name: n for n in graph.node}
    inits = {i.name: i for i in graph.initializer}
    arrays: dict[str, np.ndarray] = {}

    def array(name: str) -> np.ndarray:
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(inits[name]).astype(np.float64)
        return arrays[name]

    for _ in range(rounds):
        for p in pairs:
            a, b = nodes[p.first], nodes[p.second]
            w1, w2 = array(a.input[1]), array(b.input[1])
            channels = w1.shape[0]
            depthwise = int(_attr(b, "group", 1)) != 1
            r1 = np.abs(w1.reshape(channels, -1)).max(axis=1)
            r2 = _ranges_in(w2, depthwise, channels)
            ok = (r1 > 0) & (r2 > 0) & np.isfinite(r1) & np.isfinite(r2)
            s = np.ones(channels)
            s[ok] = np.sqrt(r1[ok] * r2[ok]) / r2[ok]
            w1 /= s.reshape(-1, *([1] * (w1.ndim - 1)))
            if len(a.input) > 2 and a.input[2]:
                array(a.input[2])[...] /= s
            if depthwise:
                per_out = np.repeat(s, w2.shape[0] // channels)
                w2 *= per_out.reshape(-1, *([1] * (w2.ndim - 1)))
            else:
                w2 *= s.reshape(1, -1, *([1] * (w2.ndim - 2)))
    for name, arr in arrays.items():
        dtype = numpy_helper.to_array(inits[name]).dtype
        inits[name].CopyFrom(numpy_helper.from_array(arr.astype(dtype), name))
    replaced = []
    for p in pairs:
        if p.clip and p.activation is not None:
            node = nodes[p.activation]
            del node.input[1:]
            node.op_type = "Relu"
            replaced.append(node.name)
    return Equalization(tuple(pairs), tuple(replaced), rounds)


def equalize_file(src: Path, dst: Path, *, rounds: int = ROUNDS) -> Equalization:
    """:func:`equalize_model` from file ``src`` to file ``dst`` (checked with ``onnx.checker``)."""
    import onnx

    model = onnx.load(str(src))
    result = equalize_model(model, rounds=rounds)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return result


def range_spread(model, names: list[str] | None = None) -> float:
    """Mean over the convolutions (``names``, default all) of log10(largest / smallest per-output-channel
    weight range): how badly one per-tensor int8 scale fits the channels (0: all channels alike)."""
    spreads = []
    for node in model.graph.node:
        if node.op_type != "Conv" or (names is not None and node.name not in names):
            continue
        w = _constant(model, node.input[1])
        if w is None:
            continue
        r = np.abs(np.asarray(w, np.float64).reshape(w.shape[0], -1)).max(axis=1)
        r = r[r > 0]
        if len(r):
            spreads.append(float(np.log10(r.max() / r.min())))
    return float(np.mean(spreads)) if spreads else 0.0
