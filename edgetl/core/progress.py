"""The progress bar of long work on both sides (rich, imported when a bar is made)."""

from __future__ import annotations


def progress_bar(enabled: bool):
    """The one progress bar of long work (training, feature passes, probes, exports, on-device
    learning), on stderr; disabled with ``--no-progress``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=Console(stderr=True),
        disable=not enabled,
    )
