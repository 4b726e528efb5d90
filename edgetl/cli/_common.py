"""What every command shares: one-line errors, JSON on stdout, logs and progress on stderr."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from edgetl.cli._output import emit_json, error_document, format_option  # noqa: F401  (re-exported)
from edgetl.core.errors import ConfigError, EdgetlError

# Exit codes (docs/json.md): 0 done, 1 a failure (data, bundle, export, device, disk), 2 a usage error
# (Click's own, and ConfigError: an option, recipe or profile value edgetl refuses), 130 interrupted.
EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    from edgetl.cli._output import clean_log

    class _Handler(RichHandler):
        def format(self, record: logging.LogRecord) -> str:
            # Log messages quote file and class names (untrusted): no control character reaches
            # the terminal raw.
            return clean_log(super().format(record))

    root = logging.getLogger("edgetl")
    if not any(getattr(h, "_edgetl", False) for h in root.handlers):
        handler = _Handler(console=Console(stderr=True), show_time=False, show_path=False)
        handler._edgetl = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


def command_name(ctx: click.Context | None) -> str:
    """``edgetl data digits`` -> ``data.digits`` (the JSON schema name after ``edgetl.``)."""
    if ctx is None:
        return "error"
    names = []
    while ctx.parent is not None:  # the root's name may be "python -m edgetl": leave it out
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    return ".".join(reversed(names)) or "main"


def json_requested(ctx: click.Context | None) -> bool:
    params = ctx.params if ctx is not None else {}
    return bool(params.get("as_json")) or params.get("output_format") == "json"


def report_error(ctx: click.Context | None, exc_type: str, message: str, exit_code: int) -> None:
    """The one error line on stderr, and under --json the error document on stdout (or, when a
    streamed document is open, the error closes it: see predict)."""
    from edgetl.cli._output import clean

    click.echo(f"Error: {clean(message)}", err=True)  # a name in the message is user data
    if json_requested(ctx):
        close = ctx.meta.get("edgetl.close_json_with_error") if ctx is not None else None
        error = {"type": exc_type, "message": message, "exit_code": exit_code}
        if close is not None:
            close(error)
        else:
            emit_json(error_document(command_name(ctx), exc_type, message, exit_code))
    sys.exit(exit_code)


def handle_errors(func: Callable) -> Callable:
    """Turn library errors into a one-line message and an exit code: 2 for ConfigError (a usage
    error: the option, recipe or profile value is refused), 1 for every other failure."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context(silent=True)
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            report_error(ctx, type(exc).__name__, str(exc), EXIT_USAGE)
        except EdgetlError as exc:
            report_error(ctx, type(exc).__name__, str(exc), EXIT_FAILURE)
        except click.UsageError as exc:
            report_error(ctx, "UsageError", exc.format_message(), EXIT_USAGE)
        except BrokenPipeError:
            quiet_broken_pipe()
        except OSError as exc:
            # The machine, not the input: a full disk, a read-only folder, a vanished file. The
            # writers are atomic, so nothing half-written is left; say what and where.
            where = f" ({exc.filename})" if exc.filename else ""
            report_error(ctx, "OSError", f"{exc.strerror or exc}{where}", EXIT_FAILURE)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(EXIT_INTERRUPTED)

    return wrapper


def quiet_broken_pipe() -> None:
    """The reader went away (``edgetl predict ... | head``): stop quietly, as ``cat`` does (exit 141 =
    128 + SIGPIPE), and keep Python from complaining when it flushes stdout at exit."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    sys.exit(141)


def common_options(func: Callable) -> Callable:
    """``-v/--verbose``, ``-q/--quiet`` and ``--no-progress`` on a command (the group has -v/-q too,
    so both ``edgetl -v predict`` and ``edgetl predict -v`` work). The command receives
    ``no_progress`` (set by -q too) only if it has that parameter."""
    import inspect

    wants_progress = "no_progress" in inspect.signature(func).parameters

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        verbose, quiet = kwargs.pop("verbose", False), kwargs.pop("quiet", False)
        no_progress = kwargs.pop("no_progress", False) or quiet
        if verbose or quiet:
            setup_logging(verbose, quiet)
        ctx = click.get_current_context(silent=True)
        if ctx is not None:
            ctx.meta["edgetl.progress"] = not no_progress
        if wants_progress:
            kwargs["no_progress"] = no_progress
        return func(*args, **kwargs)

    options = [
        click.option("-v", "--verbose", is_flag=True, help="Debug logging on stderr."),
        click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only on stderr; no progress bars."),
        click.option("--no-progress", is_flag=True, help="No progress bars (stderr, on a terminal only)."),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


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


def make_remote(
    target: str,
    identity: str | None,
    ssh_config: str | None,
    remote_edgetl: str,
    *,
    purpose: str = "bundle",
    bundle: str | None = None,
):
    """The Remote for a TARGET text: an ssh target, a device name or NAME:PATH (docs/devices.md)."""
    from edgetl.cli.fleet_cmds import make_remote_for

    return make_remote_for(target, identity, ssh_config, remote_edgetl, purpose=purpose, bundle=bundle)


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


def renamed_option(old_flag: str, param: str, new_flag: str, **option_kwargs: Any) -> Callable:
    """Keep an old option name working after a rename: a hidden ``old_flag`` whose value goes to
    ``param`` (unless the new ``new_flag`` was given too) with a one-line deprecation warning.

    Apply it above the command's function like any option; ``option_kwargs`` give the old flag's type.
    """

    def decorator(func: Callable) -> Callable:
        hidden = f"{param}__renamed"

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            old = kwargs.pop(hidden, None)
            if old is not None and old != () and old is not False:
                click.echo(f"Warning: {old_flag} is deprecated and will be removed; use {new_flag}.", err=True)
                if kwargs.get(param) in (None, (), False):
                    kwargs[param] = old
            return func(*args, **kwargs)

        return click.option(old_flag, hidden, hidden=True, default=None, **option_kwargs)(wrapper)

    return decorator
