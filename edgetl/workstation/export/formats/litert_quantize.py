"""int8 LiteRT with litert-torch's PT2E quantizer, searched until it keeps its accuracy.

Full integer: int8 weights and activations, and an int8 input and output with a scale and zero
point (the device back-end quantizes the float32 image and dequantizes the features). Each attempt:
``torch.export.export(trunk, (one image,)).module()``, torchao's ``prepare_pt2e`` with litert-torch's
``PT2EQuantizer`` (each convolution + ReLU6 annotated as one unit first: :func:`annotate_conv_relu6`),
calibration on the export's calibration images (in batches of 32, through a dynamic batch
dimension), ``convert_pt2e``, then ``litert_torch.convert(...,
quant_config=QuantConfig(pt2e_quantizer=...))``. The remedies, run by
:func:`edgetl.workstation.export.int8.search_int8` (each attempt scored on the validation images,
int8 trunk + fp32 LiteRT head, and timed against the fp32 trunk through the device back-end's own
loader when it passes; every attempt is the same all-int8 graph structure, so the first that passes
ends the search):

1. symmetric per-channel weights, histogram observer for activations (litert-torch's static
   default);
2. other activation observers: min-max, moving-average min-max (per-tensor weights are not tried:
   XNNPACK runs per-channel int8 convolutions natively, so they would buy no speed, and they never
   buy accuracy);
3. when the export wants it (``--qat-epochs``: asked for, or the bar or the speed floor missed),
   the trunk fine-tuned for int8 (:mod:`edgetl.workstation.export.qat`): the QAT trunk arrives as
   an fp32 ONNX graph, so its weights are loaded back into a batch-norm-folded copy of the run's
   torch trunk (convolutions and linear layers matched in execution order, shapes checked, and
   the result checked against ONNX Runtime on the QAT graph); a trunk that does not match is
   skipped with a warning. Quantized with the best settings of 1-2.

torch, torchao and litert-torch are imported inside the functions.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.workstation.export.common import first_line
from edgetl.workstation.export.int8 import Attempt, QatHook, best, settled

log = logging.getLogger(__name__)

QUANT_METHOD = "litert-torch PT2E static quantization (LiteRT)"
METHODS = ("histogram", "minmax", "moving-average-minmax")  # activation observers
WEIGHTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "BATCH_MATMUL")
QAT_MIN_SQNR_DB = 60.0  # the QAT weights loaded into torch must compute what the QAT ONNX graph computes
CALIBRATION_BATCH = 32


@dataclasses.dataclass(frozen=True)
class LiteRTQuantConfig:
    """One way of quantizing the trunk with the PT2E quantizer."""

    method: str = "histogram"  # activation observer
    per_channel: bool = True  # weights: symmetric per output channel, or per tensor
    source: str = "fp32"  # "fp32" (the run's trunk) | "qat" (fine-tuned for int8)

    def describe(self) -> str:
        parts = [self.method, "per-channel" if self.per_channel else "per-tensor"]
        if self.source == "qat":
            parts.append("QAT trunk")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "per_channel": self.per_channel, "symmetric": True, "source": self.source}


@dataclasses.dataclass
class Quantized:
    """One attempt's int8 trunk: its ``.tflite`` file (in the quantizer's work folder)."""

    path: Path


def quantization_config(config: LiteRTQuantConfig):
    """litert-torch's symmetric static config with ``config``'s weight granularity and activation observer."""
    from litert_torch.quantize.pt2e_quantizer import get_symmetric_quantization_config

    qconfig = get_symmetric_quantization_config(is_per_channel=config.per_channel, is_dynamic=False)
    if config.method == "histogram":
        return qconfig
    from torchao.quantization.pt2e.observer import MinMaxObserver, MovingAverageMinMaxObserver

    observer = {"minmax": MinMaxObserver, "moving-average-minmax": MovingAverageMinMaxObserver}[config.method]
    act = dataclasses.replace(qconfig.input_activation, observer_or_fake_quant_ctr=observer.with_args(eps=2**-12))
    return dataclasses.replace(qconfig, input_activation=act, output_activation=act)


RELU6 = (0.0, 6.0)  # the clamp a convolution's output may carry into LiteRT's fused activation


def _clamp_bounds(node) -> tuple[float, float] | None:
    """(low, high) of an ``aten.hardtanh`` / ``aten.clamp`` node with constant bounds, else None."""
    import torch

    if node.op != "call_function":
        return None
    if node.target in (torch.ops.aten.hardtanh.default, torch.ops.aten.hardtanh_.default):
        params = (("min_val", -1.0), ("max_val", 1.0))
    elif node.target == torch.ops.aten.clamp.default:
        params = (("min", None), ("max", None))
    else:
        return None
    low, high = (
        node.args[1 + i] if len(node.args) > 1 + i else node.kwargs.get(name, default)
        for i, (name, default) in enumerate(params)
    )
    if not all(isinstance(v, (int, float)) for v in (low, high)):
        return None
    return float(low), float(high)


def annotate_conv_relu6(graph_module, qconfig) -> int:
    """Annotate each convolution whose only use is a ReLU6 (``hardtanh(0, 6)`` or ``clamp(0, 6)``)
    as one quantized unit: the convolution's inputs, weight and bias as usual, its output not at
    all, and the ReLU6's output as the unit's output. Returns how many were annotated.

    litert-torch's annotator fuses only ``relu`` into a convolution's output, so the output before
    a ReLU6 got its own int8 range. EfficientNet-Lite0's convolutions reach about 100 before their
    ReLU6 (MobileNetV2's about 11): a range of 0-100 in 256 steps leaves 15 steps for the 0-6 that
    the ReLU6 keeps, and LiteRT int8 of the fine-tuned Lite0 (digits, 224 px) lost 37.6 pp. With
    the ReLU6's own range (0-6) at the unit's output, as LiteRT runs it (a convolution with a fused
    RELU6), it lost -0.28 pp. Run before the quantizer's own annotators, which skip annotated nodes.
    """
    import torch
    from litert_torch.quantize import pt2e_quantizer_utils as qutils
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    convs = (torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default, torch.ops.aten.conv1d.default)
    done = 0
    for node in graph_module.graph.nodes:
        if _clamp_bounds(node) != RELU6:
            continue
        conv = node.args[0]
        if not isinstance(conv, torch.fx.Node) or conv.op != "call_function" or conv.target not in convs:
            continue
        if len(conv.users) != 1 or "quantization_annotation" in conv.meta or "quantization_annotation" in node.meta:
            continue
        inputs = {conv.args[0]: qutils.get_input_act_qspec(qconfig), conv.args[1]: qutils.get_weight_qspec(qconfig)}
        if len(conv.args) > 2 and isinstance(conv.args[2], torch.fx.Node):
            inputs[conv.args[2]] = qutils.get_bias_qspec(qconfig)
        conv.meta["quantization_annotation"] = QuantizationAnnotation(input_qspec_map=inputs, _annotated=True)
        node.meta["quantization_annotation"] = QuantizationAnnotation(
            output_qspec=qutils.get_output_act_qspec(qconfig), _annotated=True
        )
        done += 1
    return done


def make_quantizer(config: LiteRTQuantConfig):
    """litert-torch's ``PT2EQuantizer`` with ``config``'s settings, convolution + ReLU6 annotated
    as one unit first (:func:`annotate_conv_relu6`)."""
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer

    class _Quantizer(PT2EQuantizer):
        def annotate(self, model):
            fused = annotate_conv_relu6(model, self.global_config)
            log.debug("litert int8: %d convolution + ReLU6 pair(s) quantized as one", fused)
            return super().annotate(model)

    return _Quantizer().set_global(quantization_config(config))


def pt2e_quantize(trunk, calib: np.ndarray, config: LiteRTQuantConfig):
    """(quantized torch graph, PT2EQuantizer): ``trunk`` exported at batch 1, calibrated on ``calib``."""
    import torch
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = make_quantizer(config)
    x = torch.from_numpy(np.ascontiguousarray(calib))
    with torch.no_grad():
        # Calibrated in batches (a dynamic batch dimension: about half the time of one image at a
        # time on MobileNetV2, same ranges); a trunk that does not export so goes one image at a time.
        batch = CALIBRATION_BATCH
        try:
            dynamic = ({0: torch.export.Dim("batch")},)
            graph = torch.export.export(trunk.eval(), (x[:2],), dynamic_shapes=dynamic).module()
        except Exception as exc:  # torch.export's constraint violations and tracing errors
            log.debug("litert int8: no dynamic batch for calibration (%s); one image at a time", first_line(exc))
            graph, batch = torch.export.export(trunk.eval(), (x[:1],)).module(), 1
        prepared = prepare_pt2e(graph, quantizer)
        for i in range(0, len(x), batch):
            prepared(x[i : i + batch])
    from torchao.quantization.pt2e import allow_exported_model_train_eval

    # .eval() on the graph (and on a module holding it: the merged graph) switches its
    # batch norm / dropout ops instead of raising.
    quantized = convert_pt2e(prepared, fold_quantize=False)
    allow_exported_model_train_eval(quantized)
    quantized.eval()  # the override returns None, not the module
    return quantized, quantizer


def to_tflite(module, quantizer, sample, *, what: str = "int8 trunk") -> bytes:
    from litert_torch.quantize.quant_config import QuantConfig

    from edgetl.workstation.export.formats.litert import convert_to_bytes

    return convert_to_bytes(module, sample, what=what, quant_config=QuantConfig(pt2e_quantizer=quantizer))


def float_layers(path: Path) -> list[str]:
    """Weighted ops of a ``.tflite`` whose input is float (not quantized): kept in float."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    tensors = {t["index"]: t for t in it.get_tensor_details()}
    out = []
    for op in it._get_ops_details():
        if op["op_name"] in WEIGHTED_OPS and len(op["inputs"]) and op["inputs"][0] in tensors:
            t = tensors[op["inputs"][0]]
            if np.dtype(t["dtype"]).kind == "f":
                out.append(f"{op['op_name']}:{t['name']}")
    return out


def trunk_from_onnx(trunk, onnx_path: Path, x_check: np.ndarray):
    """A torch trunk computing what the ONNX trunk at ``onnx_path`` computes: ``trunk`` with batch
    norm folded and the ONNX Conv/Gemm weights loaded in execution order; None when they do not
    match (layer count, shapes, or the result against ONNX Runtime)."""
    import onnx
    import torch
    from onnx import numpy_helper

    from edgetl.workstation.export.common import ort_model, sqnr_db
    from edgetl.workstation.export.qat import fold_batchnorm

    folded, _ = fold_batchnorm(trunk, x_check)
    folded.eval()
    order: list[Any] = []
    hooks = [
        m.register_forward_hook(lambda mod, *_: order.append(mod))
        for m in folded.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    try:
        with torch.no_grad():
            folded(torch.from_numpy(x_check[:1]))
    finally:
        for h in hooks:
            h.remove()
    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:  # the exporter shares equal initializers through Identity nodes
        if node.op_type == "Identity" and node.input[0] in inits:
            inits[node.output[0]] = inits[node.input[0]]
        elif node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            inits[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    nodes = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    if len(nodes) != len(order):
        log.warning("litert int8: the QAT trunk has %d weighted layers, the torch trunk %d", len(nodes), len(order))
        return None
    with torch.no_grad():
        for node, module in zip(nodes, order, strict=True):
            w = inits.get(node.input[1])
            b = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if w is None or tuple(w.shape) != tuple(module.weight.shape) or (b is None and len(node.input) > 2):
                log.warning("litert int8: QAT layer %s does not match the torch trunk", node.name)
                return None
            module.weight.copy_(torch.from_numpy(w.copy()))
            if b is not None:
                if module.bias is None:
                    module.bias = torch.nn.Parameter(torch.zeros(module.weight.shape[0]))
                module.bias.copy_(torch.from_numpy(b.copy()))
            elif module.bias is not None:
                module.bias.zero_()
        mine = folded(torch.from_numpy(x_check)).numpy()
    fidelity = sqnr_db(mine, ort_model(onnx_path)(x_check))
    if fidelity is not None and not fidelity >= QAT_MIN_SQNR_DB:
        log.warning("litert int8: the QAT trunk rebuilt in torch is %s dB from its ONNX graph", fidelity)
        return None
    return folded


@dataclasses.dataclass
class LiteRTQuantizer:
    """The PT2E remedies for :func:`~edgetl.workstation.export.int8.search_int8`.

    ``validation`` is (images, labels, head) with ``head`` features -> logits (the fp32 LiteRT head
    through the device back-end).
    """

    trunk: Any  # the run's torch trunk (eval mode)
    fp32_tflite: Path
    calib: np.ndarray
    validation: tuple[np.ndarray, np.ndarray, Callable[[np.ndarray], np.ndarray]]
    label: str = "litert int8"
    qat: QatHook | None = None
    workdir: Path | None = None
    saved: Quantized | None = None
    _count: int = 0
    _qat_trunk: Any = None

    def __post_init__(self) -> None:
        if self.workdir is None:
            import tempfile

            self.workdir = Path(tempfile.mkdtemp(prefix="edgetl-litert-int8-"))
        self.workdir.mkdir(parents=True, exist_ok=True)

    @property
    def calibration_size(self) -> int:
        return len(self.calib)

    def configs(self, attempts: Sequence[Attempt]) -> Iterator[LiteRTQuantConfig]:
        # Per-channel weights only: XNNPACK runs per-channel int8 convolutions (QC8) natively, so
        # per-tensor weights buy no speed there, and they never buy accuracy (on the digits
        # MobileNetV2 at 96 px: 43.75 pp lost per-tensor against 4.37 pp per-channel).
        for method in METHODS:
            yield LiteRTQuantConfig(method, True)
            if settled(attempts):
                return

    def qat_config(self, attempts: Sequence[Attempt]) -> LiteRTQuantConfig | None:
        """The QAT remedy, when the export wants it: the best post-training settings on the QAT trunk."""
        if self.qat is None or not attempts or not self.qat.wanted(attempts):
            return None
        top = best(attempts).config
        return LiteRTQuantConfig(top.method, top.per_channel, source="qat")

    def _source(self, config: LiteRTQuantConfig):
        if config.source != "qat":
            return self.trunk
        if self._qat_trunk is None:
            assert self.qat is not None
            from edgetl.workstation.export.qat import check_images

            rebuilt = trunk_from_onnx(self.trunk, self.qat.source(), check_images(self.validation[0]))
            self._qat_trunk = rebuilt if rebuilt is not None else False
        return self._qat_trunk or None

    def quantize(self, config: LiteRTQuantConfig, *, max_drop: float) -> tuple[Any, tuple[str, ...]] | None:
        import torch

        trunk = self._source(config)
        if trunk is None:
            log.warning("litert int8: the QAT trunk could not be rebuilt in PyTorch; QAT is skipped for LiteRT")
            return None
        module, quantizer = pt2e_quantize(trunk, self.calib, config)
        self._count += 1
        assert self.workdir is not None
        path = self.workdir / f"attempt-{self._count}.tflite"
        path.write_bytes(to_tflite(module, quantizer, torch.from_numpy(self.calib[:1])))
        return Quantized(path), tuple(float_layers(path))

    def evaluate(self, model: Quantized) -> float:
        x_val, y_val, head = self.validation
        trunk = self.runner(model, 0)
        pred = np.concatenate([head(trunk(x_val[i : i + 64])).argmax(1) for i in range(0, len(x_val), 64)])
        return float((pred == y_val).mean())

    def runner(self, model: Quantized | None, threads: int) -> Callable[[np.ndarray], Any]:
        """``model`` (None: the fp32 trunk) loaded by the device back-end's own loader with
        ``threads`` threads (0: LiteRT's default)."""
        from edgetl.device.backends.litert import load

        return load(self.fp32_tflite if model is None else model.path, threads=threads or None)

    def save(self, model: Quantized, out: Path) -> None:
        shutil.copyfile(model.path, out)
        self.saved = model

    def header(self) -> dict[str, Any]:
        import importlib.metadata

        def version(dist: str) -> str | None:
            try:
                return importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                return None

        return {
            "method": QUANT_METHOD,
            "litert_torch_version": version("litert-torch"),
            "torchao_version": version("torchao"),
            "ai_edge_litert_version": version("ai-edge-litert"),
            "activation_type": "int8",
            "weight_type": "int8",
            "io_type": "int8",
        }

    def extra(self) -> dict[str, Any]:
        return {}
