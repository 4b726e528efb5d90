"""Human-readable output of bench: rich tables and summary lines (--json prints the library's documents
instead). rich is imported only inside the functions."""

from __future__ import annotations

from edgetl.cli._tables import _human_bytes, _ms


def print_comparison(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Devices compared (preprocessed input -> logits)")
    for col in ("device", "configuration", "p50 ms", "p99 ms", "img/s", "cold ms", "RSS MB", "vs first"):
        table.add_column(col, justify="left" if col in ("device", "configuration") else "right", overflow="fold")
    for r in rows:
        config = f"{r['variant']} t{r['threads'] or '-default'} b{r['batch_size']}"
        table.add_row(
            r["target"],
            config,
            f"{r['p50_ms']:.2f}",
            f"{r['p99_ms']:.2f}",
            f"{r['throughput_ips']:.1f}",
            _ms(r["cold_start_ms"], 0),
            "-" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}",
            f"{r['speedup_vs_first']:.2f}x" if r["speedup_vs_first"] else "-",
        )
    console = Console()
    console.print(table)
    seen = set()
    for r in rows:
        if r["target"] not in seen:
            seen.add(r["target"])
            console.print(f"{r['target']}: {r['cpu'] or '?'} (fingerprint {r['fingerprint']})", highlight=False)


def print_bench(rep) -> None:
    """Few configurations: metrics as rows, configurations as columns (fits a Pi's terminal and puts
    fp32 beside int8). A sweep: one row per configuration."""
    from rich.console import Console
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
        ("cold start: load ms", lambda r: _ms(r.cold_start_ms["load"])),
        ("cold start: first run ms", lambda r: _ms(r.cold_start_ms["first_inference"], 2)),
        *([(cs_total, lambda r: _ms(r.cold_start_ms.get("total")))] if cs_total else []),
        ("peak RSS MB", lambda r: "-" if r.peak_rss_mb is None else f"{r.peak_rss_mb:.0f}"),
        ("model size", lambda r: _human_bytes(r.model_bytes)),
        ("inference precision", lambda r: r.inference_precision or "-"),
        ("val top-1 (export)", lambda r: "-" if r.val_top1 is None else f"{r.val_top1:.4f}"),
    ]
    settings = f"{first.warmup} warm-up + {first.iterations} runs" + (" each, interleaved" if len(results) > 1 else "")
    console = Console()
    if len(results) <= 4:
        same = len({(r.threads, r.batch_size) for r in results}) == 1
        title = f"{first.bundle}: " + (
            f"batch {first.batch_size}, threads {first.threads or 'default'}, " if same else ""
        )
        table = Table(title=title + settings)
        table.add_column("")
        for r in results:
            table.add_column(r.variant if same else r.label, justify="right")
        for label, cell in rows:
            table.add_row(label, *(cell(r) for r in results))
    else:
        table = Table(title=f"{first.bundle}: {settings}")
        table.add_column("configuration", no_wrap=True)
        for col in ("p50 ms", "p99 ms", "img/s", "cold start ms", "RSS MB", "size"):
            table.add_column(col, justify="right")
        for r in results:
            table.add_row(
                r.label,
                f"{r.latency_ms['p50']:.2f}",
                f"{r.latency_ms['p99']:.2f}",
                f"{r.throughput_ips:.1f}",
                _ms(r.cold_start_ms.get("total") or r.cold_start_ms["load"], 0),
                "-" if r.peak_rss_mb is None else f"{r.peak_rss_mb:.0f}",
                _human_bytes(r.model_bytes),
            )
    console.print(table)
    for c in rep.comparison:
        parts = [f"speed-up {c['speedup_p50']:.2f}x (p50 latency)"]
        if c["kind"] == "precision" and c["compression"] is not None:
            parts.append(f"compression {c['compression']:.2f}x")
        if c["kind"] == "precision" and c["top1_drop_pp"] is not None:
            parts.append(f"top-1 drop {c['top1_drop_pp']:.2f} pp (at export)")
        where = (
            ""
            if len({(r.threads, r.batch_size) for r in results}) == 1
            else f" (threads {c['threads'] or 'default'}, batch {c['batch_size']})"
        )
        console.print(f"{c['variant']} vs {c['baseline']}{where}: " + ", ".join(parts))
    for r in results:
        if r.heads_cost:
            hc = r.heads_cost
            heads = "; ".join(
                f"{h['head']} {h['head_ms']:.3f} ms alone ({h['head_pct_of_trunk']:.1f}% of the trunk), "
                f"trunk + {h['head']} {h['trunk_plus_head_ms']:.3f} ms"
                for h in hc["heads"]
            )
            console.print(f"heads on {r.label}: trunk alone {hc['trunk_ms']:.3f} ms; {heads}")
    for s in rep.skipped:
        console.print(f"[yellow]skipped {s['variant']}: {s['reason']}[/yellow]")
    if rep.profile:
        applied = ", ".join(f"{k}={v}" for k, v in rep.profile["applied"].items()) or "nothing (all overridden)"
        console.print(f"profile {rep.profile['name']}: applied {applied}")
    env = first.env
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    console.print(
        f"[dim]{env['cpu']}; {env['logical_cores']} logical cores ({env['usable_cores']} usable); "
        f"governor {env['governor'] or 'n/a'}; {env['os']} {env['kernel']}; python {env['python']}; {versions}. "
        f"Preprocessing, not timed above: {first.preprocess_ms:.1f} ms per image. "
        f"Cold start: {first.cold_start_scope}.[/dim]"
    )
