"""The device runtime's public names in one place, for callers that want one import.

The code lives by job: :mod:`edgetl.device.backends` (one module per runtime, registered from
:data:`edgetl.core.formats.FORMATS`), :mod:`edgetl.device.bundle_loading` (open_bundle, Bundle),
:mod:`edgetl.device.predictor` (Predictor, softmax) and :mod:`edgetl.device.images` (walking
folders, PredictionStream, predict_files). No torch anywhere.
"""

from __future__ import annotations

from edgetl.core.formats import DEFAULT_RUNTIME
from edgetl.device.backends import RUNTIMES, Model, import_backend
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
