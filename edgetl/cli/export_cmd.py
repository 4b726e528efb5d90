"""`edgetl export`."""

from __future__ import annotations

from typing import Any

import click

from edgetl.cli._common import common_options, handle_errors, parse_list, renamed_option
from edgetl.cli._output import FORMATS as OUTPUT_FORMATS
from edgetl.core.formats import FORMATS as MODEL_FORMATS
from edgetl.core.formats import PRECISIONS

# A variant's record in --json `results` (and its columns in a pipe): these keys first, always present
# (null where they do not apply), then any other metric the export measured (merged_*, ...).
VARIANT_KEYS = (
    "name",
    "format",
    "precision",
    "runtime",
    "val_top1",
    "top1_drop_pp",
    "max_abs_diff",
    "top1_agreement",
    "n",
    "bytes",
    "features_sqnr_db",
    "inference_precision",
    "speedup_vs_fp32",
)
TSV_COLUMNS = (
    "name",
    "format",
    "precision",
    "val_top1",
    "top1_drop_pp",
    "max_abs_diff",
    "top1_agreement",
    "bytes",
    "inference_precision",
    "speedup_vs_fp32",
)


def _list_of(choices, what: str):
    """A comma-list option checked against ``choices`` when the command line is parsed (exit 2)."""

    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
        if value is None:
            return None
        items = parse_list(value)
        if not items:
            raise click.BadParameter(f"is empty; give {what} from {', '.join(choices)}")
        for item in items:
            if item not in choices:
                raise click.BadParameter(f"{item!r} is not one of {', '.join(choices)}")
        return items

    return callback


def _output_format(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--format table|tsv|json``; a model format there (``--format onnx,openvino``, what the option
    meant before ``--model-format``) still works, with a deprecation warning."""
    if value is None or value in OUTPUT_FORMATS:
        return value
    items = parse_list(value) or []
    if items and all(item in MODEL_FORMATS for item in items):
        click.echo(
            f"Warning: --format {value} (a model format) is deprecated and will be removed; use --model-format "
            f"{value} (--format now chooses the output: {', '.join(OUTPUT_FORMATS)}).",
            err=True,
        )
        return ",".join(items)
    raise click.BadParameter(
        f"{value!r} is not one of {', '.join(OUTPUT_FORMATS)} (model formats go to --model-format: "
        f"{', '.join(MODEL_FORMATS)})"
    )


def _format_options(func):
    """``--format`` (the output, or the deprecated spelling of ``--model-format``) and ``--json``: the
    same options as every command's (edgetl.cli._output.format_option) with the old meaning kept."""
    func = click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="Print one JSON document on stdout (the same as --format json; logs go to stderr).",
    )(func)
    return click.option(
        "--format",
        "output_format",
        callback=_output_format,
        default=None,
        metavar="[table|tsv|json]",
        help="Output: table (default on a terminal), tsv (default in a pipe: tab-separated lines with a "
        "header, never wrapped) or json (see docs/json.md). A model format here (--format onnx) is the "
        "deprecated spelling of --model-format.",
    )(func)


@click.command()
@click.argument("run", type=click.Path())
@click.option("--out", "out", type=click.Path(), help="Bundle folder to write.")
@click.option(
    "--export-profile",
    "export_profile",
    default=None,
    metavar="NAME|PATH",
    help="Export profile (export/*.yaml: default, onnx-int8, openvino-int8, fp32-only, litert, ncnn, pi, "
    "all) or a .yaml path; the options below override it. Default: default (every format installed, fp32 and int8).",
)
@renamed_option("--profile", "export_profile", "--export-profile", metavar="NAME|PATH")
@click.option(
    "--model-format",
    "model_formats",
    callback=_list_of(tuple(MODEL_FORMATS), "model formats"),
    default=None,
    metavar="F[,F...]",
    help=f"Model formats to export, e.g. onnx or onnx,openvino ({', '.join(MODEL_FORMATS)}). Default: the profile's.",
)
@click.option(
    "--precision",
    "precisions",
    callback=_list_of(PRECISIONS, "precisions"),
    default=None,
    metavar="P[,P...]",
    help="Precisions to export, e.g. int8 or fp32,int8 (bf16: OpenVINO only). Default: the profile's.",
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
    "--min-speedup",
    "min_speedup",
    type=float,
    default=None,
    metavar="X",
    help="Speed-up over fp32 (p50, batch 1, at 1 thread and at all cores) an int8 variant should reach "
    "where this CPU has int8 dot-product instructions (VNNI, AMX, ARM dot product); below it the export "
    "warns, naming the variant and what cost the speed. 0.5..10 (profile default: 1.2). Measured and "
    "recorded everywhere (speedup_vs_fp32).",
)
@click.option(
    "--qat-epochs",
    "qat_epochs",
    type=int,
    default=None,
    metavar="N",
    help="Quantization-aware fine-tuning of the trunk (fake int8 in the forward pass, distilled from the "
    "fp32 model on the run's training images, the head unchanged), tried as an int8 remedy by every format: "
    "N epochs, 1..20; 0 never. Default (auto): 1 epoch, only when post-training int8 misses --max-drop "
    "or --min-speedup. Needs the run's training images.",
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
@_format_options
@common_options
@handle_errors
def export(
    run,
    out,
    export_profile,
    model_formats,
    precisions,
    calib_size,
    max_drop,
    min_speedup,
    qat_epochs,
    merged,
    add_to,
    head,
    partial,
    force,
    output_format,
    as_json,
    no_progress,
) -> None:
    """Export the run RUN to a bundle for the device; every variant is checked before the bundle appears.

    Each variant is loaded through the device runtime (ONNX Runtime, OpenVINO) and compared with
    PyTorch on the run's validation images: fp32 must match (max abs logit diff <= 1e-3, same
    top-1 everywhere); fp16, bf16 and int8 may lose at most --max-drop points of top-1 (int8
    first tries other calibrations and keeping the most sensitive layers in float). Each int8 variant
    is also timed against its fp32 on this machine (speedup_vs_fp32; the search keeps the fastest
    attempt that passes), and held to --min-speedup where the CPU has int8 dot-product instructions.

    \b
    Example:
      edgetl export runs/digits --out bundles/digits
      edgetl export runs/digits --out bundles/digits-pi --export-profile onnx-int8
      edgetl export runs/digits --out bundles/digits --model-format openvino --precision fp32,bf16,int8 --force --json
      edgetl export runs/parts-head --add-to bundles/digits --head parts
    """
    from edgetl.cli._output import resolve_format
    from edgetl.core.errors import ConfigError

    if output_format is not None and output_format not in OUTPUT_FORMATS:  # the old --format onnx,openvino
        if model_formats is not None:
            raise click.UsageError(
                f"--format {output_format} is the old spelling of --model-format, which is given too: keep one"
            )
        model_formats, output_format = parse_list(output_format), None
    fmt = resolve_format(output_format, as_json)
    if add_to is not None:
        if out is not None or any(
            v is not None
            for v in (export_profile, model_formats, precisions, calib_size, merged, min_speedup, qat_epochs)
        ):
            raise ConfigError(
                "--add-to writes into BUNDLE with its formats and precisions: drop --out, --export-profile, "
                "--model-format, --precision, --calib-size, --min-speedup, --qat-epochs and --merged"
            )
        if not head:
            raise ConfigError("--add-to BUNDLE needs --head NAME")
        from edgetl.workstation.add_head import add_head

        added = add_head(
            run,
            add_to,
            head,
            max_drop=1.0 if max_drop is None else max_drop,
            partial=partial,
            force=force,
            progress=not no_progress,
        )
        variants, left_out = added["variants"], dict(added["left_out"])
        context: dict[str, Any] = {"bundle": added["bundle"], "run": str(run), "head": added["head"]}
        context.update(profile=None, left_out=left_out)
        title = f"Bundle {added['bundle']}: head {added['head']} added"
        if left_out:
            title += f" (left out of {', '.join(left_out)})"
    else:
        if out is None:
            raise ConfigError("export needs --out BUNDLE (or --add-to BUNDLE --head NAME)")
        if head is not None or partial:
            raise ConfigError(
                f"{'--head' if head is not None else '--partial'} applies to a head added with --add-to BUNDLE"
            )
        from edgetl.workstation.export import HEAD, export_bundle, resolve_options

        options = resolve_options(
            export_profile,
            formats=model_formats,
            precisions=precisions,
            calib_size=calib_size,
            max_drop=max_drop,
            merged=merged,
            min_speedup=min_speedup,
            qat_epochs=qat_epochs,
        )
        doc = export_bundle(run, out, options, force=force, progress=not no_progress)
        variants = doc["variants"]
        context = {"bundle": doc["bundle"], "run": str(run), "head": HEAD, "profile": doc["profile"], "left_out": {}}
        title = f"Bundle {doc['bundle']}"
    results = variant_records(variants)
    if fmt == "json":
        from edgetl.cli._output import emit_json, envelope

        emit_json(envelope("export", results, **context))
        return
    print_variants(fmt, results, title=title)


def variant_records(variants: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The export's metrics per variant (``{name: metrics}``) as --json ``results`` records."""
    from edgetl.core.formats import runtime_of, variant_name

    split = {variant_name(f, p): (f, p) for f in MODEL_FORMATS for p in PRECISIONS}
    records = []
    for name, metrics in variants.items():
        fmt, precision = split.get(name, (None, None))
        record: dict[str, Any] = dict.fromkeys(VARIANT_KEYS)
        record.update(name=name, format=fmt, precision=precision, runtime=runtime_of(fmt) if fmt else None)
        record.update(metrics)
        records.append(record)
    return records


def print_variants(fmt: str, records: list[dict[str, Any]], *, title: str) -> None:
    from edgetl.cli._output import emit_table

    if fmt == "tsv":
        emit_table(fmt, TSV_COLUMNS, ([r[c] for c in TSV_COLUMNS] for r in records))
        return
    rows = []
    for r in records:
        rows.append(
            [
                r["name"],
                f"{r['val_top1']:.4f}",
                "-" if r["top1_drop_pp"] is None else f"{r['top1_drop_pp']:.2f}",
                f"{r['max_abs_diff']:.1e}",
                f"{r['top1_agreement']:.4f}",
                f"{r['bytes'] / 1e6:.2f}",
                r["inference_precision"] or "-",
                "-" if r["speedup_vs_fp32"] is None else f"{r['speedup_vs_fp32']:.2f}x",
            ]
        )
    # Compact (the headers of `edgetl info`'s variant table), so that the table fits 80 columns.
    columns = ("variant", "val top-1", "drop pp", "max diff", "agree", "MB", "ran", "vs fp32")
    emit_table(fmt, columns, rows, title=title, right=columns[1:], whole=columns[:1])


COMMANDS = [export]
