"""Benchmark a bundle variant the way the device will run it: preprocessed input -> logits.

What is timed, and why:

- ``latency_ms``: ``Predictor.logits`` (trunk once + the selected heads) on a fixed, already
  preprocessed batch, after ``warmup`` untimed runs; ``perf_counter_ns`` around each call. Image
  decoding and preprocessing are left out so the number is the model's, comparable across runtimes
  and with OpenVINO's ``benchmark_app``; ``preprocess_ms`` (numpy/pillow, one camera-sized image)
  is reported beside it because the device pays it too.
- ``cold_start_ms``: ``load`` = open the bundle (manifest + sha256 of every file) and create the
  sessions; ``first_inference`` = the first call, which often pays lazy allocations. The runtime
  library is imported and initialised (one throw-away load) before the clock starts: that one-time
  cost is the process's, and would otherwise favour whichever variant is benched second.
- ``peak_rss_mb``: the process's resident-set high-water mark. On Linux the mark is reset just
  before loading (``/proc/self/clear_refs``), so each variant's peak is its own even when several
  are benched in one process (``peak_rss_scope`` says ``variant``); elsewhere it is the process's.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from edgetl.envinfo import environment
from edgetl.errors import ConfigError
from edgetl.preprocess import preprocess
from edgetl.runtime import DEFAULT_RUNTIME, import_backend, open_bundle

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BenchResult:
    """One variant's numbers with the context needed to trust or compare them."""

    bundle: str
    variant: str
    runtime: str
    precision: str
    heads: tuple[str, ...]
    batch_size: int
    threads: int | None  # None: the runtime's default (ONNX Runtime: one per physical core)
    warmup: int
    iterations: int
    latency_ms: dict[str, float]  # p50, p90, p99, mean, min, max
    throughput_ips: float  # images per second: batch_size / mean latency
    cold_start_ms: dict[str, float]  # load, first_inference
    peak_rss_mb: float | None
    peak_rss_scope: str  # "variant" or "process" (see module docstring)
    model_bytes: int
    preprocess_ms: float  # median, one image, numpy/pillow
    val_top1: float | None  # from the bundle manifest (measured at export), for the comparison
    env: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["heads"] = list(self.heads)
        return d


def _check_options(*, batch_size: int, threads: int | None, warmup: int, iterations: int) -> None:
    for name, value, minimum in (("batch-size", batch_size, 1), ("warmup", warmup, 0), ("iterations", iterations, 1)):
        if not isinstance(value, int) or value < minimum:
            raise ConfigError(f"--{name} must be an integer >= {minimum}, not {value!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"--threads must be an integer >= 1, not {threads!r}")


def synthetic_image(width: int = 640, height: int = 480, seed: int = 0) -> Image.Image:
    """A camera-sized RGB frame with gradients, edges and noise: timing does not depend on pixel
    values for these graphs, but preprocessing cost does depend on the source size."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    arr = np.stack([xx / width * 255, yy / height * 255, (xx + yy) / (width + height) * 255], axis=-1)
    arr[height // 4 : height // 2, width // 3 : width // 2] = (230, 40, 40)
    arr += rng.normal(0, 12, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="RGB")


def _reset_peak_rss() -> str:
    gc.collect()  # free the previous variant's sessions before the mark is reset
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "variant"
    except OSError:
        return "process"


def _peak_rss_mb(scope: str) -> float | None:
    if scope == "variant":
        # VmHWM, not ru_maxrss: the latter also keeps the peak recorded when earlier threads exited.
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


def _elapsed_ms(fn, *args) -> float:
    t0 = time.perf_counter_ns()
    fn(*args)
    return (time.perf_counter_ns() - t0) / 1e6


def latency_summary(samples_ms: Sequence[float]) -> dict[str, float]:
    a = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(a.mean()),
            "min": float(a.min()), "max": float(a.max())}


def bench(
    bundle_path: str | os.PathLike,
    *,
    runtime: str = DEFAULT_RUNTIME,
    precision: str | None = None,
    batch_size: int = 1,
    threads: int | None = None,
    warmup: int = 10,
    iterations: int = 100,
    head: str | None = None,
) -> BenchResult:
    """Benchmark one variant (``precision`` None: fp32 if the bundle has it); ``head`` None: the
    default head, ``"all"``: every head (the trunk still runs once)."""
    _check_options(batch_size=batch_size, threads=threads, warmup=warmup, iterations=iterations)
    import_backend(runtime)
    # A throw-away load first: the runtime's one-time process set-up (its environment, lazy imports)
    # would otherwise be charged to whichever variant happens to be benched first.
    open_bundle(bundle_path, verify=False).load(runtime=runtime, precision=precision, heads=head, threads=threads)
    scope = _reset_peak_rss()

    t0 = time.perf_counter_ns()
    bundle = open_bundle(bundle_path)
    predictor = bundle.load(runtime=runtime, precision=precision, heads=head, threads=threads)
    load_ms = (time.perf_counter_ns() - t0) / 1e6

    log.info("benchmarking %s: %d warm-up + %d timed runs at batch %d",
             predictor.variant, warmup, iterations, batch_size)
    image = synthetic_image()
    x = np.repeat(predictor.preprocess([image]), batch_size, axis=0)
    first_ms = _elapsed_ms(predictor.logits, x)
    for _ in range(warmup):
        predictor.logits(x)
    samples = [_elapsed_ms(predictor.logits, x) for _ in range(iterations)]
    peak = _peak_rss_mb(scope)

    pp = predictor.preprocessing
    preprocess_ms = float(np.median([_elapsed_ms(preprocess, image, pp) for _ in range(min(max(iterations, 5), 30))]))

    latency = latency_summary(samples)
    variant = bundle.manifest["variants"][predictor.variant]
    return BenchResult(
        bundle=str(bundle.path),
        variant=predictor.variant,
        runtime=runtime,
        precision=predictor.precision,
        heads=predictor.head_names,
        batch_size=batch_size,
        threads=threads,
        warmup=warmup,
        iterations=iterations,
        latency_ms=latency,
        throughput_ips=batch_size / (latency["mean"] / 1000.0),
        cold_start_ms={"load": load_ms, "first_inference": first_ms},
        peak_rss_mb=peak,
        peak_rss_scope=scope,
        model_bytes=bundle.model_bytes(variant, predictor.head_names),
        preprocess_ms=preprocess_ms,
        val_top1=(variant.get("metrics") or {}).get("val_top1"),
        env=environment(),
    )


def bench_precisions(
    bundle_path: str | os.PathLike,
    *,
    runtime: str = DEFAULT_RUNTIME,
    precisions: Sequence[str] | None = None,
    **options: Any,
) -> list[BenchResult]:
    """Bench several precisions of one runtime (None: every precision the bundle has, fp32 first)."""
    if precisions is None:
        precisions = open_bundle(bundle_path, verify=False).runtime_precisions(runtime)
    if not precisions:
        raise ConfigError("no precision to benchmark")
    return [bench(bundle_path, runtime=runtime, precision=p, **options) for p in dict.fromkeys(precisions)]


def compare(results: Sequence[BenchResult]) -> list[dict[str, Any]]:
    """Each result against the fp32 one (else the first), as NNCF's reports do: speed-up of the
    median latency, compression of the model files, and the validation top-1 drop from export."""
    if len(results) < 2:
        return []
    base = next((r for r in results if r.precision == "fp32"), results[0])
    rows = []
    for r in results:
        if r is base:
            continue
        drop = None
        if r.val_top1 is not None and base.val_top1 is not None:
            drop = (base.val_top1 - r.val_top1) * 100.0
        rows.append({
            "variant": r.variant,
            "baseline": base.variant,
            "speedup_p50": base.latency_ms["p50"] / r.latency_ms["p50"],
            "throughput_ratio": r.throughput_ips / base.throughput_ips,
            "compression": base.model_bytes / r.model_bytes if r.model_bytes else None,
            "top1_drop_pp": drop,
        })
    return rows


def report(results: Sequence[BenchResult]) -> dict[str, Any]:
    """The ``--json`` document: one variant -> its result; several -> ``{results, comparison}``."""
    if len(results) == 1:
        return results[0].to_dict()
    return {"results": [r.to_dict() for r in results], "comparison": compare(results)}
