"""Results: one configuration's numbers, the report of a run, ratios between results, saving, plotting."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.core.errors import BackendError


@dataclasses.dataclass(frozen=True)
class BenchResult:
    """One configuration's numbers with the context needed to trust or compare them."""

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
    cold_start_ms: dict[str, float | None]  # import, load, first_inference, total
    peak_rss_mb: float | None
    peak_rss_scope: str  # "fresh-process", or "process" (this process, when cold start is off)
    model_bytes: int
    preprocess_ms: float  # median, one 640x480 image, numpy/pillow
    val_top1: float | None  # from the bundle manifest (measured at export), for the comparison
    env: dict[str, Any]
    provider: str | None = None  # ONNX Runtime provider asked for (None: CPU)
    device: str | None = None  # OpenVINO device asked for (None: CPU)
    streams: int | None = None
    cold_start_scope: str = "fresh-process"  # or "in-process" (no import; the runtime already set up)
    heads_cost: dict[str, Any] | None = None
    merged: bool = False  # each head's single trunk+head graph (export --merged) instead of trunk + heads
    inference_precision: str | None = None  # what OpenVINO reports it ran (f32, bf16); None: ONNX Runtime
    profile: dict[str, Any] | None = None  # {name, path, applied: {setting: value}} with --device-profile
    samples_ms: tuple[float, ...] = dataclasses.field(default=(), repr=False)  # every timed call

    def to_dict(self, *, samples: bool = False) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["heads"] = list(self.heads)
        if samples:
            d["samples_ms"] = list(self.samples_ms)
        else:
            del d["samples_ms"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchResult:
        """A result read back from ``--json`` (another machine's, or a saved file); keys this
        version does not know are ignored, so an older workstation reads a newer device."""
        known = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["heads"] = tuple(kw.get("heads", ()))
        kw["samples_ms"] = tuple(kw.get("samples_ms", ()))
        return cls(**kw)

    @property
    def label(self) -> str:
        target = self.provider or self.device
        threads = f"t{self.threads}" if self.threads is not None else "t-default"
        return " ".join(
            filter(None, (self.variant, "merged" if self.merged else "", target, threads, f"b{self.batch_size}"))
        )


@dataclasses.dataclass(frozen=True)
class BenchReport:
    results: list[BenchResult]
    comparison: list[dict[str, Any]]
    skipped: list[dict[str, str]]  # variants --all could not run here, with the reason
    profile: dict[str, Any] | None
    several: bool  # a sweep or --all: always the {"results": [...]} shape

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> BenchReport:
        """The inverse of :meth:`to_dict` (either shape)."""
        if "results" not in doc:
            return cls([BenchResult.from_dict(doc)], [], [], None, False)
        return cls(
            [BenchResult.from_dict(r) for r in doc["results"]],
            doc.get("comparison", []),
            doc.get("skipped", []),
            doc.get("profile"),
            True,
        )

    def to_dict(self, *, samples: bool = False) -> dict[str, Any]:
        """One configuration asked for: its result; otherwise ``{results, comparison, ...}``."""
        if len(self.results) == 1 and not self.several:
            return self.results[0].to_dict(samples=samples)
        doc: dict[str, Any] = {
            "results": [r.to_dict(samples=samples) for r in self.results],
            "comparison": self.comparison,
        }
        if self.skipped:
            doc["skipped"] = self.skipped
        if self.profile:
            doc["profile"] = self.profile
        return doc


# --- comparison, saving, plotting ---------------------------------------------------------------------


def _ratio_row(kind: str, r: BenchResult, base: BenchResult) -> dict[str, Any]:
    drop = None
    if r.val_top1 is not None and base.val_top1 is not None:
        drop = (base.val_top1 - r.val_top1) * 100.0
    return {
        "kind": kind,
        "variant": r.variant,
        "baseline": base.variant,
        "threads": r.threads,
        "batch_size": r.batch_size,
        "speedup_p50": base.latency_ms["p50"] / r.latency_ms["p50"],
        "throughput_ratio": r.throughput_ips / base.throughput_ips,
        "compression": base.model_bytes / r.model_bytes if r.model_bytes else None,
        "top1_drop_pp": drop,
    }


def compare(results: Sequence[BenchResult]) -> list[dict[str, Any]]:
    """Ratios between results measured with the same threads, batch size and accelerator, as NNCF's
    reports do: each precision against fp32 of the same runtime (``kind: precision``), and OpenVINO
    against ONNX Runtime at the same precision (``kind: runtime``). ``speedup_p50`` > 1: faster."""
    rows = []

    def same_setting(a: BenchResult, b: BenchResult) -> bool:
        return (a.threads, a.batch_size) == (b.threads, b.batch_size)

    for r in results:
        base = next(
            (
                b
                for b in results
                if b is not r
                and b.runtime == r.runtime
                and b.precision == "fp32"
                and same_setting(r, b)
                and (b.provider, b.device, b.streams) == (r.provider, r.device, r.streams)
            ),
            None,
        )
        if base is None and r.precision != "fp32":
            # No fp32 here: against the first result of the same runtime and setting (as before).
            base = next((b for b in results if b.runtime == r.runtime and same_setting(r, b)), None)
            base = None if base is r else base
        if base is not None:
            rows.append(_ratio_row("precision", r, base))
    for r in results:
        if r.runtime == "onnxruntime":
            continue
        base = next(
            (b for b in results if b.runtime == "onnxruntime" and b.precision == r.precision and same_setting(r, b)),
            None,
        )
        if base is not None:
            rows.append(_ratio_row("runtime", r, base))
    return rows


def report(results: Sequence[BenchResult]) -> dict[str, Any]:
    """The ``--json`` document: one result -> that result; several -> ``{results, comparison}``."""
    return BenchReport(list(results), compare(results), [], None, False).to_dict()


def results_dir(profile_name: str, save_dir: str | os.PathLike | None = None) -> Path:
    """Where ``--save`` writes: ``save_dir`` if given; in a checkout of edgetl, the project's
    ``devices/<profile>/results/``; anywhere else ``./devices/<profile>/results/``."""
    if save_dir is not None:
        return Path(save_dir)
    project = Path(__file__).resolve().parents[3]  # edgetl/device/bench/results.py -> the checkout
    if (project / "devices").is_dir() and (project / "pyproject.toml").is_file():
        return project / "devices" / profile_name / "results"
    return Path.cwd() / "devices" / profile_name / "results"


def save_report(
    rep: BenchReport, *, profile_name: str | None = None, save_dir: str | os.PathLike | None = None
) -> Path:
    """Write the report (with every timed sample) as JSON; returns the file written. The folder is
    named after ``profile_name``, else the profile applied, else the one that fits this machine
    (as ``edgetl doctor`` says), else ``unknown-<arch>``."""
    if profile_name is None:
        from edgetl.device.doctor import machine_profile_name

        profile_name = rep.profile["name"] if rep.profile else machine_profile_name()
    folder = results_dir(profile_name, save_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    bundle_name = Path(rep.results[0].bundle).name or "bundle"
    path = folder / f"{stamp}-{bundle_name}.json"
    doc = rep.to_dict(samples=True)
    doc = doc if "results" in doc else {"results": [doc], "comparison": rep.comparison}
    doc["saved_utc"], doc["profile_folder"] = stamp, profile_name
    from edgetl.core.atomic import write_json_atomic

    write_json_atomic(path, doc)
    return path


def plot_latencies(results: Sequence[BenchResult], path: str | os.PathLike) -> Path:
    """A PNG of each configuration's latency distribution (violin + median), one row each."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BackendError("--plot needs matplotlib: pip install matplotlib") from None
    path = Path(path)
    rows = [r for r in results if r.samples_ms]
    fig, ax = plt.subplots(figsize=(8, 1.0 + 0.6 * len(rows)))
    data = [np.asarray(r.samples_ms) for r in rows]
    try:
        ax.violinplot(data, orientation="horizontal", showmedians=True, showextrema=True)
    except TypeError:  # matplotlib < 3.10
        ax.violinplot(data, vert=False, showmedians=True, showextrema=True)
    ax.set_yticks(range(1, len(rows) + 1), [r.label for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("latency per call (ms), preprocessed input -> logits")
    env = rows[0].env if rows else {}
    ax.set_title(
        f"{Path(rows[0].bundle).name if rows else ''}: {env.get('cpu', '')}, {env.get('usable_cores', '?')} cores",
        fontsize=9,
    )
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
