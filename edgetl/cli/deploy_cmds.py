"""`edgetl deploy`: copy a bundle to a device over SSH and verify it there (see edgetl.device.deploy)."""

from __future__ import annotations

import click

from edgetl.cli._common import emit_json, handle_errors, json_option, make_remote, ssh_options


@click.command()
@click.argument("bundle", type=click.Path())
@click.argument("target", metavar="TARGET")
@click.option(
    "--check",
    is_flag=True,
    help="Afterwards run `edgetl doctor` on the device: do its runtimes, int8 speed and device profile "
    "fit the bundle? Exits 1 if no runtime there can run it.",
)
@ssh_options
@json_option
@handle_errors
def deploy(
    bundle: str,
    target: str,
    check: bool,
    identity: str | None,
    ssh_config: str | None,
    remote_edgetl: str,
    as_json: bool,
) -> None:
    """Copy BUNDLE to a device and verify it there; TARGET is user@host:PATH or ssh://user@host:port/PATH.

    Uses the system ssh client (your ~/.ssh/config, keys, agent and known_hosts); edgetl never
    turns host-key checking off. The bundle is packed, streamed to a temporary file beside PATH,
    unpacked by `edgetl unpack` on the device with every checksum verified, and only then renamed
    over an older bundle at PATH: an interrupted deploy leaves the old one intact. The device needs
    the runtime-only install (pip install edgetl, no torch). PATH is absolute or relative to the
    login's home.

    \b
    Example:
      edgetl deploy bundles/digits pi@raspberrypi.local:bundles/digits --check
      edgetl deploy bundles/digits ssh://me@nuc:2222/opt/models/digits --remote-edgetl '~/edgetl/bin/edgetl'
      edgetl bench pi@raspberrypi.local:bundles/digits --device-profile rpi4 --save
    """
    remote = make_remote(target, identity, ssh_config, remote_edgetl)
    doc = _deploy_with_progress(bundle, remote, check=check, show=not as_json)
    if as_json:
        emit_json(doc)
    else:
        click.echo(
            f"Deployed {doc['files']} files ({doc['bytes'] / 1e6:.1f} MB) to {doc['where']}:{doc['path']} "
            f"(edgetl {doc['remote_edgetl']} there): copy {doc['copy_seconds']:.1f} s "
            f"({doc['copy_mb_per_s'] or 0:.1f} MB/s), verify + unpack {doc['unpack_seconds']:.1f} s; "
            f"variants: {', '.join(doc['variants'])}"
        )
        if "check" in doc:
            _print_check(doc["check"])
    if "check" in doc and not doc["check"]["ok"]:
        failed = "; ".join(c["detail"] for c in doc["check"]["checks"] if c["status"] == "fail")
        from edgetl.core.errors import RemoteError

        raise RemoteError(f"deployed, but the device cannot use the bundle: {failed}")


def _deploy_with_progress(bundle: str, remote, *, check: bool, show: bool) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from edgetl.device.deploy import deploy as deploy_bundle

    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as progress:
        task = progress.add_task(f"copy to {remote.target.where}", total=None)

        def on_progress(stage: str, done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        return deploy_bundle(bundle, remote, check=check, on_progress=on_progress)


def _print_check(check: dict) -> None:
    marks = {"ok": "[green]ok[/green]  ", "warn": "[yellow]warn[/yellow]", "fail": "[red]FAIL[/red]"}
    from rich.console import Console

    console = Console()
    m = check["machine"]
    console.print(
        f"Device: {m.get('cpu')} ({m.get('arch')}, {m.get('logical_cores')} cores), "
        f"{m.get('os')} {m.get('kernel')}, python {m.get('python')}",
        highlight=False,
    )
    for c in check["checks"]:
        console.print(f"  {marks[c['status']]} {c['check']:<9} {c['detail']}", highlight=False)


COMMANDS = [deploy]
