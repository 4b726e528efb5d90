"""Results: one configuration's numbers, the report of a run, ratios between results, the JSON
document, saving and reading back, the spread check, plotting."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.core.errors import BackendError, ConfigError, DataError

# The --json document and the saved files (docs/schemas/bench.json). The CLI writes the same
# envelope with edgetl.cli._output.envelope; tests check that both say the same version.
SCHEMA = "edgetl.bench"
SCHEMA_VERSION = 1
# Saved results hold every timed sample: a million calls of 16 configurations is ~300 MB of JSON.
MAX_SAVED_BYTES = 1 << 30

# The spread check: p90 above this many times p50 means the timed calls did not see a quiet machine
# (the results saved on the shared 2-core VM of devices/x86-server/results/examples range from 1.18x
# at their quietest to 3.55x; see docs/benchmarking.md). Below MIN_SPREAD_SAMPLES timed calls p90 is
# not measured well enough to judge.
NOISY_SPREAD = 1.5
MIN_SPREAD_SAMPLES = 10


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
    iterations: int  # timed calls made (with duration_s: as many as fitted)
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
    duration_s: float | None = None  # timed for about this long (bench --duration) instead of a number of calls
    target: str | None = None  # the device it ran on (ssh://user@host/path); None: this machine
    remote: dict[str, Any] | None = None  # that device: {target, where, edgetl, fingerprint, machine, profile_fit}
    source: str | None = None  # the saved file it was read from (bench --compare)
    samples_ms: tuple[float, ...] = dataclasses.field(default=(), repr=False)  # every timed call

    def to_dict(self, *, samples: bool = False) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["heads"] = list(self.heads)
        d["label"] = self.label
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
        kw["samples_ms"] = tuple(kw.get("samples_ms") or ())
        return cls(**kw)

    @property
    def label(self) -> str:
        target = self.provider or self.device
        threads = f"t{self.threads}" if self.threads is not None else "t-default"
        return " ".join(
            filter(None, (self.variant, "merged" if self.merged else "", target, threads, f"b{self.batch_size}"))
        )

    @property
    def where(self) -> str:
        """Where it ran, for tables: the device (``user@host``), else ``local``."""
        if self.remote and isinstance(self.remote.get("where"), str):
            return self.remote["where"]
        return "local"


# --- the spread check ---------------------------------------------------------------------------------


def spread(r: BenchResult) -> float | None:
    """p90 / p50 of ``r``, or None when it has fewer than :data:`MIN_SPREAD_SAMPLES` timed calls."""
    p50, p90 = r.latency_ms.get("p50"), r.latency_ms.get("p90")
    if r.iterations < MIN_SPREAD_SAMPLES or not p50 or p90 is None:
        return None
    return p90 / p50


def noise_warnings(results: Sequence[BenchResult]) -> list[str]:
    """One warning naming every result whose p90 is above :data:`NOISY_SPREAD` times its p50 (the
    machine did not stay quiet while timing), with what to do; none when all are below."""
    noisy = [(r, x) for r in results if (x := spread(r)) is not None and x > NOISY_SPREAD]
    if not noisy:
        return []
    several = len({(r.source, r.target) for r in results}) > 1
    which = ", ".join(
        f"{r.label}{f' in {Path(r.source).name}' if several and r.source else ''}"
        f"{f' on {r.where}' if several and r.remote and not r.source else ''} {x:.1f}x ({r.latency_ms['p90']:.3f} vs "
        f"{r.latency_ms['p50']:.3f} ms)"
        for r, x in noisy
    )
    return [
        f"the machine looks noisy: p90 is more than {NOISY_SPREAD}x p50 for {which}. Close other programs, "
        "set the CPU governor to performance (sudo cpupower frequency-set -g performance) and time longer "
        "(more --iterations, or --duration); ratios within one interleaved run stay comparable"
    ]


def spread_warning(r: BenchResult) -> str | None:
    """:func:`noise_warnings` of one result: the warning, or None when its spread is fine."""
    return next(iter(noise_warnings([r])), None)


# --- ratios ---------------------------------------------------------------------------------------


def _ratio_row(kind: str, r: BenchResult, base: BenchResult, i: int, j: int) -> dict[str, Any]:
    drop = None
    if r.val_top1 is not None and base.val_top1 is not None:
        drop = (base.val_top1 - r.val_top1) * 100.0
    return {
        "kind": kind,
        "variant": r.variant,
        "baseline": base.variant,
        "result": i,
        "baseline_result": j,
        "threads": r.threads,
        "batch_size": r.batch_size,
        "speedup_p50": base.latency_ms["p50"] / r.latency_ms["p50"],
        "throughput_ratio": r.throughput_ips / base.throughput_ips if base.throughput_ips else None,
        "compression": base.model_bytes / r.model_bytes if r.model_bytes else None,
        "top1_drop_pp": drop,
    }


def compare(results: Sequence[BenchResult], indices: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Ratios between results measured with the same threads, batch size and accelerator, as NNCF's
    reports do: each precision against fp32 of the same runtime (``kind: precision``), and OpenVINO
    against ONNX Runtime at the same precision (``kind: runtime``). ``speedup_p50`` > 1: faster.
    ``result`` and ``baseline_result`` are positions in ``results`` (or the given ``indices``)."""
    idx = list(range(len(results))) if indices is None else list(indices)
    rows = []

    def same_setting(a: BenchResult, b: BenchResult) -> bool:
        return (a.threads, a.batch_size) == (b.threads, b.batch_size)

    for i, r in enumerate(results):
        base = next(
            (
                j
                for j, b in enumerate(results)
                if j != i
                and b.runtime == r.runtime
                and b.precision == "fp32"
                and same_setting(r, b)
                and (b.provider, b.device, b.streams) == (r.provider, r.device, r.streams)
            ),
            None,
        )
        if base is None and r.precision != "fp32":
            # No fp32 here: against the first result of the same runtime and setting.
            base = next((j for j, b in enumerate(results) if b.runtime == r.runtime and same_setting(r, b)), None)
            base = None if base == i else base
        if base is not None:
            rows.append(_ratio_row("precision", r, results[base], idx[i], idx[base]))
    for i, r in enumerate(results):
        if r.runtime == "onnxruntime":
            continue
        base = next(
            (
                j
                for j, b in enumerate(results)
                if b.runtime == "onnxruntime" and b.precision == r.precision and same_setting(r, b)
            ),
            None,
        )
        if base is not None:
            rows.append(_ratio_row("runtime", r, results[base], idx[i], idx[base]))
    return rows


def comparisons(results: Sequence[BenchResult]) -> list[dict[str, Any]]:
    """The ``comparison`` of a document: :func:`compare` within each run (each device, each saved
    file), and when the results come from several, every result against the first one
    (``kind: first``, the "vs first" column of the multi-device and ``--compare`` tables)."""
    groups: dict[tuple[str | None, str | None], list[int]] = {}
    for i, r in enumerate(results):
        groups.setdefault((r.source, r.target), []).append(i)
    rows = []
    for idx in groups.values():
        rows += compare([results[i] for i in idx], idx)
    if len(groups) > 1:
        rows += [_ratio_row("first", r, results[0], i, 0) for i, r in enumerate(results) if i > 0]
    return rows


# --- the report and its document ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BenchReport:
    """What one ``bench`` shows: the results (one per configuration, and device or saved file), the
    ratios between them, the variants ``--all`` skipped; ``mode`` says where they come from:
    ``local`` (timed here), ``remote`` (timed on devices over ssh) or ``compare`` (read from files)."""

    results: list[BenchResult]
    comparison: list[dict[str, Any]]
    skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)  # variants --all could not run
    profile: dict[str, Any] | None = None  # the device profile applied (local, or one device)
    mode: str = "local"
    bundle: str | None = None  # the bundle (local path, or the one device target); None: several

    @classmethod
    def of(
        cls, results: Sequence[BenchResult], *, skipped: Sequence[dict[str, str]] = (), mode: str = "local"
    ) -> BenchReport:
        """A report of ``results``, its comparison computed; ``bundle`` and ``profile`` when they
        are the same for every result."""
        results = list(results)
        sources = {(r.source, r.target) for r in results}
        bundle = None
        if len(sources) == 1 and mode != "compare":
            bundle = results[0].target or results[0].bundle if results else None
        profile = results[0].profile if len(sources) == 1 and results else None
        return cls(results, comparisons(results), list(skipped), profile, mode, bundle)

    @property
    def warnings(self) -> list[str]:
        return noise_warnings(self.results)

    def context(self, *, warnings: Sequence[str] = ()) -> dict[str, Any]:
        """The document's keys besides the envelope's and ``results``."""
        return {
            "mode": self.mode,
            "bundle": self.bundle,
            "comparison": self.comparison,
            "warnings": [*warnings, *self.warnings],
            "skipped": self.skipped,
        }

    def result_dicts(self, *, samples: bool = False) -> list[dict[str, Any]]:
        return [r.to_dict(samples=samples) for r in self.results]

    def to_dict(self, *, samples: bool = False, warnings: Sequence[str] = (), **extra: Any) -> dict[str, Any]:
        """The document (docs/schemas/bench.json): the envelope, the context, ``extra`` keys, then
        ``results``: always a list, whatever the number of configurations or devices."""
        from edgetl import __version__

        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "edgetl": __version__,
            **self.context(warnings=warnings),
            **extra,
            "results": self.result_dicts(samples=samples),
        }

    @classmethod
    def from_dict(cls, doc: Any, *, what: str = "the bench document", source: str | None = None) -> BenchReport:
        """A document read back: this version's, or what older edgetl printed and saved (a single
        result; ``{results, comparison}``; a device's saved result with its ``device``). ``source``
        is recorded on each result (``--compare``). A document that is not bench results is a
        one-line :class:`DataError`."""
        results = [
            BenchResult.from_dict({**d, "source": source} if source is not None else d)
            for d in result_dicts_of(doc, what=what)
        ]
        mode = doc.get("mode") if isinstance(doc.get("mode"), str) else "local"
        skipped = [s for s in doc.get("skipped") or [] if isinstance(s, dict)]
        if source is not None:
            mode = "compare"
        rep = cls.of(results, skipped=skipped, mode=mode)
        return rep


def result_dicts_of(doc: Any, *, what: str) -> list[dict[str, Any]]:
    """The result records of a bench document of any edgetl version, each checked (see
    :func:`check_result_dict`); a device's saved result's ``device`` is put on each as ``remote``."""
    if not isinstance(doc, dict):
        raise DataError(f"{what} is not a bench result (a JSON object written by `edgetl bench --save` or --json)")
    if "schema" in doc:
        if doc["schema"] != SCHEMA:
            raise DataError(f"{what} is an {doc['schema']!r} document, not bench results")
        version = doc.get("schema_version")
        if not isinstance(version, int) or isinstance(version, bool) or version > SCHEMA_VERSION:
            raise DataError(
                f"{what} has bench schema_version {version!r}; this edgetl reads up to {SCHEMA_VERSION}: "
                "upgrade edgetl to read it"
            )
        if "error" in doc and "results" not in doc:
            message = doc["error"].get("message") if isinstance(doc["error"], dict) else doc["error"]
            raise DataError(f"{what} is the error of a failed bench ({message}), not results")
        records = doc.get("results")
    elif "results" in doc:
        records = doc["results"]  # edgetl before schema_version: {results, comparison, ...}
    elif "latency_ms" in doc:
        records = [doc]  # edgetl before schema_version: one configuration's result alone
    else:
        raise DataError(f"{what} is not a bench result (no results in it)")
    if not isinstance(records, list) or not records:
        raise DataError(f"{what} holds no results (`results` must be a non-empty list)")
    device = doc.get("device") if "schema" not in doc else None
    out = []
    for n, d in enumerate(records):
        check_result_dict(d, what=f"{what}, result {n + 1}")
        if isinstance(device, dict) and d.get("remote") is None:  # a device's result saved by older edgetl
            d = {**d, "remote": device, "target": device.get("target")}
        out.append(d)
    return out


_NUMBER = (int, float)
_RESULT_KEYS: dict[str, tuple[tuple[type, ...], bool]] = {
    # key: (types, may be null)
    "bundle": ((str,), False),
    "variant": ((str,), False),
    "runtime": ((str,), False),
    "precision": ((str,), False),
    "heads": ((list,), False),
    "batch_size": ((int,), False),
    "threads": ((int,), True),
    "warmup": ((int,), False),
    "iterations": ((int,), False),
    "latency_ms": ((dict,), False),
    "throughput_ips": (_NUMBER, False),
    "cold_start_ms": ((dict,), False),
    "peak_rss_mb": (_NUMBER, True),
    "peak_rss_scope": ((str,), False),
    "model_bytes": ((int,), False),
    "preprocess_ms": (_NUMBER, False),
    "val_top1": (_NUMBER, True),
    "env": ((dict,), False),
}
_OPTIONAL_KEYS: dict[str, tuple[type, ...]] = {
    "provider": (str,),
    "device": (str,),
    "streams": (int,),
    "merged": (bool,),
    "heads_cost": (dict,),
    "profile": (dict,),
    "duration_s": _NUMBER,
    "target": (str,),
    "remote": (dict,),
    "samples_ms": (list,),
    "cold_start_scope": (str,),
    "inference_precision": (str,),
}


def check_result_dict(d: Any, *, what: str) -> None:
    """A result record from outside (a saved file, a device's output) must have the keys and
    types this edgetl reads, and positive finite latencies: else one DataError line naming it."""
    if not isinstance(d, dict):
        raise DataError(f"{what} is not a JSON object")

    def bad(key: str, expected: str) -> DataError:
        return DataError(f"{what}: {key} must be {expected}, not {d.get(key)!r:.60}")

    for key, (types, nullable) in _RESULT_KEYS.items():
        if key not in d:
            raise DataError(f"{what} has no {key!r}: not a bench result of this or an older edgetl")
        value = d[key]
        if value is None and nullable:
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            raise bad(key, " or ".join(t.__name__ for t in types) + (" or null" if nullable else ""))
    for key, types in _OPTIONAL_KEYS.items():
        value = d.get(key)
        if value is None:
            continue
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise bad(key, " or ".join(t.__name__ for t in types) + " or null")
    for key in ("p50", "p90", "p99", "mean", "min", "max"):
        v = d["latency_ms"].get(key)
        if isinstance(v, bool) or not isinstance(v, _NUMBER) or not math.isfinite(v) or v < 0:
            raise DataError(f"{what}: latency_ms.{key} must be a number >= 0, not {v!r:.60}")
    if d["latency_ms"]["p50"] <= 0:
        raise DataError(f"{what}: latency_ms.p50 must be above 0")
    if d["batch_size"] < 1 or d["iterations"] < 1:
        raise DataError(f"{what}: batch_size and iterations must be at least 1")
    for v in d["cold_start_ms"].values():
        if v is not None and (isinstance(v, bool) or not isinstance(v, _NUMBER)):
            raise DataError(f"{what}: cold_start_ms values must be numbers or null")
    if not all(isinstance(h, str) for h in d["heads"]):
        raise DataError(f"{what}: heads must be a list of names")
    samples = d.get("samples_ms") or []
    if not all(isinstance(s, _NUMBER) and not isinstance(s, bool) for s in samples):
        raise DataError(f"{what}: samples_ms must be a list of numbers")


def report(results: Sequence[BenchResult]) -> dict[str, Any]:
    """The ``--json`` document of ``results`` timed here (see :meth:`BenchReport.to_dict`)."""
    return BenchReport.of(results).to_dict()


# --- saving and reading back ----------------------------------------------------------------------------


def results_dir(profile_name: str, save_dir: str | os.PathLike | None = None) -> Path:
    """Where ``--save`` writes: ``save_dir`` if given; in a checkout of edgetl, the project's
    ``devices/<profile>/results/``; anywhere else ``./devices/<profile>/results/``."""
    if save_dir is not None:
        return Path(save_dir)
    project = Path(__file__).resolve().parents[3]  # edgetl/device/bench/results.py -> the checkout
    if (project / "devices").is_dir() and (project / "pyproject.toml").is_file():
        return project / "devices" / profile_name / "results"
    return Path.cwd() / "devices" / profile_name / "results"


def _check_folder(folder: Path, what: str) -> None:
    """``folder`` exists as a writable folder, or can be made: its nearest existing parent is one."""
    probe = folder
    while not probe.exists():
        if probe.is_symlink():
            raise ConfigError(f"{what}: {probe} is a broken symbolic link")
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{what}: {probe} is not a folder, so {folder} cannot be made there")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{what}: {probe} is not writable")


def check_save_dir(save_dir: str | os.PathLike | None = None) -> None:
    """Before timing: can ``--save`` write its file (``save_dir``, else under ``devices/``)?
    A one-line ConfigError if not, so that a long benchmark is not thrown away afterwards."""
    folder = Path(save_dir) if save_dir is not None else results_dir("any").parent.parent
    _check_folder(folder, "--save-dir" if save_dir is not None else "--save")


def save_report(
    rep: BenchReport,
    *,
    profile_name: str | None = None,
    save_dir: str | os.PathLike | None = None,
    name: str | None = None,
) -> Path:
    """Write the report (with every timed sample) as the bench document; returns the file written.

    The folder is named after ``profile_name``, else the profile applied, else the one that fits
    this machine (as ``edgetl doctor`` says), else ``unknown-<arch>``; the file after the UTC time
    and ``name`` (default: the bundle's folder name)."""
    if profile_name is None:
        if rep.profile:
            profile_name = rep.profile["name"]
        else:
            from edgetl.device.doctor import machine_profile_name

            profile_name = machine_profile_name()
    folder = results_dir(profile_name, save_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    name = name or Path(rep.results[0].bundle).name or "bundle"
    path = folder / f"{stamp}-{name}.json"
    n = 1
    while path.exists():  # two runs saved in the same second keep both
        n += 1
        path = folder / f"{stamp}-{name}-{n}.json"
    from edgetl.core.atomic import write_json_atomic

    write_json_atomic(path, rep.to_dict(samples=True, saved_utc=stamp, profile_folder=profile_name))
    return path


def read_saved(path: str | os.PathLike) -> BenchReport:
    """A file written by ``bench --save`` (or a ``bench --json`` document), of this edgetl or an
    older one; each result records the file as its ``source``."""
    from edgetl.core.jsonio import read_json

    path = Path(path)
    if path.is_dir():
        kind = "a bundle" if (path / "manifest.json").is_file() else "a folder"
        raise ConfigError(
            f"{path} is {kind}: --compare reads result files written by `edgetl bench --save` (or --json); "
            "to time a bundle, leave out --compare"
        )
    doc = read_json(path, what=str(path), error=DataError, max_bytes=MAX_SAVED_BYTES)
    return BenchReport.from_dict(doc, what=str(path), source=str(path))


def combine(reports: Sequence[BenchReport], *, mode: str) -> BenchReport:
    """Several reports (devices, saved files) as one: their results in order, the comparison
    within each and against the first result; skipped variants say where."""
    results = [r for rep in reports for r in rep.results]
    skipped = []
    for rep in reports:
        where = rep.results[0].source or rep.results[0].target if rep.results else None
        skipped += [{**s, "where": where} if where and len(reports) > 1 else s for s in rep.skipped]
    return BenchReport.of(results, skipped=skipped, mode=mode)


# --- plotting --------------------------------------------------------------------------------------------


def plot_problem() -> str | None:
    """Why ``--plot`` cannot draw here (matplotlib is not installed), or None; checked before timing."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("matplotlib")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return "matplotlib is not installed (pip install matplotlib)"
    return None


def check_plot_path(path: str | os.PathLike) -> Path:
    """Before timing: ``--plot``'s file must be a .png in an existing, writable folder (a one-line
    ConfigError otherwise), so that a long benchmark is not thrown away afterwards."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ConfigError(f"--plot {path}: the file name must end in .png (the plot is a PNG image)")
    if path.is_dir():
        raise ConfigError(f"--plot {path} is a folder; give a file name ending in .png")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise ConfigError(f"--plot {path}: {parent} is not a folder")
    if not parent.is_dir():
        raise ConfigError(f"--plot {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--plot {path}: the folder {parent} is not writable")
    return path


def plot_latencies(
    results: Sequence[BenchResult],
    path: str | os.PathLike,
    *,
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """A PNG of each configuration's latency distribution (violin + median), one row each;
    ``labels`` name the rows (default: each result's label), ``title`` the plot (default: the
    bundle and the machine's CPU). Written atomically."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BackendError("--plot needs matplotlib: pip install matplotlib") from None
    path = Path(path)
    names = list(labels) if labels is not None else [r.label for r in results]
    rows = [(r, name) for r, name in zip(results, names, strict=True) if r.samples_ms]
    if not rows:
        raise BackendError("--plot: the results hold no timed samples to draw (save them with --save or --samples)")
    longest = max(len(name) for _, name in rows)
    fig, ax = plt.subplots(figsize=(max(8.0, 5.0 + 0.08 * longest), 1.0 + 0.6 * len(rows)))
    data = [np.asarray(r.samples_ms) for r, _ in rows]
    try:
        ax.violinplot(data, orientation="horizontal", showmedians=True, showextrema=True)
    except TypeError:  # matplotlib < 3.10
        ax.violinplot(data, vert=False, showmedians=True, showextrema=True)
    ax.set_yticks(range(1, len(rows) + 1), [name for _, name in rows])
    ax.invert_yaxis()
    ax.set_xlabel("latency per call (ms), preprocessed input -> logits")
    if title is None:
        first = rows[0][0]
        env = first.env
        title = f"{Path(first.bundle).name}: {env.get('cpu', '')}, {env.get('usable_cores', '?')} cores"
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    from edgetl.core.atomic import _umask

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a plot is for others to read
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path
