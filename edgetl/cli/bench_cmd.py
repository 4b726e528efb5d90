"""`edgetl bench`: here, or on devices over ssh (see edgetl.device.bench, edgetl.device.remote_bench)."""

from __future__ import annotations

import os

import click
from click.core import ParameterSource

from edgetl.cli._common import (
    common_options,
    forwarded_args,
    handle_errors,
    make_remote,
    parse_list,
    ssh_options,
)
from edgetl.cli._output import emit_json, envelope, format_option, resolve_format
from edgetl.cli._runtime_options import (
    SSH_OPTIONS,
    head_option,
    ov_device_option,
    profile_option,
    provider_option,
    runtime_option,
)
from edgetl.cli.group_cmds import parallel_option
from edgetl.core.formats import PRECISIONS
from edgetl.device.limits import (
    BOUNDS,
    MAX_DURATION_S,
    MAX_ITERATIONS,
    MAX_STREAMS,
    MAX_WARMUP,
    MIN_DURATION_S,
)

# What --compare (read saved results, time nothing) goes with; any other option given is refused.
COMPARE_OPTIONS = ("compare", "plot", "samples", "output_format", "as_json", "verbose", "quiet", "no_progress")


def _precisions(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    items = parse_list(value)
    for p in items or ():
        if p not in PRECISIONS:
            raise click.BadParameter(f"{p!r} is not one of {', '.join(PRECISIONS)}")
    return items


def _positive_ints(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    items = parse_list(value)
    if items is None:
        return None
    out = []
    hi = BOUNDS[param.name or ""][1]
    for item in items:
        if not item.isdigit() or not 1 <= int(item) <= hi:
            raise click.BadParameter(
                f"{item!r} is not an integer from 1 to {hi} (give one value or a comma list: 1,2,4)"
            )
        out.append(int(item))
    return out


@click.command()
@click.argument("paths", nargs=-1, type=click.Path(), metavar="[BUNDLE | --compare FILE...]")
@runtime_option
@click.option(
    "--precision",
    callback=_precisions,
    default=None,
    metavar="P[,P...]",
    help="Precisions to bench, e.g. int8 or fp32,int8. "
    "Default: the profile's, else every precision the bundle has for the runtime.",
)
@click.option(
    "--all",
    "all_variants",
    is_flag=True,
    help="Every variant this machine can run (ONNX Runtime and OpenVINO), interleaved, with ratios.",
)
@head_option
@click.option(
    "--batch-size",
    callback=_positive_ints,
    default=None,
    metavar="N[,N...]",
    help="Images per inference call; a comma list sweeps (1,8). Default: the profile's, else 1.",
)
@click.option(
    "--threads",
    callback=_positive_ints,
    default=None,
    metavar="N[,N...]",
    help="Intra-op threads; a comma list sweeps (1,2,4). Default: the profile's, else the runtime's "
    "(ONNX Runtime: one per physical core).",
)
@provider_option
@ov_device_option
@click.option(
    "--streams", type=click.IntRange(1, MAX_STREAMS), default=None, help="OpenVINO streams (default: the runtime's)."
)
@click.option("--warmup", type=click.IntRange(0, MAX_WARMUP), default=10, show_default=True, help="Untimed runs first.")
@click.option(
    "--iterations",
    type=click.IntRange(1, MAX_ITERATIONS),
    default=100,
    show_default=True,
    help="Timed runs per configuration (or --duration).",
)
@click.option(
    "--duration",
    type=click.FloatRange(MIN_DURATION_S, MAX_DURATION_S),
    default=None,
    metavar="SECONDS",
    help="Instead of --iterations: time for about SECONDS per configuration (N configurations take "
    "about N x SECONDS), interleaved as usual, every configuration getting the same number of runs.",
)
@click.option(
    "--block",
    type=click.IntRange(1, MAX_ITERATIONS),
    default=10,
    show_default=True,
    help="Timed runs per configuration per interleaving round.",
)
@click.option(
    "--merged",
    is_flag=True,
    help="Time each head's single trunk+head graph (bundles exported with --merged) instead of the "
    "shared trunk and separate heads.",
)
@click.option(
    "--cold-start/--no-cold-start",
    default=True,
    show_default=True,
    help="Measure import, load and first inference in a fresh process (about a second each).",
)
@profile_option
@click.option(
    "--save",
    is_flag=True,
    help="Write the result (every sample included) under devices/<profile>/results/ (see --save-dir); "
    "read it back with --compare. Checked before timing.",
)
@click.option(
    "--save-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder for --save. Default: the checkout's devices/<profile>/results/, else the same under "
    "the current directory.",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    default=None,
    metavar="PNG",
    help="Write the latency distribution of each configuration to this PNG (needs matplotlib; without "
    "it the results are still printed and saved, with a warning). Checked before timing.",
)
@click.option(
    "--target",
    "targets",
    multiple=True,
    metavar="TARGET",
    help="A bundle on a device (user@host:PATH, ssh://user@host:port/PATH, or a named device: NAME or "
    "NAME:PATH); repeat to compare devices "
    "in one table. Same as giving one as BUNDLE. @GROUP: every device of a group, --parallel N at a time.",
)
@parallel_option
@ssh_options
@click.option("--samples", is_flag=True, help="With --json: include every timed sample (samples_ms).")
@click.option(
    "--compare",
    is_flag=True,
    help="Compare saved results offline: the arguments are files written by --save (or --json output); "
    "no bundle, no timing. Prints the comparison table (or --json, --format tsv); --plot draws it.",
)
@format_option
@common_options
@click.pass_context
@handle_errors
def bench(
    ctx: click.Context,
    paths: tuple[str, ...],
    runtime: str | None,
    precision: list[str] | None,
    all_variants: bool,
    head: str | None,
    batch_size: list[int] | None,
    threads: list[int] | None,
    provider: str | None,
    ov_device: str | None,
    streams: int | None,
    warmup: int,
    iterations: int,
    duration: float | None,
    block: int,
    merged: bool,
    cold_start: bool,
    device_profile: str | None,
    save: bool,
    save_dir: str | None,
    plot: str | None,
    targets: tuple[str, ...],
    parallel: int,
    identity: str | None,
    ssh_config: str | None,
    remote_edgetl: str,
    samples: bool,
    compare: bool,
    output_format: str | None,
    as_json: bool,
) -> None:
    """Measure latency, throughput, cold start, memory and size of a bundle's variants.

    Timed: preprocessed input -> logits (trunk + head), after warm-up; several configurations
    (precisions, --all, --threads/--batch-size lists) are timed interleaved so that drift hits
    all of them alike, and compared: int8 vs fp32, OpenVINO vs ONNX Runtime. Cold start comes
    from a fresh process. A p90 above 1.5x the p50 is reported as a noisy machine. --json prints
    one document whatever the number of configurations or devices: {"schema": "edgetl.bench",
    ..., "comparison": [...], "warnings": [...], "results": [...]}; in a pipe, one tab-separated
    line per configuration. See docs/benchmarking.md.

    On a device (BUNDLE or --target as user@host:PATH or a device NAME, after `edgetl deploy`): edgetl bench runs
    there over ssh with these options, its progress streams here, and the result comes back;
    --save stores it here under devices/<profile>/results/ with the device's fingerprint.

    --compare FILE...: the results saved earlier (--save), side by side, without timing anything.

    \b
    Example:
      edgetl bench bundles/digits
      edgetl bench bundles/digits --all --threads 1,2 --batch-size 1,8 --json
      edgetl bench bundles/digits --device-profile rpi5 --duration 20 --save --plot rpi5.png
      edgetl bench --target pi@rpi4.local:bundles/digits --target me@nuc:bundles/digits --precision int8
      edgetl bench @lab --precision int8 --parallel 8
      edgetl bench --compare devices/rpi5/results/*.json --plot rpi5-history.png
    """
    fmt = resolve_format(output_format, as_json)
    given = {
        p.name
        for p in ctx.command.params
        if isinstance(p, click.Option) and p.name and ctx.get_parameter_source(p.name) is ParameterSource.COMMANDLINE
    }
    if duration is not None and "iterations" in given:
        raise click.UsageError("give --iterations or --duration, not both")
    if compare:
        _bench_compare(ctx, paths, given, plot=plot, fmt=fmt, samples=samples)
        return
    if len(paths) > 1:
        raise click.UsageError(
            f"give one BUNDLE, not {len(paths)} (to compare saved results: edgetl bench --compare FILE...)"
        )
    bundle = paths[0] if paths else None
    from edgetl.device.remote_bench import LOCAL_BENCH_OPTIONS, bench_targets

    remote_targets = bench_targets(bundle, targets)
    plot, warnings = _check_outputs(plot=plot, save=save or save_dir is not None, save_dir=save_dir)
    groups = [t for t in remote_targets if t.startswith("@")]
    if groups and len(remote_targets) > 1:
        raise click.UsageError(f"a group ({groups[0]}) is benched alone: give it as the only target")
    if not groups and "parallel" in given:
        raise click.UsageError("--parallel is for a group of devices (@GROUP)")
    if groups:
        from edgetl.cli.group_cmds import bench_group_cmd

        bench_group_cmd(
            ctx,
            groups[0],
            forwarded_args(ctx, exclude=(*SSH_OPTIONS, *LOCAL_BENCH_OPTIONS, "parallel")),
            identity=identity,
            ssh_config=ssh_config,
            remote_edgetl=remote_edgetl,
            parallel=parallel,
            fmt=fmt,
            samples=samples,
            save=save,
            save_dir=save_dir,
            plot=plot,
            warnings=warnings,
            show_progress=ctx.meta.get("edgetl.progress", True),
        )
        return
    if remote_targets:
        remotes = [make_remote(t, identity, ssh_config, remote_edgetl) for t in remote_targets]
        _bench_remote(
            remotes,
            forwarded_args(ctx, exclude=(*SSH_OPTIONS, *LOCAL_BENCH_OPTIONS, "parallel")),
            save=save,
            save_dir=save_dir,
            plot=plot,
            fmt=fmt,
            samples=samples,
            warnings=warnings,
        )
        return
    from edgetl.device.bench import BenchOptions, run_bench, save_report

    options = BenchOptions(
        device_profile=device_profile,
        runtime=runtime,
        precisions=precision,
        all_variants=all_variants,
        head=head,
        threads=threads,
        batch_size=batch_size,
        provider=provider,
        device=ov_device,
        streams=streams,
        warmup=warmup,
        iterations=iterations,
        block=block,
        cold_start_runs=cold_start,
        merged=merged,
        duration_s=duration,
    )
    rep = run_bench(bundle, options)
    if save or save_dir is not None:
        click.echo(f"Saved {save_report(rep, save_dir=save_dir)}", err=True)
    if plot:
        warnings += _plot(rep, plot)
    _emit(rep, fmt, samples=samples, warnings=warnings)


def _check_outputs(*, plot: str | None, save: bool, save_dir: str | None) -> tuple[str | None, list[str]]:
    """Before timing: --plot's file and --save's folder can be written (else a usage error, exit 2).
    Without matplotlib, the plot is skipped with a warning and the results still print: returns
    the plot to draw (None: none) and the warnings."""
    from edgetl.device.bench import check_plot_path, check_save_dir, plot_problem

    warnings = []
    if plot:
        check_plot_path(plot)
        problem = plot_problem()
        if problem:
            warnings.append(f"--plot {plot} skipped: {problem}; the results are printed (and saved) all the same")
            click.echo(f"Warning: {warnings[-1]}", err=True)
            plot = None
    if save:
        check_save_dir(save_dir)
    return plot, warnings


def _plot(rep, plot: str) -> list[str]:
    """Draw the plot; a failure (a broken matplotlib) is a warning: the results still print."""
    from edgetl.cli._bench_tables import source_names
    from edgetl.core.errors import EdgetlError
    from edgetl.device.bench import plot_latencies

    several = len({(r.source, r.target) for r in rep.results}) > 1
    labels, title = None, None
    if several:
        labels = [f"{name} {r.label}" for r, name in zip(rep.results, source_names(rep.results), strict=True)]
        title = "Latency per call, " + ("saved results" if rep.mode == "compare" else "devices") + " compared"
    try:
        click.echo(f"Plot {plot_latencies(rep.results, plot, labels=labels, title=title)}", err=True)
    except (EdgetlError, OSError, ImportError, RuntimeError, ValueError) as exc:
        warning = f"--plot {plot} failed ({exc}); the results are printed all the same"
        click.echo(f"Warning: {warning}", err=True)
        return [warning]
    return []


def _emit(rep, fmt: str, *, samples: bool, warnings: list[str], device_line: str | None = None) -> None:
    """The spread warnings on stderr, then the results: one JSON document, TSV lines, or a table."""
    from edgetl.cli._bench_tables import print_bench, print_bench_tsv, print_comparison

    for w in rep.warnings:
        click.echo(f"Warning: {w}", err=True)
    if fmt == "json":
        emit_json(envelope("bench", rep.result_dicts(samples=samples), **rep.context(warnings=warnings)))
    elif fmt == "tsv":
        print_bench_tsv(rep)
    elif len({(r.source, r.target) for r in rep.results}) > 1 or rep.mode == "compare":
        print_comparison(rep)
    else:
        print_bench(rep, device_line=device_line)


def _bench_compare(
    ctx: click.Context, paths: tuple[str, ...], given: set[str], *, plot: str | None, fmt: str, samples: bool
) -> None:
    """--compare FILE...: saved results side by side; nothing is timed."""
    from edgetl.device.bench import combine, read_saved

    extra = sorted(given - set(COMPARE_OPTIONS))
    if extra:
        flags = ", ".join(_flag(ctx, name) for name in extra)
        raise click.UsageError(f"--compare reads saved results and times nothing: {flags} do not apply")
    if not paths:
        raise click.UsageError("--compare needs the result files to read (written by edgetl bench --save)")
    for path in paths:
        if not os.path.exists(path):  # a missing input is a failure (exit 1), like every command's
            from edgetl.core.errors import DataError

            raise DataError(f"--compare: {path} does not exist")
    plot, warnings = _check_outputs(plot=plot, save=False, save_dir=None)
    rep = combine([read_saved(p) for p in paths], mode="compare")
    if plot:
        warnings += _plot(rep, plot)
    _emit(rep, fmt, samples=samples, warnings=warnings)


def _flag(ctx: click.Context, name: str) -> str:
    param = next((p for p in ctx.command.params if p.name == name), None)
    if param is None:
        return name
    return next((o for o in param.opts if o.startswith("--")), param.opts[0])


def _bench_remote(
    remotes: list,
    args: list[str],
    *,
    save: bool,
    save_dir: str | None,
    plot: str | None,
    fmt: str,
    samples: bool,
    warnings: list[str],
) -> None:
    """Bench on each device in turn, then one table: the device's own when there is one, else a comparison."""
    from edgetl.device.remote_bench import bench_devices, remote_report

    benches = bench_devices(
        remotes, args, save=save, save_dir=save_dir, on_saved=lambda path: click.echo(f"Saved {path}", err=True)
    )
    rep = remote_report(benches)
    if plot:
        warnings += _plot(rep, plot)
    device_line = None
    if len(benches) == 1:
        d = benches[0].device
        device_line = f"Device {d['where']}: edgetl {d['edgetl']}, fingerprint {d['fingerprint']}" + (
            f", fits profile {d['profile_fit']}" if d["profile_fit"] else ""
        )
    _emit(rep, fmt, samples=samples, warnings=warnings, device_line=device_line)


COMMANDS = [bench]
