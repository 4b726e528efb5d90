"""`edgetl export`."""

from __future__ import annotations

import click

from edgetl.cli._common import emit_json, handle_errors, json_option, parse_list


@click.command()
@click.argument("run", type=click.Path())
@click.option("--out", "out", required=True, type=click.Path(), help="Bundle folder to write.")
@click.option("--format", "formats", default=None, help="Comma list of formats (default: all available: onnx).")
@click.option("--precision", "precisions", default="fp32,int8", show_default=True, help="Comma list: fp32, int8.")
@click.option(
    "--calib-size", type=click.IntRange(min=1), default=200, show_default=True,
    help="Training images used to calibrate int8.",
)
@click.option(
    "--max-drop", type=float, default=1.0, show_default=True,
    help="Largest int8 validation top-1 drop vs fp32, in percentage points; the export fails above it.",
)
@click.option("--force", is_flag=True, help="Replace BUNDLE if it exists (only once the new one is complete).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@json_option
@handle_errors
def export(run, out, formats, precisions, calib_size, max_drop, force, no_progress, as_json) -> None:
    """Export the run RUN to a bundle for the device: ONNX fp32 and int8, every variant checked.

    Each variant is loaded through the device runtime and compared with PyTorch on the run's
    validation images before the bundle appears: fp32 must match (max abs logit diff <= 1e-3,
    same top-1 everywhere); int8 may lose at most --max-drop points of top-1.

    \b
    Example:
      edgetl export runs/digits --out bundles/digits
      edgetl export runs/digits --out bundles/digits --precision fp32 --force --json
    """
    from edgetl.export import DEFAULT_FORMATS, export_bundle

    doc = export_bundle(
        run,
        out,
        formats=parse_list(formats) or DEFAULT_FORMATS,
        precisions=parse_list(precisions) or (),
        calib_size=calib_size,
        max_drop=max_drop,
        force=force,
        progress=not no_progress,
    )
    if as_json:
        emit_json(doc)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Bundle {doc['bundle']}")
    for col in ("variant", "val top-1", "int8 drop", "max abs diff", "top-1 agreement", "size"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for name, m in doc["variants"].items():
        drop = f"{m['top1_drop_pp']:.2f} pp" if "top1_drop_pp" in m else "-"
        table.add_row(
            name, f"{m['val_top1']:.4f}", drop, f"{m['max_abs_diff']:.2e}", f"{m['top1_agreement']:.4f}",
            f"{m['bytes'] / 1e6:.2f} MB",
        )
    Console().print(table)


COMMANDS = [export]
