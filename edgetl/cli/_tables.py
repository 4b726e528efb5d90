"""Human-readable output of predict and bench: rich tables and summary lines (--json prints the library's
documents instead). Imported by the commands; rich is imported only inside the functions."""

from __future__ import annotations

import click

TABLE_ROWS = 200  # predict prints a table up to this many results, then plain lines (bounded memory)


def stream_table(stream, predictor, top_k: int) -> None:
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
        table = Table(title=f"{predictor.variant} ({predictor.runtime})")
        for col in ("image", *(("head",) if several_heads else ()), "label", "score", f"top {top_k}"):
            table.add_column(col, justify="right" if col == "score" else "left", overflow="fold")
        for r in buffered:
            table.add_row(*cells(r))
        console.print(table)
        return
    click.echo(
        f"# {predictor.variant} ({predictor.runtime}): "
        + "\t".join(("image", *(("head",) if several_heads else ()), "label", "score", f"top {top_k}"))
    )
    for r in buffered:
        click.echo("\t".join(cells(r)))
    for r in iterator:
        click.echo("\t".join(cells(r)))


def print_summary(s) -> None:
    """predict's closing lines on stderr: speed, where the time went, images per label."""
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


def _ms(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _human_bytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"
