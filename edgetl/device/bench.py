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
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edgetl.core.envinfo import environment, usable_cores
from edgetl.core.errors import BackendError, ConfigError
from edgetl.core.preprocess import preprocess
from edgetl.device.profiles import DeviceProfile, load_profile, merge_settings
from edgetl.device.runtime import _BACKENDS, DEFAULT_RUNTIME, Predictor, import_backend, open_bundle

log = logging.getLogger(__name__)

BLOCK = 10  # timed calls per configuration per interleaving round


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


# --- what to run --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Config:
    runtime: str
    precision: str
    threads: int | None
    batch_size: int
    options: tuple[tuple[str, Any], ...]  # provider, provider_options (as sorted items), device, streams

    @property
    def load_options(self) -> dict[str, Any]:
        return {k: dict(v) if k == "provider_options" else v for k, v in self.options}


def _check_options(
    *, batch_sizes: Sequence[int], threads: Sequence[int | None], warmup: int, iterations: int, block: int
) -> None:
    for name, value, minimum in (("warmup", warmup, 0), ("iterations", iterations, 1), ("block", block, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ConfigError(f"--{name} must be an integer >= {minimum}, not {value!r}")
    for b in batch_sizes:
        if not isinstance(b, int) or isinstance(b, bool) or b < 1:
            raise ConfigError(f"--batch-size must be an integer >= 1, not {b!r}")
    for t in threads:
        if t is not None and (not isinstance(t, int) or isinstance(t, bool) or t < 1):
            raise ConfigError(f"--threads must be an integer >= 1, not {t!r}")


def _as_list(value: Any) -> list[Any] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return list(dict.fromkeys(value))
    return [value]


def _load_options(runtime: str, settings: dict[str, Any], *, strict: bool) -> tuple[tuple[str, Any], ...]:
    """The accelerator options for one runtime's loads. ``strict`` (one runtime asked for): every
    option given goes to the load, which refuses, by name, one that does not apply to the runtime;
    with --all each runtime takes its own (the ONNX Runtime OpenVINO provider takes the device too)."""
    ort = [("provider", settings["provider"]), ("provider_options", settings["provider_options"])]
    ov = [("device", settings["ov_device"]), ("streams", settings["streams"])]
    if strict:
        opts = ort + ov
    elif runtime == "onnxruntime":
        ov_provider = str(settings["provider"] or "").lower() in ("openvino", "openvinoexecutionprovider")
        opts = ort + (ov[:1] if ov_provider else [])
    else:
        opts = ov
    # Hashable, so that a configuration can key the results: provider options as sorted items.
    return tuple((k, tuple(sorted(v.items())) if isinstance(v, dict) else v) for k, v in opts if v is not None)


def _runtime_for_format(fmt: str) -> str | None:
    return next((name for name, b in _BACKENDS.items() if b.format == fmt), None)


def _variants_to_run(
    bundle, runtime: str, precisions: list[str] | None, all_variants: bool
) -> tuple[list[tuple[str, str]], list[dict[str, str]]]:
    """(runtime, precision) pairs, and for --all the variants skipped with the reason."""
    if not all_variants:
        if precisions is None:
            precisions = bundle.runtime_precisions(runtime)
        for p in precisions:
            bundle.resolve_precision(runtime, p)  # a precision the bundle lacks: BundleError naming it
        return [(runtime, p) for p in precisions], []
    pairs, skipped = [], []
    for name, var in bundle.manifest["variants"].items():
        rt = _runtime_for_format(var["format"])
        if precisions is not None and var["precision"] not in precisions:
            continue
        if rt is None:
            skipped.append({"variant": name, "reason": f"no edgetl runtime runs format {var['format']!r}"})
            continue
        try:
            import_backend(rt)
        except BackendError as exc:
            skipped.append({"variant": name, "reason": str(exc)})
            continue
        pairs.append((rt, var["precision"]))
    if not pairs:
        raise BackendError(
            f"no variant of {bundle.path} can run here: " + "; ".join(f"{s['variant']}: {s['reason']}" for s in skipped)
        )
    order = {p: i for i, p in enumerate(("fp32", "fp16", "bf16", "int8"))}
    pairs.sort(key=lambda rp: (list(_BACKENDS).index(rp[0]), order.get(rp[1], 9)))
    return pairs, skipped


# --- timing -------------------------------------------------------------------------------------------


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


def interleave(timed: Sequence[_Timed], *, warmup: int, iterations: int, block: int = BLOCK) -> None:
    """Warm each up, then time ``iterations`` calls of each in rounds of ``block``, rotating the order
    (and reversing it every other round); one untimed call after each switch."""
    for t in timed:
        t.first_ms = _elapsed_ms(t.fn)
        for _ in range(warmup):
            t.fn()
    rounds = math.ceil(iterations / block)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside a timed call is noise no configuration asked for (timeit does the same)
    try:
        for r in range(rounds):
            n = min(block, iterations - r * block)
            shift = r % len(timed)
            order = list(timed[shift:]) + list(timed[:shift])
            for t in order[::-1] if r % 2 else order:
                if len(timed) > 1:
                    t.fn()
                for _ in range(n):
                    t0 = time.perf_counter_ns()
                    t.fn()
                    t.samples.append((time.perf_counter_ns() - t0) / 1e6)
    finally:
        if gc_was_enabled:
            gc.enable()


# --- cold start in a fresh process --------------------------------------------------------------------

# Runs in `sys.executable -c`: nothing is imported before the clock starts but `time`.
_COLD_START = r"""
import time
t0 = time.perf_counter_ns()
import json, sys
sys.path.insert(0, sys.argv[2])
args = json.loads(sys.argv[1])
try:
    from edgetl.device.runtime import import_backend, open_bundle
    import_backend(args["runtime"])
    t1 = time.perf_counter_ns()
    predictor = open_bundle(args["bundle"]).load(**args["load"])
    t2 = time.perf_counter_ns()
    from edgetl.device.bench import _peak_rss_mb, bench_input
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
    config: _Config,
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
    package_parent = str(Path(__file__).resolve().parents[2])
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


# --- the benchmark ------------------------------------------------------------------------------------


def run_bench(
    bundle_path: str | os.PathLike,
    *,
    device_profile: str | os.PathLike | DeviceProfile | None = None,
    runtime: str | None = None,
    precisions: Sequence[str] | str | None = None,
    all_variants: bool = False,
    head: str | Sequence[str] | None = None,
    threads: int | Sequence[int | None] | None = None,
    batch_size: int | Sequence[int] | None = None,
    provider: str | None = None,
    provider_options: dict[str, Any] | None = None,
    device: str | None = None,
    streams: int | None = None,
    warmup: int = 10,
    iterations: int = 100,
    block: int = BLOCK,
    cold_start_runs: bool = True,
    merged: bool = False,
) -> BenchReport:
    """Benchmark every requested configuration of a bundle, interleaved; see the module docstring.

    Configurations: the variants (``all_variants``: every variant this machine can run, ONNX
    Runtime and OpenVINO; else ``runtime`` x ``precisions``, None = every precision the bundle has)
    x ``threads`` x ``batch_size`` (each a value or a list). ``device_profile`` supplies the values
    not given here (``None`` = not given). ``merged``: time each selected head's single trunk+head
    graph (bundles exported with ``--merged``) instead of the shared trunk and separate heads.
    """
    profile = load_profile(device_profile) if isinstance(device_profile, (str, os.PathLike)) else device_profile
    given = {
        "runtime": runtime,
        "provider": provider,
        "provider_options": provider_options,
        "ov_device": device,
        "streams": streams,
        "threads": _as_list(threads),
        "batch_size": _as_list(batch_size),
        "precision": _as_list(precisions),
    }
    settings, source = merge_settings(profile, given)
    if all_variants and source.get("precision") == "profile":
        # --all asks for every variant: the profile's precision does not narrow it (an option does).
        settings["precision"] = None
        del source["precision"]
    runtime = settings["runtime"] or DEFAULT_RUNTIME
    threads_list = _as_list(settings["threads"]) or [None]
    batch_list = _as_list(settings["batch_size"]) or [1]
    precision_list = _as_list(settings["precision"])
    _check_options(batch_sizes=batch_list, threads=threads_list, warmup=warmup, iterations=iterations, block=block)
    profile_doc = None
    if profile is not None:
        profile_doc = {
            "name": profile.name,
            "path": profile.path,
            "applied": {k: settings[k] for k, s in source.items() if s == "profile"},
            "overridden": sorted(k for k, s in source.items() if s == "option" and k in profile.settings()),
        }

    bundle = open_bundle(bundle_path)  # verifies every file once, and leaves them in the page cache
    pairs, skipped = _variants_to_run(bundle, runtime, precision_list, all_variants)
    configs = []
    for rt, precision in pairs:
        options = _load_options(rt, settings, strict=not all_variants)
        for t in threads_list:
            for b in batch_list:
                configs.append(_Config(rt, precision, t, b, options))
    cores = usable_cores()
    if cores and any(t and t > cores for t in threads_list):
        log.warning(
            "asking for more threads (%s) than this machine's %d usable cores: threads will share cores",
            max(t for t in threads_list if t),
            cores,
        )

    predictors: dict[tuple, tuple[Predictor, float]] = {}
    load_keys = {}
    for c in configs:
        key = (c.runtime, c.precision, c.threads, c.options)
        load_keys[c] = key
        if key not in predictors:
            import_backend(c.runtime)
            t0 = time.perf_counter_ns()
            # Every head is loaded (the heads-cost rounds need them); the timed call runs the selected ones.
            p = bundle.load(
                runtime=c.runtime,
                precision=c.precision,
                heads=head if merged else "all",
                threads=c.threads,
                merged=merged,
                **c.load_options,
            )
            predictors[key] = (p, (time.perf_counter_ns() - t0) / 1e6)
    # Cold starts next (the loads above have refused bad options with clean messages), one fresh
    # process at a time while this one is idle.
    cold: dict[_Config, dict[str, Any]] = {}
    if cold_start_runs:
        for c in configs:
            log.info(
                "cold start in a fresh process: %s %s, threads %s, batch %d",
                c.runtime,
                c.precision,
                c.threads or "default",
                c.batch_size,
            )
            cold[c] = cold_start(bundle_path, c, heads=head, merged=merged, steady_runs=max(1, min(warmup, 10)))
    first_predictor = next(iter(predictors.values()))[0]
    selected = {
        c: bundle.resolve_heads(bundle.variant(_BACKENDS[c.runtime].format, c.precision), head) for c in configs
    }

    image = synthetic_image()
    pp = first_predictor.preprocessing
    preprocess_ms = float(np.median([_elapsed_ms(preprocess, image, pp) for _ in range(min(max(iterations, 5), 30))]))
    inputs = {b: np.repeat(first_predictor.preprocess([image]), b, axis=0) for b in batch_list}

    timed: list[_Timed] = []
    main: dict[_Config, _Timed] = {}
    costs: dict[_Config, dict[str, _Timed]] = {}
    for c in configs:
        p, _ = predictors[load_keys[c]]
        x = inputs[c.batch_size]
        main[c] = _Timed(f"{c}", lambda p=p, x=x, s=selected[c]: p.logits(x, s))
        timed.append(main[c])
        if len(p.head_names) > 1 and not merged:
            feats = p.features(x)
            parts = {"trunk": _Timed("trunk", lambda p=p, x=x: p.features(x))}
            for h in p.head_names:
                parts[f"head:{h}"] = _Timed(h, lambda p=p, f=feats, h=h: p.head_logits(f, [h]))
                parts[f"trunk+head:{h}"] = _Timed(h, lambda p=p, x=x, h=h: p.logits(x, [h]))
            costs[c] = parts
            timed.extend(parts.values())
    log.info(
        "timing %d configuration(s) interleaved: %d warm-up + %d timed calls each, in blocks of %d",
        len(configs),
        warmup,
        iterations,
        block,
    )
    interleave(timed, warmup=warmup, iterations=iterations, block=block)
    process_peak = _peak_rss_mb()

    env = environment()
    results = []
    for c in configs:
        p, load_ms = predictors[load_keys[c]]
        variant = bundle.manifest["variants"][p.variant]
        latency = latency_summary(main[c].samples)
        if c in cold:
            cold_ms, peak, peak_scope, cold_scope = (
                cold[c]["cold_start_ms"],
                cold[c]["peak_rss_mb"],
                "fresh-process",
                "fresh-process",
            )
        else:
            cold_ms = {"import": None, "load": load_ms, "first_inference": main[c].first_ms, "total": None}
            peak, peak_scope, cold_scope = process_peak, "process", "in-process"
        opts = c.load_options
        results.append(
            BenchResult(
                bundle=str(bundle.path),
                variant=p.variant,
                runtime=c.runtime,
                precision=c.precision,
                heads=selected[c],
                batch_size=c.batch_size,
                threads=c.threads,
                warmup=warmup,
                iterations=iterations,
                latency_ms=latency,
                throughput_ips=c.batch_size / (latency["mean"] / 1000.0),
                cold_start_ms=cold_ms,
                peak_rss_mb=peak,
                peak_rss_scope=peak_scope,
                model_bytes=_model_bytes(bundle, variant, selected[c], merged),
                preprocess_ms=preprocess_ms,
                val_top1=(variant.get("metrics") or {}).get("val_top1"),
                env=env,
                provider=opts.get("provider"),
                device=opts.get("device"),
                streams=opts.get("streams"),
                cold_start_scope=cold_scope,
                heads_cost=_heads_cost(costs.get(c), main[c], selected[c]),
                merged=merged,
                profile=profile_doc,
                samples_ms=tuple(main[c].samples),
                inference_precision=p.runtime_info.get("inference_precision"),
            )
        )
    several = all_variants or len(configs) > 1
    return BenchReport(results, compare(results), skipped, profile_doc, several)


def _model_bytes(bundle, variant: dict[str, Any], heads: Sequence[str], merged: bool) -> int:
    if not merged:
        return bundle.model_bytes(variant, heads)
    total = 0
    for rel in dict.fromkeys(variant["merged"][h] for h in heads):
        rec = bundle.manifest["files"][rel]
        total += int(rec.get("bytes", 0)) + sum(int(r.get("bytes", 0)) for r in (rec.get("extra_files") or {}).values())
    return total


def _p50(samples: Sequence[float]) -> float:
    return float(np.median(samples))


def _heads_cost(parts: dict[str, _Timed] | None, main: _Timed, selected: Sequence[str]) -> dict[str, Any] | None:
    """p50s: the trunk alone, each head alone (on features) and trunk + that head, end to end."""
    if parts is None:
        return None
    trunk = _p50(parts["trunk"].samples)
    per_head = []
    for key, t in parts.items():
        if key.startswith("head:"):
            h = key.partition(":")[2]
            head_ms = _p50(t.samples)
            per_head.append(
                {
                    "head": h,
                    "head_ms": head_ms,
                    "trunk_plus_head_ms": _p50(parts[f"trunk+head:{h}"].samples),
                    "head_pct_of_trunk": 100.0 * head_ms / trunk if trunk else None,
                }
            )
    return {
        "trunk_ms": trunk,
        "heads": per_head,
        "selected_heads": list(selected),
        "trunk_plus_selected_ms": _p50(main.samples),
    }


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
    cold_start_runs: bool = True,
    **options: Any,
) -> BenchResult:
    """Benchmark one variant (``precision`` None: fp32 if the bundle has it); ``head`` None: the
    default head, ``"all"``: every head (the trunk still runs once)."""
    if precision is None:
        precision = open_bundle(bundle_path, verify=False).resolve_precision(runtime, None)
    report = run_bench(
        bundle_path,
        runtime=runtime,
        precisions=[precision],
        batch_size=batch_size,
        threads=threads,
        warmup=warmup,
        iterations=iterations,
        head=head,
        cold_start_runs=cold_start_runs,
        **options,
    )
    return report.results[0]


def bench_precisions(
    bundle_path: str | os.PathLike,
    *,
    runtime: str = DEFAULT_RUNTIME,
    precisions: Sequence[str] | None = None,
    **options: Any,
) -> list[BenchResult]:
    """Bench several precisions of one runtime (None: every precision the bundle has, fp32 first)."""
    if precisions is not None and not precisions:
        raise ConfigError("no precision to benchmark")
    return run_bench(bundle_path, runtime=runtime, precisions=precisions, **options).results


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
    project = Path(__file__).resolve().parents[2]
    if (project / "devices").is_dir() and (project / "pyproject.toml").is_file():
        return project / "devices" / profile_name / "results"
    return Path.cwd() / "devices" / profile_name / "results"


def save_report(rep: BenchReport, *, profile_name: str, save_dir: str | os.PathLike | None = None) -> Path:
    """Write the report (with every timed sample) as JSON; returns the file written."""
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


__all__ = [
    "BenchReport",
    "BenchResult",
    "bench",
    "bench_precisions",
    "compare",
    "interleave",
    "latency_summary",
    "plot_latencies",
    "report",
    "results_dir",
    "run_bench",
    "save_report",
    "synthetic_image",
]
