"""Labelled image folders (DATA/<class>/<images>): listing, class order, unreadable files.

Torch-free: the device evaluates a bundle on such a folder, the workstation trains on one.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

from edgetl.core.errors import DataError
from edgetl.core.preprocess import check_image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
# A training image is recognised by the first 16 hex digits (64 bits) of the sha256 of its bytes:
# compact in a manifest, and a chance collision between a million images on each side is ~1e-7.
HASH_HEX = 16
_HEX_PREFIXES = re.compile(rf"(?:[0-9a-f]{{{HASH_HEX}}})*")


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


def hidden(name: str) -> bool:
    """A hidden file or folder (``.DS_Store``, macOS's ``._photo.jpg`` metadata, ``.git``): never an
    image or a class, in training folders and in the folders ``predict`` walks alike."""
    return name.startswith(".")


def _class_folders(root: str | os.PathLike) -> tuple[Path, list[str]]:
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; pass a folder with one sub-folder of images per class")
    root = root.resolve()  # runs record absolute paths: --resume and export work from any directory
    return root, sorted(p.name for p in root.iterdir() if p.is_dir() and not hidden(p.name))


def _images(folder: Path) -> list[Path]:
    """The image files under a class folder, hidden ones left out. A link to nothing is kept, so
    that it is reported with the unreadable files instead of vanishing."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and (p.is_file() or (p.is_symlink() and not p.exists()))
        and not any(hidden(part) for part in p.relative_to(folder).parts)
    )


def _warn_look_alike_classes(root: Path, names: list[str]) -> None:
    """Class folders that are one folder twice (a link to another class) or whose names differ only by
    case or Unicode normalisation ("café" typed two ways): trained as separate classes, they split
    one class in two and look the same in every output. Said once, as a warning."""
    import unicodedata

    by_target: dict[Path, list[str]] = {}
    by_form: dict[str, list[str]] = {}
    for name in names:
        by_target.setdefault((root / name).resolve(), []).append(name)
        by_form.setdefault(unicodedata.normalize("NFKC", name).casefold(), []).append(name)
    for group in by_target.values():
        if len(group) > 1:
            log.warning(
                "class folders %s are the same folder (a link): its images are in %d classes",
                ", ".join(repr(n) for n in group),
                len(group),
            )
    for group in by_form.values():
        if len(group) > 1:
            log.warning(
                "class folders %s differ only by case or Unicode form: they are separate classes; "
                "rename or merge them if they are one",
                ", ".join(ascii(n) for n in group),
            )


def scan_image_folder(
    root: str | os.PathLike, *, classes: tuple[str, ...] | None = None, min_classes: int = 2
) -> ImageFolder:
    """List the images of ``root``/<class>/*; ``classes`` pins the class order (for --val-dir);
    ``min_classes``: 1 where the folder adds classes to a head (``learn --extend``)."""
    root, found = _class_folders(root)
    if classes is not None:
        if set(found) != set(classes):
            missing = sorted(set(classes) - set(found))
            extra = sorted(set(found) - set(classes))
            raise DataError(
                f"classes in {root} differ from the training classes (missing: {missing or 'none'}, "
                f"extra: {extra or 'none'}); both folders need the same class sub-folders"
            )
        found = list(classes)
    _warn_look_alike_classes(root, found)
    if len(found) < min_classes:
        raise DataError(
            f"{root} has {len(found)} class folder(s); {'a classifier needs' if min_classes > 1 else 'it needs'} "
            f"at least {min_classes} "
            "(lay the data out as DATA/<class name>/<image files>)"
        )
    samples = []
    for label, name in enumerate(found):
        files = _images(root / name)
        if not files:
            raise DataError(f"class folder {root / name} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        samples.extend(Sample(str(p), label) for p in files)
    return ImageFolder(str(root), tuple(found), tuple(samples))


def _problem(path: str) -> str | None:
    try:
        check_image(path)
    except DataError as exc:
        return str(exc)
    return None


def drop_unreadable(folder: ImageFolder, *, on_bad_image: str = "skip", min_per_class: int = 1) -> ImageFolder:
    """Decode every image once (:func:`edgetl.core.preprocess.check_image`, a few at a time: the
    decoders release the GIL); skip (and report) or fail on those that cannot be read."""
    good, skipped = [], []
    workers = max(1, min(4, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        problems = list(pool.map(_problem, [s.path for s in folder.samples], chunksize=16))
    for s, problem in zip(folder.samples, problems, strict=True):
        if problem is not None:
            if on_bad_image == "fail":
                raise DataError(f"{problem} (use --on-bad-image skip to leave such files out)") from None
            skipped.append((s.path, problem))
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


def scan_labelled_folder(root: str | os.PathLike, classes: tuple[str, ...]) -> tuple[ImageFolder, tuple[int, ...]]:
    """The images of ``root``/<class>/* for scoring a model whose classes are ``classes``.

    The folder may hold any subset of the model's classes (field data rarely has them all); a class
    folder the model does not know is an error naming it. Returns the folder (``classes``: the
    model's, samples labelled with the model's class indices) and the indices of the classes that
    have at least one image there, in the model's order.
    """
    root, found = _class_folders(root)
    unknown = [name for name in found if name not in classes]
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:10])
        if len(unknown) > 10:
            shown += f" and {len(unknown) - 10} more"
        raise DataError(
            f"{root} has class folder(s) the model does not know: {shown} "
            f"(the model's classes: {', '.join(classes[:20])}{' ...' if len(classes) > 20 else ''})"
        )
    samples: list[Sample] = []
    present = []
    for label, name in enumerate(classes):
        if name not in found:
            continue
        files = _images(root / name)
        if files:
            present.append(label)
        samples.extend(Sample(str(p), label) for p in files)
    if not samples:
        raise DataError(
            f"{root} has no images in class folders ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
            "lay the data out as DATA/<class name>/<image files>"
        )
    return ImageFolder(str(root), tuple(classes), tuple(samples)), tuple(present)


def image_sha256(path: str | os.PathLike) -> str:
    """sha256 of an image file's bytes (what recognises the same image under another name or place)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_prefixes(hashes: Iterable[str]) -> str:
    """The :data:`HASH_HEX`-digit prefixes of ``hashes``, sorted and without duplicates, as one string."""
    return "".join(sorted({h[:HASH_HEX] for h in hashes}))


def parse_hash_prefixes(text: str) -> frozenset[str]:
    """The prefixes :func:`hash_prefixes` joined (a malformed string is a :class:`DataError`)."""
    if not isinstance(text, str) or not _HEX_PREFIXES.fullmatch(text):
        raise DataError(f"a list of training-image hashes must be {HASH_HEX}-digit lowercase hex prefixes")
    return frozenset(text[i : i + HASH_HEX] for i in range(0, len(text), HASH_HEX))
