"""Bounds on the numbers a user gives the device side (command-line options and device profiles).

One table, read by the CLI options, the library calls and the profile checks, so a value is refused
with the same one line wherever it comes from, before it reaches a runtime that would allocate for
it (``bench --batch-size 100000`` asked ONNX Runtime for a 1.2 GB input of a 224-pixel model and
ended in a traceback). Imports nothing heavy: the CLI reads it for ``--help``.
"""

from __future__ import annotations

import math
from typing import Any

from edgetl.core.errors import ConfigError

# 4096 images of 224x224x3 float32 are 2.5 GB of input alone; no edge device gains throughput
# from batches that large (bench's curves flatten by 32-64 on every CPU we measured).
MAX_BATCH_SIZE = 4096
# More than any machine's cores (the largest servers have 384 hardware threads); a typo beyond it.
MAX_THREADS = 1024
MAX_STREAMS = 1024
# bench: 1,000,000 timed runs of a 1 ms model are 17 minutes; more is a typo, not a measurement.
MAX_ITERATIONS = 1_000_000
MAX_WARMUP = 100_000
# bench --duration: a day per configuration is the longest soak anyone runs; below a tenth of a
# second a measurement is one round of a few calls (use --iterations for that).
MIN_DURATION_S = 0.1
MAX_DURATION_S = 86_400.0

BOUNDS: dict[str, tuple[int, int]] = {
    "batch_size": (1, MAX_BATCH_SIZE),
    "threads": (1, MAX_THREADS),
    "streams": (1, MAX_STREAMS),
    "iterations": (1, MAX_ITERATIONS),
    "warmup": (0, MAX_WARMUP),
    "block": (1, MAX_ITERATIONS),
    "top_k": (1, 1 << 20),
}
# Settings that are numbers of seconds (a float or an int, finite), with the same one-line messages.
SECONDS_BOUNDS: dict[str, tuple[float, float]] = {
    "duration": (MIN_DURATION_S, MAX_DURATION_S),
}


def problem(name: str, value: Any) -> str | None:
    """What is wrong with ``value`` for the setting ``name`` (see :data:`BOUNDS` and
    :data:`SECONDS_BOUNDS`), or None."""
    if name in SECONDS_BOUNDS:
        lo_s, hi_s = SECONDS_BOUNDS[name]
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or not lo_s <= value <= hi_s
        ):
            return f"{name} must be a number of seconds from {lo_s:g} to {hi_s:g}, not {value!r}"
        return None
    lo, hi = BOUNDS[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        return f"{name} must be an integer >= {lo} (at most {hi}), not {value!r}"
    if value > hi:
        return f"{name} must be at most {hi}, not {value}"
    return None


def check(name: str, value: Any, *, flag: bool = True) -> Any:
    """``value`` if it is within the bounds of ``name``, else a one-line :class:`ConfigError`
    naming the option (``--batch-size``, or ``batch_size`` with ``flag=False``)."""
    message = problem(name, value)
    if message is not None:
        if flag:
            message = "--" + name.replace("_", "-") + message[len(name) :]
        raise ConfigError(message)
    return value


def check_batch_size(value: Any) -> int:
    return check("batch_size", value)


__all__ = [
    "BOUNDS",
    "MAX_BATCH_SIZE",
    "MAX_DURATION_S",
    "MAX_THREADS",
    "MIN_DURATION_S",
    "SECONDS_BOUNDS",
    "check",
    "check_batch_size",
    "problem",
]
