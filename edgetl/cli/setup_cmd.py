"""`edgetl device setup`: install this edgetl's device runtime on a device over ssh (see edgetl.device.setup).

``COMMANDS`` is empty: the command joins the ``device`` group (edgetl/cli/fleet_cmds.py).
"""

from __future__ import annotations

import click

from edgetl.cli._common import common_options, handle_errors, parse_list, ssh_options
from edgetl.cli._output import console, emit_json, emit_table, envelope, format_option, plain, resolve_format

# setup in a pipe (--format tsv): a header and one line.
SETUP_COLUMNS = (
    "target",
    "action",
    "version",
    "previous_version",
    "mode",
    "extras",
    "venv",
    "remote_edgetl",
    "arch",
    "python_version",
    "glibc",
    "files_copied",
    "bytes_copied",
    "profile",
    "seconds",
)


@click.command("setup", short_help="Install this edgetl's runtime on a device over ssh (online or --offline).")
@click.argument("target", metavar="TARGET")
@click.option(
    "--venv",
    default="edgetl",
    show_default=True,
    metavar="PATH",
    help="Where the venv goes on the device: absolute, or relative to the login's home. It is a symlink "
    "to a versioned venv beside it (.NAME.venvs/VERSION-TOKEN), so an upgrade swaps it in one step.",
)
@click.option(
    "--extras",
    default=None,
    metavar="LIST",
    help="Device extras to install besides ONNX Runtime, comma-separated: openvino, litert, ncnn (runtimes), "
    "serve (`edgetl serve`).",
)
@click.option(
    "--offline",
    is_flag=True,
    help="The device has no index: this machine downloads the wheels for the device's platform and "
    "Python, copies them, and the device installs with --no-index.",
)
@click.option(
    "--wheelhouse",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    metavar="DIR",
    help="With --offline: use the wheels in DIR as they are (no download, e.g. on an air-gapped "
    "workstation); a package without a wheel for the device is named before anything is copied.",
)
@click.option(
    "--name",
    default=None,
    metavar="NAME",
    help="Save the device under NAME in your inventory (edgetl device list), with the venv's edgetl as its "
    "remote edgetl: then `edgetl deploy BUNDLE NAME` and `edgetl bench NAME`.",
)
@ssh_options
@format_option
@common_options
@click.pass_context
@handle_errors
def setup(
    ctx: click.Context,
    target: str,
    venv: str,
    extras: str | None,
    offline: bool,
    wheelhouse: str | None,
    name: str | None,
    identity: str | None,
    ssh_config: str | None,
    remote_edgetl: str,
    output_format: str | None,
    as_json: bool,
    no_progress: bool,
) -> None:
    """Install this edgetl's device runtime (no torch) on TARGET: [user@]host or ssh://user@host:port.

    Uses the system ssh client (your ~/.ssh/config, keys, agent and known_hosts); host-key checking
    is never turned off. Reads the device's facts (architecture, Python, glibc, free disk, python3-venv),
    builds edgetl's wheel here, copies it (with --offline, with every dependency's wheel for the
    device) and checks every file's sha256 there, installs into a new venv, runs `edgetl doctor` from
    it, and only then switches --venv to it. Re-running with the same version does nothing; a failed
    upgrade leaves the old venv working. Afterwards use the printed command as --remote-edgetl.

    \b
    Example:
      edgetl device setup pi@raspberrypi.local --extras litert,ncnn --name pi4
      edgetl device setup pi@raspberrypi.local --offline --extras litert --name pi4
      edgetl deploy bundles/digits pi4 --check
      edgetl bench pi4
    """
    from pathlib import Path

    from click.core import ParameterSource

    from edgetl.device.remote import Remote
    from edgetl.device.setup import parse_host_target, setup_device

    fmt = resolve_format(output_format, as_json)
    if ctx.get_parameter_source("remote_edgetl") is ParameterSource.COMMANDLINE:
        raise click.UsageError("--remote-edgetl does not apply to setup: setup installs edgetl and prints its command")
    if wheelhouse is not None and not offline:
        raise click.UsageError("--wheelhouse is for --offline installs: add --offline")
    remote = Remote(parse_host_target(target), identity=identity, ssh_config=ssh_config)
    if name is not None:
        from edgetl.device.inventory import check_name

        check_name(name)  # before the install, not after it
    err = console(stderr=True)

    def progress(message: str) -> None:
        if not no_progress:
            err.print(plain(f"· {message}"), style="dim")

    record = setup_device(
        remote,
        venv=venv,
        extras=parse_list(extras) or [],
        offline=offline,
        wheelhouse=Path(wheelhouse) if wheelhouse else None,
        progress=progress,
    )
    if name is not None:
        from edgetl.device.inventory import inventory_path, update_device

        update_device(
            name,
            target=record["target"],
            venv=record["venv"],
            remote_edgetl=record["remote_edgetl"],
            edgetl_version=record["version"],
            facts=dict(record["facts"]),
            **({"profile": record["doctor"]["profile"]} if record["doctor"].get("profile") else {}),
            **{
                k: str(Path(v).expanduser().resolve())
                for k, v in (("ssh_config", ssh_config), ("identity", identity))
                if v
            },
        )
        record["name"] = name
        progress(f"saved as device {name} in {inventory_path()}: deploy and bench by name")
    if fmt == "json":
        emit_json(envelope("device.setup", [record], target=record["target"]))
    elif fmt == "tsv":
        emit_table("tsv", SETUP_COLUMNS, [_cells(record)])
    else:
        _print_record(record)


# ssh_options brings --remote-edgetl too: setup installs edgetl and prints that command, so the
# option is hidden here (and refused when given).
for _param in setup.params:
    if _param.name == "remote_edgetl":
        _param.hidden = True


def _cells(r: dict) -> list:
    return [
        r["target"],
        r["action"],
        r["version"],
        r["previous_version"],
        r["mode"],
        ",".join(r["extras"]),
        r["venv"],
        r["remote_edgetl"],
        r["facts"]["arch"],
        r["facts"]["python_version"],
        r["facts"]["glibc"],
        r["files_copied"],
        r["bytes_copied"],
        r["doctor"]["profile"],
        r["seconds"]["total"],
    ]


def _print_record(r: dict) -> None:
    out = console()
    f, d = r["facts"], r["doctor"]
    head = {
        "unchanged": f"edgetl {r['version']} was already installed on {r['where']}: nothing to do.",
        "installed": f"Installed edgetl {r['version']} on {r['where']} ({r['mode']}).",
        "upgraded": f"Replaced edgetl {r['previous_version']} with {r['version']} on {r['where']} ({r['mode']}).",
    }[r["action"]]
    out.print(plain(head))
    out.print(plain(f"  device:   {f['arch']}, Python {f['python_version']}, glibc {f['glibc']}"))
    out.print(plain(f"  venv:     {r['venv']} -> {r['venv_dir']}"))
    if r["files_copied"]:
        out.print(plain(f"  copied:   {r['files_copied']} files, {r['bytes_copied'] / 1e6:.1f} MB"))
    runtimes = ", ".join(f"{k} {v}" for k, v in d["runtimes"].items()) or "none"
    out.print(plain(f"  doctor:   profile {d['profile'] or '(none fits)'}; runtimes: {runtimes}"))
    for w in d["warnings"]:
        out.print(plain(f"  warning:  {w}"))
    out.print(plain(f"  took:     {r['seconds']['total']:.1f} s"))
    out.print(plain(f"Use it with: --remote-edgetl {r['remote_edgetl']}"))


COMMANDS: list = []
