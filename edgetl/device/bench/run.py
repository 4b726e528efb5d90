"""What to run (options -> configurations) and the run itself: load, cold starts, interleaved timing."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from edgetl.core.envinfo import environment, usable_cores
from edgetl.core.errors import BackendError, ConfigError
from edgetl.core.formats import DEFAULT_RUNTIME, PRECISIONS, RUNTIMES, runtime_of
from edgetl.core.preprocess import preprocess
from edgetl.device import limits
from edgetl.device.backends import backend, import_backend
from edgetl.device.bench.coldstart import cold_start
from edgetl.device.bench.results import BenchReport, BenchResult
from edgetl.device.bench.timing import (
    BLOCK,
    _elapsed_ms,
    _peak_rss_mb,
    _Timed,
    interleave,
    latency_summary,
    synthetic_image,
)
from edgetl.device.bundle_loading import open_bundle
from edgetl.device.predictor import Predictor
from edgetl.device.profiles import DeviceProfile, resolve_settings

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchOptions:
    """What to benchmark and how; ``None`` means "not given": the device profile's value, else the default.

    Configurations: the variants (``all_variants``: every variant this machine can run, each
    runtime; else ``runtime`` x ``precisions``, None = every precision the bundle has) x
    ``threads`` x ``batch_size`` (each a value or a list). ``merged``: time each selected head's
    single trunk+head graph (bundles exported with ``--merged``) instead of the shared trunk and
    separate heads. ``device``: the OpenVINO device (``--openvino-device``). ``duration_s``:
    time for about this many seconds per configuration instead of ``iterations`` calls (every
    configuration still gets the same number of calls, interleaved; see :func:`interleave`).
    """

    device_profile: str | os.PathLike | DeviceProfile | None = None
    runtime: str | None = None
    precisions: Sequence[str] | str | None = None
    all_variants: bool = False
    head: str | Sequence[str] | None = None
    threads: int | Sequence[int | None] | None = None
    batch_size: int | Sequence[int] | None = None
    provider: str | None = None
    provider_options: dict[str, Any] | None = None
    device: str | None = None
    streams: int | None = None
    warmup: int = 10
    iterations: int = 100
    block: int = BLOCK
    cold_start_runs: bool = True
    merged: bool = False
    duration_s: float | None = None


@dataclasses.dataclass(frozen=True)
class Config:
    """One timed configuration: a variant loaded with these threads and options, at this batch size."""

    runtime: str
    precision: str
    threads: int | None
    batch_size: int
    options: tuple[tuple[str, Any], ...]  # provider, provider_options (as sorted items), device, streams

    @property
    def load_options(self) -> dict[str, Any]:
        return {k: dict(v) if k == "provider_options" else v for k, v in self.options}


def _check_options(
    *,
    batch_sizes: Sequence[int],
    threads: Sequence[int | None],
    warmup: int,
    iterations: int,
    block: int,
    duration_s: float | None = None,
) -> None:
    # The bounds of edgetl.device.limits: a library caller gets the CLI's one line, not an
    # allocation of 100,000 images.
    for name, value in (("warmup", warmup), ("iterations", iterations), ("block", block)):
        limits.check(name, value)
    if duration_s is not None:
        limits.check("duration", duration_s)
    for b in batch_sizes:
        limits.check("batch_size", b)
    for t in threads:
        if t is not None:
            limits.check("threads", t)


def _as_list(value: Any) -> list[Any] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return list(dict.fromkeys(value))
    return [value]


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
        rt = runtime_of(var["format"])
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
    order = {p: i for i, p in enumerate(PRECISIONS)}
    pairs.sort(key=lambda rp: (list(RUNTIMES).index(rp[0]), order.get(rp[1], 9)))
    return pairs, skipped


def _hashable(options: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """Load options as a key for the results: provider options as sorted items."""
    return tuple((k, tuple(sorted(v.items())) if isinstance(v, dict) else v) for k, v in options.items())


# --- the benchmark ------------------------------------------------------------------------------------


def run_bench(bundle_path: str | os.PathLike, options: BenchOptions | None = None, /, **given: Any) -> BenchReport:
    """Benchmark every requested configuration of a bundle, interleaved; see :mod:`edgetl.device.bench`.

    ``options`` (or the same fields as keywords: ``run_bench(path, runtime="openvino", threads=[1, 2])``)
    says what to run; the device profile is applied once here, under the options given.
    """
    if options is None:
        options = BenchOptions(**given)
    elif given:
        options = dataclasses.replace(options, **given)
    o = options
    settings = resolve_settings(
        o.device_profile,
        {
            "runtime": o.runtime,
            "provider": o.provider,
            "provider_options": o.provider_options,
            "ov_device": o.device,
            "streams": o.streams,
            "threads": _as_list(o.threads),
            "batch_size": _as_list(o.batch_size),
            "precision": _as_list(o.precisions),
        },
    )
    if o.all_variants and settings.source.get("precision") == "profile":
        # --all asks for every variant: the profile's precision does not narrow it (an option does).
        settings.values["precision"] = None
        del settings.source["precision"]
    threads_list = _as_list(settings.values["threads"]) or [None]
    batch_list = _as_list(settings.values["batch_size"]) or [1]
    precision_list = _as_list(settings.values["precision"])
    warmup, iterations, block, merged, head = o.warmup, o.iterations, o.block, o.merged, o.head
    all_variants, cold_start_runs, duration_s = o.all_variants, o.cold_start_runs, o.duration_s
    _check_options(
        batch_sizes=batch_list,
        threads=threads_list,
        warmup=warmup,
        iterations=iterations,
        block=block,
        duration_s=duration_s,
    )
    profile_doc = settings.profile_doc()

    bundle = open_bundle(bundle_path)  # verifies every file once, and leaves them in the page cache
    runtime = settings.runtime_for(bundle)  # a profile's runtimes: the first this bundle and machine have
    pairs, skipped = _variants_to_run(bundle, runtime, precision_list, all_variants)
    configs = []
    for rt, precision in pairs:
        options = _hashable(settings.load_options(rt, strict=not all_variants))
        for t in threads_list:
            for b in batch_list:
                configs.append(Config(rt, precision, t, b, options))
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
    cold: dict[Config, dict[str, Any]] = {}
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
    selected = {c: bundle.resolve_heads(bundle.variant(backend(c.runtime).format, c.precision), head) for c in configs}

    image = synthetic_image()
    pp = first_predictor.preprocessing
    pp_runs = 30 if duration_s is not None else min(max(iterations, 5), 30)
    preprocess_ms = float(np.median([_elapsed_ms(preprocess, image, pp) for _ in range(pp_runs)]))
    inputs = {b: np.repeat(first_predictor.preprocess([image]), b, axis=0) for b in batch_list}

    timed: list[_Timed] = []
    main: dict[Config, _Timed] = {}
    costs: dict[Config, dict[str, _Timed]] = {}
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
    if duration_s is None:
        log.info(
            "timing %d configuration(s) interleaved: %d warm-up + %d timed calls each, in blocks of %d",
            len(configs),
            warmup,
            iterations,
            block,
        )
    else:
        log.info(
            "timing %d configuration(s) interleaved: %d warm-up, then about %g s each (%g s in all), in blocks of %d",
            len(configs),
            warmup,
            duration_s,
            duration_s * len(configs),
            block,
        )
    # With a duration, the time of every timed call counts (the heads' rounds too): the run takes
    # about duration_s per configuration.
    done = interleave(
        timed,
        warmup=warmup,
        iterations=None if duration_s is not None else iterations,
        block=block,
        duration_s=None if duration_s is None else duration_s * len(configs) / len(timed),
        max_iterations=limits.MAX_ITERATIONS,
    )
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
                iterations=done,
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
                duration_s=duration_s,
            )
        )
    return BenchReport.of(results, skipped=skipped)


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


def bench(bundle_path: str | os.PathLike, options: BenchOptions | None = None, /, **given: Any) -> BenchResult:
    """Benchmark one configuration: ``options`` (or the same fields as keywords) with one precision
    (``precisions`` None: fp32 if the bundle has it), one thread count and one batch size; ``head``
    None: the default head, ``"all"``: every head (the trunk still runs once)."""
    options = BenchOptions(**given) if options is None else dataclasses.replace(options, **given)
    if options.precisions is None:
        runtime = options.runtime or DEFAULT_RUNTIME
        precision = open_bundle(bundle_path, verify=False).resolve_precision(runtime, None)
        options = dataclasses.replace(options, precisions=[precision])
    return run_bench(bundle_path, options).results[0]


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
    return run_bench(bundle_path, BenchOptions(runtime=runtime, precisions=precisions, **options)).results
