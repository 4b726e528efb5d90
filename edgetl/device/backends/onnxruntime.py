"""ONNX Runtime back-end: runs a bundle's ``onnx/`` files (protocol: :mod:`edgetl.device.backends`).

Accelerators are ONNX Runtime execution providers (``provider``: ``cpu``, ``cuda``, ``tensorrt``,
``openvino``, ``coreml``, ``xnnpack`` ... whichever the installed build has). Asking for one this
machine lacks is a :class:`BackendError` that lists what it has; a provider that is installed but
fails to start (a CUDA build without a GPU) is refused too, rather than silently running on the CPU.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgetl.core.errors import BackendError, BundleError, ConfigError

# ``device``: the ONNX Runtime OpenVINO provider's device_type.
if TYPE_CHECKING:
    from edgetl.device.backends import Model

OPTIONS = ("provider", "provider_options", "device")

# ONNX Runtime execution providers by short name (the full names are accepted too), and how to
# get a build that has each.
PROVIDERS: dict[str, tuple[str, str]] = {
    "cpu": ("CPUExecutionProvider", "always present"),
    "cuda": ("CUDAExecutionProvider", "pip install onnxruntime-gpu (Jetson: the JetPack wheel)"),
    "tensorrt": ("TensorrtExecutionProvider", "pip install onnxruntime-gpu plus TensorRT (Jetson: the JetPack wheel)"),
    "openvino": ("OpenVINOExecutionProvider", "pip install onnxruntime-openvino"),
    "coreml": ("CoreMLExecutionProvider", "the macOS onnxruntime wheel"),
    "xnnpack": ("XnnpackExecutionProvider", "an onnxruntime build with --use_xnnpack (Android/iOS packages have it)"),
    "dnnl": ("DnnlExecutionProvider", "an onnxruntime build with --use_dnnl"),
    "directml": ("DmlExecutionProvider", "pip install onnxruntime-directml (Windows)"),
    "qnn": ("QNNExecutionProvider", "pip install onnxruntime-qnn (Windows on Snapdragon)"),
    "rocm": ("ROCMExecutionProvider", "pip install onnxruntime-rocm"),
    "migraphx": ("MIGraphXExecutionProvider", "pip install onnxruntime-migraphx"),
    "acl": ("ACLExecutionProvider", "an onnxruntime build with --use_acl"),
    "nnapi": ("NnapiExecutionProvider", "the Android onnxruntime package"),
}
# Providers that hand what they cannot run to another accelerator before the CPU.
_PROVIDER_CHAIN = {"TensorrtExecutionProvider": ("CUDAExecutionProvider",)}
# In get_available_providers() but no local device: ORT's Azure provider calls remote endpoints.
_NOT_LOCAL = frozenset({"AzureExecutionProvider"})


def provider_short_name(full_name: str) -> str:
    return next((short for short, (full, _) in PROVIDERS.items() if full == full_name), full_name)


def onnxruntime_providers() -> list[str]:
    """Short names of the providers this onnxruntime build offers, in its order of preference."""
    if importlib.util.find_spec("onnxruntime") is None:
        return []
    import onnxruntime as ort

    return [provider_short_name(p) for p in ort.get_available_providers() if p not in _NOT_LOCAL]


def resolve_provider(name: str | None) -> str:
    """A provider's full ONNX Runtime name; BackendError listing the available ones if it is missing."""
    import onnxruntime as ort

    if name is None:
        return "CPUExecutionProvider"
    known = {short: full for short, (full, _) in PROVIDERS.items()}
    full = known.get(name.lower()) or next((p for p in ort.get_all_providers() if p.lower() == name.lower()), None)
    if full is None:
        raise ConfigError(f"unknown ONNX Runtime provider {name!r}; choose one of {', '.join(PROVIDERS)}")
    if full not in ort.get_available_providers():
        short = provider_short_name(full)
        hint = PROVIDERS[short][1] if short in PROVIDERS else "an onnxruntime build that includes it"
        raise BackendError(
            f"ONNX Runtime provider {short!r} is not in this build (onnxruntime {ort.__version__} "
            f"has: {', '.join(onnxruntime_providers())}); for {short}: {hint}"
        )
    return full


def load(
    path: Path,
    *,
    threads: int | None,
    provider: str | None = None,
    provider_options: dict[str, Any] | None = None,
    device: str | None = None,
) -> Model:
    """One ``InferenceSession``, fully optimised, wrapped as a plain callable.

    ``provider`` (default CPU) comes first, then what it hands work to (TensorRT -> CUDA), then the
    CPU provider for the operators an accelerator does not support. ``device`` is the OpenVINO
    provider's ``device_type``.
    """
    import onnxruntime as ort

    full = resolve_provider(provider)
    options_for_provider = dict(provider_options or {})
    if device is not None:
        if full != "OpenVINOExecutionProvider":
            raise ConfigError(
                "--openvino-device with --runtime onnxruntime needs --provider openvino; or use --runtime openvino"
            )
        options_for_provider.setdefault("device_type", device.upper())
    if threads is not None and full == "XnnpackExecutionProvider":
        options_for_provider.setdefault("intra_op_num_threads", threads)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    chain = [full, *(p for p in _PROVIDER_CHAIN.get(full, ()) if p in ort.get_available_providers())]
    providers: list[Any] = [(full, options_for_provider), *chain[1:]]
    if "CPUExecutionProvider" not in chain:
        providers.append("CPUExecutionProvider")
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # ORT raises its own pybind exception types (Fail, InvalidGraph, ...)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if full != "CPUExecutionProvider":
            raise BackendError(
                f"ONNX Runtime cannot load {path} with {provider_short_name(full)}: {first_line}"
            ) from None
        raise BundleError(f"ONNX Runtime cannot load {path}: {first_line}") from None
    if session.get_providers()[0] != full:
        # ORT falls back to the CPU (with a warning on stderr) when a provider's libraries or device are missing.
        raise BackendError(
            f"ONNX Runtime provider {provider_short_name(full)!r} is installed but did not start "
            f"(the session fell back to {', '.join(provider_short_name(p) for p in session.get_providers())}); "
            "check its libraries and device (ONNX Runtime's warning above says which)"
        )
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        raise BundleError(f"{path} has {len(inputs)} inputs and {len(outputs)} outputs; edgetl models have one of each")
    input_name, output_name = inputs[0].name, outputs[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run([output_name], {input_name: x})[0]

    run.signature = {  # type: ignore[attr-defined]
        "inputs": [(_dims(inputs[0].shape), _ort_dtype(inputs[0].type))],
        "outputs": [(_dims(outputs[0].shape), _ort_dtype(outputs[0].type))],
    }
    return run


def _dims(shape: Any) -> list[int | None]:
    """A declared shape with every symbolic or unknown dimension as None."""
    return [d if isinstance(d, int) and d >= 0 else None for d in (shape or [])]


def _ort_dtype(type_name: str) -> str:
    """ONNX Runtime's ``tensor(float)`` as numpy spells it: float32."""
    inner = type_name.removeprefix("tensor(").removesuffix(")")
    return {"float": "float32", "double": "float64"}.get(inner, inner)


# ONNX's ModelProto for a linear head, encoded here: a device has onnxruntime (and protobuf's runtime)
# but not the ``onnx`` package and its generated classes. Field numbers are onnx.proto's.
HEAD_IR_VERSION = 8  # what ONNX Runtime 1.18 (this package's lowest) and onnx.checker both take
HEAD_OPSET = 17  # the workstation's ONNX_OPSET
_FLOAT = 1  # TensorProto.DataType.FLOAT
_ATTRIBUTE_INT = 2  # AttributeProto.AttributeType.INT


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1  # negative int64 as two's complement, as protobuf encodes it
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _bytes_field(number: int, value: bytes | str) -> bytes:
    data = value.encode("utf-8") if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _tensor(name: str, array: np.ndarray) -> bytes:
    """TensorProto: dims (1), data_type (2), name (8), raw_data (9, little-endian float32)."""
    dims = b"".join(_int_field(1, d) for d in array.shape)
    raw = np.ascontiguousarray(array, dtype="<f4").tobytes()
    return dims + _int_field(2, _FLOAT) + _bytes_field(8, name) + _bytes_field(9, raw)


def _value_info(name: str, dims: list[int | str]) -> bytes:
    """ValueInfoProto name (1), type (2): TypeProto.tensor_type (1) {elem_type (1), shape (2)}, each
    TensorShapeProto.dim (1) a dim_value (1) or a dim_param (2)."""
    shape = b"".join(_bytes_field(1, _bytes_field(2, d) if isinstance(d, str) else _int_field(1, d)) for d in dims)
    tensor_type = _int_field(1, _FLOAT) + _bytes_field(2, shape)
    return _bytes_field(1, name) + _bytes_field(2, _bytes_field(1, tensor_type))


def linear_head_onnx(weight: np.ndarray, bias: np.ndarray) -> bytes:
    """The serialized ModelProto of ``logits = Gemm(features, weight, bias, transB=1)``, batch axis
    ``batch`` (the workstation's head graph: input ``features`` (batch, D), output ``logits`` (batch, C))."""
    classes, features = weight.shape
    trans_b = _bytes_field(1, "transB") + _int_field(20, _ATTRIBUTE_INT) + _int_field(3, 1)
    # NodeProto: input (1), output (2), name (3), op_type (4), attribute (5).
    node = b"".join(
        [
            *(_bytes_field(1, n) for n in ("features", "weight", "bias")),
            _bytes_field(2, "logits"),
            _bytes_field(3, "/Gemm"),
            _bytes_field(4, "Gemm"),
            _bytes_field(5, trans_b),
        ]
    )
    # GraphProto: node (1), name (2), initializer (5), input (11), output (12).
    graph = b"".join(
        [
            _bytes_field(1, node),
            _bytes_field(2, "head"),
            _bytes_field(5, _tensor("weight", weight)),
            _bytes_field(5, _tensor("bias", bias)),
            _bytes_field(11, _value_info("features", ["batch", features])),
            _bytes_field(12, _value_info("logits", ["batch", classes])),
        ]
    )
    # ModelProto: ir_version (1), producer_name (2), graph (7), opset_import (8: domain (1), version (2)).
    opset = _bytes_field(1, "") + _int_field(2, HEAD_OPSET)
    return b"".join(
        [
            _int_field(1, HEAD_IR_VERSION),
            _bytes_field(2, "edgetl"),
            _bytes_field(7, graph),
            _bytes_field(8, opset),
        ]
    )


def write_linear_head(weight: np.ndarray, bias: np.ndarray, out: Path) -> None:
    """features (batch, D) float32 -> logits (batch, C): features @ weight.T + bias; weight (C, D), bias (C,).

    One ONNX Gemm node with float32 initializers and a dynamic batch axis, what ONNX Runtime loads as
    the workstation's head graph. ValueError for a weight or bias that is not a head (:func:`linear_head_arrays`).
    """
    from edgetl.device.backends import linear_head_arrays, staged_output

    weight, bias = linear_head_arrays(weight, bias)
    data = linear_head_onnx(weight, bias)
    with staged_output(Path(out)) as staged:
        staged.write_bytes(data)
