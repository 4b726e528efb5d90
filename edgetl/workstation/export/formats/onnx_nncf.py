"""NNCF's ONNX backend as a second int8 quantizer for the ONNX Runtime variant.

``nncf.quantize`` on an ``onnx.ModelProto`` returns a QDQ ONNX model (int8 weights stored as int8
initializers + DequantizeLinear), calibrated like NNCF's OpenVINO path: per-image min/max averaged
over the calibration set for activations, and fast or full bias correction afterwards, which ONNX
Runtime's ``quantize_static`` does not have. :class:`~.onnx_quantize.OrtQuantizer` tries it as a
remedy that keeps the int8 chain whole.

Two settings make its graph run as int8 in ONNX Runtime, not only look like it:

- activations are quantized per tensor. NNCF's CPU defaults quantize a depthwise convolution's
  input per channel, which ONNX Runtime's QLinearConv cannot take: those convolutions then ran in
  float between DequantizeLinear/QuantizeLinear (on a digits MobileNetV2 at 96 px: 0.36x fp32);
- optionally (``activation_type="uint8"``) every int8 activation Q/DQ pair is re-encoded as uint8
  (:func:`to_uint8_activations`, exact: zero point + 128). NNCF stores a tensor that can be
  negative (a residual sum) as int8; on x86 ONNX Runtime fuses a residual Add into QLinearAdd only
  with uint8, so with int8 those Adds and the convolutions around them stay in float.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

QUANT_METHOD = "nncf post-training quantization (ONNX)"
RANGE_ESTIMATORS = ("mean-minmax", "minmax")
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def available() -> bool:
    """Whether NNCF is installed (it comes with the OpenVINO extra; the ONNX variant does not need it)."""
    return importlib.util.find_spec("nncf") is not None


def _advanced(config: Any):
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        QuantizationParameters,
    )
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    estimators = {"mean-minmax": None, "minmax": RangeEstimatorParametersSet.MINMAX}
    if config.method not in estimators:
        raise ValueError(f"NNCF ONNX range estimator {config.method!r} is not one of {RANGE_ESTIMATORS}")
    return AdvancedQuantizationParameters(
        weights_quantization_params=QuantizationParameters(per_channel=config.per_channel),
        # Per tensor: ONNX Runtime's QLinearConv takes one input scale (see the module docstring).
        activations_quantization_params=QuantizationParameters(per_channel=False),
        activations_range_estimator_params=estimators[config.method],
        disable_bias_correction=config.bias_correction is None,
    )


def quantize_nncf_onnx(
    fp32_path: Path, out_path: Path, calib: np.ndarray, config: Any, *, input_name: str = "image"
) -> Path:
    """Quantize the ONNX graph at ``fp32_path`` with NNCF, calibrated on ``calib`` (one image per
    item, so NNCF's per-batch statistics are per image), and write the QDQ graph to ``out_path``.

    ``config`` (an ``onnx_quantize.QuantConfig``) gives the activation range estimator (``method``:
    ``mean-minmax``, NNCF's default, or ``minmax``), weight granularity (``per_channel``), bias
    correction (``fast``, ``full`` or None), the nodes kept in float (``excluded_nodes``, an NNCF
    ignored scope) and the activation type (``int8`` as NNCF writes it, or ``uint8``).
    """
    import nncf
    import onnx

    from edgetl.workstation.export.formats.openvino_quantize import quiet_nncf

    model = onnx.load(str(fp32_path))
    dataset = nncf.Dataset([{input_name: calib[i : i + 1]} for i in range(len(calib))])
    ignored = nncf.IgnoredScope(names=list(config.excluded_nodes)) if config.excluded_nodes else None
    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    nncf_log.setLevel(logging.ERROR)
    try:
        with quiet_nncf():
            quantized = nncf.quantize(
                model,
                dataset,
                preset=nncf.QuantizationPreset.PERFORMANCE,
                target_device=nncf.TargetDevice.CPU,
                subset_size=len(calib),
                fast_bias_correction=config.bias_correction != "full",
                ignored_scope=ignored,
                advanced_parameters=_advanced(config),
            )
    finally:
        nncf_log.setLevel(level)
    if config.activation_type == "uint8":
        to_uint8_activations(quantized)
    onnx.save(quantized, str(out_path))
    return out_path


def to_uint8_activations(model) -> int:
    """Re-encode every int8 QuantizeLinear/DequantizeLinear of an activation as uint8, in place; returns
    how many zero points changed. Exact: ``q + 128`` with zero point ``z + 128`` dequantizes to the
    same value for every ``q``. Weights (int8 initializers read by a DequantizeLinear) stay int8."""
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    weights = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    weight_zero_points = {n.input[2] for n in weights if len(n.input) > 2}
    zero_points: set[str] = set()
    outputs: set[str] = set()
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
            continue
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            continue  # a weight
        zp = inits.get(node.input[2])
        if zp is not None and zp.data_type == TensorProto.INT8 and zp.name not in weight_zero_points:
            zero_points.add(zp.name)
            if node.op_type == "QuantizeLinear":
                outputs.add(node.output[0])
    for name in zero_points:
        zp = inits[name]
        shifted = (numpy_helper.to_array(zp).astype(np.int16) + 128).astype(np.uint8)
        zp.CopyFrom(numpy_helper.from_array(shifted, name))
    # Stale int8 types of the re-encoded tensors and zero points would contradict the graph: drop
    # them (ORT infers them). NNCF records the zero points' types too after full bias correction.
    kept = [v for v in graph.value_info if v.name not in outputs and v.name not in zero_points]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return len(zero_points)


def float_nodes(model) -> list[str]:
    """Weighted nodes of a QDQ graph whose data input is not dequantized: the ones left in float."""
    producers = {o: n for n in model.graph.node for o in n.output}
    out = []
    for node in model.graph.node:
        if node.op_type in WEIGHTED_OPS:
            source = producers.get(node.input[0])
            if source is None or source.op_type != "DequantizeLinear":
                out.append(node.name)
    return out
