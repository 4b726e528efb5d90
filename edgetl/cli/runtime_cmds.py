"""`edgetl predict` and `edgetl bench`: the device side, no torch (see edgetl.device.runtime, edgetl.device.bench)."""

from __future__ import annotations

import click

from edgetl.cli._common import (
    emit_json,
    forwarded_args,
    handle_errors,
    json_option,
    make_remote,
    parse_list,
    ssh_options,
)
from edgetl.core.formats import DEFAULT_RUNTIME, PRECISIONS
from edgetl.core.formats import RUNTIMES as _RUNTIMES

# From the format table (edgetl.core.formats imports nothing, so `--help` stays fast).
RUNTIMES = tuple(_RUNTIMES)
SSH_OPTIONS = ("identity", "ssh_config", "remote_edgetl")
TABLE_ROWS = 200  # predict prints a table up to this many results, then plain lines (bounded memory)

runtime_option = click.option(
    "--runtime",
    type=click.Choice(RUNTIMES),
    default=None,
    help=f"Inference library; the bundle must hold files for it. Default: the profile's, else {DEFAULT_RUNTIME}.",
)
head_option = click.option(
    "--head",
    default=None,
    metavar="NAME|all",
    help="Head (task) to run; `all` runs every head on one trunk pass. Default: the bundle's default head.",
)
provider_option = click.option(
    "--provider",
    default=None,
    metavar="NAME",
    help="ONNX Runtime execution provider: cpu (default), cuda, tensorrt, openvino, coreml, xnnpack ... "
    "(`edgetl doctor` lists the installed ones).",
)
ov_device_option = click.option(
    "--ov-device",
    default=None,
    metavar="DEVICE",
    help="OpenVINO device: CPU (default), GPU, NPU, AUTO (with --runtime openvino, or --provider openvino).",
)
profile_option = click.option(
    "--device-profile",
    default=None,
    metavar="NAME|PATH",
    help="Apply a device profile (`edgetl devices`); options given here win over its values.",
)


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
    for item in items:
        if not item.isdigit() or int(item) < 1:
            raise click.BadParameter(f"{item!r} is not an integer >= 1 (give one value or a comma list: 1,2,4)")
        out.append(int(item))
    return out


@click.command()
@click.argument("bundle", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@runtime_option
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default=None,
    help="Variant precision. Default: the profile's, else fp32 if the bundle has it.",
)
@click.option(
    "--top-k",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Best classes to report per image (at most the number of labels).",
)
@head_option
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Images per inference call (memory holds one batch).",
)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads (default: the runtime's).")
@provider_option
@ov_device_option
@click.option("--streams", type=click.IntRange(min=1), default=None, help="OpenVINO streams.")
@profile_option
@json_option
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV on stdout: image, head, label, score, top_k.")
@ssh_options
@click.pass_context
@handle_errors
def predict(
    ctx: click.Context,
    bundle: str,
    images: tuple[str, ...],
    runtime: str | None,
    precision: str | None,
    top_k: int,
    head: str | None,
    batch_size: int,
    threads: int | None,
    provider: str | None,
    ov_device: str | None,
    streams: int | None,
    device_profile: str | None,
    as_json: bool,
    as_csv: bool,
    identity: str | None,
    ssh_config: str | None,
    remote_edgetl: str,
) -> None:
    """Classify image files, or every image in folders (recursively), with a bundle.

    Folders of any size stream through in batches: results are printed as they come and memory
    holds one batch. Unreadable images are skipped and listed on stderr; a summary (images/s,
    time split, images per label) ends on stderr. With --head all, each image gets one result per
    head. --json prints one JSON list, --csv one CSV table.

    BUNDLE may be on a device (user@host:PATH or ssh://user@host:port/PATH, see `edgetl deploy`):
    edgetl runs there over ssh, IMAGES are paths on the device, and the output streams back.

    \b
    Example:
      edgetl predict bundles/digits img.png photos/ --top-k 3
      edgetl predict bundles/parts /mnt/camera/ --precision int8 --head all --csv > results.csv
      edgetl predict pi@raspberrypi.local:bundles/parts /home/pi/camera/ --json > results.json
    """
    from edgetl.core.errors import ConfigError
    from edgetl.device.remote import is_remote

    if as_json and as_csv:
        raise ConfigError("choose one of --json and --csv")
    if is_remote(bundle):
        _predict_remote(
            make_remote(bundle, identity, ssh_config, remote_edgetl), images, forwarded_args(ctx, exclude=SSH_OPTIONS)
        )
        return
    from edgetl.device.bundle_loading import open_bundle
    from edgetl.device.images import PredictionStream
    from edgetl.device.profiles import resolve_settings

    s = resolve_settings(
        device_profile,
        {
            "runtime": runtime,
            "precision": precision,
            "threads": threads,
            "provider": provider,
            "ov_device": ov_device,
            "streams": streams,
        },
    )
    runtime = s.runtime
    predictor = open_bundle(bundle).load(
        runtime=runtime, precision=s.values["precision"], heads=head, threads=s.values["threads"], **s.load_options()
    )

    skipped: list[str] = []

    def on_skip(path: str, reason: str) -> None:
        if len(skipped) < 20:
            skipped.append(reason)

    stream = PredictionStream(predictor, images, top_k=top_k, batch_size=batch_size, on_skip=on_skip)
    out = _Echo()
    if as_json:
        _stream_json(stream, out)
    elif as_csv:
        _stream_csv(stream, out)
    else:
        _stream_table(stream, predictor, runtime, top_k)
    summary = stream.summary
    if summary.skipped:
        click.echo(f"Skipped {summary.skipped} unreadable image(s):", err=True)
        for reason in skipped:
            click.echo(f"  {reason}", err=True)
        if summary.skipped > len(skipped):
            click.echo(f"  ... and {summary.skipped - len(skipped)} more", err=True)
    _print_summary(summary, predictor)


def _predict_remote(remote, images: tuple[str, ...], args: list[str]) -> None:
    """`edgetl predict` on the device; its stdout and stderr stream here as they come."""
    import codecs

    from edgetl.device.deploy import predict_remote

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        predict_remote(
            remote,
            images,
            args,
            on_stdout=lambda chunk: click.echo(decoder.decode(chunk), nl=False),
        )
    finally:
        click.echo(decoder.decode(b"", final=True), nl=False)


class _Echo:
    """A file-like ``write`` onto click.echo (stdout, as CliRunner and pipes see it)."""

    def write(self, text: str) -> None:
        click.echo(text, nl=False)


def _stream_json(stream, out) -> None:
    """One JSON list, written record by record (valid JSON even for a million images)."""
    import json

    first = True
    out.write("[")
    try:
        for record in stream:
            out.write(("\n  " if first else ",\n  ") + json.dumps(record))
            first = False
    finally:  # stdout stays one valid document even when the run fails part-way
        out.write("\n]\n" if not first else "]\n")


def _stream_csv(stream, out) -> None:
    import csv

    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["image", "head", "label", "score", "top_k"])
    for r in stream:
        top = ";".join(f"{t['label']}:{t['score']:.6f}" for t in r["top_k"])
        writer.writerow([r["image"], r["head"], r["label"], f"{r['score']:.6f}", top])


def _stream_table(stream, predictor, runtime: str, top_k: int) -> None:
    """A table while results fit on a screen or two; beyond TABLE_ROWS, plain lines as they come."""
    from rich.console import Console
    from rich.table import Table

    several_heads = len(predictor.head_names) > 1
    console = Console()

    def cells(r):
        top = ", ".join(f"{t['label']} {t['score']:.2f}" for t in r["top_k"])
        return (r["image"], *((r["head"],) if several_heads else ()), r["label"], f"{r['score']:.3f}", top)

    buffered = []
    iterator = iter(stream)
    for r in iterator:
        buffered.append(r)
        if len(buffered) > TABLE_ROWS:
            break
    else:
        table = Table(title=f"{predictor.variant} ({runtime})")
        for col in ("image", *(("head",) if several_heads else ()), "label", "score", f"top {top_k}"):
            table.add_column(col, justify="right" if col == "score" else "left", overflow="fold")
        for r in buffered:
            table.add_row(*cells(r))
        console.print(table)
        return
    click.echo(
        f"# {predictor.variant} ({runtime}): "
        + "\t".join(("image", *(("head",) if several_heads else ()), "label", "score", f"top {top_k}"))
    )
    for r in buffered:
        click.echo("\t".join(cells(r)))
    for r in iterator:
        click.echo("\t".join(cells(r)))


def _print_summary(s, predictor) -> None:
    busy = s.decode_s + s.preprocess_s + s.inference_s
    split = (
        (
            f"decode {100 * s.decode_s / busy:.0f}%, preprocess {100 * s.preprocess_s / busy:.0f}%, "
            f"inference {100 * s.inference_s / busy:.0f}%"
        )
        if busy > 0
        else ""
    )
    click.echo(
        f"Classified {s.images} image(s) in {s.seconds:.2f} s ({s.images_per_s:.1f} images/s; {split})"
        + (f", skipped {s.skipped}" if s.skipped else ""),
        err=True,
    )
    for head, counts in s.per_class.items():
        shown = ", ".join(f"{label}: {n}" for label, n in counts.items() if n)
        prefix = f"  {head}: " if len(s.per_class) > 1 else "  per label: "
        click.echo(prefix + (shown or "none"), err=True)


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
@click.option("--streams", type=click.IntRange(min=1), default=None, help="OpenVINO streams (default: the runtime's).")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True, help="Untimed runs first.")
@click.option(
    "--iterations", type=click.IntRange(min=1), default=100, show_default=True, help="Timed runs per configuration."
)
@click.option(
    "--block",
    type=click.IntRange(min=1),
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
    from edgetl.core.errors import ConfigError
    from edgetl.device.remote import is_remote

    if save_dir is not None:
        save = True
    remote_targets = ([bundle] if bundle is not None and is_remote(bundle) else []) + list(targets)
    if remote_targets:
        if bundle is not None and not is_remote(bundle):
            raise ConfigError(f"give a local BUNDLE or device targets, not both ({bundle} is local)")
        _bench_remote(
            remote_targets,
            forwarded_args(ctx, exclude=(*SSH_OPTIONS, *LOCAL_BENCH_OPTIONS)),
            ssh=(identity, ssh_config, remote_edgetl),
            save=save,
            save_dir=save_dir,
            plot=plot,
            as_json=as_json,
            samples=samples,
        )
        return
    if bundle is None:
        raise ConfigError("give a BUNDLE (a folder here, or user@host:PATH on a device) or --target")
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
    if save:
        path = save_report(rep, save_dir=save_dir)
        click.echo(f"Saved {path}", err=True)
    if plot:
        click.echo(f"Plot {plot_latencies(rep.results, plot)}", err=True)
    if as_json:
        emit_json(rep.to_dict(samples=samples))
        return
    _print_bench(rep)


# What bench does here with the device's result: not forwarded (--json and --samples are always asked for).
LOCAL_BENCH_OPTIONS = ("targets", "save", "save_dir", "plot", "samples", "as_json")


def _bench_remote(
    targets: list[str],
    args: list[str],
    *,
    ssh: tuple,
    save: bool,
    save_dir: str | None,
    plot: str | None,
    as_json: bool,
    samples: bool,
) -> None:
    """Bench on each device in turn (one at a time, so that they do not share the workstation's
    network or ssh), then one table: the device's own when there is one, else a comparison."""
    from edgetl.device.bench import BenchReport, plot_latencies
    from edgetl.device.deploy import bench_remote, comparison_rows, save_remote

    remotes = [make_remote(t, *ssh) for t in targets]  # every target parsed before the first connection
    benches = []
    for remote in remotes:
        rb = bench_remote(remote, args)
        benches.append(rb)
        if save:
            click.echo(f"Saved {save_remote(rb, save_dir)}", err=True)
    if plot:
        results = [r for rb in benches for r in BenchReport.from_dict(rb.report).results]
        click.echo(f"Plot {plot_latencies(results, plot)}", err=True)
    if as_json:
        if len(benches) == 1:
            emit_json(benches[0].to_dict(samples=samples))
        else:
            emit_json(
                {"targets": [rb.to_dict(samples=samples) for rb in benches], "comparison": comparison_rows(benches)}
            )
        return
    if len(benches) == 1:
        rb = benches[0]
        _print_bench(BenchReport.from_dict(rb.report))
        d = rb.device
        click.echo(
            f"Device {d['where']}: edgetl {d['edgetl']}, fingerprint {d['fingerprint']}"
            + (f", fits profile {d['profile_fit']}" if d["profile_fit"] else "")
        )
        return
    _print_comparison(comparison_rows(benches))


def _print_comparison(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Devices compared (preprocessed input -> logits)")
    for col in ("device", "configuration", "p50 ms", "p99 ms", "img/s", "cold ms", "RSS MB", "vs first"):
        table.add_column(col, justify="left" if col in ("device", "configuration") else "right", overflow="fold")
    for r in rows:
        config = f"{r['variant']} t{r['threads'] or '-default'} b{r['batch_size']}"
        table.add_row(
            r["target"],
            config,
            f"{r['p50_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
            f"{r['throughput_ips']:.1f}",
            _ms(r["cold_start_ms"], 0),
            "-" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}",
            f"{r['speedup_vs_first']:.2f}x" if r["speedup_vs_first"] else "-",
        )
    console = Console()
    console.print(table)
    seen = set()
    for r in rows:
        if r["target"] not in seen:
            seen.add(r["target"])
            console.print(f"{r['target']}: {r['cpu'] or '?'} (fingerprint {r['fingerprint']})", highlight=False)


def _print_bench(rep) -> None:
    """Few configurations: metrics as rows, configurations as columns (fits a Pi's terminal and puts
    fp32 beside int8). A sweep: one row per configuration."""
    from rich.console import Console
    from rich.table import Table

    results = rep.results
    first = results[0]
    cs_total = "cold start: total ms" if first.cold_start_scope == "fresh-process" else None
    rows = [
        (f"latency {k} ms", lambda r, k=k: f"{r.latency_ms[k]:.3f}")
        for k in ("p50", "p90", "p99", "mean", "min", "max")
    ]
    rows += [
        ("throughput img/s", lambda r: f"{r.throughput_ips:.1f}"),
        *([("cold start: import ms", lambda r: _ms(r.cold_start_ms.get("import")))] if cs_total else []),
        ("cold start: load ms", lambda r: _ms(r.cold_start_ms["load"])),
        ("cold start: first run ms", lambda r: _ms(r.cold_start_ms["first_inference"], 2)),
        *([(cs_total, lambda r: _ms(r.cold_start_ms.get("total")))] if cs_total else []),
        ("peak RSS MB", lambda r: "-" if r.peak_rss_mb is None else f"{r.peak_rss_mb:.0f}"),
        ("model size", lambda r: _human_bytes(r.model_bytes)),
        ("inference precision", lambda r: r.inference_precision or "-"),
        ("val top-1 (export)", lambda r: "-" if r.val_top1 is None else f"{r.val_top1:.4f}"),
    ]
    settings = f"{first.warmup} warm-up + {first.iterations} runs" + (" each, interleaved" if len(results) > 1 else "")
    console = Console()
    if len(results) <= 4:
        same = len({(r.threads, r.batch_size) for r in results}) == 1
        title = f"{first.bundle}: " + (
            f"batch {first.batch_size}, threads {first.threads or 'default'}, " if same else ""
        )
        table = Table(title=title + settings)
        table.add_column("")
        for r in results:
            table.add_column(r.variant if same else r.label, justify="right")
        for label, cell in rows:
            table.add_row(label, *(cell(r) for r in results))
    else:
        table = Table(title=f"{first.bundle}: {settings}")
        table.add_column("configuration", no_wrap=True)
        for col in ("p50 ms", "p99 ms", "img/s", "cold start ms", "RSS MB", "size"):
            table.add_column(col, justify="right")
        for r in results:
            table.add_row(
                r.label,
                f"{r.latency_ms['p50']:.2f}",
                f"{r.latency_ms['p99']:.2f}",
                f"{r.throughput_ips:.1f}",
                _ms(r.cold_start_ms.get("total") or r.cold_start_ms["load"], 0),
                "-" if r.peak_rss_mb is None else f"{r.peak_rss_mb:.0f}",
                _human_bytes(r.model_bytes),
            )
    console.print(table)
    for c in rep.comparison:
        parts = [f"speed-up {c['speedup_p50']:.2f}x (p50 latency)"]
        if c["kind"] == "precision" and c["compression"] is not None:
            parts.append(f"compression {c['compression']:.2f}x")
        if c["kind"] == "precision" and c["top1_drop_pp"] is not None:
            parts.append(f"top-1 drop {c['top1_drop_pp']:.2f} pp (at export)")
        where = (
            ""
            if len({(r.threads, r.batch_size) for r in results}) == 1
            else f" (threads {c['threads'] or 'default'}, batch {c['batch_size']})"
        )
        console.print(f"{c['variant']} vs {c['baseline']}{where}: " + ", ".join(parts))
    for r in results:
        if r.heads_cost:
            hc = r.heads_cost
            heads = "; ".join(
                f"{h['head']} {h['head_ms']:.3f} ms alone ({h['head_pct_of_trunk']:.1f}% of the trunk), "
                f"trunk + {h['head']} {h['trunk_plus_head_ms']:.3f} ms"
                for h in hc["heads"]
            )
            console.print(f"heads on {r.label}: trunk alone {hc['trunk_ms']:.3f} ms; {heads}")
    for s in rep.skipped:
        console.print(f"[yellow]skipped {s['variant']}: {s['reason']}[/yellow]")
    if rep.profile:
        applied = ", ".join(f"{k}={v}" for k, v in rep.profile["applied"].items()) or "nothing (all overridden)"
        console.print(f"profile {rep.profile['name']}: applied {applied}")
    env = first.env
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    console.print(
        f"[dim]{env['cpu']}; {env['logical_cores']} logical cores ({env['usable_cores']} usable); "
        f"governor {env['governor'] or 'n/a'}; {env['os']} {env['kernel']}; python {env['python']}; {versions}. "
        f"Preprocessing, not timed above: {first.preprocess_ms:.1f} ms per image. "
        f"Cold start: {first.cold_start_scope}.[/dim]"
    )


def _ms(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _human_bytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


COMMANDS = [predict, bench]
