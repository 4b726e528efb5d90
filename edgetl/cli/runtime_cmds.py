"""`edgetl predict` and `edgetl bench`: the device side, no torch (see edgetl.runtime, edgetl.bench)."""

from __future__ import annotations

import click

from edgetl.bundle import PRECISIONS
from edgetl.cli._common import emit_json, handle_errors, json_option, parse_list

# Mirrors edgetl.runtime.RUNTIMES (a test checks); spelled out so `--help` does not import numpy.
RUNTIMES = ("onnxruntime", "openvino")

runtime_option = click.option(
    "--runtime", type=click.Choice(RUNTIMES), default="onnxruntime", show_default=True,
    help="Inference library; the bundle must hold files for it.",
)
head_option = click.option(
    "--head", default=None, metavar="NAME|all",
    help="Head (task) to run; `all` runs every head on one trunk pass. Default: the bundle's default head.",
)


def _precisions(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    items = parse_list(value)
    for p in items or ():
        if p not in PRECISIONS:
            raise click.BadParameter(f"{p!r} is not one of {', '.join(PRECISIONS)}")
    return items


@click.command()
@click.argument("bundle", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@runtime_option
@click.option("--precision", type=click.Choice(PRECISIONS), default=None,
              help="Variant precision. Default: fp32 if the bundle has it.")
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True,
              help="Best classes to report per image (at most the number of labels).")
@head_option
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Images per inference call.")
@json_option
@handle_errors
def predict(bundle: str, images: tuple[str, ...], runtime: str, precision: str | None, top_k: int,
            head: str | None, batch_size: int, as_json: bool) -> None:
    """Classify image files, or every image in folders (recursively), with a bundle.

    Unreadable images are skipped and listed on stderr. With --head all, each image gets one
    result per head.

    \b
    Example:
      edgetl predict bundles/digits img.png photos/ --top-k 3
      edgetl predict bundles/parts line1/ --precision int8 --head all --json
    """
    from edgetl.runtime import open_bundle, predict_files

    predictor = open_bundle(bundle).load(runtime=runtime, precision=precision, heads=head)
    result = predict_files(predictor, images, top_k=top_k, batch_size=batch_size)
    if result.skipped:
        click.echo(f"Skipped {len(result.skipped)} unreadable image(s):", err=True)
        for _, reason in result.skipped:
            click.echo(f"  {reason}", err=True)
    if as_json:
        emit_json(result.predictions)
        return
    from rich.console import Console
    from rich.table import Table

    several_heads = len(predictor.head_names) > 1
    table = Table(title=f"{predictor.variant} ({runtime})")
    for col in ("image", *(("head",) if several_heads else ()), "label", "score", f"top {top_k}"):
        table.add_column(col, justify="right" if col == "score" else "left", overflow="fold")
    for r in result.predictions:
        top = ", ".join(f"{t['label']} {t['score']:.2f}" for t in r["top_k"])
        table.add_row(r["image"], *((r["head"],) if several_heads else ()), r["label"], f"{r['score']:.3f}", top)
    Console().print(table)


@click.command()
@click.argument("bundle", type=click.Path())
@runtime_option
@click.option("--precision", callback=_precisions, default=None, metavar="P[,P...]",
              help="Precisions to bench, e.g. int8 or fp32,int8. "
                   "Default: every precision the bundle has for the runtime.")
@head_option
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Images per inference call.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Intra-op threads. Default: the runtime's (ONNX Runtime: one per physical core).")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True, help="Untimed runs first.")
@click.option("--iterations", type=click.IntRange(min=1), default=100, show_default=True, help="Timed runs.")
@json_option
@handle_errors
def bench(bundle: str, runtime: str, precision: list[str] | None, head: str | None, batch_size: int,
          threads: int | None, warmup: int, iterations: int, as_json: bool) -> None:
    """Measure latency, throughput, cold start, memory and size of a bundle's variants.

    Timed: preprocessed input -> logits (trunk + head), after warm-up. With several precisions
    (the default when the bundle has fp32 and int8) the table ends with the int8-vs-fp32
    comparison; --json then prints {"results": [...], "comparison": [...]}, and with one
    precision the single result. See docs/runtime.md.

    \b
    Example:
      edgetl bench bundles/digits
      edgetl bench bundles/digits --precision int8 --threads 2 --batch-size 8 --json
    """
    from edgetl.bench import bench_precisions, compare, report

    results = bench_precisions(bundle, runtime=runtime, precisions=precision, head=head, batch_size=batch_size,
                               threads=threads, warmup=warmup, iterations=iterations)
    if as_json:
        emit_json(report(results))
        return
    _print_bench(results, compare(results))


def _print_bench(results, comparison) -> None:
    """Metrics as rows, variants as columns: fits a Pi's terminal and puts fp32 beside int8."""
    from rich.console import Console
    from rich.table import Table

    first = results[0]
    stats = ("p50", "p90", "p99", "mean", "min", "max")
    rows = [(f"latency {k} ms", lambda r, k=k: f"{r.latency_ms[k]:.3f}") for k in stats]
    rows += [
        ("throughput img/s", lambda r: f"{r.throughput_ips:.1f}"),
        ("cold start: load ms", lambda r: f"{r.cold_start_ms['load']:.1f}"),
        ("cold start: first run ms", lambda r: f"{r.cold_start_ms['first_inference']:.2f}"),
        ("peak RSS MB", lambda r: "-" if r.peak_rss_mb is None else f"{r.peak_rss_mb:.0f}"),
        ("model size", lambda r: _human_bytes(r.model_bytes)),
        ("val top-1 (export)", lambda r: "-" if r.val_top1 is None else f"{r.val_top1:.4f}"),
    ]
    table = Table(title=f"{first.bundle}: {first.runtime}, batch {first.batch_size}, "
                        f"threads {first.threads or 'default'}, {first.warmup} warm-up + {first.iterations} runs")
    table.add_column("")
    for r in results:
        table.add_column(r.variant, justify="right")
    for label, cell in rows:
        table.add_row(label, *(cell(r) for r in results))
    console = Console()
    console.print(table)
    for c in comparison:
        parts = [f"speed-up {c['speedup_p50']:.2f}x (p50 latency)"]
        if c["compression"] is not None:
            parts.append(f"compression {c['compression']:.2f}x")
        if c["top1_drop_pp"] is not None:
            parts.append(f"top-1 drop {c['top1_drop_pp']:.2f} pp (at export)")
        console.print(f"{c['variant']} vs {c['baseline']}: " + ", ".join(parts))
    env = first.env
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    console.print(
        f"[dim]{env['cpu']}; {env['logical_cores']} logical cores ({env['usable_cores']} usable); "
        f"governor {env['governor'] or 'n/a'}; {env['os']} {env['kernel']}; python {env['python']}; {versions}. "
        f"Preprocessing, not timed above: {first.preprocess_ms:.1f} ms per image.[/dim]"
    )


def _human_bytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


COMMANDS = [predict, bench]
