"""`edgetl bench`: here, or on devices over ssh (see edgetl.device.bench, edgetl.device.remote_bench)."""

from __future__ import annotations

import click

from edgetl.cli._bench_tables import print_bench, print_comparison
from edgetl.cli._common import (
    emit_json,
    forwarded_args,
    handle_errors,
    json_option,
    make_remote,
    parse_list,
    ssh_options,
)
from edgetl.cli._runtime_options import (
    SSH_OPTIONS,
    head_option,
    ov_device_option,
    profile_option,
    provider_option,
    runtime_option,
)
from edgetl.core.formats import PRECISIONS
from edgetl.device.limits import BOUNDS, MAX_ITERATIONS, MAX_STREAMS, MAX_WARMUP


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
@click.argument("bundle", required=False, type=click.Path())
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
    help="Timed runs per configuration.",
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
    help="Write the result (every sample included) under devices/<profile>/results/ (see --save-dir).",
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
    help="Write the latency distribution of each configuration to this PNG (needs matplotlib).",
)
@click.option(
    "--target",
    "targets",
    multiple=True,
    metavar="TARGET",
    help="A bundle on a device (user@host:PATH or ssh://user@host:port/PATH); repeat to compare devices "
    "in one table. Same as giving one as BUNDLE.",
)
@ssh_options
@click.option("--samples", is_flag=True, help="With --json: include every timed sample (samples_ms).")
@json_option
@click.pass_context
@handle_errors
def bench(
    ctx: click.Context,
    bundle: str | None,
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
    block: int,
    merged: bool,
    cold_start: bool,
    device_profile: str | None,
    save: bool,
    save_dir: str | None,
    plot: str | None,
    targets: tuple[str, ...],
    identity: str | None,
    ssh_config: str | None,
    remote_edgetl: str,
    samples: bool,
    as_json: bool,
) -> None:
    """Measure latency, throughput, cold start, memory and size of a bundle's variants.

    Timed: preprocessed input -> logits (trunk + head), after warm-up; several configurations
    (precisions, --all, --threads/--batch-size lists) are timed interleaved so that drift hits
    all of them alike, and compared: int8 vs fp32, OpenVINO vs ONNX Runtime. Cold start comes
    from a fresh process. --json prints {"results": [...], "comparison": [...]}, or the single
    result when one configuration was asked for. See docs/benchmarking.md.

    On a device (BUNDLE or --target as user@host:PATH, after `edgetl deploy`): edgetl bench runs
    there over ssh with these options, its progress streams here, and the result comes back;
    --save stores it here under devices/<profile>/results/ with the device's fingerprint.

    \b
    Example:
      edgetl bench bundles/digits
      edgetl bench bundles/digits --all --threads 1,2 --batch-size 1,8 --json
      edgetl bench bundles/digits --device-profile rpi5 --save --plot rpi5.png
      edgetl bench --target pi@rpi4.local:bundles/digits --target me@nuc:bundles/digits --precision int8
    """
    from edgetl.device.remote_bench import LOCAL_BENCH_OPTIONS, bench_targets

    remote_targets = bench_targets(bundle, targets)
    if remote_targets:
        _bench_remote(
            [make_remote(t, identity, ssh_config, remote_edgetl) for t in remote_targets],
            forwarded_args(ctx, exclude=(*SSH_OPTIONS, *LOCAL_BENCH_OPTIONS)),
            save=save,
            save_dir=save_dir,
            plot=plot,
            as_json=as_json,
            samples=samples,
        )
        return
    from edgetl.device.bench import BenchOptions, plot_latencies, run_bench, save_report

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
    )
    rep = run_bench(bundle, options)
    if save or save_dir is not None:
        click.echo(f"Saved {save_report(rep, save_dir=save_dir)}", err=True)
    if plot:
        click.echo(f"Plot {plot_latencies(rep.results, plot)}", err=True)
    if as_json:
        emit_json(rep.to_dict(samples=samples))
        return
    print_bench(rep)


def _bench_remote(
    remotes: list,
    args: list[str],
    *,
    save: bool,
    save_dir: str | None,
    plot: str | None,
    as_json: bool,
    samples: bool,
) -> None:
    """Bench on each device in turn, then one table: the device's own when there is one, else a comparison."""
    from edgetl.device.bench import BenchReport, plot_latencies
    from edgetl.device.remote_bench import bench_devices, benches_doc, comparison_rows

    benches = bench_devices(
        remotes, args, save=save, save_dir=save_dir, on_saved=lambda path: click.echo(f"Saved {path}", err=True)
    )
    if plot:
        results = [r for rb in benches for r in BenchReport.from_dict(rb.report).results]
        click.echo(f"Plot {plot_latencies(results, plot)}", err=True)
    if as_json:
        emit_json(benches_doc(benches, samples=samples))
        return
    if len(benches) == 1:
        rb = benches[0]
        print_bench(BenchReport.from_dict(rb.report))
        d = rb.device
        click.echo(
            f"Device {d['where']}: edgetl {d['edgetl']}, fingerprint {d['fingerprint']}"
            + (f", fits profile {d['profile_fit']}" if d["profile_fit"] else "")
        )
        return
    print_comparison(comparison_rows(benches))


COMMANDS = [bench]
