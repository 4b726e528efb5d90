"""``edgetl export``: a run -> a checked bundle. The public API; see :mod:`.pipeline` for the flow.

Modules: ``options`` (profiles and options), ``session`` (:class:`ExportSession`, one export in
progress), ``checks`` (the bars every variant passes, shared with ``export --add-to``), ``int8``
(the int8 search driver and its records), ``speed`` (int8 against fp32, timed on this machine),
``formats/`` (one plug-in per format; the protocol is
in its docstring), ``common`` (arrays, batching, progress).
"""

from __future__ import annotations

from edgetl.workstation.export.checks import (
    FP32_MAX_ABS_DIFF,
    MERGED_MAX_ABS_DIFF,
    check_bar,
    check_merged,
    check_precision_pin,
    variant_metrics,
)
from edgetl.workstation.export.common import (
    BATCH,
    HEAD,
    batches,
    load_arrays,
    progress_bar,
    tensor_spec,
    torch_logits,
)
from edgetl.workstation.export.formats.onnx import ONNX_OPSET, export_onnx
from edgetl.workstation.export.int8 import Attempt, QuantResult, search_int8, select_calibration
from edgetl.workstation.export.options import (
    DEFAULT_PROFILE,
    ExportProfile,
    check_options,
    load_profile,
    missing_library,
    resolve_options,
)
from edgetl.workstation.export.pipeline import export_bundle
from edgetl.workstation.export.session import ExportSession

__all__ = [
    "BATCH",
    "DEFAULT_PROFILE",
    "FP32_MAX_ABS_DIFF",
    "HEAD",
    "MERGED_MAX_ABS_DIFF",
    "ONNX_OPSET",
    "Attempt",
    "ExportProfile",
    "ExportSession",
    "QuantResult",
    "batches",
    "check_bar",
    "check_merged",
    "check_options",
    "check_precision_pin",
    "export_bundle",
    "export_onnx",
    "load_arrays",
    "load_profile",
    "missing_library",
    "progress_bar",
    "resolve_options",
    "search_int8",
    "select_calibration",
    "tensor_spec",
    "torch_logits",
    "variant_metrics",
]
