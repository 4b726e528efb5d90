"""How results reach stdout: one JSON envelope, or a table on a terminal, or tab-separated lines in a pipe.

Every command that prints results takes ``--format table|tsv|json`` (``--json`` is ``--format json``).
The default is ``table`` when stdout is a terminal and ``tsv`` otherwise, so a script sees lines that
never wrap and have the same shape whatever the number of rows. JSON documents share one envelope
(see docs/json.md): ``{"schema": "edgetl.<command>", "schema_version": N, "edgetl": VERSION,
...context..., "results": [...]}``; an error under JSON is ``{..., "error": {"type", "message",
"exit_code"}}`` on stdout as well as the one line on stderr.

rich is imported only inside the functions (``--help`` stays fast).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any

import click

from edgetl import __version__

FORMATS = ("table", "tsv", "json")
# One version per document; raise a command's number when its JSON changes incompatibly, and say so
# in docs/json.md. Commands not listed are at 1.
SCHEMA_VERSIONS: dict[str, int] = {}


def schema_version(command: str) -> int:
    return SCHEMA_VERSIONS.get(command, 1)


def envelope(command: str, results: list[Any], **context: Any) -> dict[str, Any]:
    """The one JSON document shape: schema, version, edgetl's version, context, then ``results``."""
    doc: dict[str, Any] = {
        "schema": f"edgetl.{command}",
        "schema_version": schema_version(command),
        "edgetl": __version__,
    }
    doc.update(context)
    doc["results"] = results
    return doc


def error_document(command: str, exc_type: str, message: str, exit_code: int) -> dict[str, Any]:
    return {
        "schema": f"edgetl.{command}",
        "schema_version": schema_version(command),
        "edgetl": __version__,
        "error": {"type": exc_type, "message": message, "exit_code": exit_code},
    }


def format_option(func):
    """``--format table|tsv|json`` and ``--json`` (the same as ``--format json``); the command gets
    ``output_format`` already resolved (see :func:`resolve_format`)."""
    func = click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="Print one JSON document on stdout (the same as --format json; logs go to stderr).",
    )(func)
    func = click.option(
        "--format",
        "output_format",
        type=click.Choice(FORMATS),
        default=None,
        help="Output: table (default on a terminal), tsv (default in a pipe: tab-separated lines with a "
        "header, never wrapped) or json (see docs/json.md).",
    )(func)
    return func


def resolve_format(output_format: str | None, as_json: bool) -> str:
    if as_json:
        if output_format not in (None, "json"):
            raise click.UsageError(f"--json and --format {output_format} disagree; give one of them")
        return "json"
    if output_format is not None:
        return output_format
    return "table" if stdout_is_terminal() else "tsv"


def stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def emit_json(obj: Any) -> None:
    """One strict JSON document on stdout: a NaN or infinity anywhere is written as null (Python's
    ``NaN`` is not JSON: ``jq`` and every other parser refuse it)."""
    from edgetl.core.jsonio import dumps

    click.echo(dumps(obj, indent=2, default=str))


# Characters shown escaped wherever untrusted text is printed: the C0 and C1 control characters and
# DEL (a terminal acts on ESC, on the 8-bit CSI U+009B, on BEL ...), and the bidirectional controls
# (U+202E and its kin reorder what is shown: "Trojan Source"). TSV also escapes the tab, the line
# breaks and the backslash (its escape character); log lines keep their line breaks.
_BIDI_CONTROLS = (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
_TERMINAL_CONTROL = {
    **{i: f"\\x{i:02x}" for i in (*range(0x20), 0x7F, *range(0x80, 0xA0))},
    **{i: f"\\u{i:04x}" for i in _BIDI_CONTROLS},
}
_CONTROL = {**_TERMINAL_CONTROL, ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r", ord("\\"): "\\\\"}
_LOG_CONTROL = {k: v for k, v in _TERMINAL_CONTROL.items() if k != ord("\n")}
# A spreadsheet reads a cell that starts with one of these as a formula (CSV injection).
_FORMULA_START = ("=", "+", "-", "@")


def text(value: Any) -> str:
    """A value as the text of a cell: ``None`` empty, booleans ``true``/``false`` (as in the JSON)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def tsv_cell(value: Any) -> str:
    """One TSV field (:func:`text`): tabs, newlines, other control characters and backslashes escaped
    (names come from user data: a file called ``a\\tb.png`` must not add a column)."""
    return text(value).translate(_CONTROL)


def tsv_line(cells: Iterable[Any]) -> str:
    return "\t".join(tsv_cell(c) for c in cells)


def csv_cell(value: Any) -> str:
    """One CSV field (:func:`text`): control characters escaped as :func:`clean` does (the csv module
    quotes commas and quotes), and text a spreadsheet would run as a formula (a cell starting with
    ``= + - @``) kept as text by a leading apostrophe, as OWASP advises. Numbers are left alone."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return text(value)
    cell = text(value).translate(_TERMINAL_CONTROL)
    return "'" + cell if cell.startswith(_FORMULA_START) else cell


def clean(value: Any) -> str:
    """Untrusted text (a file or label name) for a terminal line: control characters shown escaped."""
    return str(value).translate(_TERMINAL_CONTROL)


def clean_log(value: Any) -> str:
    """A log message for stderr: as :func:`clean`, but its line breaks kept (a message may have
    several lines; a name inside it has its newlines escaped wherever it was quoted with ``!r``)."""
    return str(value).translate(_LOG_CONTROL)


def plain(value: Any) -> Any:
    """Untrusted text for a rich table or line: no markup interpretation, control characters shown
    escaped."""
    from rich.text import Text

    return Text(clean(value))


def console(*, stderr: bool = False):
    """A rich console; on stdout in a pipe it never wraps lines (soft wrap)."""
    from rich.console import Console

    return Console(stderr=stderr, soft_wrap=not stderr and not stdout_is_terminal())


def emit_table(
    fmt: str,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    *,
    title: str | None = None,
    right: Sequence[str] = (),
    whole: Sequence[str] = (),
) -> None:
    """A table on stdout: rich on ``table``, else a header line and one tab-separated line per row.

    Cells and headers are shown as text (never as rich markup), control characters escaped, so
    names from user data print as they are.
    Columns in ``whole`` (names a user copies, such as variant names) are never broken across
    lines on a narrow terminal; the others give way.
    """
    if fmt == "tsv":
        click.echo(tsv_line(columns))
        for row in rows:
            click.echo(tsv_line(row))
        return
    from rich.table import Table

    table = Table(title=plain(title) if title else None)
    for col in columns:
        # A header can be a name from user data too (evaluate's confusion columns are class names).
        header = plain(col)
        table.add_column(header, justify="right" if col in right else "left", overflow="fold", no_wrap=col in whole)
    for row in rows:
        table.add_row(*(plain(c) for c in row))
    console().print(table)
