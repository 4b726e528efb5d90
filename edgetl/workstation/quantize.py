"""Static int8 quantization of an ONNX trunk with ONNX Runtime, searched until it keeps its accuracy.

Only the trunk is quantized: it holds almost all weights and compute, while a head is a few
kilobytes and stays fp32 in every variant.

Plain ORT static quantization is not enough for small mobile backbones: on a digits-fine-tuned
MobileNetV2 at 96 px its defaults lost 12.8 pp of top-1, per-channel weights still 0.6 pp, and
the worst single noise sources sit in the first two convolutions. :func:`search_int8` therefore tries
remedies in order of
cost, each scored on the run's validation images, and stops at the first within ``max_drop``:

1. ORT's defaults (QDQ, int8 weights and activations, MinMax calibration, per-tensor weights);
2. per-channel weights (depthwise convolutions have very different ranges per channel);
3. keeping the most sensitive nodes in float: those around the worst 1, 2, 4, 8 ... noise sources,
   measured on calibration images by :func:`rank_noise_sources` (no per-backbone list), up to a
   cap of a quarter of the weighted layers;
4. other calibration methods (percentile, entropy), alone and with that exclusion set.

Every attempt is recorded, so the manifest says what was tried and why the shipped model looks
the way it does. ORT calibrates once per method: ranges are cached and every later attempt with
that method is a graph rewrite, which keeps the whole search at seconds per attempt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.core.imagefolder import Sample

log = logging.getLogger(__name__)

METHODS = ("minmax", "entropy", "percentile")
QUANT_METHOD = "onnxruntime static QDQ"
# Ops whose weights make them the unit a user thinks of as "a layer".
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Activations that ORT's QDQ quantizer folds into the preceding op's output range: to keep a
# tensor produced by one of these in float, the op before it must stay float too.
_FOLDED_ACTIVATIONS = ("Relu", "Clip")
_QUANT_INPUT_SUFFIX = "_QuantizeLinear_Input"  # onnxruntime.quantization.quant_utils naming
_WEIGHT_SUFFIX = "_quantized"


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """One way of quantizing the trunk."""

    method: str = "minmax"
    per_channel: bool = False
    excluded_nodes: tuple[str, ...] = ()

    def describe(self) -> str:
        parts = [self.method, "per-channel" if self.per_channel else "per-tensor"]
        if self.excluded_nodes:
            parts.append(f"{len(self.excluded_nodes)} node(s) in float")
        return ", ".join(parts)


@dataclasses.dataclass(frozen=True)
class Attempt:
    config: QuantConfig
    val_top1: float
    top1_drop_pp: float
    passed: bool
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.config.method,
            "per_channel": self.config.per_channel,
            "excluded_nodes": list(self.config.excluded_nodes),
            "val_top1": self.val_top1,
            "top1_drop_pp": round(self.top1_drop_pp, 4),
            "passed": self.passed,
            "seconds": round(self.seconds, 2),
        }


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


@dataclasses.dataclass(frozen=True)
class QuantResult:
    """The chosen model (written to the output path) and the record of the search."""

    chosen: Attempt
    attempts: tuple[Attempt, ...]
    sensitivity: tuple[NoiseSource, ...]
    calibration_size: int

    @property
    def passed(self) -> bool:
        return self.chosen.passed

    def manifest_record(self, calibration_images: list[str]) -> dict[str, Any]:
        cfg = self.chosen.config
        return {
            "method": QUANT_METHOD,
            "activation_type": "int8",
            "weight_type": "int8",
            "per_channel": cfg.per_channel,
            "calibration": {"method": cfg.method, "size": self.calibration_size, "images": calibration_images},
            "excluded_nodes": list(cfg.excluded_nodes),
            "sensitivity": [s.to_dict() for s in self.sensitivity[:10]],
            "attempts": [a.to_dict() for a in self.attempts],
        }


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# --- calibration data ---------------------------------------------------------------------------


def select_calibration(samples: Sequence[Sample], size: int, *, seed: int = 0) -> list[Sample]:
    """``size`` training samples, the same every time, classes taken in turn (stratified).

    Round-robin over classes (each shuffled with ``seed``) keeps a small calibration set from
    missing a class whose activations would then fall outside the calibrated ranges.
    """
    by_class: dict[int, list[Sample]] = defaultdict(list)
    for s in sorted(samples, key=lambda s: (s.label, s.path)):
        by_class[s.label].append(s)
    rng = np.random.default_rng(seed)
    queues = [[items[i] for i in rng.permutation(len(items))] for _, items in sorted(by_class.items())]
    chosen: list[Sample] = []
    depth = 0
    while len(chosen) < size and any(depth < len(q) for q in queues):
        chosen.extend(q[depth] for q in queues if depth < len(q) and len(chosen) < size)
        depth += 1
    return chosen[:size]


class ArrayReader:
    """ORT ``CalibrationDataReader`` over a preprocessed array, in fixed-size batches.

    It supports ``len``/``set_range`` so that ORT collects statistics one batch at a time
    (``CalibStridedMinMax``): memory stays bounded by one batch of activations, and the histogram
    calibrators never see batches of unequal size (which they cannot stack).
    """

    def __init__(self, x: np.ndarray, input_name: str, batch_size: int = 16):
        self._batches = [x[i : i + batch_size] for i in range(0, len(x), batch_size)]
        self._name = input_name
        self._range = (0, len(self._batches))
        self._next = 0

    def __len__(self) -> int:
        return len(self._batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._range = (start_index, min(end_index, len(self._batches)))
        self._next = start_index

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._range[1]:
            return None
        batch = self._batches[self._next]
        self._next += 1
        return {self._name: batch}

    def rewind(self) -> None:
        self.set_range(0, len(self._batches))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        self.rewind()
        while (item := self.get_next()) is not None:
            yield item


# --- ORT plumbing -------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_onnxruntime() -> Iterator[None]:
    """Keep ORT's quantization chatter off the user's terminal for the duration of the block.

    The calibrators ``print`` progress to stdout (which must stay clean for ``--json``) and the
    graph optimizer warns about every initializer a fusion made unused. Both go to the debug log.
    ORT has no getter for its logger severity; 2 (warning) is its default and is restored.
    """
    import onnxruntime as ort

    captured = io.StringIO()
    ort.set_default_logger_severity(3)
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        ort.set_default_logger_severity(2)
        if captured.getvalue().strip():
            log.debug("onnxruntime.quantization output:\n%s", captured.getvalue().rstrip())


def prepare_for_quantization(fp32_path: Path, out_path: Path) -> Path:
    """ORT's recommended ``quant_pre_process`` (shape inference, constant folding, Conv+BN fusion).

    It keeps node names, so ranked nodes are the bundle's node names. Symbolic shape inference
    does not support every graph; then the exported model is quantized as it is.
    """
    from onnxruntime.quantization import quant_pre_process

    try:
        quant_pre_process(str(fp32_path), str(out_path))
        return out_path
    except Exception as exc:  # ORT raises plain Exceptions from its shape inference
        log.warning("quant_pre_process failed (%s); quantizing the exported graph as it is", _first_line(exc))
        return fp32_path


def quantize_trunk(
    model_path: Path,
    out_path: Path,
    calib: np.ndarray,
    config: QuantConfig,
    *,
    input_name: str,
    cache_dir: Path,
) -> Path:
    """One ``quantize_static`` call; calibration ranges are cached per method in ``cache_dir``."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    reader = ArrayReader(calib, input_name)
    quantize_static(
        str(model_path),
        str(out_path),
        reader,
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        per_channel=config.per_channel,
        nodes_to_exclude=list(config.excluded_nodes),
        calibrate_method=methods[config.method],
        calibration_cache_path=str(cache_dir / f"calibration.{config.method}.json"),
        extra_options={"CalibStridedMinMax": 1},
    )
    return out_path


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


# --- the search ---------------------------------------------------------------------------------


def search_int8(
    fp32_path: Path,
    out_path: Path,
    calib: np.ndarray,
    evaluate: Callable[[Path], float],
    *,
    baseline_top1: float,
    max_drop: float,
    workdir: Path,
    input_name: str = "image",
    sensitivity_images: int = 8,
    max_excluded_fraction: float = 0.25,
    on_attempt: Callable[[Attempt], None] | None = None,
) -> QuantResult:
    """Quantize ``fp32_path`` to ``out_path``: the first attempt within ``max_drop`` pp of
    ``baseline_top1`` (``evaluate(path)`` gives a trunk's validation top-1), else the best one.

    The caller decides what a failure means; the result says whether the bar was met.
    """
    import onnx

    workdir.mkdir(parents=True, exist_ok=True)
    attempts: list[Attempt] = []
    models: dict[QuantConfig, Path] = {}
    sensitivity: list[NoiseSource] = []

    def attempt(config: QuantConfig) -> Attempt:
        t0 = time.perf_counter()
        path = workdir / f"trunk.int8.attempt{len(attempts)}.onnx"
        with quiet_onnxruntime():
            quantize_trunk(prepared, path, calib, config, input_name=input_name, cache_dir=workdir)
        top1 = evaluate(path)
        drop = (baseline_top1 - top1) * 100.0
        result = Attempt(config, top1, drop, drop <= max_drop + 1e-9, time.perf_counter() - t0)
        attempts.append(result)
        models[config] = path
        log.info(
            "int8 attempt %d (%s): val top-1 %.4f, drop %.2f pp%s",
            len(attempts),
            config.describe(),
            top1,
            drop,
            "" if result.passed else f" > {max_drop:g} pp",
        )
        if on_attempt:
            on_attempt(result)
        return result

    def finish() -> QuantResult:
        passed = [a for a in attempts if a.passed]
        # Ties on top-1 go to the attempt with fewer float nodes, then to the earlier one.
        chosen = passed[0] if passed else max(attempts, key=lambda a: (a.val_top1, -len(a.config.excluded_nodes)))
        models[chosen.config].replace(out_path)
        return QuantResult(chosen, tuple(attempts), tuple(sensitivity), len(calib))

    with quiet_onnxruntime():
        prepared = prepare_for_quantization(fp32_path, workdir / "trunk.prepared.onnx")

    # 1-2: ORT defaults, then per-channel weights.
    for per_channel in (False, True):
        if attempt(QuantConfig("minmax", per_channel)).passed:
            return finish()
    per_channel = max(attempts, key=lambda a: a.val_top1).config.per_channel

    # 3: keep the worst noise sources in float, measured on the better of the two models.
    t0 = time.perf_counter()
    with quiet_onnxruntime():
        sensitivity = rank_noise_sources(
            prepared, models[QuantConfig("minmax", per_channel)], calib[:sensitivity_images], input_name=input_name
        )
    log.info(
        "int8 sensitivity (%.1fs): worst %s",
        time.perf_counter() - t0,
        "; ".join(f"{s.kind} {s.tensor} {s.sqnr_db:.1f} dB" for s in sensitivity[:3]) or "none",
    )
    graph = onnx.load(str(prepared)).graph
    weighted = sum(1 for n in graph.node if n.op_type in WEIGHTED_OPS)
    cap = max(3, int(weighted * max_excluded_fraction))  # tiny graphs still get a few nodes
    excluded: tuple[str, ...] = ()
    for nodes in exclusion_schedule(sensitivity, cap):
        excluded = nodes
        if attempt(QuantConfig("minmax", per_channel, nodes)).passed:
            return finish()

    # 4: other calibration methods, alone and with the last exclusion set.
    for method in ("percentile", "entropy"):
        for nodes in dict.fromkeys(((), excluded)):
            if attempt(QuantConfig(method, per_channel, nodes)).passed:
                return finish()
    return finish()
