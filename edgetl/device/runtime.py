"""The device runtime's public names in one place, for callers that want one import.

The code lives by job: :mod:`edgetl.device.backends` (one module per runtime, registered from
:data:`edgetl.core.formats.FORMATS`), :mod:`edgetl.device.bundle_loading` (open_bundle, Bundle),
:mod:`edgetl.device.predictor` (Predictor, softmax) and :mod:`edgetl.device.images` (walking
folders, PredictionStream, predict_files). No torch anywhere.
"""

from __future__ import annotations

import dataclasses

from edgetl.core.formats import DEFAULT_RUNTIME, runtime_of
from edgetl.device.backends import BACKENDS, RUNTIMES, Backend, Model, import_backend
from edgetl.device.backends.onnxruntime import PROVIDERS, onnxruntime_providers, resolve_provider
from edgetl.device.backends.openvino import check_openvino_device, openvino_core, openvino_devices
from edgetl.device.bundle_loading import ALL_HEADS, Bundle, open_bundle
from edgetl.device.images import (
    PredictionStream,
    PredictReport,
    PredictSummary,
    find_images,
    iter_images,
    predict_files,
)
from edgetl.device.predictor import Predictor, softmax

# The registry itself (the same dict) and the OpenVINO loader, for tests that patch a back-end.
_BACKENDS = BACKENDS
_load_openvino = BACKENDS["openvino"].loader


def _Backend(fmt: str, module: str, install_hint: str, loader) -> Backend:
    """The registered back-end of format ``fmt`` with another loader (the old constructor's arguments)."""
    return dataclasses.replace(BACKENDS[runtime_of(fmt)], loader=loader)


__all__ = [
    "ALL_HEADS",
    "DEFAULT_RUNTIME",
    "PROVIDERS",
    "RUNTIMES",
    "Bundle",
    "Model",
    "PredictReport",
    "PredictSummary",
    "PredictionStream",
    "Predictor",
    "check_openvino_device",
    "find_images",
    "import_backend",
    "iter_images",
    "onnxruntime_providers",
    "open_bundle",
    "openvino_core",
    "openvino_devices",
    "predict_files",
    "resolve_provider",
    "softmax",
]
