"""Human-readable output of predict and bench: rich tables, tab-separated lines and summary lines (--json
prints the library's documents instead). Imported by the commands; rich is imported only inside the functions."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import click

from edgetl.cli._output import clean, tsv_line

TABLE_ROWS = 200  # on a terminal, predict prints a table up to this many results, then aligned lines (bounded memory)

# predict's columns in a pipe (tsv) and in CSV: the same for any number of images, heads or bundles.
PREDICT_COLUMNS = ("image", "head", "label", "score", "top_k", "variant", "runtime", "unfamiliar")


def _score(value: float) -> str:
    """A score for TSV/CSV; a non-finite one (never produced: the predictor refuses it) as an empty cell."""
    return f"{value:.6f}" if math.isfinite(value) else ""


def predict_cells(r: dict[str, Any]) -> list[str]:
    """One prediction record as the cells of :data:`PREDICT_COLUMNS` (``top_k`` as ``label:score;...``)."""
    top = ";".join(f"{t['label']}:{_score(t['score'])}" for t in r["top_k"])
    unfamiliar = "" if "unfamiliar" not in r else "true" if r["unfamiliar"] else "false"
    return [r["image"], r["head"], r["label"], _score(r["score"]), top, r["variant"], r["runtime"], unfamiliar]


def stream_lines(records: Iterable[dict[str, Any]]) -> None:
    """predict in a pipe: the header, then one tab-separated line per record as it comes (cells
    escaped: a tab or newline in a file name cannot add a column or a line)."""
    click.echo(tsv_line(PREDICT_COLUMNS))
    for r in records:
        click.echo(tsv_line(predict_cells(r)))


def stream_table(records: Iterable[dict[str, Any]], predictor, top_k: int) -> None:
    """predict on a terminal: a table while the results fit on a screen or two; beyond TABLE_ROWS,
    the same columns as aligned lines as they come (widths from the first rows)."""
    several_heads = len(predictor.head_names) > 1
    flags = bool(getattr(predictor, "familiarity", None))  # a head with statistics: say which images are unfamiliar
    columns = (
        "image",
        *(("head",) if several_heads else ()),
        "label",
        "score",
        f"top {top_k}",
        *(("unfamiliar",) if flags else ()),
    )
    title = f"{predictor.variant} ({predictor.runtime})"

    def cells(r):
        top = ", ".join(f"{clean(t['label'])} {t['score']:.2f}" for t in r["top_k"])
        return (
            clean(r["image"]),
            *((clean(r["head"]),) if several_heads else ()),
            clean(r["label"]),
            f"{r['score']:.3f}",
            top,
            *(("yes" if r.get("unfamiliar") else "",) if flags else ()),
        )

    buffered = []
    iterator = iter(records)
    for r in iterator:
        buffered.append(cells(r))
        if len(buffered) > TABLE_ROWS:
            break
    else:
        from rich.table import Table
        from rich.text import Text

        from edgetl.cli._output import console

        table = Table(title=Text(title))
        for col in columns:
            table.add_column(col, justify="right" if col == "score" else "left", overflow="fold")
        for row in buffered:
            table.add_row(*(Text(c) for c in row))
        console().print(table)
        return
    widths = [max(len(col), *(len(row[i]) for row in buffered)) for i, col in enumerate(columns)]
    score = columns.index("score")

    def line(row) -> str:
        padded = [c.rjust(w) if i == score else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(padded).rstrip()

    click.echo(f"# {clean(title)}")
    click.echo(line(columns))
    for row in buffered:
        click.echo(line(row))
    for r in iterator:
        click.echo(line(cells(r)))


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
        shown = ", ".join(f"{clean(label)}: {n}" for label, n in counts.items() if n)
        prefix = f"  {clean(head)}: " if len(s.per_class) > 1 else "  per label: "
        click.echo(prefix + (shown or "none"), err=True)


def _ms(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _human_bytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"
