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
- ``write_linear_head(weight, bias, out)``: write a linear head (features (N, D) float32 -> logits
  (N, C) float32, ``features @ weight.T + bias``) as a graph file of this format at ``out``, with
  its sidecars, float32 weights and the batch axis the format allows, readable by ``load``. It uses
  only numpy and the runtime's own libraries (no torch, no ``onnx``): required for a runtime whose
  bundles can receive heads learned on the device (:func:`head_writer`).
- Import the inference library inside ``load`` (and ``write_linear_head``), never at module level:
  a device with only ONNX Runtime imports this package without OpenVINO, and nothing here may
  import torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
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


def head_writer(runtime: str) -> Callable[[np.ndarray, np.ndarray, Path], None] | None:
    """The runtime's ``write_linear_head(weight, bias, out)``; None when its module has none."""
    backend(runtime)  # an unknown runtime is a ConfigError naming the known ones
    return getattr(importlib.import_module(f"{__name__}.{runtime}"), "write_linear_head", None)


def linear_head_arrays(weight: np.ndarray, bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``weight`` (C, D) and ``bias`` (C,) as C-contiguous float32, checked for every writer alike.

    A head needs at least two classes and one feature, and finite float32 values: a NaN or an
    infinity (or a float64 beyond float32's range) would be written silently and give NaN logits.
    """
    w, b = np.asarray(weight), np.asarray(bias)
    if w.ndim != 2 or b.ndim != 1 or b.shape[0] != w.shape[0]:
        raise ValueError(f"a linear head takes weight (C, D) and bias (C,), not {w.shape} and {b.shape}")
    classes, features = w.shape
    if classes < 2 or features < 1:
        raise ValueError(f"a linear head needs at least 2 classes and 1 feature, not weight {w.shape}")
    with np.errstate(over="ignore"):  # beyond float32's range becomes inf, refused just below
        w, b = np.ascontiguousarray(w, dtype=np.float32), np.ascontiguousarray(b, dtype=np.float32)
    if not (np.isfinite(w).all() and np.isfinite(b).all()):
        raise ValueError("a linear head's weight and bias must be finite float32 values (NaN or inf found)")
    return w, b


@contextlib.contextmanager
def staged_output(out: Path, sidecars: tuple[str, ...] = ()) -> Iterator[Path]:
    """A path to write ``out`` at, in a scratch folder beside it; moved to ``out`` (with its sidecar
    files, ``out`` with each suffix) only when the block succeeds, so a failure leaves no partial file.
    """
    out = Path(out)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        staged = work / out.name
        yield staged
        for suffix in sidecars:
            os.replace(staged.with_suffix(suffix), out.with_suffix(suffix))
        os.replace(staged, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


__all__ = [
    "BACKENDS",
    "LOAD_OPTIONS",
    "RUNTIMES",
    "Backend",
    "Model",
    "backend",
    "check_load_options",
    "head_writer",
    "import_backend",
    "linear_head_arrays",
    "register",
    "staged_output",
]
