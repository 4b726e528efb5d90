"""Training data: deterministic validation splits and the offline digits demo (image folders: core.imagefolder)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from edgetl.core.atomic import output_lock
from edgetl.core.errors import DataError
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


def write_digits(out: str | os.PathLike) -> dict:
    """Write scikit-learn's bundled 8x8 digits (1,797 images) as a PNG image folder."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("`edgetl data digits` needs scikit-learn: pip install 'edgetl[train]'") from None
    from PIL import Image

    out = Path(out)
    _refuse_non_empty(out)
    digits = load_digits()
    classes = [str(int(c)) for c in digits.target_names]
    # Under the output's lock, in a temporary folder of our own beside OUT (never a fixed name that
    # might be someone's folder): a second writer fails at once, an interruption leaves no half folder.
    with output_lock(out):
        _refuse_non_empty(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; a dataset is read by others
            for c in classes:
                (tmp / c).mkdir()
            for i, (img, target) in enumerate(zip(digits.images, digits.target, strict=False)):
                # Values are 0..16 ink levels; scale to 0..255 grey.
                pixels = np.clip(np.round(img * (255.0 / 16.0)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, mode="L").save(tmp / str(int(target)) / f"{i:04d}.png")
            if out.exists():
                out.rmdir()  # empty (checked under the lock); rmdir refuses anything else
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return {"path": str(out), "classes": classes, "images": len(digits.images)}


def _refuse_non_empty(out: Path) -> None:
    if out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir()))):
        raise DataError(f"{out} exists and is not empty (or not a folder); choose a new folder")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
