"""Labelled image folders (DATA/<class>/<images>): listing, class order, unreadable files.

Torch-free: the device evaluates a bundle on such a folder, the workstation trains on one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from edgetl.core.errors import DataError
from edgetl.core.preprocess import load_image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})


@dataclasses.dataclass(frozen=True)
class Sample:
    path: str
    label: int


@dataclasses.dataclass(frozen=True)
class ImageFolder:
    root: str
    classes: tuple[str, ...]
    samples: tuple[Sample, ...]
    skipped: tuple[tuple[str, str], ...] = ()  # (path, reason) of unreadable images

    def counts(self) -> list[int]:
        counts = [0] * len(self.classes)
        for s in self.samples:
            counts[s.label] += 1
        return counts


def scan_image_folder(root: str | os.PathLike, *, classes: tuple[str, ...] | None = None) -> ImageFolder:
    """List the images of ``root``/<class>/*; ``classes`` pins the class order (for --val-dir)."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; pass a folder with one sub-folder of images per class")
    root = root.resolve()  # runs record absolute paths: --resume and export work from any directory
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is not None:
        if set(found) != set(classes):
            missing = sorted(set(classes) - set(found))
            extra = sorted(set(found) - set(classes))
            raise DataError(
                f"classes in {root} differ from the training classes (missing: {missing or 'none'}, "
                f"extra: {extra or 'none'}); both folders need the same class sub-folders"
            )
        found = list(classes)
    if len(found) < 2:
        raise DataError(
            f"{root} has {len(found)} class folder(s); a classifier needs at least 2 "
            "(lay the data out as DATA/<class name>/<image files>)"
        )
    samples = []
    for label, name in enumerate(found):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise DataError(f"class folder {root / name} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        samples.extend(Sample(str(p), label) for p in files)
    return ImageFolder(str(root), tuple(found), tuple(samples))


def drop_unreadable(folder: ImageFolder, *, on_bad_image: str = "skip", min_per_class: int = 1) -> ImageFolder:
    """Decode every image once; skip (and report) or fail on those that cannot be read."""
    good, skipped = [], []
    for s in folder.samples:
        try:
            load_image(s.path)
        except DataError as exc:
            if on_bad_image == "fail":
                raise DataError(f"{exc} (use --on-bad-image skip to leave such files out)") from None
            skipped.append((s.path, str(exc)))
            continue
        good.append(s)
    for _path, reason in skipped:
        log.warning("skipped unreadable image: %s", reason)
    result = dataclasses.replace(folder, samples=tuple(good), skipped=tuple(skipped))
    for name, n in zip(folder.classes, result.counts(), strict=False):
        if n < min_per_class:
            raise DataError(
                f"class {name!r} has {n} readable image(s) after skipping bad files; it needs >= {min_per_class}"
            )
    return result


def class_counts(samples: list[Sample], n_classes: int) -> list[int]:
    counts = [0] * n_classes
    for s in samples:
        counts[s.label] += 1
    return counts
