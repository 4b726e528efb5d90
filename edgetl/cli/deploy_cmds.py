"""`edgetl deploy`: copy a bundle to a device over SSH and verify it there (see edgetl.device.deploy)."""

from __future__ import annotations

import click

from edgetl.cli._common import common_options, handle_errors, ssh_options
from edgetl.cli._output import console, emit_json, emit_table, envelope, format_option, plain, resolve_format
from edgetl.cli.group_cmds import parallel_option

# deploy in a pipe (--format tsv): a header and one line (the check's overall status: ok, warn,
# fail, or empty without --check; its details go to stderr).
DEPLOY_COLUMNS = (
    "target",
    "where",
    "path",
    "files",
    "bytes",
    "archive_bytes",
    "sha256",
    "variants",
    "heads",
    "remote_edgetl",
    "copy_seconds",
    "copy_mb_per_s",
    "unpack_seconds",
    "seconds",
    "check",
)


@click.command()
@click.argument("bundle", type=click.Path())
@click.argument("target", metavar="TARGET")
@click.option(
    "--check",
    is_flag=True,
    help="Afterwards run `edgetl doctor` on the device: do its runtimes, int8 speed and device profile "
    "fit the bundle? Exits 1 if no runtime there can run it.",
)
@parallel_option
@ssh_options
@format_option
@common_options
@click.pass_context
@handle_errors
def deploy(
    ctx: click.Context,
    bundle: str,
    target: str,
    check: bool,
    parallel: int,
    identity: str | None,
    ssh_config: str | None,
    remote_edgetl: str,
    output_format: str | None,
    as_json: bool,
    no_progress: bool,
) -> None:
    """Copy BUNDLE to a device and verify it there; TARGET is user@host:PATH, ssh://user@host:port/PATH,
    or a named device: NAME (to NAME's bundle folder) or NAME:PATH (see edgetl device list), or
    @GROUP (every device of a group, --parallel N at a time, one row each; see docs/devices.md).

    Uses the system ssh client (your ~/.ssh/config, keys, agent and known_hosts); edgetl never
    turns host-key checking off. The bundle is packed, streamed to a temporary file beside PATH,
    unpacked by `edgetl unpack` on the device with every checksum verified, and only then renamed
    over an older bundle at PATH: an interrupted deploy leaves the old one intact. The device needs
    the runtime-only install (edgetl device setup, no torch). PATH is absolute or relative to the
    login's home.

    \b
    Example:
      edgetl deploy bundles/digits pi@raspberrypi.local:bundles/digits --check
      edgetl deploy bundles/digits ssh://me@nuc:2222/opt/models/digits --remote-edgetl '~/edgetl/bin/edgetl'
      edgetl bench pi@raspberrypi.local:bundles/digits --device-profile rpi4 --save
      edgetl deploy bundles/digits @lab --check --parallel 8
    """
    fmt = resolve_format(output_format, as_json)
    if target.startswith("@"):
        from edgetl.cli.group_cmds import deploy_to_group

        deploy_to_group(
            ctx,
            bundle,
            target,
            check=check,
            identity=identity,
            ssh_config=ssh_config,
            remote_edgetl=remote_edgetl,
            parallel=parallel,
            fmt=fmt,
            show_progress=not no_progress,
        )
        return
    if ctx.get_parameter_source("parallel") is click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("--parallel is for a group of devices (@GROUP)")
    from edgetl.cli.fleet_cmds import resolve_remote

    remote, resolved = resolve_remote(target, identity, ssh_config, remote_edgetl, purpose="deploy", bundle=bundle)
    doc = _deploy_with_progress(bundle, remote, check=check, show=not no_progress)
    if resolved.device is not None:
        from edgetl.device.inventory import record_deploy

        record_deploy(resolved.device.name, remote.target.path)  # `bench NAME` / `predict NAME` find it
    failed = None
    if "check" in doc and not doc["check"]["ok"]:
        failed = "; ".join(c["detail"] for c in doc["check"]["checks"] if c["status"] == "fail")
    document = envelope("deploy", [doc], bundle=bundle, target=str(remote.target))
    if fmt == "json" and failed:
        # The deploy happened: its record goes out with the error (exit 1), as one document.
        head = {k: v for k, v in document.items() if k != "results"}
        ctx.meta["edgetl.close_json_with_error"] = lambda error: emit_json(
            {**head, "error": error, "partial": True, "results": document["results"]}
        )
    elif fmt == "json":
        emit_json(document)
    elif fmt == "tsv":
        emit_table("tsv", DEPLOY_COLUMNS, [_deploy_cells(doc)])
        if "check" in doc:
            _print_check(doc["check"], stderr=True)
    else:
        console().print(
            plain(
                f"Deployed {doc['files']} files ({doc['bytes'] / 1e6:.1f} MB) to {doc['where']}:{doc['path']} "
                f"(edgetl {doc['remote_edgetl']} there): copy {doc['copy_seconds']:.1f} s "
                f"({doc['copy_mb_per_s'] or 0:.1f} MB/s), verify + unpack {doc['unpack_seconds']:.1f} s; "
                f"variants: {', '.join(doc['variants'])}"
            )
        )
        if "check" in doc:
            _print_check(doc["check"])
    if failed:
        from edgetl.core.errors import RemoteError

        raise RemoteError(f"deployed, but the device cannot use the bundle: {failed}")


def _check_status(check: dict | None) -> str:
    if check is None:
        return ""
    statuses = {c["status"] for c in check["checks"]}
    return "fail" if "fail" in statuses else "warn" if "warn" in statuses else "ok"


def _deploy_cells(doc: dict) -> list:
    return [
        doc["target"],
        doc["where"],
        doc["path"],
        doc["files"],
        doc["bytes"],
        doc["archive_bytes"],
        doc["sha256"],
        ",".join(doc["variants"]),
        ",".join(doc["heads"]),
        doc["remote_edgetl"],
        doc["copy_seconds"],
        "" if doc["copy_mb_per_s"] is None else doc["copy_mb_per_s"],
        doc["unpack_seconds"],
        doc["seconds"],
        _check_status(doc.get("check")),
    ]


def _deploy_with_progress(bundle: str, remote, *, check: bool, show: bool) -> dict:
    """Deploy with a copy progress bar on stderr (a terminal only, and not with --no-progress or -q)."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from edgetl.device.deploy import deploy as deploy_bundle

    err = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err,
        transient=True,
        disable=not show or not err.is_terminal,
    ) as progress:
        task = progress.add_task(f"copy to {remote.target.where}", total=None)

        def on_progress(stage: str, done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        return deploy_bundle(bundle, remote, check=check, on_progress=on_progress)


def _print_check(check: dict, *, stderr: bool = False) -> None:
    """The device and each check, one line each (names from the device shown as text)."""
    from rich.text import Text

    marks = {"ok": ("ok  ", "green"), "warn": ("warn", "yellow"), "fail": ("FAIL", "red")}
    out = console(stderr=stderr)
    m = check["machine"]
    out.print(
        plain(
            f"Device: {m.get('cpu')} ({m.get('arch')}, {m.get('logical_cores')} cores), "
            f"{m.get('os')} {m.get('kernel')}, python {m.get('python')}"
        )
    )
    for c in check["checks"]:
        mark, style = marks.get(c["status"], (str(c["status"]), ""))
        line = Text("  ")
        line.append(mark, style=style)
        line.append(" ")
        line.append(plain(f"{c['check']:<9} {c['detail']}"))
        out.print(line)


COMMANDS = [deploy]
