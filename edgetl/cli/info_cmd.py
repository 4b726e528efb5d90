"""`edgetl info BUNDLE|RUN`: what a bundle or a run holds, in one screen (see edgetl.device.info).

Torch-free: it reads JSON files (and hashes a bundle's files), so it works on a device-only install.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from edgetl.cli._common import common_options, format_option, handle_errors
from edgetl.cli._output import clean, emit_json, envelope, resolve_format, text, tsv_line

LABELS_ON_SCREEN = 72  # characters of label names shown per head before "... (+N more)"


@click.command()
@click.argument("path", metavar="BUNDLE|RUN", type=click.Path())
@click.option(
    "--no-verify",
    is_flag=True,
    help="Do not hash the bundle's files (huge bundles): checksums say 'not checked' (sizes are still compared).",
)
@format_option
@common_options
@handle_errors
def info(path: str, no_verify: bool, output_format: str | None, as_json: bool) -> None:
    """Show what the bundle or run PATH holds, in one screen.

    \b
    A bundle: each variant (format, precision, runtime, size, export metrics: val top-1, drop
    against fp32, max abs diff, top-1 agreement, precision run), heads and labels,
    preprocessing, lineage (backbone, weights, run, versions, created) and the checksum of
    every file. A run (from `edgetl finetune`): backbone, strategy, weights, data, val top-1,
    preprocessing, files present (model.pt is not loaded: no torch needed).

    Exit code 1, after the report, when a bundle file does not match its manifest or is
    missing, or a run file is missing or unreadable.

    \b
    Example:
      edgetl info bundles/digits
      edgetl info runs/digits --json
      edgetl info bundles/big --no-verify          # skip hashing a huge bundle
    """
    from edgetl.device.info import describe, problems

    fmt = resolve_format(output_format, as_json)
    kind, record = describe(path, verify=not no_verify)
    if fmt == "json":
        emit_json(envelope("info", [record], path=str(path), kind=kind))
    elif fmt == "tsv":
        click.echo(tsv_line(("key", "value")))
        for key, value in facts(record):
            click.echo(tsv_line((key, value)))
    elif kind == "bundle":
        _bundle_screen(record)
    else:
        _run_screen(record)
    wrong = problems(kind, record)
    if wrong:
        shown = clean("; ".join(wrong[:5]) + (f"; and {len(wrong) - 5} more" if len(wrong) > 5 else ""))
        if kind == "bundle":
            where = clean(path)
            click.echo(f"Error: bundle {where}: {shown} (modified or corrupted); copy or export it again", err=True)
        else:
            click.echo(f"Error: {shown}", err=True)
        sys.exit(1)


# --- tsv: one key<TAB>value line per fact ------------------------------------------------------------


def facts(record: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """The record as ``(dotted key, value)`` pairs: objects by key, lists of named records by their
    name (``variant.onnx-int8.val_top1``), other lists by index (``head.colour.labels.0``); empty
    lists and objects give no line. The same facts as the JSON, never wrapped."""
    out: list[tuple[str, str]] = []
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.extend(facts(value, f"{name}."))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    ident = next((item[k] for k in ("name", "path") if isinstance(item.get(k), str)), str(i))
                    rest = {k: v for k, v in item.items() if not (k in ("name", "path") and v == ident)}
                    out.extend(facts(rest, f"{name}.{ident}."))
                else:
                    out.append((f"{name}.{i}", text(item)))
        else:
            out.append((name, text(value)))
    return out


# --- table: one screen ---------------------------------------------------------------------------------


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _f(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def shorten(names: list[str], width: int = LABELS_ON_SCREEN) -> str:
    """``a, b, c, ... (+97 more)``: as many names as fit in ``width`` characters (the JSON has all)."""
    shown: list[str] = []
    used = 0
    for i, name in enumerate(names):
        left = len(names) - i - 1
        tail = len(f", ... (+{left} more)") if left else 0
        if shown and used + 2 + len(name) + tail > width:
            return ", ".join(shown) + f", ... (+{len(names) - i} more)"
        shown.append(name)
        used += len(name) + (2 if len(shown) > 1 else 0)
    return ", ".join(shown)


def _preprocessing(pp: Any) -> str:
    if not isinstance(pp, dict):
        return "-"
    return (
        f"{pp.get('input_size')} px (resize {pp.get('resize_size')}, {pp.get('interpolation')}), "
        f"mean {pp.get('mean')}, std {pp.get('std')}, {pp.get('color_mode')} {pp.get('layout')} {pp.get('dtype')}"
    )


def _weights(w: dict[str, Any] | None) -> str:
    if not w:
        return "-"
    line = w.get("kind") or "?"
    if w.get("origin"):
        line += f" ({w['origin']})"
    if w.get("sha256"):
        line += f", sha256 {w['sha256']}"
    if w.get("file"):
        line += f", {w['file']}"
    return line


def _facts_table(rows: list[tuple[str, Any]]):
    from rich.table import Table

    from edgetl.cli._output import plain

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, plain(value))
    return table


def _table(title: str, columns: list[str], rows: list[list[Any]], right: tuple[str, ...] = ()):
    from rich.table import Table

    from edgetl.cli._output import plain

    # One space between columns: the variants table (with ran and vs fp32) fits 80 columns.
    table = Table(
        title=title, title_justify="left", box=None, pad_edge=False, header_style="bold", collapse_padding=True
    )
    for col in columns:
        # Short cells never wrap; the free-text ones (labels, run) fold when the screen is narrow.
        table.add_column(
            col, justify="right" if col in right else "left", overflow="fold", no_wrap=col not in ("labels", "run")
        )
    for row in rows:
        table.add_row(*(plain(c) for c in row))
    return table


def _bundle_screen(r: dict[str, Any]) -> None:
    from edgetl.cli._output import console, plain

    out = console()
    lin = r["lineage"]
    out.print(
        plain(
            f"Bundle {r['path']}: {len(r['variants'])} variant(s), {len(r['heads'])} head(s), "
            f"{_size(r['checksums']['bytes'])}"
        )
    )
    variants = r["variants"]
    ran = any(v["inference_precision"] for v in variants)
    speedup = any(v["speedup_vs_fp32"] is not None for v in variants)
    merged = any(v["merged"] for v in variants)
    columns = ["variant", "runtime", "size", "top-1", "drop pp", "max diff", "agree"]
    columns += ["ran"] * ran + ["vs fp32"] * speedup
    rows = []
    for v in variants:
        row = [
            v["name"],
            v["runtime"] or "?",
            _size(v["bytes"]),
            _f(v["val_top1"], ".4f"),
            _f(v["top1_drop_pp"], ".2f"),
            _f(v["max_abs_diff"], ".1e"),
            _f(v["top1_agreement"], ".4f"),
        ]
        row += [v["inference_precision"] or "-"] * ran
        row += [_f(v["speedup_vs_fp32"], ".2f", "x")] * speedup
        rows.append(row)
    out.print(_table("Variants", columns, rows, right=("size", "top-1", "drop pp", "max diff", "agree", "vs fp32")))
    for v in variants:
        q = v["quantization"]
        if q:
            how = [f"{q['calibration']} calibration" if q["calibration"] else None]
            how += [f"{q['calibration_size']} images" if q["calibration_size"] is not None else None]
            how += [{True: "per-channel", False: "per-tensor", None: None}[q["per_channel"]]]
            how += [f"{q['float_nodes']} nodes kept in float" if q["float_nodes"] is not None else None]
            details = ", ".join(h for h in how if h)
            out.print(plain(f"{v['name']}: {q['method'] or 'quantized'}" + (f" ({details})" if details else "")))
        if v["scored"] == "as written":
            lost = v["int8_saturation_drop_pp"]
            out.print(
                plain(
                    f"{v['name']}: top-1 as its graph is written (ARM and VNNI CPUs)"
                    + (
                        f"; loses {lost:.2f} pp on x86 CPUs without VNNI or AMX (int8 kernels saturate): "
                        "there run openvino-int8 or fp32"
                        if lost is not None
                        else ""
                    )
                )
            )
    if merged:
        kinds = {tuple(v["merged"]) for v in variants}
        if len(kinds) == 1:
            where = f"{', '.join(variants[0]['merged'])} in every variant"
        else:
            where = "; ".join(f"{v['name']}: {', '.join(v['merged'])}" for v in variants if v["merged"])
        out.print(plain(f"merged graphs (trunk + head in one file): {where}"))
    head_rows = []
    for h in r["heads"]:
        run = h["run"] or {}
        where = run.get("name") or "-"
        if run.get("strategy"):
            where += f" ({run['strategy']})"
        left = f"; not in {', '.join(h['left_out'])}" if h["left_out"] else ""
        head_rows.append(
            [
                h["name"] + (" (default)" if h["default"] and len(r["heads"]) > 1 else ""),
                h["classes"],
                shorten(h["labels"]),
                where + left,
            ]
        )
    out.print(_table("Heads", ["head", "classes", "labels", "run"], head_rows, right=("classes",)))
    sums = r["checksums"]
    if sums["status"] == "ok":
        state = f"ok ({sums['count']} files verified)"
    elif sums["status"] == "not checked":
        state = f"not checked (--no-verify; {sums['count']} files present with their sizes)"
    else:
        bad = [f"{p} (mismatch)" for p in sums["mismatched"]] + [f"{p} (missing)" for p in sums["missing"]]
        state = f"FAILED: {', '.join(bad)}"
    versions = ", ".join(f"{k} {v}" for k, v in lin["versions"].items()) or "-"
    backbone = lin["backbone"] or "?"
    if lin["feature_dim"] is not None:
        backbone += f" ({lin['feature_dim']} features)"
    out.print(
        _facts_table(
            [
                ("preprocessing", _preprocessing(r["preprocessing"])),
                ("backbone", backbone),
                ("weights", _weights(lin["weights"])),
                ("run", lin["run"] or "-"),
                ("created", f"{lin['created_utc'] or '-'} by edgetl {lin['edgetl_version'] or '?'}"),
                ("versions", versions),
                ("checksums", state),
            ]
        )
    )


def _run_screen(r: dict[str, Any]) -> None:
    from edgetl.cli._output import console, plain

    out = console()
    out.print(plain(f"Run {r['path']}" + ("" if r["complete"] else " (incomplete)")))
    data = r["data"]
    images = f"{text(data['train_images']) or '?'} train / {text(data['val_images']) or '?'} val images"
    if data["skipped"]:
        images += f", {data['skipped']} skipped"
    if data["root"]:
        images += f", from {data['root']}"
    top1 = _f(r["val_top1"], ".4f")
    if r["best_epoch"] is not None:
        top1 += f" (best epoch {r['best_epoch']}" + (f" of {r['epochs_run']})" if r["epochs_run"] else ")")
    if r["n_val"] is not None:
        top1 += f" on {r['n_val']} images"
    backbone = r["backbone"] or "?"
    if r["trunk_from"]:
        backbone += f" (head on the trunk of bundle {r['trunk_from']['bundle']})"
    files = ", ".join(
        f"{f['name']} {_size(f['bytes'])}" if f["present"] else f"{f['name']} MISSING"
        for f in r["files"]
        if f["present"] or f["required"]
    )
    rows = [
        ("backbone", backbone),
        ("strategy", r["strategy"] or "-"),
        ("weights", _weights(r["weights"])),
        ("data", images),
        ("classes", f"{r['classes']}: {shorten(r['labels'])}"),
        ("val top-1", top1),
        ("preprocessing", _preprocessing(r["preprocessing"])),
        ("versions", ", ".join(f"{k} {v}" for k, v in r["versions"].items()) or "-"),
        ("files", files),
    ]
    out.print(_facts_table(rows))


COMMANDS = [info]
