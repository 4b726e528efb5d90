"""How much faster an int8 variant is than its fp32, measured on the exporting machine.

int8 is for speed first; the accuracy bar only keeps the speed from costing correctness. So the
export times what it ships: each int8 attempt of the search that passes the accuracy bar (its
trunk against the fp32 trunk), and the chosen variant through the device runtime (trunk + head
against the same format's fp32 variant, loaded from the unfinished bundle exactly as a device
loads it). Both at batch 1, at 1 thread and at the machine's usable cores, interleaved with the
timing code of ``edgetl bench`` (:func:`edgetl.device.bench.timing.interleaved_p50`), so machine
drift hits fp32 and int8 alike and the ratio of their p50s is what is compared.

A speed-up can only be held to ``--min-speedup`` on a CPU with int8 dot-product instructions
(VNNI, AMX, ARM dot product: :data:`edgetl.core.envinfo.INT8_DOT_PRODUCT`); elsewhere int8 is not
expected to be faster and the figure is recorded with ``checked: false``. A variant under the floor
is reported (one warning naming the variant, the figure and what cost the speed), never failed: the
accuracy bar is the gate, the speed floor is a finding. A figure under the floor is timed again
before it counts (:func:`confirmed`): a miss warns, and in the search it can start the QAT remedy.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from edgetl.core import envinfo
from edgetl.device.bench import timing

log = logging.getLogger(__name__)

CALLS = 300  # timed calls per model and thread count for the shipped variant (a few hundred, as bench)
SEARCH_CALLS = 100  # per attempt of the int8 search (one attempt is one of several: cheaper)
WARMUP = 10
CONFIRM_REPEATS = 3  # measurements of a pair whose speed-up misses the floor, combined by their median
BATCH_SIZE = 1


def thread_counts() -> tuple[int, ...]:
    """1 thread, and every core this process may use (what a runtime's default uses), once each."""
    return tuple(dict.fromkeys((1, max(1, envinfo.usable_cores() or 1))))


@dataclasses.dataclass(frozen=True)
class Timing:
    """fp32 and int8 p50 latencies (ms) at each thread count, from interleaved runs."""

    threads: tuple[int, ...]
    fp32_p50_ms: tuple[float, ...]
    int8_p50_ms: tuple[float, ...]
    calls: int

    @property
    def speedups(self) -> tuple[float, ...]:
        """fp32 p50 / int8 p50 per thread count (above 1: int8 is faster); NaN where a p50 is not a
        positive finite number."""
        return tuple(_ratio(f, q) for f, q in zip(self.fp32_p50_ms, self.int8_p50_ms, strict=True))

    @property
    def speedup(self) -> float:
        """The lowest speed-up over the thread counts (what int8 is at least worth here); NaN if any is."""
        values = self.speedups
        if not values or not all(math.isfinite(v) for v in values):
            return math.nan
        return min(values)

    @property
    def finite(self) -> bool:
        return math.isfinite(self.speedup)

    def latencies(self) -> str:
        """``p50 3.09 vs 4.11 ms at 1 thread, 2.96 vs 2.92 ms at 2`` (int8 vs fp32)."""
        parts = [
            f"{q:.2f} vs {f:.2f} ms at {t}{' thread' if i == 0 else ''}"
            for i, (t, f, q) in enumerate(zip(self.threads, self.fp32_p50_ms, self.int8_p50_ms, strict=True))
        ]
        return f"p50 {', '.join(parts)}"

    def describe(self) -> str:
        """``1.33x fp32 (p50 3.09 vs 4.11 ms at 1 thread, 2.96 vs 2.92 ms at 2)``."""
        return f"{self.speedup:.2f}x fp32 ({self.latencies()})"

    def to_dict(self) -> dict[str, Any]:
        """The manifest's record of a timing: per thread count, and the lowest speed-up."""
        return {
            "batch_size": BATCH_SIZE,
            "calls": self.calls,
            "by_threads": [
                {"threads": t, "fp32_p50_ms": round(f, 4), "int8_p50_ms": round(q, 4), "speedup": round(s, 4)}
                for t, f, q, s in zip(self.threads, self.fp32_p50_ms, self.int8_p50_ms, self.speedups, strict=True)
            ],
            "speedup_vs_fp32": round(self.speedup, 4),
        }


def _ratio(fp32_ms: float, int8_ms: float) -> float:
    ok = all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in (fp32_ms, int8_ms))
    return fp32_ms / int8_ms if ok else math.nan


def time_pair(
    fp32: Callable[[int], Callable[[], Any]],
    int8: Callable[[int], Callable[[], Any]],
    *,
    threads: Sequence[int] | None = None,
    calls: int = CALLS,
    warmup: int = WARMUP,
) -> Timing:
    """Time ``fp32(t)()`` against ``int8(t)()`` interleaved at each thread count ``t`` (default
    :func:`thread_counts`); each factory loads its model for ``t`` threads and returns one call."""
    threads = tuple(threads or thread_counts())
    f_ms, q_ms, done = [], [], calls
    for t in threads:
        (f, q), done = timing.interleaved_p50([fp32(t), int8(t)], warmup=warmup, iterations=calls)
        f_ms.append(f)
        q_ms.append(q)
    return Timing(threads, tuple(f_ms), tuple(q_ms), done)


def median_timing(timings: Sequence[Timing]) -> Timing:
    """Several timings of one pair combined: per thread count, the median fp32 p50 and the median
    int8 p50 (calls: their sum)."""
    first = timings[0]
    if any(t.threads != first.threads for t in timings):
        raise ValueError("timings of different thread counts cannot be combined")
    return Timing(
        first.threads,
        tuple(float(statistics.median(t.fp32_p50_ms[i] for t in timings)) for i in range(len(first.threads))),
        tuple(float(statistics.median(t.int8_p50_ms[i] for t in timings)) for i in range(len(first.threads))),
        sum(t.calls for t in timings),
    )


def confirmed(measure: Callable[[], Timing], floor: float | None, *, repeats: int = CONFIRM_REPEATS) -> Timing:
    """``measure()``, repeated when its speed-up is under ``floor`` (or not finite) and combined by
    :func:`median_timing` over ``repeats`` measurements: on a shared machine one burst of contention
    on a core can halve one p50 of a pair, and a miss triggers remedies that cost minutes (the QAT
    fine-tune) and warnings, so a miss is confirmed before it counts. None: no floor, one measurement.
    """
    first = measure()
    if floor is None or first.speedup >= floor:
        return first
    timings = [first, *(measure() for _ in range(repeats - 1))]
    combined = median_timing(timings)
    log.info(
        "speed-up %.2fx under %.2gx: timed %d times, median %s",
        first.speedup,
        floor,
        len(timings),
        combined.describe(),
    )
    return combined


def attempt_timer(
    runner: Callable[[Any, int], Callable[[Any], Any]], x: Any, *, floor: float | None = None
) -> Callable[[Any], Timing]:
    """The int8 search's timer: ``runner(model, threads)`` loads a trunk (``None``: the fp32 one) and
    returns a callable of one batch; each attempt's trunk is timed against fp32 on ``x``, a speed-up
    under ``floor`` :func:`confirmed` by repeated timing."""
    fp32_cache: dict[int, Callable[[Any], Any]] = {}

    def fp32(t: int) -> Callable[[], Any]:
        if t not in fp32_cache:
            fp32_cache[t] = runner(None, t)
        run = fp32_cache[t]
        return lambda: run(x)

    def timer(model: Any) -> Timing:
        def int8(t: int) -> Callable[[], Any]:
            run = runner(model, t)
            return lambda: run(x)

        return confirmed(lambda: time_pair(fp32, int8, calls=SEARCH_CALLS), floor)

    return timer


def measure_variant(bundle: Any, runtime: str, head: str, x: Any, *, floor: float | None = None) -> Timing:
    """The shipped int8 variant against the same runtime's fp32 variant, both loaded from ``bundle``
    (an opened :class:`~edgetl.device.bundle_loading.Bundle`) through the device runtime, trunk +
    ``head`` on the preprocessed batch ``x``: what ``edgetl bench`` times; a speed-up under
    ``floor`` :func:`confirmed` by repeated timing."""

    def load(precision: str) -> Callable[[int], Callable[[], Any]]:
        def at(t: int) -> Callable[[], Any]:
            predictor = bundle.load(runtime=runtime, precision=precision, heads=[head], threads=t)
            return lambda: predictor.logits(x, [head])

        return at

    return confirmed(lambda: time_pair(load("fp32"), load("int8")), floor)


def speed_record(measured: Timing, *, min_speedup: float, dot_product: list[str] | None) -> dict[str, Any]:
    """The variant's manifest ``speed`` record: the timing, the floor, whether it could be checked, and
    the machine it was measured on (:func:`edgetl.core.envinfo.environment`)."""
    return {
        **measured.to_dict(),
        "measured": "trunk + head through the device runtime, against the format's fp32 variant",
        "min_speedup": min_speedup,
        "int8_dot_product": None if dot_product is None else bool(dot_product),
        "checked": bool(dot_product),
        "machine": envinfo.environment(),
    }


def speed_cost(quantization: dict[str, Any] | None) -> str:
    """What the chosen quantization gave up speed for, from its manifest record."""
    if not quantization:
        return "no quantization record says how it was made"
    floats = len(quantization.get("excluded_nodes") or [])
    settings = [
        (quantization.get("calibration") or {}).get("method") or "?",
        "per-channel" if quantization.get("per_channel") else "per-tensor",
    ]
    if floats:
        return (
            f"{floats} layer(s) kept in float to hold the accuracy bar ({', '.join(settings)}): each one adds "
            "dequantize/quantize around an fp32 op and breaks the int8 chain"
        )
    return (
        f"no layer is kept in float ({', '.join(settings)}): the runtime's int8 kernels are not faster for "
        "this graph on this CPU"
    )


def below_floor_message(
    name: str, fmt: str, measured: Timing, min_speedup: float, dot_product: list[str], quantization: dict | None
) -> str:
    return (
        f"variant {name} is only {measured.speedup:.2f}x as fast as {fmt}-fp32 ({measured.latencies()}), under "
        f"--min-speedup {min_speedup:g} on this CPU with int8 dot-product instructions ({', '.join(dot_product)}); "
        f"what cost the speed: {speed_cost(quantization)}"
    )


def cannot_check_message(min_speedup: float, dot_product: list[str] | None) -> str:
    why = (
        "this platform does not report its CPU features"
        if dot_product is None
        else "this CPU has no int8 dot-product instructions (VNNI, AMX, ARM dot product)"
    )
    return (
        f"{why}: int8 is not expected to be faster than fp32 here, so each int8 variant's speed-up is measured "
        f"and recorded (speedup_vs_fp32, checked: false) but cannot be checked against --min-speedup "
        f"{min_speedup:g} on this machine"
    )
