"""int8 OpenVINO IR with NNCF, searched until it keeps its accuracy.

NNCF post-training quantization of the trunk (FakeQuantize, int8 weights), calibrated on the same
training images as ONNX Runtime's int8, non-quantized ops pinned to f32. The remedies, run by
:func:`edgetl.workstation.export.int8.search_int8` (each attempt scored on the validation images,
int8 trunk + fp32 head, and timed against the fp32 IR when it passes; an attempt that passes with
no layer in float ends the search, since the remedies before accuracy control all give the same
int8 graph and none could be faster):

1. NNCF's defaults (symmetric, per-channel weights, mean of per-batch min/max for activations,
   fast bias correction);
2. full bias correction (slower, and on a digits-tuned MobileNetV2 it took int8 from -1.39 pp to
   +0.28 pp);
3. other activation range estimators: min-max, percentile (mean quantile), histogram;
4. NNCF's accuracy-controlled quantization: layers ranked by their contribution to the drop are
   reverted to float until the drop is within ``max_drop``, at most a quarter of the weighted layers;
5. when the export wants it (``--qat-epochs``: asked for, or the bar or the speed floor missed), the
   trunk fine-tuned for int8 (:mod:`edgetl.workstation.export.qat`), quantized whole with the best
   settings of 1-3 (:meth:`OVQuantizer.qat_config`).

NNCF and OpenVINO are imported inside the functions: the rest of edgetl never needs them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.workstation.export.formats.openvino import compile_f32
from edgetl.workstation.export.int8 import Attempt, QatHook, best, settled

log = logging.getLogger(__name__)

METHODS = ("mean-minmax", "minmax", "percentile", "histogram")
QUANT_METHOD = "nncf post-training quantization (OpenVINO)"
WEIGHTED_OPS = ("Convolution", "GroupConvolution", "MatMul", "ConvolutionBackpropData")


@contextlib.contextmanager
def quiet_nncf() -> Iterator[None]:
    """NNCF prints progress bars and INFO logs on stdout, which must stay clean for ``--json``;
    both go to the debug log instead."""
    import nncf  # noqa: F401  (creates nncf_logger and its stdout handler)
    from nncf.common.logging import nncf_logger

    captured = io.StringIO()
    handlers = [h for h in nncf_logger.handlers if isinstance(h, logging.StreamHandler)]
    streams = [h.setStream(captured) for h in handlers]
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        for h, s in zip(handlers, streams, strict=False):
            h.setStream(s)
        text = "\n".join(line for line in captured.getvalue().splitlines() if line.strip() and "━" not in line)
        if text:
            log.debug("nncf output:\n%s", text)


def float_layers(model) -> list[str]:
    """Weighted layers of a quantized ``ov.Model`` whose input is not quantized (kept in float)."""
    out = []
    for op in model.get_ordered_ops():
        if op.get_type_name() in WEIGHTED_OPS and op.input_value(0).get_node().get_type_name() != "FakeQuantize":
            out.append(op.get_friendly_name())
    return out


@dataclasses.dataclass(frozen=True)
class OVQuantConfig:
    """One way of quantizing the trunk with NNCF."""

    method: str = "mean-minmax"  # activations range estimator; weights are always per-channel min-max
    bias_correction: str = "fast"  # fast | full
    accuracy_control: bool = False
    source: str = "fp32"  # the trunk quantized: "fp32" (the exported one) | "qat" (fine-tuned for int8)

    def describe(self) -> str:
        parts = [self.method, f"{self.bias_correction} bias correction"]
        if self.accuracy_control:
            parts.append("accuracy control")
        if self.source == "qat":
            parts.append("QAT trunk")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "per_channel": True,
            "bias_correction": self.bias_correction,
            "accuracy_control": self.accuracy_control,
            "source": self.source,
        }


def _advanced(method: str):
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    estimators = {
        "mean-minmax": None,  # NNCF's default for per-tensor activations
        "minmax": RangeEstimatorParametersSet.MINMAX,
        "percentile": RangeEstimatorParametersSet.MEAN_QUANTILE,
        "histogram": RangeEstimatorParametersSet.HISTOGRAM,
    }
    return AdvancedQuantizationParameters(activations_range_estimator_params=estimators[method])


def quantize_ir(
    fp32_xml: Path,
    calib: np.ndarray,
    config: OVQuantConfig,
    *,
    validation: tuple[np.ndarray, np.ndarray, Callable[[np.ndarray], np.ndarray]] | None = None,
    max_drop: float = 1.0,
    max_float_layers: int = 3,
):
    """One NNCF quantization of the IR at ``fp32_xml``; returns the ``ov.Model``.

    Accuracy control needs ``validation``: (images, labels, head) with ``head`` features -> logits;
    each image is one validation item so NNCF can rank layers by per-image correctness.
    """
    import nncf

    from edgetl.device.runtime import openvino_core

    model = openvino_core().read_model(str(fp32_xml))
    # One image per item: NNCF's mean-of-batch statistics then mean the same as in ONNX Runtime.
    dataset = nncf.Dataset([calib[i : i + 1] for i in range(len(calib))])
    common = {"subset_size": len(calib), "fast_bias_correction": config.bias_correction == "fast"}
    # Histogram statistics cannot be per-channel; NNCF warns once per point and falls back to min-max.
    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    nncf_log.setLevel(logging.ERROR)
    try:
        with quiet_nncf():
            if not config.accuracy_control:
                return nncf.quantize(model, dataset, advanced_parameters=_advanced(config.method), **common)
            from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

            if validation is None:
                raise ValueError("accuracy control needs validation data")
            x_val, y_val, head = validation
            items = nncf.Dataset([(x_val[i : i + 1], int(y_val[i])) for i in range(len(x_val))])

            def validate(compiled, data) -> tuple[float, list[float]]:
                correct = [float(head(compiled(x)[0]).argmax(1)[0] == y) for x, y in data]
                return (float(np.mean(correct)) if correct else 0.0), correct

            return nncf.quantize_with_accuracy_control(
                model,
                dataset,
                items,
                validate,
                max_drop=max(max_drop, 0.0) / 100.0,
                advanced_quantization_parameters=_advanced(config.method),
                advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                    max_num_iterations=max_float_layers
                ),
                **common,
            )
    finally:
        nncf_log.setLevel(level)


@dataclasses.dataclass
class OVQuantizer:
    """The NNCF remedies for :func:`~edgetl.workstation.export.int8.search_int8`.

    ``validation`` is (images, labels, head) with ``head`` features -> logits (the fp32 IR head).
    """

    fp32_xml: Path
    calib: np.ndarray
    validation: tuple[np.ndarray, np.ndarray, Callable[[np.ndarray], np.ndarray]]
    max_excluded_fraction: float = 0.25
    label: str = "openvino int8"
    qat: QatHook | None = None
    workdir: Path | None = None  # where the QAT trunk's IR is written (with ``qat``)
    _cap: int = 3
    _qat_xml: Path | None = None

    @property
    def calibration_size(self) -> int:
        return len(self.calib)

    def configs(self, attempts: Sequence[Attempt]) -> Iterator[OVQuantConfig]:
        from edgetl.device.runtime import openvino_core

        weighted = sum(
            1 for op in openvino_core().read_model(str(self.fp32_xml)).get_ops() if op.get_type_name() in WEIGHTED_OPS
        )
        self._cap = max(3, int(max(weighted, 1) * self.max_excluded_fraction))
        # 1-2: NNCF defaults, then full bias correction. An attempt that passes with no layer in float
        # ends the search: the others have the same int8 graph, so none could be faster.
        for bias in ("fast", "full"):
            yield OVQuantConfig("mean-minmax", bias)
            if settled(attempts):
                return
        bias = best(attempts).config.bias_correction
        # 3: other range estimators for activations.
        for method in METHODS[1:]:
            yield OVQuantConfig(method, bias)
            if settled(attempts):
                return
        # 4: keep the layers that cost the most accuracy in float (NNCF ranks them on the validation images).
        top = best(attempts).config
        yield OVQuantConfig(top.method, top.bias_correction, accuracy_control=True)

    def qat_config(self, attempts: Sequence[Attempt]) -> OVQuantConfig | None:
        """The QAT remedy, when the export wants it: NNCF's post-training settings that did best
        without accuracy control (whole int8, the point of QAT), on the QAT trunk."""
        if self.qat is None or not attempts or not self.qat.wanted(attempts):
            return None
        plain = [a for a in attempts if not a.config.accuracy_control] or list(attempts)
        top = best(plain).config
        return OVQuantConfig(top.method, top.bias_correction, source="qat")

    def _source(self, config: OVQuantConfig) -> Path:
        if config.source != "qat":
            return self.fp32_xml
        if self._qat_xml is None:
            from edgetl.workstation.export.formats.openvino import convert_onnx

            assert self.qat is not None and self.workdir is not None
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._qat_xml = self.workdir / "trunk.qat.xml"
            convert_onnx(self.qat.source(), self._qat_xml)
        return self._qat_xml

    def quantize(self, config: OVQuantConfig, *, max_drop: float) -> tuple[Any, tuple[str, ...]] | None:
        try:
            model = quantize_ir(
                self._source(config),
                self.calib,
                config,
                validation=self.validation,
                max_drop=max_drop,
                max_float_layers=self._cap,
            )
        except Exception as exc:  # NNCF's restorer raises plain errors on graphs it cannot rank; the others stand
            if not config.accuracy_control:
                raise
            log.warning("openvino int8: accuracy-controlled quantization failed (%s)", str(exc).strip().splitlines()[0])
            return None
        return model, tuple(float_layers(model))

    def evaluate(self, model: Any) -> float:
        x_val, y_val, head = self.validation
        trunk = compile_f32(model)
        pred = np.concatenate([head(trunk(x_val[i : i + 64])[0]).argmax(1) for i in range(0, len(x_val), 64)])
        return float((pred == y_val).mean())

    def runner(self, model: Any | None, threads: int) -> Callable[[np.ndarray], Any]:
        """``model`` (None: the fp32 IR) compiled on the CPU as the device runtime compiles it
        (inference precision pinned to f32) with ``threads`` inference threads."""
        return compile_f32(self.fp32_xml if model is None else model, threads=threads)

    def save(self, model: Any, out: Path) -> None:
        import openvino as ov

        ov.save_model(model, str(out), compress_to_fp16=False)

    def header(self) -> dict[str, Any]:
        import importlib.metadata

        return {
            "method": QUANT_METHOD,
            "nncf_version": importlib.metadata.version("nncf"),
            "preset": "performance",
            "activation_type": "int8",
            "weight_type": "int8",
        }

    def extra(self) -> dict[str, Any]:
        return {}
