"""What every command shares: one-line errors, JSON on stdout, logs and progress on stderr."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from edgetl.core.errors import EdgetlError

json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON document on stdout (logs go to stderr)."
)


def setup_logging(verbose: bool = False) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    root = logging.getLogger("edgetl")
    if not any(getattr(h, "_edgetl", False) for h in root.handlers):
        handler = RichHandler(console=Console(stderr=True), show_time=False, show_path=False)
        handler._edgetl = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def handle_errors(func: Callable) -> Callable:
    """Turn library errors into a one-line message and exit code 1 (2 is Click's usage error)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except EdgetlError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(1)
        except OSError as exc:
            # The machine, not the input: a full disk, a read-only folder, a vanished file. The
            # writers are atomic, so nothing half-written is left; say what and where.
            where = f" ({exc.filename})" if exc.filename else ""
            click.echo(f"Error: {exc.strerror or exc}{where}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)

    return wrapper


def emit_json(obj: Any) -> None:
    """One strict JSON document on stdout: a NaN or infinity anywhere is written as null (Python's
    ``NaN`` is not JSON: ``jq`` and every other parser refuse it)."""
    from edgetl.core.jsonio import dumps

    click.echo(dumps(obj, indent=2, default=str))


def parse_list(value: str | None) -> list[str] | None:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    return items or None


def ssh_options(func: Callable) -> Callable:
    """--identity, --ssh-config and --remote-edgetl: how to reach a device and run edgetl there."""
    options = [
        click.option(
            "--identity",
            "-i",
            "identity",
            type=click.Path(dir_okay=False),
            default=None,
            metavar="KEY",
            help="SSH private key for the device (ssh -i). Default: your ssh config, agent and keys.",
        ),
        click.option(
            "--ssh-config",
            "ssh_config",
            type=click.Path(dir_okay=False),
            default=None,
            metavar="FILE",
            help="SSH config file to use instead of ~/.ssh/config (ssh -F).",
        ),
        click.option(
            "--remote-edgetl",
            "remote_edgetl",
            default="edgetl",
            show_default=True,
            metavar="CMD",
            envvar="EDGETL_REMOTE_EDGETL",
            help="How to run edgetl on the device when it is not on its PATH, e.g. "
            "'~/edgetl/bin/edgetl' or 'python3 -m edgetl' (or set EDGETL_REMOTE_EDGETL).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def make_remote(target: str, identity: str | None, ssh_config: str | None, remote_edgetl: str):
    from edgetl.device.remote import Remote, parse_target

    return Remote(parse_target(target), identity=identity, ssh_config=ssh_config, edgetl=remote_edgetl)


def forwarded_args(ctx: click.Context, *, exclude: tuple[str, ...] = ()) -> list[str]:
    """The options given on this command line, as words for the same command on a device.

    Derived from the command's own parameters, so a new option travels without editing a list:
    each option the user gave (not a default, not an environment variable) becomes its first long
    flag with the parsed value (lists as ``1,2``); ``--x/--no-x`` switches say which; flags as flags.
    """
    from click.core import ParameterSource

    from edgetl.device.remote import remote_args

    flags: dict[str, str] = {}
    values: dict[str, Any] = {}
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name is None or param.name in exclude:
            continue
        if ctx.get_parameter_source(param.name) is not ParameterSource.COMMANDLINE:
            continue
        flag = next(o for o in param.opts if o.startswith("--"))
        if param.is_bool_flag and param.secondary_opts:
            flag += "/" + param.secondary_opts[0]
        flags[param.name], values[param.name] = flag, ctx.params[param.name]
    return remote_args(values, flags)
