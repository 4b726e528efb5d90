"""Cold start: import, load and first inference of one configuration in a fresh Python process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgetl.core.errors import BackendError

if TYPE_CHECKING:
    from edgetl.device.bench.run import Config

# Runs in `sys.executable -c`: nothing is imported before the clock starts but `time`.
_COLD_START = r"""
import time
t0 = time.perf_counter_ns()
import json, sys
sys.path.insert(0, sys.argv[2])
args = json.loads(sys.argv[1])
try:
    from edgetl.device.backends import import_backend
    from edgetl.device.bundle_loading import open_bundle
    import_backend(args["runtime"])
    t1 = time.perf_counter_ns()
    predictor = open_bundle(args["bundle"]).load(**args["load"])
    t2 = time.perf_counter_ns()
    from edgetl.device.bench.timing import _peak_rss_mb, bench_input
    x = bench_input(predictor, args["batch_size"])
    t3 = time.perf_counter_ns()
    predictor.logits(x)
    t4 = time.perf_counter_ns()
    for _ in range(args["steady_runs"]):
        predictor.logits(x)
    peak = _peak_rss_mb()
except Exception as exc:
    print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
    sys.exit(1)
print(json.dumps({"import": (t1 - t0) / 1e6, "load": (t2 - t1) / 1e6, "prepare": (t3 - t2) / 1e6,
                  "first_inference": (t4 - t3) / 1e6, "after_first": (time.perf_counter_ns() - t4) / 1e6,
                  "peak_rss_mb": peak}))
"""


def cold_start(
    bundle_path: str | os.PathLike,
    config: Config,
    *,
    heads: Any,
    merged: bool = False,
    steady_runs: int = 10,
    timeout: float = 900.0,
) -> dict[str, Any]:
    """Import, load and first inference of one configuration in a new Python process (no shell)."""
    load = {
        "runtime": config.runtime,
        "precision": config.precision,
        "heads": heads,
        "threads": config.threads,
        **config.load_options,
    }
    if merged:
        load["merged"] = True
    args = {
        "runtime": config.runtime,
        "bundle": str(bundle_path),
        "batch_size": config.batch_size,
        "steady_runs": steady_runs,
        "load": load,
    }
    # The folder holding the edgetl package (edgetl/device/bench/coldstart.py: three levels up), so the
    # child imports this edgetl, also from a checkout that is not installed.
    package_parent = str(Path(__file__).resolve().parents[3])
    t0 = time.perf_counter_ns()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _COLD_START, json.dumps(args), package_parent],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BackendError(f"cold start of {config.runtime} {config.precision} took over {timeout:.0f} s") from None
    wall_ms = (time.perf_counter_ns() - t0) / 1e6
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise BackendError(f"cold start in a fresh process failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    total = wall_ms - child["after_first"] - child["prepare"]
    return {
        "cold_start_ms": {
            "import": child["import"],
            "load": child["load"],
            "first_inference": child["first_inference"],
            "total": total,
        },
        "peak_rss_mb": child["peak_rss_mb"],
    }
