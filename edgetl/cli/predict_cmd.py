"""`edgetl predict`: the device side, no torch (see edgetl.device.bundle_loading, edgetl.device.images)."""

from __future__ import annotations

import click

from edgetl.cli._common import forwarded_args, handle_errors, json_option, make_remote, ssh_options
from edgetl.cli._runtime_options import (
    SSH_OPTIONS,
    head_option,
    ov_device_option,
    profile_option,
    provider_option,
    runtime_option,
)
from edgetl.cli._tables import print_summary, stream_table
from edgetl.core.formats import PRECISIONS
from edgetl.device.limits import MAX_BATCH_SIZE, MAX_STREAMS, MAX_THREADS


@click.command()
@click.argument("bundle", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@runtime_option
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default=None,
    help="Variant precision. Default: the profile's, else fp32 if the bundle has it.",
)
@click.option(
    "--top-k",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Best classes to report per image (at most the number of labels).",
)
@head_option
@click.option(
    "--batch-size",
    type=click.IntRange(1, MAX_BATCH_SIZE),
    default=32,
    show_default=True,
    help="Images per inference call (memory holds one batch).",
)
@click.option(
    "--threads", type=click.IntRange(1, MAX_THREADS), default=None, help="Intra-op threads (default: the runtime's)."
)
@provider_option
@ov_device_option
@click.option("--streams", type=click.IntRange(1, MAX_STREAMS), default=None, help="OpenVINO streams.")
@profile_option
@json_option
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV on stdout: image, head, label, score, top_k.")
@ssh_options
@click.pass_context
@handle_errors
def predict(
    ctx: click.Context,
    bundle: str,
    images: tuple[str, ...],
    runtime: str | None,
    precision: str | None,
    top_k: int,
    head: str | None,
    batch_size: int,
    threads: int | None,
    provider: str | None,
    ov_device: str | None,
    streams: int | None,
    device_profile: str | None,
    as_json: bool,
    as_csv: bool,
    identity: str | None,
    ssh_config: str | None,
    remote_edgetl: str,
) -> None:
    """Classify image files, or every image in folders (recursively), with a bundle.

    Folders of any size stream through in batches: results are printed as they come and memory
    holds one batch. Unreadable images are skipped and listed on stderr; a summary (images/s,
    time split, images per label) ends on stderr. With --head all, each image gets one result per
    head. --json prints one JSON list, --csv one CSV table.

    BUNDLE may be on a device (user@host:PATH or ssh://user@host:port/PATH, see `edgetl deploy`):
    edgetl runs there over ssh, IMAGES are paths on the device, and the output streams back.

    \b
    Example:
      edgetl predict bundles/digits img.png photos/ --top-k 3
      edgetl predict bundles/parts /mnt/camera/ --precision int8 --head all --csv > results.csv
      edgetl predict pi@raspberrypi.local:bundles/parts /home/pi/camera/ --json > results.json
    """
    from edgetl.core.errors import ConfigError
    from edgetl.device.remote import is_remote

    if as_json and as_csv:
        raise ConfigError("choose one of --json and --csv")
    if is_remote(bundle):
        _predict_remote(
            make_remote(bundle, identity, ssh_config, remote_edgetl), images, forwarded_args(ctx, exclude=SSH_OPTIONS)
        )
        return
    from edgetl.device.bundle_loading import LoadOptions, open_bundle
    from edgetl.device.images import PredictionStream
    from edgetl.device.profiles import apply_profile

    given = LoadOptions(
        runtime=runtime,
        precision=precision,
        heads=head,
        threads=threads,
        provider=provider,
        device=ov_device,
        streams=streams,
    )
    predictor = open_bundle(bundle).load(apply_profile(device_profile, given))

    def on_skip(path: str, reason: str) -> None:
        # Said as it happens, one line each: when every image fails the run ends in an error, and
        # the reasons must have been shown by then.
        click.echo(f"Skipped: {reason}", err=True)

    stream = PredictionStream(predictor, images, top_k=top_k, batch_size=batch_size, on_skip=on_skip)
    out = _Echo()
    if as_json:
        _stream_json(stream, out)
    elif as_csv:
        _stream_csv(stream, out)
    else:
        stream_table(stream, predictor, top_k)
    summary = stream.summary
    if summary.skipped:
        click.echo(f"Skipped {summary.skipped} unreadable image(s) (reasons above).", err=True)
    print_summary(summary)


def _predict_remote(remote, images: tuple[str, ...], args: list[str]) -> None:
    """`edgetl predict` on the device; its stdout and stderr stream here as they come."""
    import codecs

    from edgetl.device.remote_bench import predict_remote

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        predict_remote(
            remote,
            images,
            args,
            on_stdout=lambda chunk: click.echo(decoder.decode(chunk), nl=False),
        )
    finally:
        click.echo(decoder.decode(b"", final=True), nl=False)


class _Echo:
    """A file-like ``write`` onto click.echo (stdout, as CliRunner and pipes see it)."""

    def write(self, text: str) -> None:
        click.echo(text, nl=False)


def _stream_json(stream, out) -> None:
    """One JSON list, written record by record (valid JSON even for a million images); strict: a
    non-finite number would be null, never ``NaN`` (the predictor refuses non-finite logits anyway)."""
    from edgetl.core.jsonio import dumps

    first = True
    out.write("[")
    try:
        for record in stream:
            out.write(("\n  " if first else ",\n  ") + dumps(record))
            first = False
    finally:  # stdout stays one valid document even when the run fails part-way
        out.write("\n]\n" if not first else "]\n")


def _stream_csv(stream, out) -> None:
    import csv

    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["image", "head", "label", "score", "top_k"])
    for r in stream:
        top = ";".join(f"{t['label']}:{_score(t['score'])}" for t in r["top_k"])
        writer.writerow([r["image"], r["head"], r["label"], _score(r["score"]), top])


def _score(value: float) -> str:
    """A score for CSV; a non-finite one (never produced: the predictor refuses it) as an empty cell."""
    import math

    return f"{value:.6f}" if math.isfinite(value) else ""


COMMANDS = [predict]
