"""Walk files and folders of images and classify them with bounded memory.

:func:`iter_images` walks folders lazily in a stable order; :class:`PredictionStream` turns the
paths into prediction records batch by batch, skipping (and reporting) unreadable files, and
keeps a :class:`PredictSummary` of counts and where the time went.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from edgetl.core.errors import DataError
from edgetl.core.imagefolder import IMAGE_EXTENSIONS, hidden
from edgetl.core.preprocess import load_image
from edgetl.device.predictor import Predictor, _check_positive


@dataclasses.dataclass(frozen=True)
class PredictReport:
    """Predictions for the readable images, and ``(path, reason)`` for the files that were skipped."""

    predictions: list[dict[str, Any]]
    skipped: list[tuple[str, str]]


def find_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given (any extension: the user named them), folders recursively by image extension."""
    return list(iter_images(inputs))


def iter_images(inputs: Iterable[str | os.PathLike]) -> Iterator[Path]:
    """:func:`find_images` as a stream: folders are walked lazily, each in ``sorted(rglob)`` order,
    so memory does not grow with the folder. Every input is checked now, before the first path is
    yielded (missing paths, folders without images). A file named twice, or inside a folder also
    named, is yielded once."""
    inputs = [Path(item) for item in inputs]
    explicit: set[str] = set()
    folders: list[Path] = []
    for p in inputs:
        if p.is_dir():
            if next(_walk_images(p), None) is None:
                raise DataError(f"folder {p} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
            folders.append(p)
        elif p.is_file():
            explicit.add(os.path.abspath(p))
        else:
            raise DataError(f"image {p} does not exist")
    return _iter_checked(inputs, explicit, [os.path.abspath(f) for f in folders])


def _iter_checked(inputs: list[Path], explicit: set[str], roots: list[str]) -> Iterator[Path]:
    walked: set[str] = set()
    yielded: set[str] = set()  # explicit files only: bounded by the command line
    for p in inputs:
        key = os.path.abspath(p)
        if p.is_dir():
            nested = any(key != r and key.startswith(r + os.sep) for r in roots)
            if key in walked or nested:
                continue
            walked.add(key)
            for f in _walk_images(p):
                if os.path.abspath(f) not in explicit:
                    yield f
        elif key not in yielded:
            yielded.add(key)
            yield p


def _walk_images(folder: Path) -> Iterator[Path]:
    """Image files under ``folder``, depth first, each directory's entries by name: the order of
    ``sorted(folder.rglob("*"))`` (paths compare part by part), one directory listing in memory."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"cannot list folder {folder}: {exc.strerror or exc}") from None
    for entry in entries:
        if hidden(entry.name):
            continue
        if entry.is_dir(follow_symlinks=False):
            yield from _walk_images(Path(entry.path))
        elif Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS and (entry.is_file() or entry.is_symlink()):
            yield Path(entry.path)  # a link to nothing too: reported as unreadable, not dropped unseen


MAX_LISTED_SKIPS = 100


@dataclasses.dataclass
class PredictSummary:
    """What a prediction run did: counts, time split, and how many images each label got."""

    images: int = 0
    skipped: int = 0
    # The first MAX_LISTED_SKIPS skipped files, {"path", "reason"} each (a folder of a million bad
    # files must not fill memory); ``skipped`` counts them all.
    skipped_files: list[dict[str, str]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0  # wall time from the first file opened to the last record
    decode_s: float = 0.0  # reading and decoding image files
    preprocess_s: float = 0.0  # resize, crop, normalise (numpy/pillow)
    inference_s: float = 0.0  # trunk + heads
    per_class: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # head -> label -> images

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["images_per_s"] = self.images_per_s
        return d


class PredictionStream:
    """Classify files and folders of any size with bounded memory: iterate to get one record per
    image and head (image-major), in batches of ``batch_size``. Unreadable images are skipped (one
    bad file on a camera share should not stop the other thousand) and reported to ``on_skip``;
    :attr:`summary` holds counts and times, complete once iteration ends."""

    def __init__(
        self,
        predictor: Predictor,
        inputs: Iterable[str | os.PathLike],
        *,
        top_k: int = 5,
        batch_size: int = 32,
        on_skip: Callable[[str, str], None] | None = None,
    ) -> None:
        _check_positive(top_k=top_k, batch_size=batch_size)
        self.predictor = predictor
        self.top_k = top_k
        self.batch_size = batch_size
        self.on_skip = on_skip
        self.summary = PredictSummary(
            per_class={h: dict.fromkeys(predictor.labels[h], 0) for h in predictor.head_names}
        )
        self._paths = iter_images(inputs)  # checks the inputs now, walks the folders lazily

    def __iter__(self) -> Iterator[dict[str, Any]]:
        s = self.summary
        start = time.perf_counter()
        for names, images in self._batches():
            t0 = time.perf_counter()
            x = self.predictor.preprocess(images)
            t1 = time.perf_counter()
            logits, feats = self.predictor.outputs(x)
            t2 = time.perf_counter()
            s.preprocess_s += t1 - t0
            s.inference_s += t2 - t1
            s.images += len(names)
            for record in self.predictor.records(names, logits, self.top_k, features=feats):
                per_class = s.per_class[record["head"]]
                per_class[record["label"]] = per_class.get(record["label"], 0) + 1
                yield record
            s.seconds = time.perf_counter() - start
        s.seconds = time.perf_counter() - start
        if s.images == 0:
            raise DataError(f"none of the {s.skipped} image(s) could be read" if s.skipped else "no images given")

    def _batches(self) -> Iterator[tuple[list[str], list[Image.Image]]]:
        names: list[str] = []
        images: list[Image.Image] = []
        for path in self._paths:
            t0 = time.perf_counter()
            try:
                # Reduced to the model's resize size right after decoding: the batch holds small
                # images and at most one full-size decoded one, whatever the files' sizes.
                image = load_image(path, self.predictor.preprocessing, gray_ok=True)
            except DataError as exc:
                self.summary.skipped += 1
                if len(self.summary.skipped_files) < MAX_LISTED_SKIPS:
                    self.summary.skipped_files.append({"path": str(path), "reason": str(exc)})
                if self.on_skip is not None:
                    self.on_skip(str(path), str(exc))
                continue
            finally:
                self.summary.decode_s += time.perf_counter() - t0
            names.append(str(path))
            images.append(image)
            if len(names) == self.batch_size:
                yield names, images
                names, images = [], []
        if names:
            yield names, images


def predict_files(
    predictor: Predictor, inputs: Iterable[str | os.PathLike], *, top_k: int = 5, batch_size: int = 32
) -> PredictReport:
    """Classify files and folders into one list, skipping (not failing on) unreadable images; for
    folders of any size iterate a :class:`PredictionStream` instead."""
    skipped: list[tuple[str, str]] = []
    stream = PredictionStream(
        predictor,
        inputs,
        top_k=top_k,
        batch_size=batch_size,
        on_skip=lambda path, reason: skipped.append((path, reason)),
    )
    try:
        predictions = list(stream)
    except DataError:
        if skipped and not stream.summary.images:
            raise DataError(f"none of the {len(skipped)} image(s) could be read (first: {skipped[0][1]})") from None
        raise
    return PredictReport(predictions, skipped)


__all__ = ["PredictReport", "PredictSummary", "PredictionStream", "find_images", "iter_images", "predict_files"]
