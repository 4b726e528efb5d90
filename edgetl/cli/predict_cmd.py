"""`edgetl predict`: the device side, no torch (see edgetl.device.bundle_loading, edgetl.device.images)."""

from __future__ import annotations

from typing import Any

import click

from edgetl.cli._common import common_options, forwarded_args, handle_errors, make_remote, ssh_options
from edgetl.cli._output import format_option, resolve_format
from edgetl.cli._runtime_options import (
    SSH_OPTIONS,
    head_option,
    ov_device_option,
    precision_option,
    profile_option,
    provider_option,
    runtime_option,
    threads_option,
)
from edgetl.cli._tables import PREDICT_COLUMNS, clean, predict_cells, print_summary, stream_lines, stream_table
from edgetl.device.limits import MAX_BATCH_SIZE, MAX_STREAMS


@click.command()
@click.argument("bundle", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@runtime_option
@precision_option
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
@threads_option
@provider_option
@ov_device_option
@click.option("--streams", type=click.IntRange(1, MAX_STREAMS), default=None, help="OpenVINO streams.")
@profile_option
@click.option(
    "--csv",
    "as_csv",
    is_flag=True,
    help="Print CSV on stdout: " + ", ".join(PREDICT_COLUMNS) + " (instead of --format).",
)
@click.option(
    "--reject-unfamiliar",
    is_flag=True,
    help="Label images unlike anything the head was trained on `unknown` (heads with stored statistics; "
    "every record says `unfamiliar` either way).",
)
@ssh_options
@format_option
@common_options
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
    as_csv: bool,
    reject_unfamiliar: bool,
    identity: str | None,
    ssh_config: str | None,
    remote_edgetl: str,
    output_format: str | None,
    as_json: bool,
    no_progress: bool,
) -> None:
    """Classify image files, or every image in folders (recursively), with a bundle.

    Folders of any size stream through in batches: results are printed as they come and memory
    holds one batch. Unreadable images are skipped and listed on stderr; a summary (images/s,
    time split, images per label) ends on stderr. With --head all, each image gets one result per
    head.

    \b
    Output (stdout), one result per image and head, the same shape for 5 images or a million:
      in a pipe (--format tsv)  a header line, then tab-separated lines:
                                image, head, label, score, top_k, variant, runtime,
                                unfamiliar (true/false; empty for a head without statistics)
      on a terminal (table)     a table, or aligned lines beyond 200 results
      --json                    one JSON document (docs/json.md), written record by record
      --csv                     CSV with the same columns as tsv

    BUNDLE may be on a device (user@host:PATH, ssh://user@host:port/PATH, or a named device: NAME, NAME:PATH;
    see `edgetl deploy`):
    edgetl runs there over ssh, IMAGES are paths on the device, and the output streams back.

    \b
    Example:
      edgetl predict bundles/digits img.png photos/ --top-k 3
      edgetl predict bundles/parts /mnt/camera/ --precision int8 --head all --csv > results.csv
      edgetl predict pi@raspberrypi.local:bundles/parts /home/pi/camera/ --json > results.json
    """
    from edgetl.device.inventory import is_device_target

    if as_csv:
        if as_json or output_format == "json":
            raise click.UsageError("choose one of --json and --csv")
        if output_format is not None:
            raise click.UsageError(f"--csv and --format {output_format} disagree; give one of them")
        fmt = "csv"
    else:
        fmt = resolve_format(output_format, as_json)
    if is_device_target(bundle):
        args = forwarded_args(ctx, exclude=(*SSH_OPTIONS, "output_format", "as_json"))
        # The device's stdout is a pipe: it prints tsv by default (a table would be drawn for 80
        # columns there); JSON and CSV are asked for by name.
        if fmt == "json":
            args.append("--json")
        _predict_remote(ctx, make_remote(bundle, identity, ssh_config, remote_edgetl), images, args)
        return
    from edgetl.device.bundle_loading import LoadOptions, open_bundle
    from edgetl.device.images import PredictionStream

    given = LoadOptions(
        runtime=runtime,
        precision=precision,
        heads=head,
        threads=threads,
        provider=provider,
        device=ov_device,
        streams=streams,
    )
    options, profile_doc = with_profile(device_profile, given)
    predictor = open_bundle(bundle).load(options)
    predictor.reject_unfamiliar = reject_unfamiliar

    progress = _Progress(enabled=not no_progress)

    def on_skip(path: str, reason: str) -> None:
        # Said as it happens, one line each: when every image fails the run ends in an error, and
        # the reasons must have been shown by then.
        progress.echo(f"Skipped: {clean(reason)}")

    stream = PredictionStream(predictor, images, top_k=top_k, batch_size=batch_size, on_skip=on_skip)
    source = _tagged(progress.counted(stream), predictor)
    out = _Echo()
    with progress:
        if fmt == "json":
            context: dict[str, Any] = {
                "bundle": bundle,
                "variant": predictor.variant,
                "runtime": predictor.runtime,
                "precision": predictor.precision,
                "head": head or predictor.head_names[0],
                "heads": list(predictor.head_names),
                "top_k": min(top_k, max(len(predictor.labels[h]) for h in predictor.head_names)),
            }
            if predictor.runtime_info:
                context["runtime_info"] = predictor.runtime_info
            if profile_doc is not None:
                context["device_profile"] = profile_doc
            _stream_json(ctx, source, stream, out, context)
        elif fmt == "csv":
            _stream_csv(source, out)
        elif fmt == "tsv":
            stream_lines(source)
        else:
            stream_table(source, predictor, top_k)
    summary = stream.summary
    if summary.skipped:
        click.echo(f"Skipped {summary.skipped} unreadable image(s) (reasons above).", err=True)
    if not _quiet():
        print_summary(summary)


def with_profile(device_profile: str | None, given):
    """The load options with the device profile's settings under the ones given, and the JSON's
    ``device_profile`` record (``{name, path, applied, overridden}``, as bench writes it), or None."""
    from edgetl.device.backends import LOAD_OPTIONS
    from edgetl.device.profiles import apply_profile, load_profile, resolve_settings

    if device_profile is None:
        return apply_profile(None, given), None
    profile = load_profile(device_profile)
    settings = {setting: getattr(given, option) for option, (setting, _) in LOAD_OPTIONS.items()}
    settings.update(runtime=given.runtime, precision=given.precision, threads=given.threads)
    doc = resolve_settings(profile, settings).profile_doc()
    # predict classifies in batches of --batch-size whatever the profile's latency batch size.
    doc["applied"].pop("batch_size", None)
    doc["overridden"] = [k for k in doc["overridden"] if k != "batch_size"]
    return apply_profile(profile, given), doc


def _tagged(records, predictor):
    """Each record also says which variant and runtime made it (a record cut out of the output
    still says where it came from)."""
    variant, runtime = predictor.variant, predictor.runtime
    for r in records:
        yield {**r, "variant": variant, "runtime": runtime}


def _predict_remote(ctx: click.Context, remote, images: tuple[str, ...], args: list[str]) -> None:
    """`edgetl predict` on the device; its stdout and stderr stream here as they come.

    Under --json, once the device has printed, stdout holds its document (its results, or its
    error, closed there): a failure reported here then goes to stderr only, never as a second
    document. Before that (ssh or edgetl not reachable) the error document is printed as usual."""
    import codecs

    from edgetl.device.remote_bench import predict_remote

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def on_stdout(chunk: bytes) -> None:
        ctx.meta["edgetl.close_json_with_error"] = lambda error: None
        click.echo(decoder.decode(chunk), nl=False)

    try:
        predict_remote(remote, images, args, on_stdout=on_stdout)
    finally:
        click.echo(decoder.decode(b"", final=True), nl=False)


class _Echo:
    """A file-like ``write`` onto click.echo (stdout, as CliRunner and pipes see it)."""

    def write(self, text: str) -> None:
        click.echo(text, nl=False)


def _stream_json(ctx: click.Context, records, stream, out, context: dict[str, Any]) -> None:
    """One envelope (docs/json.md), written record by record: the context first, then ``results``,
    then ``summary`` -- valid JSON for a million images without holding them. Should the run fail
    part-way, the error closes the open document (``"error": {...}, "partial": true``), so stdout
    is still one valid document. Strict: a non-finite number would be null, never ``NaN``."""
    from edgetl.cli._output import envelope
    from edgetl.core.jsonio import dumps

    head = envelope("predict", [], **context)
    del head["results"]
    text = dumps(head, indent=2, default=str)
    out.write(text[: text.rindex("}")].rstrip() + ',\n  "results": [')
    state = {"first": True, "open": True}

    def close_results() -> None:
        out.write("\n  ]" if not state["first"] else "]")

    def close_with_error(error: dict[str, Any]) -> None:
        if not state["open"]:
            return
        state["open"] = False
        close_results()
        out.write(',\n  "error": ' + dumps(error) + ',\n  "partial": true\n}\n')

    ctx.meta["edgetl.close_json_with_error"] = close_with_error
    try:
        for record in records:
            out.write(("\n    " if state["first"] else ",\n    ") + dumps(record))
            state["first"] = False
    except KeyboardInterrupt:
        # handle_errors says "Interrupted." and exits 130; stdout still ends as one document.
        close_with_error({"type": "KeyboardInterrupt", "message": "interrupted", "exit_code": 130})
        raise
    state["open"] = False
    close_results()
    summary = dumps(stream.summary.to_dict(), indent=2).replace("\n", "\n  ")
    out.write(',\n  "summary": ' + summary + "\n}\n")


def _stream_csv(records, out) -> None:
    """CSV (RFC 4180 quoting) with the TSV's columns; names from user data have their control
    characters escaped and cannot start a spreadsheet formula (:func:`csv_cell`)."""
    import csv

    from edgetl.cli._output import csv_cell

    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(PREDICT_COLUMNS)
    for r in records:
        writer.writerow([csv_cell(c) for c in predict_cells(r)])


class _Progress:
    """A count of classified images on stderr while the results go to a file or a pipe (nothing
    when stderr is not a terminal, when stdout is one -- the results show the progress there --, or
    with --no-progress/-q)."""

    def __init__(self, *, enabled: bool) -> None:
        from edgetl.cli._output import stdout_is_terminal

        self.enabled = enabled and _stderr_is_terminal() and not stdout_is_terminal()
        self._progress = None
        self._task = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("classified {task.completed} result(s)"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task("predict", total=None)
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def counted(self, records):
        for r in records:
            if self._progress is not None:
                self._progress.advance(self._task)
            yield r

    def echo(self, line: str) -> None:
        if self._progress is not None:
            self._progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            click.echo(line, err=True)


def _stderr_is_terminal() -> bool:
    import sys

    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _quiet() -> bool:
    """-q (on the command or the group): the summary lines are left out, warnings stay."""
    import logging

    return logging.getLogger("edgetl").getEffectiveLevel() > logging.INFO


COMMANDS = [predict]
