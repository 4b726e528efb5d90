"""Timing: the synthetic input, interleaved rounds, latency percentiles, peak memory."""

from __future__ import annotations

import dataclasses
import gc
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from edgetl.device.predictor import Predictor

BLOCK = 10  # timed calls per configuration per interleaving round


def synthetic_image(width: int = 640, height: int = 480, seed: int = 0) -> Image.Image:
    """A camera-sized RGB frame with gradients, edges and noise: timing does not depend on pixel
    values for these graphs, but preprocessing cost does depend on the source size."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    arr = np.stack([xx / width * 255, yy / height * 255, (xx + yy) / (width + height) * 255], axis=-1)
    arr[height // 4 : height // 2, width // 3 : width // 2] = (230, 40, 40)
    arr += rng.normal(0, 12, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="RGB")


def bench_input(predictor: Predictor, batch_size: int) -> np.ndarray:
    """The timed input: the synthetic frame preprocessed with the bundle's settings, repeated."""
    return np.repeat(predictor.preprocess([synthetic_image()]), batch_size, axis=0)


def _peak_rss_mb() -> float | None:
    """This process's resident-set high-water mark (VmHWM on Linux, ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, KiB on Linux


def _elapsed_ms(fn: Callable[..., Any], *args: Any) -> float:
    t0 = time.perf_counter_ns()
    fn(*args)
    return (time.perf_counter_ns() - t0) / 1e6


def latency_summary(samples_ms: Sequence[float]) -> dict[str, float]:
    a = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "mean": float(a.mean()),
        "min": float(a.min()),
        "max": float(a.max()),
    }


@dataclasses.dataclass
class _Timed:
    name: str
    fn: Callable[[], Any]
    first_ms: float = 0.0
    samples: list[float] = dataclasses.field(default_factory=list)
    total_ms: float = 0.0  # sum of samples


def interleave(
    timed: Sequence[_Timed],
    *,
    warmup: int,
    iterations: int | None = None,
    block: int = BLOCK,
    duration_s: float | None = None,
    max_iterations: int = 1_000_000,
) -> int:
    """Warm each up, then time calls of each in rounds of ``block``, rotating the order (and
    reversing it every other round); one untimed call after each switch. Returns the number of
    timed calls each got (the same for all).

    ``iterations`` calls each; or, with ``duration_s``, rounds until the timed calls of all of them
    add up to ``duration_s`` per entry (so the run takes about ``len(timed) * duration_s`` seconds,
    every entry getting the same number of calls), at least one round and at most
    ``max_iterations`` calls each.
    """
    if (iterations is None) == (duration_s is None):
        raise ValueError("give iterations or duration_s")
    for t in timed:
        t.first_ms = _elapsed_ms(t.fn)
        for _ in range(warmup):
            t.fn()
    budget_ms = None if duration_s is None else duration_s * 1000.0 * len(timed)
    limit = iterations if iterations is not None else max_iterations
    done = 0
    r = 0
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed call is noise no configuration asked for (timeit does the same)
    try:
        while done < limit:
            n = min(block, limit - done)
            shift = r % len(timed)
            order = list(timed[shift:]) + list(timed[:shift])
            for t in order[::-1] if r % 2 else order:
                if len(timed) > 1:
                    t.fn()
                for _ in range(n):
                    t0 = time.perf_counter_ns()
                    t.fn()
                    ms = (time.perf_counter_ns() - t0) / 1e6
                    t.samples.append(ms)
                    t.total_ms += ms
            done += n
            r += 1
            if budget_ms is not None and sum(t.total_ms for t in timed) >= budget_ms:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return done


def interleaved_p50(
    fns: Sequence[Callable[[], Any]], *, warmup: int, iterations: int, block: int = BLOCK
) -> tuple[list[float], int]:
    """p50 latency (ms) of each of ``fns``, timed with :func:`interleave` exactly as ``edgetl bench``
    times configurations (``iterations`` calls each, in rounds of ``block``, the order rotating);
    returns the p50s in the order given and the number of timed calls each got. For callers that
    compare models without a bundle (the export's int8 search times its attempts against fp32)."""
    timed = [_Timed(str(i), fn) for i, fn in enumerate(fns)]
    done = interleave(timed, warmup=warmup, iterations=iterations, block=block)
    return [float(np.median(t.samples)) for t in timed], done
