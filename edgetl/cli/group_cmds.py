"""Groups of named devices (``@GROUP``): deploy, bench and doctor on each, one table at the end.

``edgetl deploy BUNDLE @lab`` and ``edgetl bench @lab`` call :func:`deploy_to_group` and
:func:`bench_group_cmd` when their target starts with ``@``; ``edgetl device doctor NAME|@GROUP``
is :func:`doctor` (joined to the ``device`` group by edgetl/cli/fleet_cmds.py). The fan-out is
edgetl.device.fleet. Each device is one row (``ok`` or ``failed`` with its one-line error); the
exit code is 1 when any device failed. Devices run ``--parallel N`` at a time; what each prints is
kept and shown in the table, and stderr gets one progress line per device as it finishes.
"""

from __future__ import annotations

from typing import Any

import click

from edgetl.cli._common import common_options, handle_errors, ssh_options
from edgetl.cli._output import clean, emit_json, emit_table, envelope, format_option, resolve_format

DEPLOY_GROUP_COLUMNS = ("device", "status", "where", "path", "files", "bytes", "seconds", "check", "error")
BENCH_GROUP_COLUMNS = ("device", "status", "variant", "p50_ms", "throughput_ips", "edgetl", "error")
DOCTOR_COLUMNS = ("device", "status", "arch", "cpu", "profile", "runtimes", "int8", "edgetl", "error")


def parallel_option(func):
    """``--parallel N``: how many devices of a group at a time."""
    from edgetl.device.fleet import DEFAULT_PARALLEL, MAX_PARALLEL

    return click.option(
        "--parallel",
        "parallel",
        type=click.IntRange(1, MAX_PARALLEL),
        default=DEFAULT_PARALLEL,
        show_default=True,
        metavar="N",
        help="With @GROUP: how many devices at a time.",
    )(func)


def overrides_from(ctx: click.Context, identity: str | None, ssh_config: str | None, remote_edgetl: str | None):
    """The ssh settings the command line gave (each device's own from the inventory otherwise)."""
    from click.core import ParameterSource

    from edgetl.device.fleet import SshOverrides

    def given(name: str, value):
        if name in ctx.params and ctx.get_parameter_source(name) is not ParameterSource.COMMANDLINE:
            return None
        return value

    return SshOverrides(
        identity=given("identity", identity),
        ssh_config=given("ssh_config", ssh_config),
        remote_edgetl=given("remote_edgetl", remote_edgetl),
    )


def _reporter(show: bool, total: int):
    """One stderr line per device as it finishes (whole lines: they never interleave)."""
    done = [0]

    def on_done(rec: dict[str, Any]) -> None:
        done[0] += 1
        if not show:
            return
        status = "ok" if rec["ok"] else f"failed: {rec['error']['message']}"
        click.echo(clean(f"[{done[0]}/{total}] {rec['device']}: {status} ({rec['seconds']:.1f} s)"), err=True)

    return on_done


def _status(rec: dict[str, Any]) -> str:
    return "ok" if rec["ok"] else "failed"


def _error(rec: dict[str, Any]) -> str:
    return rec["error"]["message"] if rec["error"] else ""


def _finish(ctx: click.Context, fmt: str, document: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """Print the JSON document (the table was printed by the caller) and fail (exit 1) if any
    device failed: under --json the same document then carries the error and ``partial: true``."""
    from edgetl.device.fleet import failures

    problem = failures(records)
    if fmt == "json":
        if problem:
            head = {k: v for k, v in document.items() if k != "results"}
            ctx.meta["edgetl.close_json_with_error"] = lambda error: emit_json(
                {**head, "error": error, "partial": True, "results": document["results"]}
            )
        else:
            emit_json(document)
    if problem:
        from edgetl.core.errors import RemoteError

        raise RemoteError(problem)


def _group_title(what: str, group: str, records: list[dict[str, Any]]) -> str:
    ok = sum(r["ok"] for r in records)
    return f"{what} on {group}: {ok} of {len(records)} devices ok"


# --- deploy BUNDLE @GROUP ------------------------------------------------------------------------------


def deploy_to_group(
    ctx: click.Context,
    bundle: str,
    target: str,
    *,
    check: bool,
    identity: str | None,
    ssh_config: str | None,
    remote_edgetl: str | None,
    parallel: int,
    fmt: str,
    show_progress: bool,
) -> None:
    """``edgetl deploy BUNDLE @GROUP[:PATH]``: the bundle to every device of the group."""
    from edgetl.device.fleet import check_status, deploy_group, group_devices

    devices, path = group_devices(target)
    records = deploy_group(
        bundle,
        devices,
        path=path,
        check=check,
        overrides=overrides_from(ctx, identity, ssh_config, remote_edgetl),
        parallel=parallel,
        on_done=_reporter(show_progress, len(devices)),
    )
    group = target.partition(":")[0]
    if fmt != "json":
        rows = []
        for rec in records:
            d = rec["deploy"] or {}
            size = d.get("bytes")
            rows.append(
                (
                    rec["device"],
                    _status(rec),
                    d.get("where", ""),
                    d.get("path", ""),
                    d.get("files", ""),
                    "" if size is None else size if fmt == "tsv" else f"{size / 1e6:.1f} MB",
                    d.get("seconds", "") if fmt == "tsv" or not d else f"{d['seconds']:.1f}",
                    check_status(d.get("check")),
                    _error(rec),
                )
            )
        emit_table(
            fmt,
            DEPLOY_GROUP_COLUMNS,
            rows,
            title=_group_title(f"Deploy {bundle}", group, records),
            right=("files", "bytes", "seconds"),
            whole=("device",),
        )
    document = envelope(
        "deploy.group",
        records,
        bundle=bundle,
        group=group,
        path=path,
        parallel=parallel,
        failed=sum(not r["ok"] for r in records),
    )
    _finish(ctx, fmt, document, records)


# --- bench @GROUP --------------------------------------------------------------------------------------


def bench_group_cmd(
    ctx: click.Context,
    target: str,
    bench_args: list[str],
    *,
    identity: str | None,
    ssh_config: str | None,
    remote_edgetl: str | None,
    parallel: int,
    fmt: str,
    samples: bool,
    save: bool,
    save_dir: str | None,
    plot: str | None,
    warnings: list[str],
    show_progress: bool,
) -> None:
    """``edgetl bench @GROUP[:PATH]``: the bundle deployed to each device, benched there."""
    from edgetl.device.fleet import bench_group, group_devices

    devices, path = group_devices(target)
    records, benches = bench_group(
        devices,
        bench_args,
        path=path,
        overrides=overrides_from(ctx, identity, ssh_config, remote_edgetl),
        parallel=parallel,
        samples=samples,
        save=save,
        save_dir=save_dir,
        on_done=_reporter(show_progress, len(devices)),
    )
    for rec in records:
        if rec.get("saved"):
            click.echo(clean(f"Saved {rec['saved']}"), err=True)
    ok = [rb for rb in benches if rb is not None]
    if plot and ok:
        from edgetl.cli.bench_cmd import _plot
        from edgetl.device.remote_bench import remote_report

        warnings = warnings + _plot(remote_report(ok), plot)
    group = target.partition(":")[0]
    if fmt != "json":
        rows = []
        for rec in records:
            if not rec["results"]:
                rows.append((rec["device"], _status(rec), "", "", "", rec["edgetl"] or "", _error(rec)))
            for r in rec["results"]:
                p50, ips = r["latency_ms"]["p50"], r["throughput_ips"]
                rows.append(
                    (
                        rec["device"],
                        _status(rec),
                        r["label"],
                        p50 if fmt == "tsv" else f"{p50:.2f}",
                        ips if fmt == "tsv" else f"{ips:.1f}",
                        rec["edgetl"] or "",
                        "",
                    )
                )
        emit_table(
            fmt,
            BENCH_GROUP_COLUMNS,
            rows,
            title=_group_title("Bench", group, records),
            right=("p50_ms", "throughput_ips"),
            whole=("device", "variant"),
        )
        for w in warnings:
            click.echo(clean(f"Warning: {w}"), err=True)
    document = envelope(
        "bench.group",
        records,
        group=group,
        path=path,
        parallel=parallel,
        failed=sum(not r["ok"] for r in records),
        warnings=warnings,
    )
    _finish(ctx, fmt, document, records)


# --- edgetl device doctor NAME|@GROUP -------------------------------------------------------------------


@click.command("doctor", short_help="Run edgetl doctor on a named device or a group, one table.")
@click.argument("target", metavar="NAME|@GROUP")
@parallel_option
@click.option(
    "--no-record",
    "no_record",
    is_flag=True,
    help="Do not keep the facts found (architecture, CPU, runtimes, profile, edgetl's version) in the inventory.",
)
@ssh_options
@format_option
@common_options
@click.pass_context
@handle_errors
def doctor(
    ctx: click.Context,
    target: str,
    parallel: int,
    no_record: bool,
    identity: str | None,
    ssh_config: str | None,
    remote_edgetl: str,
    output_format: str | None,
    as_json: bool,
    no_progress: bool,
) -> None:
    """Run `edgetl doctor` on the named device NAME, or on every device of @GROUP (@all: every
    device), --parallel N at a time, and print one row per device: architecture, CPU, the device
    profile that fits, the runtimes installed, what int8 can be expected to do there (faster,
    uncertain, not-faster), edgetl's version. The facts are kept in the inventory (as
    `edgetl device add --check` does) unless --no-record.

    A device that cannot be reached, or whose edgetl fails, is a row with its one-line error and
    does not stop the others; the exit code is then 1.

    \b
    Output: a table on a terminal, tab-separated lines in a pipe (device, status, arch, cpu,
    profile, runtimes, int8, edgetl, error), or --json: {"schema": "edgetl.device.doctor", "group",
    "parallel", "failed", "results": [{"device", "target", "ok", "error", "seconds", "edgetl",
    "summary", "doctor"}, ...]}.

    \b
    Example:
      edgetl device doctor pi4
      edgetl device doctor @lab --parallel 8 --json
    """
    from edgetl.device.fleet import doctor_group, group_devices
    from edgetl.device.inventory import get_device

    fmt = resolve_format(output_format, as_json)
    if target.startswith("@"):
        devices, path = group_devices(target)
        if path is not None:
            raise click.UsageError(f"doctor takes NAME or @GROUP, without a path ({target})")
    else:
        devices = [get_device(target)]
    records = doctor_group(
        devices,
        overrides=overrides_from(ctx, identity, ssh_config, remote_edgetl),
        parallel=parallel,
        record_facts=not no_record,
        on_done=_reporter(not no_progress and len(devices) > 1, len(devices)),
    )
    if fmt != "json":
        rows = []
        for rec in records:
            s = rec["summary"] or {}
            runtimes = s.get("runtimes") or {}
            rows.append(
                (
                    rec["device"],
                    _status(rec),
                    s.get("arch") or "",
                    s.get("cpu") or "",
                    s.get("profile") or "",
                    ", ".join(f"{k} {v}" for k, v in runtimes.items()) if fmt == "table" else ",".join(runtimes),
                    s.get("int8") or "",
                    rec["edgetl"] or "",
                    _error(rec),
                )
            )
        emit_table(
            fmt,
            DOCTOR_COLUMNS,
            rows,
            title=_group_title("edgetl doctor", target, records),
            whole=("device",),
        )
    document = envelope(
        "device.doctor",
        records,
        group=target if target.startswith("@") else None,
        parallel=parallel,
        failed=sum(not r["ok"] for r in records),
    )
    _finish(ctx, fmt, document, records)


COMMANDS: list = []  # doctor joins `edgetl device` (fleet_cmds); deploy and bench call the functions above
