"""`edgetl pack` and `edgetl unpack`: one file to copy to the device (see edgetl.device.pack)."""

from __future__ import annotations

import click

from edgetl.cli._common import emit_json, handle_errors, json_option


@click.command()
@click.argument("bundle", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@json_option
@handle_errors
def pack(bundle: str, out: str, force: bool, as_json: bool) -> None:
    """Verify the bundle BUNDLE and pack it into the gzip tar OUT, to copy to a device.

    \b
    Example:
      edgetl pack bundles/digits digits.tar.gz
      scp digits.tar.gz pi@raspberrypi: && ssh pi@raspberrypi edgetl unpack digits.tar.gz bundles/digits
      (`edgetl deploy bundles/digits pi@raspberrypi:bundles/digits` does all of this in one step)
    """
    from edgetl.device.pack import pack_bundle

    doc = pack_bundle(bundle, out, force=force)
    if as_json:
        emit_json(doc)
    else:
        click.echo(
            f"Packed {doc['files']} files ({doc['bytes'] / 1e6:.1f} MB) into {doc['archive']} "
            f"({doc['archive_bytes'] / 1e6:.1f} MB, sha256 {doc['sha256'][:16]}...)"
        )


@click.command()
@click.argument("archive", type=click.Path())
@click.argument("dest", type=click.Path())
@click.option("--force", is_flag=True, help="Replace DEST if it exists (only once the new bundle is verified).")
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
    help="The archive's expected sha256 (`pack --json` prints it); checked before anything is extracted.",
)
@json_option
@handle_errors
def unpack(archive: str, dest: str, force: bool, max_mb: int, sha256: str | None, as_json: bool) -> None:
    """Safely unpack ARCHIVE (from `edgetl pack`) into the bundle folder DEST and verify every checksum.

    Refused: absolute paths, `..`, links, devices, files the manifest does not list, a checksum
    that does not match. Nothing is written to DEST unless the whole bundle verifies.

    \b
    Example:
      edgetl unpack digits.tar.gz bundles/digits
    """
    from edgetl.device.pack import unpack_bundle

    doc = unpack_bundle(archive, dest, force=force, max_bytes=max_mb * 1024 * 1024, sha256=sha256)
    if as_json:
        emit_json(doc)
    else:
        click.echo(
            f"Unpacked and verified {doc['files']} files into {doc['bundle']} "
            f"(variants: {', '.join(doc['variants'])}; heads: {', '.join(doc['heads'])})"
        )


COMMANDS = [pack, unpack]
