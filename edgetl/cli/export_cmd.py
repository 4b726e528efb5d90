"""`edgetl export`."""

from __future__ import annotations

import click

from edgetl.cli._common import emit_json, handle_errors, json_option, parse_list


@click.command()
@click.argument("run", type=click.Path())
@click.option("--out", "out", type=click.Path(), help="Bundle folder to write.")
@click.option(
    "--profile",
    default=None,
    metavar="NAME|PATH",
    help="Export profile (export/*.yaml: default, onnx-int8, openvino-int8, fp32-only, all) or a .yaml "
    "path; the options below override it. Default: default (every format installed, fp32 and int8).",
)
@click.option("--format", "formats", default=None, metavar="F[,F]", help="Comma list: onnx, openvino.")
@click.option(
    "--precision", "precisions", default=None, metavar="P[,P]", help="Comma list: fp32, fp16, bf16 (OpenVINO), int8."
)
@click.option(
    "--calib-size",
    type=click.IntRange(min=1),
    default=None,
    help="Training images used to calibrate int8 (profile default: 200).",
)
@click.option(
    "--max-drop",
    type=float,
    default=None,
    help="Largest fp16/bf16/int8 validation top-1 drop vs fp32, in percentage points; the export fails "
    "above it after trying the remedies (profile default: 1.0).",
)
@click.option(
    "--merged/--no-merged",
    default=None,
    help="Also write trunk + head as one graph per variant (one-file deployments, overhead reference).",
)
@click.option(
    "--add-to",
    "add_to",
    type=click.Path(),
    default=None,
    metavar="BUNDLE",
    help="Add the head of RUN (trained with finetune --trunk-from BUNDLE) to BUNDLE; trunk files untouched.",
)
@click.option("--head", "head", default=None, metavar="NAME", help="Name of the head added with --add-to.")
@click.option(
    "--partial",
    is_flag=True,
    help="With --add-to: leave the head out of fp16/bf16/int8 variants where it misses --max-drop "
    "(their trunk was tuned with the first head) instead of failing.",
)
@click.option("--force", is_flag=True, help="Replace BUNDLE (or, with --add-to, a head of that name) if it exists.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@json_option
@handle_errors
def export(
    run,
    out,
    profile,
    formats,
    precisions,
    calib_size,
    max_drop,
    merged,
    add_to,
    head,
    partial,
    force,
    no_progress,
    as_json,
) -> None:
    """Export the run RUN to a bundle for the device; every variant is checked before the bundle appears.

    Each variant is loaded through the device runtime (ONNX Runtime, OpenVINO) and compared with
    PyTorch on the run's validation images: fp32 must match (max abs logit diff <= 1e-3, same
    top-1 everywhere); fp16, bf16 and int8 may lose at most --max-drop points of top-1 (int8
    first tries other calibrations and keeping the most sensitive layers in float).

    \b
    Example:
      edgetl export runs/digits --out bundles/digits
      edgetl export runs/digits --out bundles/digits-pi --profile onnx-int8
      edgetl export runs/digits --out bundles/digits --format openvino --precision fp32,bf16,int8 --force --json
      edgetl export runs/parts-head --add-to bundles/digits --head parts
    """
    from edgetl.core.errors import ConfigError

    if add_to is not None:
        if out is not None or any(v is not None for v in (profile, formats, precisions, calib_size, merged)):
            raise ConfigError(
                "--add-to writes into BUNDLE with its formats and precisions: drop --out, --profile, "
                "--format, --precision, --calib-size and --merged"
            )
        if not head:
            raise ConfigError("--add-to BUNDLE needs --head NAME")
        from edgetl.workstation.add_head import add_head

        doc = add_head(
            run,
            add_to,
            head,
            max_drop=1.0 if max_drop is None else max_drop,
            partial=partial,
            force=force,
            progress=not no_progress,
        )
        title = f"Bundle {doc['bundle']}: head {doc['head']} added"
        if doc["left_out"]:
            title += f" (left out of {', '.join(doc['left_out'])})"
    else:
        if out is None:
            raise ConfigError("export needs --out BUNDLE (or --add-to BUNDLE --head NAME)")
        if head is not None or partial:
            raise ConfigError(
                f"{'--head' if head is not None else '--partial'} applies to a head added with --add-to BUNDLE"
            )
        from edgetl.workstation.export import export_bundle, resolve_options

        options = resolve_options(
            profile,
            formats=parse_list(formats),
            precisions=parse_list(precisions),
            calib_size=calib_size,
            max_drop=max_drop,
            merged=merged,
        )
        doc = export_bundle(run, out, options, force=force, progress=not no_progress)
        title = f"Bundle {doc['bundle']}"
    if as_json:
        emit_json(doc)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("variant", "val top-1", "drop", "max abs diff", "top-1 agreement", "size", "ran"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for name, m in doc["variants"].items():
        drop = f"{m['top1_drop_pp']:.2f} pp" if "top1_drop_pp" in m else "-"
        table.add_row(
            name,
            f"{m['val_top1']:.4f}",
            drop,
            f"{m['max_abs_diff']:.2e}",
            f"{m['top1_agreement']:.4f}",
            f"{m['bytes'] / 1e6:.2f} MB",
            m.get("inference_precision") or "-",
        )
    Console().print(table)


COMMANDS = [export]
