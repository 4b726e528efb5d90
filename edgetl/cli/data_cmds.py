"""`edgetl data` and `edgetl backbones`."""

from __future__ import annotations

import click

from edgetl.cli._common import common_options, handle_errors
from edgetl.cli._output import clean, emit_json, emit_table, envelope, format_option, resolve_format


@click.group()
def data() -> None:
    """Datasets for trying edgetl offline."""


@data.command("digits", short_help="Write scikit-learn's digits (1,797 8x8 images, 10 classes) as an image folder.")
@click.argument("out_positional", metavar="[OUT]", required=False, type=click.Path())
@click.option(
    "--out", "out", type=click.Path(), default=None, metavar="DIR", help="Folder to write (a new or empty one)."
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing digits folder (written by this command) once the new one is complete.",
)
@format_option
@common_options
@handle_errors
def data_digits(
    out_positional: str | None, out: str | None, force: bool, output_format: str | None, as_json: bool
) -> None:
    """Write scikit-learn's bundled digits (1,797 8x8 images, 10 classes) as an image folder.

    The folder is written beside --out DIR and renamed into place when complete: an interruption
    leaves nothing half-written. DIR must be new or empty; --force replaces a folder this command
    wrote before (class folders 0-9 of PNG files and nothing else). A positional OUT instead of
    --out is still accepted (deprecated).

    \b
    Output: one line, or --json:
      {"schema": "edgetl.data.digits", ..., "results": [{path, classes, images, replaced}]}

    \b
    Example:
      edgetl data digits --out data/digits
    """
    from edgetl.workstation.data import write_digits

    fmt = resolve_format(output_format, as_json)
    if out_positional is not None:
        if out is not None:
            raise click.UsageError("give the output folder once: --out OUT (the positional OUT is deprecated)")
        click.echo("Warning: `edgetl data digits OUT` is deprecated and will be removed; use --out OUT.", err=True)
        out = out_positional
    if out is None:
        raise click.UsageError("Missing option '--out'.")
    result = write_digits(out, force=force)
    if fmt == "json":
        emit_json(envelope("data.digits", [result]))
    else:
        click.echo(
            f"Wrote {result['images']} images in {len(result['classes'])} classes to {clean(result['path'])}"
            + (" (replaced the old folder)" if result.get("replaced") else "")
        )


@click.command()
@format_option
@common_options
@handle_errors
def backbones(output_format: str | None, as_json: bool) -> None:
    """List the supported backbones: feature dimension, parameters, input size, weights.

    \b
    Output: a table on a terminal, tab-separated lines in a pipe (params as a plain count there),
    or --json: {"schema": "edgetl.backbones", ..., "results": [{name, feature_dim, params,
    input_size, weights}, ...]}.

    \b
    Example:
      edgetl backbones --json
    """
    from edgetl.workstation.backbones import list_backbones

    fmt = resolve_format(output_format, as_json)
    rows = [spec.describe() for spec in list_backbones()]
    if fmt == "json":
        emit_json(envelope("backbones", rows))
        return
    columns = ("name", "feature_dim", "params", "input_size", "weights")

    def params(n: int) -> str:
        return str(n) if fmt == "tsv" else f"{n / 1e6:.1f}M"

    emit_table(
        fmt,
        columns,
        [(r["name"], r["feature_dim"], params(r["params"]), r["input_size"], r["weights"]) for r in rows],
        title="Backbones",
        right=("feature_dim", "params", "input_size"),
    )


COMMANDS = [data, backbones]
