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
