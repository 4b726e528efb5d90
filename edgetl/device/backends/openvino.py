"""OpenVINO back-end: runs a bundle's ``openvino/`` IR (protocol: :mod:`edgetl.device.backends`).

The device is OpenVINO's (``device``: ``CPU``, ``GPU``, ``NPU``, ``AUTO``); asking for one this
machine lacks is a :class:`BackendError` that lists what it has. The variant's inference precision
is always pinned (see :func:`load`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgetl.core.errors import BackendError, BundleError

if TYPE_CHECKING:
    from edgetl.device.backends import Model

OPTIONS = ("device", "streams")


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """The device as OpenVINO spells it, checked once before any file is compiled."""
    if options.get("device") is not None:
        options = {**options, "device": check_openvino_device(options["device"])}
    return options


def openvino_devices() -> list[str]:
    """OpenVINO's devices on this machine (``CPU``, ``GPU.0``, ``NPU`` ...); [] without OpenVINO."""
    if importlib.util.find_spec("openvino") is None:
        return []
    return list(openvino_core().available_devices)


def openvino_core():
    """One ``openvino.Core`` per process (creating it scans for plugins and devices)."""
    global _OV_CORE
    if _OV_CORE is None:
        import openvino

        _OV_CORE = openvino.Core()
    return _OV_CORE


_OV_CORE = None
# Virtual devices that pick or combine real ones; "AUTO:GPU,CPU" lists candidates after the colon.
_OV_VIRTUAL = ("AUTO", "MULTI", "HETERO", "BATCH")


def check_openvino_device(device: str) -> str:
    """``device`` as OpenVINO spells it; BackendError listing the devices present if one is missing."""
    available = openvino_devices()
    base = {d.split(".")[0] for d in available}
    name, _, candidates = device.upper().partition(":")
    wanted = [c.strip() for c in candidates.split(",") if c.strip()] if name in _OV_VIRTUAL else [device.upper()]
    for d in wanted:
        if d not in available and d not in base:
            raise BackendError(
                f"OpenVINO device {d!r} is not available here (OpenVINO has: {', '.join(available) or 'no devices'}"
                f"{', AUTO' if available else ''}); GPU needs the Intel GPU compute runtime, NPU the NPU driver"
            )
    return device.upper()


def _ov_type_name(value: Any) -> str:
    """OpenVINO element type (``<Type: 'float32'>``) as its short name: f32, bf16, f16."""
    return value.get_type_name() if hasattr(value, "get_type_name") else str(value)


def load(
    path: Path,
    *,
    threads: int | None,
    device: str | None = None,
    streams: int | None = None,
    inference_precision: str | None = None,
) -> Model:
    """One compiled IR model with its own infer request, wrapped as a plain callable.

    ``inference_precision`` is the variant's ``INFERENCE_PRECISION_HINT`` from the manifest. It is
    always pinned because the CPU plugin otherwise picks bf16 by itself on CPUs with bf16 support
    (AMX, AVX512-BF16), and an "fp32" variant then differs from what the export measured by ~0.1
    in features. The callable's ``runtime_info`` says what the plugin actually runs.
    """
    core = openvino_core()
    device = device or "CPU"
    config: dict[str, Any] = {}
    if inference_precision is not None:
        config["INFERENCE_PRECISION_HINT"] = inference_precision
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    if streams is not None:
        config["NUM_STREAMS"] = streams
    try:
        compiled = core.compile_model(core.read_model(str(path)), device, config)
    except Exception as exc:  # OpenVINO raises RuntimeError with multi-line C++ context
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"OpenVINO cannot load {path} on {device}: {first_line}") from None
    if len(compiled.inputs) != 1 or len(compiled.outputs) != 1:
        raise BundleError(
            f"{path} has {len(compiled.inputs)} inputs and {len(compiled.outputs)} outputs; "
            "edgetl models have one of each"
        )
    request = compiled.create_infer_request()
    from openvino import Tensor

    def run(x: np.ndarray) -> np.ndarray:
        # A tensor over x's memory (callers pass C-contiguous float32), not infer({0: x}): that
        # copies the input and every output per call, ~0.1 ms more on a 2-core Xeon (a 2.5 ms model).
        request.set_input_tensor(Tensor(np.ascontiguousarray(x), shared_memory=True))
        request.infer()
        # The request reuses its output buffer: copy before the next call overwrites it.
        return request.get_output_tensor(0).data.copy()

    info: dict[str, Any] = {"device": device}
    try:
        info["inference_precision"] = _ov_type_name(compiled.get_property("INFERENCE_PRECISION_HINT"))
    except Exception:  # virtual devices (AUTO, MULTI) do not all report it
        info["inference_precision"] = None
    run.runtime_info = info  # type: ignore[attr-defined]
    run.signature = {  # type: ignore[attr-defined]
        "inputs": [_ov_port(compiled.inputs[0])],
        "outputs": [_ov_port(compiled.outputs[0])],
    }
    return run


# OpenVINO element types as numpy spells them.
_OV_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "f64": "float64", "i64": "int64", "i32": "int32"}


def _ov_port(port: Any) -> tuple[list[int | None], str]:
    """A port's declared shape (dynamic dimensions as None) and element type."""
    dims = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
    name = _ov_type_name(port.get_element_type())
    return dims, _OV_DTYPES.get(name, name)


def write_linear_head(weight: np.ndarray, bias: np.ndarray, out: Path) -> None:
    """features (batch, D) float32 -> logits (batch, C): features @ weight.T + bias; weight (C, D), bias (C,).

    The IR the workstation converts its ONNX head to (a MatMul with transpose_b, then an Add of the
    bias as [1, C]; input ``features`` with a dynamic batch, output ``logits``), built with the
    opset functions and saved as ``out`` (``.xml``) with its ``.bin`` beside it, float32 weights.
    Not through ``convert_model`` (which starts OpenVINO's conversion telemetry and forks) nor
    ``read_model`` of the ONNX head (which keeps Gemm's multiplications by alpha and beta).
    ValueError for a weight or bias that is not a head (:func:`edgetl.device.backends.linear_head_arrays`).
    """
    import openvino

    try:
        import openvino.opset13 as ops
    except ImportError:  # OpenVINO 2024 (this package takes 2024.4 on) has them under openvino.runtime only
        import openvino.runtime.opset13 as ops

    from edgetl.device.backends import linear_head_arrays, staged_output

    weight, bias = linear_head_arrays(weight, bias)
    out = Path(out)
    if out.suffix != ".xml":
        raise ValueError(f"an OpenVINO head is an .xml file (its weights go in the .bin beside it), not {out.name}")
    features = ops.parameter(openvino.PartialShape([-1, weight.shape[1]]), openvino.Type.f32, name="features")
    features.output(0).set_names({"features"})
    product = ops.matmul(features, ops.constant(weight, name="weight"), transpose_a=False, transpose_b=True)
    logits = ops.add(product, ops.constant(bias[None, :], name="bias"), name="logits")
    logits.output(0).set_names({"logits"})
    model = openvino.Model([ops.result(logits)], [features], "head")
    with staged_output(out, sidecars=(".bin",)) as staged:
        openvino.save_model(model, str(staged), compress_to_fp16=False)
