"""Training data: deterministic validation splits and the offline digits demo (image folders: core.imagefolder)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from edgetl.core.atomic import output_lock, replace_directory
from edgetl.core.errors import DataError, OutputExistsError
from edgetl.core.imagefolder import ImageFolder, Sample


def stratified_split(folder: ImageFolder, val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Deterministic per-class split: the same seed and files always give the same split."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-split must be between 0 and 1, not {val_fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label, name in enumerate(folder.classes):
        items = sorted((s for s in folder.samples if s.label == label), key=lambda s: s.path)
        if len(items) < 2:
            raise DataError(f"class {name!r} has {len(items)} image(s); a validation split needs at least 2 per class")
        n_val = min(len(items) - 1, max(1, round(len(items) * val_fraction)))
        order = rng.permutation(len(items))
        val.extend(items[i] for i in sorted(order[:n_val]))
        train.extend(items[i] for i in sorted(order[n_val:]))
    return train, val


def write_digits(out: str | os.PathLike, *, force: bool = False) -> dict:
    """Write scikit-learn's bundled 8x8 digits (1,797 images) as a PNG image folder.

    ``out`` must be new or an empty folder; with ``force``, a folder this function wrote before
    (class folders ``0``-``9`` of PNG files, nothing else) is replaced once the new one is complete.
    Anything else is an :class:`OutputExistsError`: --force never deletes a folder of someone's.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("`edgetl data digits` needs scikit-learn: pip install 'edgetl[train]'") from None
    from PIL import Image

    out = Path(out)
    _check_digits_output(out, force)
    digits = load_digits()
    classes = [str(int(c)) for c in digits.target_names]
    # Under the output's lock, in a temporary folder of our own beside OUT (never a fixed name that
    # might be someone's folder): a second writer fails at once, an interruption leaves no half folder.
    with output_lock(out):
        replaced = _check_digits_output(out, force)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; a dataset is read by others
            for c in classes:
                (tmp / c).mkdir()
            for i, (img, target) in enumerate(zip(digits.images, digits.target, strict=False)):
                # Values are 0..16 ink levels; scale to 0..255 grey.
                pixels = np.clip(np.round(img * (255.0 / 16.0)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(tmp / str(int(target)) / f"{i:04d}.png")
            if out.exists() and not replaced:
                out.rmdir()  # empty (checked under the lock); rmdir refuses anything else
            # The old folder (if any) is renamed aside, the new one put in place, the old one removed.
            replace_directory(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return {"path": str(out), "classes": classes, "images": len(digits.images), "replaced": replaced}


DIGIT_CLASSES = frozenset(str(i) for i in range(10))


def _check_digits_output(out: Path, force: bool) -> bool:
    """Whether ``out`` is to be replaced (True) or is new/empty (False); else OutputExistsError."""
    if not (out.exists() or out.is_symlink()):
        return False
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return False
    if not force:
        raise OutputExistsError(f"{out} exists and is not empty; pass --force to replace it, or choose another --out")
    if not _is_digits_folder(out):
        raise OutputExistsError(
            f"--force replaces only a digits folder (class folders 0-9 of PNG files, nothing else), and {out} "
            "is not one; choose another --out or remove it yourself"
        )
    return True


def _is_digits_folder(path: Path) -> bool:
    """What :func:`write_digits` writes: only class folders ``0``-``9``, each holding only PNG files."""
    if path.is_symlink() or not path.is_dir():
        return False
    for entry in os.scandir(path):
        if entry.name not in DIGIT_CLASSES or entry.is_symlink() or not entry.is_dir():
            return False
        for f in os.scandir(entry.path):
            if f.is_symlink() or not f.is_file() or not f.name.endswith(".png"):
                return False
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
