"""`edgetl pack` and `edgetl unpack`: one file to copy to the device (see edgetl.device.pack)."""

from __future__ import annotations

import click

from edgetl.cli._common import common_options, format_option, handle_errors
from edgetl.cli._output import emit_json, envelope, resolve_format, tsv_cell


class _OldPositional(click.Argument):
    """The output as a positional argument, as before `--out`: still accepted (with a warning), not
    shown in the usage line."""

    def get_usage_pieces(self, ctx: click.Context) -> list[str]:
        return []


def _output(out: str | None, positional: str | None, what: str) -> str:
    """``--out``, or the deprecated positional output (one warning line); both or neither: usage error."""
    if out is not None and positional is not None:
        raise click.UsageError(f"the {what} is given twice ({positional} and --out {out}); give only --out")
    if out is None and positional is None:
        raise click.UsageError(f"missing --out: the {what} to write")
    if positional is not None:
        click.echo(
            f"Warning: the {what} as a positional argument is deprecated and will be removed; use --out {positional}.",
            err=True,
        )
        return positional
    assert out is not None
    return out


@click.command()
@click.argument("bundle", type=click.Path())
@click.argument("out_positional", required=False, type=click.Path(), cls=_OldPositional)
@click.option("--out", "out", type=click.Path(), default=None, metavar="FILE", help="The archive to write (.tar.gz).")
@click.option("--force", is_flag=True, help="Replace the archive if it exists.")
@format_option
@common_options
@handle_errors
def pack(
    bundle: str, out_positional: str | None, out: str | None, force: bool, output_format: str | None, as_json: bool
) -> None:
    """Verify the bundle BUNDLE and pack it into one gzip tar, to copy to a device.

    Only the files the manifest lists are packed. The archive is reproducible: the same bundle
    gives the same bytes (and sha256) every time. The full sha256 is printed last on the line;
    `unpack --sha256` checks it on the device.

    \b
    Example:
      edgetl pack bundles/digits --out digits.tar.gz
      scp digits.tar.gz pi@raspberrypi: && ssh pi@raspberrypi edgetl unpack digits.tar.gz --out bundles/digits
      (`edgetl deploy bundles/digits pi@raspberrypi:bundles/digits` does all of this in one step)
    """
    from edgetl.device.pack import pack_bundle

    fmt = resolve_format(output_format, as_json)
    target = _output(out, out_positional, "archive")
    doc = pack_bundle(bundle, target, force=force)
    if fmt == "json":
        emit_json(envelope("pack", [doc], bundle=str(bundle)))
    else:
        click.echo(
            f"Packed {doc['files']} files ({doc['bytes'] / 1e6:.1f} MB) into {tsv_cell(doc['archive'])} "
            f"({doc['archive_bytes'] / 1e6:.1f} MB); sha256 {doc['sha256']}"
        )


@click.command()
@click.argument("archive", type=click.Path())
@click.argument("dest_positional", required=False, type=click.Path(), cls=_OldPositional)
@click.option("--out", "out", type=click.Path(), default=None, metavar="DIR", help="The bundle folder to write.")
@click.option("--force", is_flag=True, help="Replace the bundle folder (a bundle) once the new one is verified.")
@click.option(
    "--max-size",
    "max_mb",
    type=click.IntRange(min=1),
    default=4096,
    show_default=True,
    help="Refuse archives that unpack to more than this many MB.",
)
@click.option(
    "--sha256",
    "sha256",
    default=None,
    metavar="HEX",
    help="The archive's expected sha256 (the 64 hex digits `pack` prints); checked before anything is extracted.",
)
@format_option
@common_options
@handle_errors
def unpack(
    archive: str,
    dest_positional: str | None,
    out: str | None,
    force: bool,
    max_mb: int,
    sha256: str | None,
    output_format: str | None,
    as_json: bool,
) -> None:
    """Safely unpack ARCHIVE (from `edgetl pack`) into a bundle folder and verify every checksum.

    Refused: absolute paths, `..`, links, devices, files the manifest does not list, a checksum
    that does not match. Nothing is written unless the whole bundle verifies.

    \b
    Example:
      edgetl unpack digits.tar.gz --out bundles/digits
      edgetl unpack digits.tar.gz --out bundles/digits --sha256 HEX   # HEX: what `pack` printed
    """
    from edgetl.device.pack import unpack_bundle

    fmt = resolve_format(output_format, as_json)
    dest = _output(out, dest_positional, "bundle folder")
    doc = unpack_bundle(archive, dest, force=force, max_bytes=max_mb * 1024 * 1024, sha256=sha256)
    if fmt == "json":
        emit_json(envelope("unpack", [doc], archive=str(archive), bundle=str(dest)))
    else:
        click.echo(
            f"Unpacked and verified {doc['files']} files into {tsv_cell(doc['bundle'])} "
            f"(variants: {', '.join(map(tsv_cell, doc['variants']))}; heads: {', '.join(map(tsv_cell, doc['heads']))})"
        )


COMMANDS = [pack, unpack]
