"""Data preparation for training: the split, the transforms, the image dataset, class balance.

``finetune``, ``finetune_head``, the study and the probe benchmark all prepare data here, so runs of
the same data and seed train and validate on the same files.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from edgetl.core.errors import ConfigError
from edgetl.core.imagefolder import Sample, drop_unreadable, scan_image_folder
from edgetl.core.preprocess import Preprocessing, load_image
from edgetl.workstation.data import stratified_split
from edgetl.workstation.options import TrainConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PreparedData:
    labels: list[str]
    train: list[Sample]
    val: list[Sample]
    skipped: list[tuple[str, str]]
    root: str
    val_dir: str | None = None


def prepare_data(data: str | Path, cfg: TrainConfig, *, val_dir: str | Path | None = None) -> PreparedData:
    """Scan ``data`` (and ``val_dir``), drop unreadable images, split by ``cfg.seed``."""
    folder = drop_unreadable(scan_image_folder(data), on_bad_image=cfg.on_bad_image, min_per_class=1 if val_dir else 2)
    if val_dir is not None:
        val_folder = drop_unreadable(scan_image_folder(val_dir, classes=folder.classes), on_bad_image=cfg.on_bad_image)
        train, val = list(folder.samples), list(val_folder.samples)
        skipped = list(folder.skipped) + list(val_folder.skipped)
    else:
        train, val = stratified_split(folder, cfg.val_split, cfg.seed)
        skipped = list(folder.skipped)
    _warn_copies(train, val)
    return PreparedData(
        list(folder.classes),
        train,
        val,
        skipped,
        str(Path(data).resolve()),
        str(Path(val_dir).resolve()) if val_dir else None,
    )


def _warn_copies(train: list[Sample], val: list[Sample]) -> None:
    """Warn when validation images are byte-for-byte copies of training images (a copy in --val-dir,
    or two copies in DATA that the split put on both sides): the validation top-1 would count them
    as unseen. The check is evaluate's (files compared by size first; only same-size ones hashed)."""
    from edgetl.device.evaluate import TrainingImages

    flags = TrainingImages.from_split([s.path for s in train], []).flags([s.path for s in val])
    copies = [s.path for s, copy in zip(val, flags, strict=True) if copy]
    if copies:
        log.warning(
            "%d validation image(s) are byte-for-byte copies of training images (e.g. %r): the "
            "validation top-1 counts them as unseen; remove the copies for an honest score",
            len(copies),
            copies[0],
        )


def subsample_per_class(samples: list[Sample], n: int | None, seed: int) -> list[Sample]:
    """At most ``n`` samples per class, chosen by ``seed`` (None: all). Order is kept."""
    if n is None:
        return list(samples)
    rng = np.random.default_rng(seed)
    keep: set[int] = set()
    by_class: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        by_class.setdefault(s.label, []).append(i)
    for idx in by_class.values():
        keep.update(idx if len(idx) <= n else rng.choice(idx, size=n, replace=False).tolist())
    return [s for i, s in enumerate(samples) if i in keep]


# --- transforms and datasets --------------------------------------------------------------------


def eval_transform(pp: Preprocessing):
    """The torchvision eval transform; ``edgetl.core.preprocess`` is its torch-free twin (tested equal)."""
    from torchvision import transforms as T

    interp = T.InterpolationMode(pp.interpolation)
    return T.Compose(
        [
            T.Resize(pp.resize_size, interpolation=interp),
            T.CenterCrop(pp.input_size),
            T.ToTensor(),
            T.Normalize(pp.mean, pp.std),
        ]
    )


def train_transform(pp: Preprocessing, *, hflip: bool):
    """Light augmentation at the eval scale: random crop position, mild colour jitter, optional flip.

    Cropping after the same resize as evaluation keeps objects at the scale the model is tested on;
    flips are off by default because many targets (digits, text, parts with handedness) are not
    mirror-symmetric.
    """
    from torchvision import transforms as T

    interp = T.InterpolationMode(pp.interpolation)
    steps = [T.Resize(pp.resize_size, interpolation=interp), T.RandomCrop(pp.input_size)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ColorJitter(0.2, 0.2, 0.2), T.ToTensor(), T.Normalize(pp.mean, pp.std)]
    return T.Compose(steps)


class ImageDataset:
    """Images decoded and transformed on access (benchmarks/train_loop_overhead.py builds its baseline on it)."""

    def __init__(self, samples: list[Sample], transform):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        return self.transform(load_image(s.path)), s.label


# --- where and how it runs ------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def select_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    return torch.device(name)


# --- class balance --------------------------------------------------------------------------------


def class_weights(counts: list[int]):
    """Inverse-frequency weights normalised to mean 1 (``--balance``)."""
    import torch

    counts_t = torch.tensor([max(c, 1) for c in counts], dtype=torch.float32)
    w = counts_t.sum() / (len(counts) * counts_t)
    return w / w.mean()


def warn_imbalance(counts: list[int], labels: list[str], balance: bool) -> None:
    if max(counts) > 3 * min(counts):
        small = labels[counts.index(min(counts))]
        log.warning(
            "classes are imbalanced (train images per class from %d (%r) to %d)%s; "
            "per-class accuracy is in metrics.json",
            min(counts),
            small,
            max(counts),
            "" if balance else ": consider --balance",
        )
