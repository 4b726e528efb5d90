"""What ``edgetl export`` produces: export profiles (``export/*.yaml``) with command-line options on top.

Formats, precisions and the libraries each format needs come from :mod:`edgetl.core.formats`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgetl.core.errors import ConfigError
from edgetl.core.formats import FORMATS, PRECISIONS, missing_export_modules

log = logging.getLogger(__name__)

DEFAULT_PROFILE = "default"
MAX_CALIB_SIZE = 100_000  # images; far above any calibration set worth its time
# --min-speedup: int8 p50 speed-up over fp32 (edgetl.workstation.export.speed, which imports numpy:
# the values are repeated here so that the CLI's option parsing stays light).
DEFAULT_MIN_SPEEDUP = 1.2
MIN_SPEEDUP_RANGE = (0.5, 10.0)
# --qat-epochs: quantization-aware fine-tuning of the trunk (edgetl.workstation.export.qat, torch).
# None = auto (only when post-training int8 misses the accuracy bar or the speed floor), 0 = never.
DEFAULT_QAT_EPOCHS = 1  # what auto runs: docs/export.md has the measurement (a 2nd and 3rd epoch gained ~nothing)
QAT_MAX_EPOCHS = 20


@dataclasses.dataclass(frozen=True)
class ExportProfile:
    """What ``edgetl export`` produces; ``export/<name>.yaml`` files hold these keys (plus ``description``).

    ``skip_unavailable``: formats whose library is not installed are left out with a warning
    instead of failing (the ``default`` profile: "everything available"). Naming a format on the
    command line always requires it. ``min_speedup``: the speed-up over fp32 an int8 variant should
    reach on a CPU with int8 dot-product instructions (below it the export warns; docs/export.md).
    ``qat_epochs``: epochs of quantization-aware fine-tuning of the trunk, tried as an int8 remedy
    (None: auto, :data:`DEFAULT_QAT_EPOCHS` epochs only when post-training int8 falls short; 0: never).
    """

    formats: tuple[str, ...] = ("onnx", "openvino")
    precisions: tuple[str, ...] = ("fp32", "int8")
    calib_size: int = 200
    max_drop: float = 1.0
    merged: bool = False
    skip_unavailable: bool = False
    min_speedup: float = DEFAULT_MIN_SPEEDUP
    qat_epochs: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["formats"], d["precisions"] = list(self.formats), list(self.precisions)
        return d


def load_profile(name_or_path: str | os.PathLike) -> tuple[dict[str, Any], Path]:
    """Read an export profile (a shipped name or a path); unknown keys are errors."""
    from edgetl.core import shipped as profiles

    data, path = profiles.load("export-profile", name_or_path, ExportProfile, allowed_extra=("description",))
    data.pop("description", None)
    for key in ("formats", "precisions"):
        if key in data:
            value = data[key]
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"export profile {path}: {key} must be a list of names, not {data[key]!r}")
            data[key] = tuple(value)
    for key in ("merged", "skip_unavailable"):
        if key in data and not isinstance(data[key], bool):
            raise ConfigError(f"export profile {path}: {key} must be true or false, not {data[key]!r}")
    return data, path


def resolve_options(
    profile: str | os.PathLike | None = None,
    *,
    formats: Sequence[str] | None = None,
    precisions: Sequence[str] | None = None,
    calib_size: int | None = None,
    max_drop: float | None = None,
    merged: bool | None = None,
    min_speedup: float | None = None,
    qat_epochs: int | None = None,
) -> ExportProfile:
    """The profile (default: ``default``) with every option given (not None) on top, checked."""
    values, _ = load_profile(profile or DEFAULT_PROFILE)
    given = {
        "formats": formats,
        "precisions": precisions,
        "calib_size": calib_size,
        "max_drop": max_drop,
        "merged": merged,
        "min_speedup": min_speedup,
        "qat_epochs": qat_epochs,
    }
    values.update({k: (tuple(v) if k in ("formats", "precisions") else v) for k, v in given.items() if v is not None})
    if formats is not None:
        values["skip_unavailable"] = False  # asked for by name: required
    return check_options(**values)


def missing_library(fmt: str, precisions: Sequence[str] = ()) -> str | None:
    """Why ``fmt`` cannot be exported here, or None when it can."""
    missing = missing_export_modules(fmt, tuple(precisions))
    if not missing:
        return None
    hint = f"pip install 'edgetl[{FORMATS[fmt].export_extra}]'"
    return f"--model-format {fmt} needs {', '.join(missing)}, which is not installed ({hint})"


def check_options(
    formats: Sequence[str] = ExportProfile.formats,
    precisions: Sequence[str] = ExportProfile.precisions,
    calib_size: int = ExportProfile.calib_size,
    max_drop: float = ExportProfile.max_drop,
    merged: bool = False,
    skip_unavailable: bool = False,
    min_speedup: float = DEFAULT_MIN_SPEEDUP,
    qat_epochs: int | None = None,
) -> ExportProfile:
    """Validate formats, precisions, calibration size, accuracy gate, speed floor and QAT epochs
    before any work is done."""
    formats = tuple(dict.fromkeys(formats))
    precisions = tuple(dict.fromkeys(precisions))
    if not formats:
        raise ConfigError(f"no --model-format given; choose from {', '.join(FORMATS)}")
    for fmt in formats:
        if fmt not in FORMATS:
            raise ConfigError(f"unknown --model-format {fmt!r}; choose from {', '.join(FORMATS)}")
    if not precisions:
        raise ConfigError(f"no --precision given; choose from {', '.join(PRECISIONS)}")
    for p in precisions:
        if p not in PRECISIONS:
            raise ConfigError(f"unsupported --precision {p!r}; choose from {', '.join(PRECISIONS)}")
    if isinstance(calib_size, bool) or not isinstance(calib_size, int) or not 1 <= calib_size <= MAX_CALIB_SIZE:
        raise ConfigError(f"--calib-size must be an integer in 1..{MAX_CALIB_SIZE}, not {calib_size!r}")
    # A NaN bar would pass nothing and an infinite one everything; a negative one is allowed (it forces
    # the search to run every remedy, and tests use it to force a failure).
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not math.isfinite(max_drop):
        raise ConfigError(f"--max-drop must be a finite number of percentage points, not {max_drop!r}")
    low, high = MIN_SPEEDUP_RANGE
    if (
        isinstance(min_speedup, bool)
        or not isinstance(min_speedup, (int, float))
        or not (low <= min_speedup <= high)  # NaN fails this too
    ):
        raise ConfigError(f"--min-speedup must be a speed-up over fp32 in {low:g}..{high:g}, not {min_speedup!r}")
    if qat_epochs is not None and (
        isinstance(qat_epochs, bool) or not isinstance(qat_epochs, int) or not 0 <= qat_epochs <= QAT_MAX_EPOCHS
    ):
        raise ConfigError(
            f"--qat-epochs must be an integer in 0..{QAT_MAX_EPOCHS} (0: never; left out: auto), not {qat_epochs!r}"
        )
    available = []
    for fmt in formats:
        reason = missing_library(fmt, precisions)
        if reason is None:
            available.append(fmt)
        elif skip_unavailable:
            log.warning("%s: leaving %s out of the bundle", reason, fmt)
        else:
            raise ConfigError(reason)
    if not available:
        raise ConfigError(f"none of the formats {', '.join(formats)} can be exported here")
    for p in precisions:
        if not any(p in FORMATS[f].precisions for f in available):
            holders = [f.name for f in FORMATS.values() if p in f.precisions]
            raise ConfigError(
                f"--precision {p} is not available for --model-format {','.join(available)}; "
                f"it needs --model-format {' or '.join(holders)}"
            )
    return ExportProfile(
        tuple(available),
        precisions,
        calib_size,
        float(max_drop),
        bool(merged),
        skip_unavailable,
        float(min_speedup),
        qat_epochs,
    )
