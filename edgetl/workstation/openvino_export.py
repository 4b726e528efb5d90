"""OpenVINO IR for a bundle: conversion from the bundle's ONNX graphs, fp16 and bf16, and int8 with NNCF.

IR is converted from the same fp32 ONNX graphs that ONNX Runtime runs (``ov.convert_model``), so
both runtimes start from one graph. Variants and what the device runs:

* ``openvino-fp32``: fp32 IR, ``INFERENCE_PRECISION_HINT`` pinned to f32. Without the pin the CPU
  plugin runs bf16 by itself on CPUs with bf16 support, ~0.1 off in features: not fp32.
* ``openvino-fp16``: IR with fp16 weights (``save_model(compress_to_fp16=True)``), run in f32.
* ``openvino-bf16``: the fp32 IR run with the hint bf16; its own accuracy check.
* ``openvino-int8``: NNCF post-training quantization of the trunk (FakeQuantize, int8 weights),
  calibrated on the same training images as ONNX Runtime's int8, non-quantized ops pinned to f32.

int8 is searched like :func:`edgetl.workstation.quantize.search_int8`: each attempt is scored on the validation
images (int8 trunk, fp32 head) and the search stops at the first within ``max_drop``:

1. NNCF's defaults (symmetric, per-channel weights, mean of per-batch min/max for activations,
   fast bias correction);
2. full bias correction (slower, and on a digits-tuned MobileNetV2 it took int8 from -1.39 pp to
   +0.28 pp);
3. other activation range estimators: min-max, percentile (mean quantile), histogram;
4. NNCF's accuracy-controlled quantization: layers ranked by their contribution to the drop are
   reverted to float until the drop is within ``max_drop``, at most a quarter of the weighted layers.

NNCF and OpenVINO are imported inside the functions: the rest of edgetl never needs them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# OpenVINO INFERENCE_PRECISION_HINT per bundle precision: what the export measures and the runtime pins.
INFERENCE_PRECISION = {"fp32": "f32", "fp16": "f32", "bf16": "bf16", "int8": "f32"}
METHODS = ("mean-minmax", "minmax", "percentile", "histogram")
QUANT_METHOD = "nncf post-training quantization (OpenVINO)"
WEIGHTED_OPS = ("Convolution", "GroupConvolution", "MatMul", "ConvolutionBackpropData")


def bin_path(xml: str) -> str:
    return xml[: -len(".xml")] + ".bin"


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


def convert_onnx(onnx_path: Path, xml_path: Path, *, compress_to_fp16: bool = False) -> None:
    """ONNX -> IR (``.xml`` + ``.bin``); fp16 compresses the weights only."""
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    # save_model compresses to fp16 unless told not to: fp32 must stay fp32.
    ov.save_model(model, str(xml_path), compress_to_fp16=compress_to_fp16)


def merge_ir(trunk_xml: Path, head_xml: Path, out_xml: Path) -> None:
    """One IR graph, image -> logits: the head's input replaced by the trunk's output."""
    import openvino as ov

    from edgetl.device.runtime import openvino_core

    core = openvino_core()
    trunk, head = core.read_model(str(trunk_xml)), core.read_model(str(head_xml))
    (param,), (features,) = head.get_parameters(), trunk.get_results()
    param.output(0).replace(features.input_value(0))
    merged = ov.Model(head.get_results(), trunk.get_parameters(), "merged")
    ov.save_model(merged, str(out_xml), compress_to_fp16=False)


def compile_f32(model, *, precision: str = "f32"):
    """Compile an IR path or ``ov.Model`` on the CPU with the inference precision pinned."""
    from edgetl.device.runtime import openvino_core

    core = openvino_core()
    model = core.read_model(str(model)) if isinstance(model, (str, Path)) else model
    return core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision})


def float_layers(model) -> list[str]:
    """Weighted layers of a quantized ``ov.Model`` whose input is not quantized (kept in float)."""
    out = []
    for op in model.get_ordered_ops():
        if op.get_type_name() in WEIGHTED_OPS and op.input_value(0).get_node().get_type_name() != "FakeQuantize":
            out.append(op.get_friendly_name())
    return out


# --- int8 ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OVQuantConfig:
    """One way of quantizing the trunk with NNCF."""

    method: str = "mean-minmax"  # activations range estimator; weights are always per-channel min-max
    bias_correction: str = "fast"  # fast | full
    accuracy_control: bool = False

    def describe(self) -> str:
        parts = [self.method, f"{self.bias_correction} bias correction"]
        if self.accuracy_control:
            parts.append("accuracy control")
        return ", ".join(parts)


@dataclasses.dataclass(frozen=True)
class OVAttempt:
    config: OVQuantConfig
    val_top1: float
    top1_drop_pp: float
    passed: bool
    seconds: float
    float_layers: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.config.method,
            "per_channel": True,
            "bias_correction": self.config.bias_correction,
            "accuracy_control": self.config.accuracy_control,
            "excluded_nodes": list(self.float_layers),
            "val_top1": self.val_top1,
            "top1_drop_pp": round(self.top1_drop_pp, 4),
            "passed": self.passed,
            "seconds": round(self.seconds, 2),
        }


@dataclasses.dataclass(frozen=True)
class OVQuantResult:
    chosen: OVAttempt
    attempts: tuple[OVAttempt, ...]
    calibration_size: int

    @property
    def passed(self) -> bool:
        return self.chosen.passed

    def manifest_record(self, calibration_images: list[str]) -> dict[str, Any]:
        import importlib.metadata

        cfg = self.chosen.config
        return {
            "method": QUANT_METHOD,
            "nncf_version": importlib.metadata.version("nncf"),
            "preset": "performance",
            "activation_type": "int8",
            "weight_type": "int8",
            "per_channel": True,
            "bias_correction": cfg.bias_correction,
            "accuracy_control": cfg.accuracy_control,
            "calibration": {"method": cfg.method, "size": self.calibration_size, "images": calibration_images},
            "excluded_nodes": list(self.chosen.float_layers),
            "attempts": [a.to_dict() for a in self.attempts],
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


def search_int8_openvino(
    fp32_xml: Path,
    out_xml: Path,
    calib: np.ndarray,
    validation: tuple[np.ndarray, np.ndarray, Callable[[np.ndarray], np.ndarray]],
    *,
    baseline_top1: float,
    max_drop: float,
    max_excluded_fraction: float = 0.25,
    on_attempt: Callable[[OVAttempt], None] | None = None,
) -> OVQuantResult:
    """Quantize the IR ``fp32_xml`` to ``out_xml``: the first attempt within ``max_drop`` pp of
    ``baseline_top1`` (validation top-1 of int8 trunk + fp32 head), else the best one."""
    import openvino as ov

    x_val, y_val, head = validation
    attempts: list[OVAttempt] = []
    models: dict[OVQuantConfig, Any] = {}
    from edgetl.device.runtime import openvino_core

    weighted = sum(
        1 for op in openvino_core().read_model(str(fp32_xml)).get_ops() if op.get_type_name() in WEIGHTED_OPS
    )
    cap = max(3, int(max(weighted, 1) * max_excluded_fraction))

    def evaluate(model) -> float:
        trunk = compile_f32(model)
        pred = np.concatenate([head(trunk(x_val[i : i + 64])[0]).argmax(1) for i in range(0, len(x_val), 64)])
        return float((pred == y_val).mean())

    def attempt(config: OVQuantConfig) -> OVAttempt:
        t0 = time.perf_counter()
        model = quantize_ir(fp32_xml, calib, config, validation=validation, max_drop=max_drop, max_float_layers=cap)
        top1 = evaluate(model)
        drop = (baseline_top1 - top1) * 100.0
        result = OVAttempt(
            config, top1, drop, drop <= max_drop + 1e-9, time.perf_counter() - t0, tuple(float_layers(model))
        )
        attempts.append(result)
        models[config] = model
        log.info(
            "openvino int8 attempt %d (%s): val top-1 %.4f, drop %.2f pp%s%s (%.1fs)",
            len(attempts),
            config.describe(),
            top1,
            drop,
            "" if result.passed else f" > {max_drop:g} pp",
            f", {len(result.float_layers)} layer(s) in float" if result.float_layers else "",
            result.seconds,
        )
        if on_attempt:
            on_attempt(result)
        return result

    def finish() -> OVQuantResult:
        passed = [a for a in attempts if a.passed]
        chosen = passed[0] if passed else max(attempts, key=lambda a: (a.val_top1, -len(a.float_layers)))
        ov.save_model(models[chosen.config], str(out_xml), compress_to_fp16=False)
        return OVQuantResult(chosen, tuple(attempts), len(calib))

    # 1-2: NNCF defaults, then full bias correction.
    for bias in ("fast", "full"):
        if attempt(OVQuantConfig("mean-minmax", bias)).passed:
            return finish()
    bias = max(attempts, key=lambda a: a.val_top1).config.bias_correction
    # 3: other range estimators for activations.
    for method in METHODS[1:]:
        if attempt(OVQuantConfig(method, bias)).passed:
            return finish()
    # 4: keep the layers that cost the most accuracy in float (NNCF ranks them on the validation images).
    best = max(attempts, key=lambda a: a.val_top1).config
    try:
        attempt(OVQuantConfig(best.method, best.bias_correction, accuracy_control=True))
    except Exception as exc:  # NNCF's restorer raises plain errors on graphs it cannot rank; the others stand
        log.warning("openvino int8: accuracy-controlled quantization failed (%s)", str(exc).strip().splitlines()[0])
    return finish()


# --- the format exporter ------------------------------------------------------------------------


def export_openvino_format(ex) -> None:
    """OpenVINO: fp32 IR trunk + head, checked; then fp16, bf16 and the int8 trunk, each checked.

    ``ex`` is :class:`edgetl.workstation.export._Export` (files, variants, checks through the device runtime).
    """
    from edgetl.workstation.export import HEAD

    trunk_src, head_src = ex.sources()
    (ex.tmp / "openvino").mkdir()
    t0 = time.perf_counter()
    trunk_rel, head_rel = "openvino/trunk.fp32.xml", f"openvino/head.{HEAD}.xml"
    convert_onnx(trunk_src, ex.tmp / trunk_rel)
    convert_onnx(head_src, ex.tmp / head_rel)
    log.info("converted trunk and head to OpenVINO IR in %.1fs", time.perf_counter() - t0)
    onnx_derived = "onnx/trunk.fp32.onnx" if ex.shipped("onnx", "fp32") else ex.origin
    head_derived = f"onnx/head.{HEAD}.onnx" if "onnx" in ex.options.formats else ex.origin
    ex.add_file(
        trunk_rel,
        fmt="openvino",
        precision="fp32",
        role="trunk",
        derived_from=onnx_derived,
        extra_files=(bin_path(trunk_rel),),
    )
    ex.add_file(
        head_rel,
        fmt="openvino",
        precision="fp32",
        role="head",
        derived_from=head_derived,
        extra_files=(bin_path(head_rel),),
    )
    derived = trunk_rel if ex.shipped("openvino", "fp32") else onnx_derived
    merged_fp32: str | None = None
    for precision in ex.precisions("openvino"):
        hint = INFERENCE_PRECISION[precision]
        if precision in ("fp32", "bf16"):
            name = ex.add_variant("openvino", precision, trunk_rel, head_rel, inference_precision=hint)
        elif precision == "fp16":
            rel = "openvino/trunk.fp16.xml"
            convert_onnx(trunk_src, ex.tmp / rel, compress_to_fp16=True)
            ex.add_file(
                rel, fmt="openvino", precision="fp16", role="trunk", derived_from=derived, extra_files=(bin_path(rel),)
            )
            name = ex.add_variant("openvino", "fp16", rel, head_rel, inference_precision=hint)
        else:  # int8
            rel = "openvino/trunk.int8.xml"
            record = _quantize(ex, ex.tmp / trunk_rel, ex.tmp / head_rel, ex.tmp / rel)
            ex.add_file(
                rel, fmt="openvino", precision="int8", role="trunk", derived_from=derived, extra_files=(bin_path(rel),)
            )
            name = ex.add_variant("openvino", "int8", rel, head_rel, inference_precision=hint, quantization=record)
        if ex.options.merged and (ex.shipped("openvino", precision) or precision == "fp32"):
            # bf16 runs the fp32 graph: it shares the fp32 merged file.
            ex.add_merged(
                name, merge_ir, source=merged_fp32 if precision == "bf16" else None, extra=lambda r: (bin_path(r),)
            )
            if precision == "fp32":
                merged_fp32 = ex.variants[name]["merged"][HEAD]
        ex.check(name)


def _quantize(ex, fp32_xml: Path, head_xml: Path, out_xml: Path) -> dict[str, Any]:
    calib_samples, x_calib = ex.calibration()
    head_model = compile_f32(head_xml)

    def head(features: np.ndarray) -> np.ndarray:
        return head_model(features)[0]

    baseline = ex.variants["openvino-fp32"]["metrics"]["val_top1"]
    task = ex.progress.add_task("openvino int8 search", total=None, status="")

    def on_attempt(a: OVAttempt) -> None:
        ex.progress.update(task, status=f"attempt {a.config.describe()}: drop {a.top1_drop_pp:.2f} pp")

    t0 = time.perf_counter()
    result = search_int8_openvino(
        fp32_xml,
        out_xml,
        x_calib,
        (ex.x_val, ex.y_val, head),
        baseline_top1=baseline,
        max_drop=ex.max_drop,
        on_attempt=on_attempt,
    )
    ex.progress.update(task, total=1, completed=1, status=f"chose {result.chosen.config.describe()}")
    log.info(
        "openvino int8: chose %s after %d attempt(s) in %.1fs",
        result.chosen.config.describe(),
        len(result.attempts),
        time.perf_counter() - t0,
    )
    return result.manifest_record([s.path for s in calib_samples])
