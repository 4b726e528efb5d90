"""Benchmark a bundle the way the device will run it: preprocessed input -> logits, numbers you can compare.

What is timed, and why:

- ``latency_ms``: ``Predictor.logits`` (trunk once + the selected heads) on a fixed, already
  preprocessed batch, ``perf_counter_ns`` around each call, garbage collection paused. Image
  decoding and preprocessing are left out so the number is the model's, comparable across runtimes
  and with OpenVINO's ``benchmark_app``; ``preprocess_ms`` (numpy/pillow, one camera-sized image)
  is reported beside it because the device pays it too.
- Several configurations (variants, ``--threads 1,2``, ``--batch-size 1,8``) are loaded together
  and timed **interleaved**: in rounds of ``block`` calls each, the order rotating every round, so
  that thermal throttling, a neighbour's compile job or a frequency change hits every
  configuration alike instead of whichever ran last. Each block starts with one untimed call, so
  a configuration is timed as a program running only it would see it (its weights in cache).
- ``cold_start_ms`` is measured in a **fresh process** (``sys.executable``, no shell): import of
  edgetl's runtime and the inference library, ``load`` (manifest, sha256 of every file, sessions
  or compilation) and the first inference; ``total`` is spawn to first result, interpreter start
  included. The bundle's files are in the page cache (the parent has just verified them): this is
  an application restart, not a power-on. ``peak_rss_mb`` is that process's high-water mark after
  a few more inferences: what the application would hold.
- ``heads_cost`` (bundles with several heads): the trunk alone, each head alone on the trunk's
  features, and trunk + each head, timed in the same interleaved rounds.
- ``duration_s`` instead of ``iterations``: rounds until the run has taken about that long per
  configuration; every configuration still gets the same number of calls.
- A spread check: p90 above :data:`NOISY_SPREAD` times p50 is reported as a warning (a noisy machine).
"""

from __future__ import annotations

from edgetl.device.bench.coldstart import cold_start
from edgetl.device.bench.results import (
    NOISY_SPREAD,
    SCHEMA_VERSION,
    BenchReport,
    BenchResult,
    check_plot_path,
    check_save_dir,
    combine,
    compare,
    comparisons,
    noise_warnings,
    plot_latencies,
    plot_problem,
    read_saved,
    report,
    results_dir,
    save_report,
    spread,
    spread_warning,
)
from edgetl.device.bench.run import BenchOptions, Config, bench, bench_precisions, run_bench
from edgetl.device.bench.timing import BLOCK, bench_input, interleave, latency_summary, synthetic_image

__all__ = [
    "BLOCK",
    "NOISY_SPREAD",
    "SCHEMA_VERSION",
    "BenchOptions",
    "BenchReport",
    "BenchResult",
    "Config",
    "bench",
    "bench_input",
    "bench_precisions",
    "check_plot_path",
    "check_save_dir",
    "cold_start",
    "combine",
    "compare",
    "comparisons",
    "interleave",
    "latency_summary",
    "noise_warnings",
    "plot_latencies",
    "plot_problem",
    "read_saved",
    "report",
    "results_dir",
    "run_bench",
    "save_report",
    "spread",
    "spread_warning",
    "synthetic_image",
]
