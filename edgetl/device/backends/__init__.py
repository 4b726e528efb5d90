"""Inference back-ends by runtime name, built from the rows of :data:`edgetl.core.formats.FORMATS`.

Adding a runtime (LiteRT, NCNN ...) is one row in ``edgetl/core/formats.py`` plus one module here
named after the row's ``runtime`` (``edgetl/device/backends/<runtime>.py``). Nothing else in the
device side names a runtime. The module implements this protocol:

- ``OPTIONS: tuple[str, ...]``: the load options it understands besides ``threads``, from
  ``provider``, ``provider_options``, ``device``, ``streams``. Any other option given to
  :meth:`edgetl.device.bundle_loading.Bundle.load` is refused with the flag that sets it.
- ``load(path, *, threads, **options) -> Model``: open one model file of the bundle and return a
  callable, float32 array (N, ...) in, float32 array out (one input, one output). ``threads``
  None leaves the thread count to the library. The variant's ``inference_precision`` (manifest)
  arrives as an option when the variant has one. A file the library cannot open is a
  :class:`~edgetl.core.errors.BundleError`, a missing accelerator a ``BackendError``, both one
  line. The callable may carry ``runtime_info`` (a dict: what the library reports it runs).
- ``check_options(options) -> options`` (optional): validate and normalise the options once,
  before the first file is loaded (OpenVINO checks the device is present).
- Import the inference library inside ``load``, never at module level: a device with only ONNX
  Runtime imports this package without OpenVINO, and nothing here may import torch.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

import numpy as np

from edgetl.core.errors import BackendError, ConfigError
from edgetl.core.formats import FORMATS

# A loaded model file: float32 array in, float32 array out (one input, one output).
Model = Callable[[np.ndarray], np.ndarray]

# Each load option besides threads: the device-profile setting that gives it, and the flag that sets
# it (for the message when a runtime does not take it). The one list; profiles and loading read it.
LOAD_OPTIONS: dict[str, tuple[str, str]] = {
    "provider": ("provider", "--provider"),
    "provider_options": ("provider_options", "provider_options"),
    "device": ("ov_device", "--openvino-device"),
    "streams": ("streams", "--streams"),
}


@dataclasses.dataclass(frozen=True)
class Backend:
    """One runtime: the bundle format it runs, the library it imports, and its loader."""

    runtime: str
    format: str
    module: str  # the inference library, imported by ``load``
    install_hint: str
    loader: Callable[..., Model] | None  # None: not implemented yet
    options: tuple[str, ...] = ()
    check_options: Callable[[dict[str, Any]], dict[str, Any]] | None = None


BACKENDS: dict[str, Backend] = {}


def register(backend: Backend) -> None:
    """Add a back-end; a second one for the same runtime is a programming error, refused."""
    if backend.runtime in BACKENDS:
        raise ValueError(f"a back-end for runtime {backend.runtime!r} is already registered")
    BACKENDS[backend.runtime] = backend


def _register_formats() -> None:
    runtimes = [f.runtime for f in FORMATS.values()]
    if len(set(runtimes)) != len(runtimes):
        raise ValueError(f"edgetl.core.formats.FORMATS names a runtime twice: {runtimes}")
    for f in FORMATS.values():
        module = importlib.import_module(f"{__name__}.{f.runtime}")
        register(
            Backend(
                runtime=f.runtime,
                format=f.name,
                module=f.runtime_module,
                install_hint=f.install_hint,
                loader=getattr(module, "load", None),
                options=tuple(getattr(module, "OPTIONS", ())),
                check_options=getattr(module, "check_options", None),
            )
        )


_register_formats()
RUNTIMES: tuple[str, ...] = tuple(BACKENDS)


def backend(runtime: str) -> Backend:
    try:
        return BACKENDS[runtime]
    except KeyError:
        raise ConfigError(f"unknown runtime {runtime!r}; choose one of {', '.join(BACKENDS)}") from None


def import_backend(runtime: str) -> None:
    """Import the runtime's library now (bench calls this so import time is not counted as model load)."""
    spec = backend(runtime)
    if importlib.util.find_spec(spec.module) is None:
        raise BackendError(f"runtime {runtime!r} is not installed: {spec.install_hint}")
    if spec.loader is None:
        raise BackendError(f"runtime {runtime!r} is not supported by edgetl yet; use --runtime onnxruntime")
    importlib.import_module(spec.module)


def check_load_options(runtime: str, options: dict[str, Any]) -> None:
    """Refuse, by its flag, an option the runtime does not take (``--streams`` with ONNX Runtime)."""
    for key in options:
        if key not in backend(runtime).options:
            users = [r for r, b in BACKENDS.items() if key in b.options]
            raise ConfigError(f"{LOAD_OPTIONS[key][1]} applies to --runtime {' or '.join(users)}, not {runtime}")


__all__ = [
    "BACKENDS",
    "LOAD_OPTIONS",
    "RUNTIMES",
    "Backend",
    "Model",
    "backend",
    "check_load_options",
    "import_backend",
    "register",
]
