"""`edgetl data` and `edgetl backbones`."""

from __future__ import annotations

import click

from edgetl.cli._common import emit_json, handle_errors, json_option


@click.group()
def data() -> None:
    """Datasets for trying edgetl offline."""


@data.command("digits")
@click.argument("out", type=click.Path())
@json_option
@handle_errors
def data_digits(out: str, as_json: bool) -> None:
    """Write scikit-learn's bundled digits (1,797 8x8 images, 10 classes) as an image folder.

    \b
    Example:
      edgetl data digits data/digits
    """
    from edgetl.workstation.data import write_digits

    result = write_digits(out)
    if as_json:
        emit_json(result)
    else:
        click.echo(f"Wrote {result['images']} images in {len(result['classes'])} classes to {result['path']}")


@click.command()
@json_option
@handle_errors
def backbones(as_json: bool) -> None:
    """List the supported backbones: feature dimension, parameters, input size, weights.

    \b
    Example:
      edgetl backbones --json
    """
    from edgetl.workstation.backbones import list_backbones

    rows = [spec.describe() for spec in list_backbones()]
    if as_json:
        emit_json(rows)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Backbones")
    for col in ("name", "feature_dim", "params", "input_size", "weights"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], str(r["feature_dim"]), f"{r['params'] / 1e6:.1f}M", str(r["input_size"]), r["weights"])
    Console().print(table)


COMMANDS = [data, backbones]
