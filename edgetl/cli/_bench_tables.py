"""What bench prints: a rich table on a terminal, one tab-separated line per configuration in a pipe
(--json prints the library's document instead). rich is imported only inside the functions; names
from bundles, devices and files are shown as text, never as markup."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edgetl.cli._output import console, emit_table, plain, tsv_line
from edgetl.cli._tables import _human_bytes, _ms

# bench in a pipe (--format tsv): these columns, one line per configuration, whatever the number of
# configurations, devices or files; an empty cell is a null (threads: the runtime's default).
BENCH_COLUMNS = (
    "source",
    "variant",
    "runtime",
    "precision",
    "threads",
    "batch_size",
    "heads",
    "iterations",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "mean_ms",
    "min_ms",
    "max_ms",
    "throughput_ips",
    "cold_start_ms",
    "peak_rss_mb",
    "model_bytes",
    "val_top1",
    "speedup_vs_first",
)


def source_names(results) -> list[str]:
    """Where each result comes from, for tables and plots: the saved file's name without .json
    (--compare; the path as given when two files share a name), the device (user@host), else
    ``local``."""
    stems: dict[str, set[str]] = {}
    for r in results:
        if r.source:
            stems.setdefault(Path(r.source).stem, set()).add(r.source)
    return [
        (Path(r.source).stem if len(stems[Path(r.source).stem]) == 1 else r.source) if r.source else r.where
        for r in results
    ]


def _num(value: Any, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _cold(r) -> float | None:
    return r.cold_start_ms.get("total") or r.cold_start_ms.get("load")


def print_bench_tsv(rep) -> None:
    """A header line, then one line per configuration (:data:`BENCH_COLUMNS`)."""
    click.echo(tsv_line(BENCH_COLUMNS))
    base = rep.results[0].latency_ms["p50"] if rep.results else None
    for r, source in zip(rep.results, source_names(rep.results), strict=True):
        lat = r.latency_ms
        click.echo(
            tsv_line(
                (
                    source,
                    r.variant,
                    r.runtime,
                    r.precision,
                    "" if r.threads is None else r.threads,
                    r.batch_size,
                    ",".join(r.heads),
                    r.iterations,
                    *(_num(lat.get(k), 4) for k in ("p50", "p90", "p99", "mean", "min", "max")),
                    _num(r.throughput_ips, 2),
                    _num(_cold(r), 1),
                    _num(r.peak_rss_mb, 1),
                    r.model_bytes,
                    _num(r.val_top1, 4),
                    _num(base / lat["p50"] if base and lat["p50"] else None, 3),
                )
            )
        )


def print_comparison(rep) -> None:
    """Several devices or saved files: one row per (source, configuration), the speed-up against
    the first row; then one line per source saying what machine it is."""
    results = rep.results
    names = source_names(results)
    base = results[0].latency_ms["p50"]
    rows = [
        (
            name,
            r.label,
            f"{r.latency_ms['p50']:.2f}",
            f"{r.latency_ms['p99']:.2f}",
            f"{r.throughput_ips:.1f}",
            _ms(_cold(r), 0),
            "-" if r.peak_rss_mb is None else f"{r.peak_rss_mb:.0f}",
            f"{base / r.latency_ms['p50']:.2f}x",
        )
        for r, name in zip(results, names, strict=True)
    ]
    what = "Saved results" if rep.mode == "compare" else "Devices"
    emit_table(
        "table",
        ("source", "configuration", "p50 ms", "p99 ms", "img/s", "cold ms", "RSS MB", "vs first"),
        rows,
        title=f"{what} compared (preprocessed input -> logits)",
        right=("p50 ms", "p99 ms", "img/s", "cold ms", "RSS MB", "vs first"),
    )
    out = console()
    seen = set()
    for r, name in zip(results, names, strict=True):
        if name in seen:
            continue
        seen.add(name)
        remote = r.remote or {}
        machine = remote.get("machine") if isinstance(remote.get("machine"), dict) else {}
        cpu = machine.get("cpu") or r.env.get("cpu") or "?"
        parts = [str(cpu)]
        if remote.get("fingerprint"):
            parts.append(f"fingerprint {remote['fingerprint']}")
        versions = r.env.get("versions") if isinstance(r.env.get("versions"), dict) else {}
        if versions.get("edgetl"):
            parts.append(f"edgetl {versions['edgetl']}")
        if r.source and r.remote:
            parts.append(f"device {remote.get('where')}")
        out.print(plain(f"{name}: " + ", ".join(parts)))
    _print_skipped(rep)


def _print_skipped(rep) -> None:
    out = console()
    for s in rep.skipped:
        where = f" on {s['where']}" if s.get("where") else ""
        text = plain(f"skipped {s.get('variant')}{where}: {s.get('reason')}")
        text.stylize("yellow")
        out.print(text)


def print_bench(rep, *, device_line: str | None = None) -> None:
    """One machine's results. Few configurations: metrics as rows, configurations as columns (fits a
    Pi's terminal and puts fp32 beside int8). A sweep: one row per configuration."""
    from rich.table import Table

    results = rep.results
    first = results[0]
    cs_total = "cold start: total ms" if first.cold_start_scope == "fresh-process" else None
    rows = [
        (f"latency {k} ms", lambda r, k=k: f"{r.latency_ms[k]:.3f}")
        for k in ("p50", "p90", "p99", "mean", "min", "max")
    ]
    rows += [
        ("throughput img/s", lambda r: f"{r.throughput_ips:.1f}"),
        *([("cold start: import ms", lambda r: _ms(r.cold_start_ms.get("import")))] if cs_total else []),
        ("cold start: load ms", lambda r: _ms(r.cold_start_ms.get("load"))),
        ("cold start: first run ms", lambda r: _ms(r.cold_start_ms.get("first_inference"), 2)),
        *([(cs_total, lambda r: _ms(r.cold_start_ms.get("total")))] if cs_total else []),
        ("peak RSS MB", lambda r: "-" if r.peak_rss_mb is None else f"{r.peak_rss_mb:.0f}"),
        ("model size", lambda r: _human_bytes(r.model_bytes)),
        ("inference precision", lambda r: r.inference_precision or "-"),
        ("val top-1 (export)", lambda r: "-" if r.val_top1 is None else f"{r.val_top1:.4f}"),
    ]
    runs = f"{first.iterations} runs" + (f" (about {first.duration_s:g} s)" if first.duration_s else "")
    settings = f"{first.warmup} warm-up + {runs}" + (" each, interleaved" if len(results) > 1 else "")
    out = console()
    if len(results) <= 4:
        same = len({(r.threads, r.batch_size) for r in results}) == 1
        title = f"{first.bundle}: " + (
            f"batch {first.batch_size}, threads {first.threads or 'default'}, " if same else ""
        )
        table = Table(title=plain(title + settings))
        table.add_column("")
        for r in results:
            table.add_column(plain(r.variant if same else r.label), justify="right")
        for label, cell in rows:
            table.add_row(label, *(plain(cell(r)) for r in results))
    else:
        table = Table(title=plain(f"{first.bundle}: {settings}"))
        table.add_column("configuration", no_wrap=True)
        for col in ("p50 ms", "p99 ms", "img/s", "cold start ms", "RSS MB", "size"):
            table.add_column(col, justify="right")
        for r in results:
            table.add_row(
                plain(r.label),
                f"{r.latency_ms['p50']:.2f}",
                f"{r.latency_ms['p99']:.2f}",
                f"{r.throughput_ips:.1f}",
                _ms(_cold(r), 0),
                "-" if r.peak_rss_mb is None else f"{r.peak_rss_mb:.0f}",
                _human_bytes(r.model_bytes),
            )
    out.print(table)
    several_settings = len({(r.threads, r.batch_size) for r in results}) > 1
    for c in rep.comparison:
        if c["kind"] == "first":
            continue
        parts = [f"speed-up {c['speedup_p50']:.2f}x (p50 latency)"]
        if c["kind"] == "precision" and c["compression"] is not None:
            parts.append(f"compression {c['compression']:.2f}x")
        if c["kind"] == "precision" and c["top1_drop_pp"] is not None:
            parts.append(f"top-1 drop {c['top1_drop_pp']:.2f} pp (at export)")
        where = f" (threads {c['threads'] or 'default'}, batch {c['batch_size']})" if several_settings else ""
        out.print(plain(f"{c['variant']} vs {c['baseline']}{where}: " + ", ".join(parts)))
    for r in results:
        if r.heads_cost:
            hc = r.heads_cost
            heads = "; ".join(
                f"{h['head']} {h['head_ms']:.3f} ms alone ({h['head_pct_of_trunk']:.1f}% of the trunk), "
                f"trunk + {h['head']} {h['trunk_plus_head_ms']:.3f} ms"
                for h in hc["heads"]
            )
            out.print(plain(f"heads on {r.label}: trunk alone {hc['trunk_ms']:.3f} ms; {heads}"))
    _print_skipped(rep)
    if rep.profile:
        applied = ", ".join(f"{k}={v}" for k, v in rep.profile["applied"].items()) or "nothing (all overridden)"
        out.print(plain(f"profile {rep.profile['name']}: applied {applied}"))
    env = first.env
    versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items() if v)
    footer = plain(
        f"{env.get('cpu')}; {env.get('logical_cores')} logical cores ({env.get('usable_cores')} usable); "
        f"governor {env.get('governor') or 'n/a'}; {env.get('os')} {env.get('kernel')}; python {env.get('python')}; "
        f"{versions}. Preprocessing, not timed above: {first.preprocess_ms:.1f} ms per image. "
        f"Cold start: {first.cold_start_scope}."
    )
    footer.stylize("dim")
    out.print(footer)
    if device_line:
        out.print(plain(device_line))
