"""Score a model on labelled images, leaving out the images it was trained on (bundles: no torch).

A model scored on images it was trained on looks better than it is. Both runs and bundles know
their training images: a run lists them in ``split.json``, a bundle records the sha256 prefixes of
their bytes (``heads.<name>.training_data``). :class:`TrainingImages` recognises them in a folder
(by path, then by content: a copy elsewhere is caught too) and :func:`score` leaves them out and
counts them, unless asked to keep them. A folder may hold any subset of the model's classes; it is
scored on those (``edgetl.core.metrics.present_classes_report``). Runs:
:mod:`edgetl.workstation.evaluate`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edgetl.core.errors import ConfigError, DataError
from edgetl.core.imagefolder import HASH_HEX, Sample, image_sha256, parse_hash_prefixes, scan_labelled_folder
from edgetl.core.metrics import present_classes_report
from edgetl.core.preprocess import Preprocessing, load_image
from edgetl.device.limits import check_batch_size

log = logging.getLogger(__name__)

# images -> predicted class index per head
Classify = Callable[[list[Image.Image]], dict[str, np.ndarray]]
SPLITS = ("val", "train", "all")


def _real(path: str) -> str:
    return os.path.realpath(path)


def _size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


@dataclasses.dataclass
class TrainingImages:
    """The images one head was trained on, recognised among other images.

    From a run (:meth:`from_split`): an image whose resolved path is one of the run's training files
    is one, one of its validation files never is, and any other image is one when its bytes equal a
    training file's (only training files of the same size are hashed, once). From a bundle
    (:meth:`from_prefixes`): an image is one when the sha256 prefix of its bytes was recorded.
    """

    train_paths: frozenset[str] = frozenset()
    val_paths: frozenset[str] = frozenset()
    prefixes: frozenset[str] | None = None
    _by_size: dict[int, list[str]] | None = None
    _hashes: dict[int, set[str]] = dataclasses.field(default_factory=dict)
    gone: int = 0  # training files of a run that are not at their recorded path any more

    @classmethod
    def from_split(cls, train: Sequence[str], val: Sequence[str]) -> TrainingImages:
        return cls(frozenset(_real(p) for p in train), frozenset(_real(p) for p in val))

    @classmethod
    def from_prefixes(cls, text: str) -> TrainingImages:
        return cls(prefixes=parse_hash_prefixes(text))

    def _same_bytes(self, path: str) -> bool:
        if self.prefixes is not None:
            try:
                return image_sha256(path)[:HASH_HEX] in self.prefixes
            except OSError:
                return False
        if self._by_size is None:
            self._by_size = {}
            for p in sorted(self.train_paths):
                size = _size(p)
                if size is None:
                    self.gone += 1
                else:
                    self._by_size.setdefault(size, []).append(p)
        size = _size(path)
        if size is None or size not in self._by_size:
            return False
        if size not in self._hashes:
            hashes = set()
            for p in self._by_size[size]:
                try:
                    hashes.add(image_sha256(p))
                except OSError:
                    self.gone += 1
            self._hashes[size] = hashes
        try:
            return image_sha256(path) in self._hashes[size]
        except OSError:
            return False

    def flags(self, paths: Sequence[str]) -> list[bool]:
        """For each path: whether it is a training image."""
        out = []
        for path in paths:
            real = _real(path)
            if real in self.val_paths:
                out.append(False)
            elif real in self.train_paths:
                out.append(True)
            else:
                out.append(self._same_bytes(path))
        if self.gone:
            log.warning(
                "%d of the run's training files are no longer at their recorded paths; copies of them "
                "elsewhere cannot be recognised",
                self.gone,
            )
        return out


@dataclasses.dataclass(frozen=True)
class HeadPlan:
    """How one head is scored: which images are its training images (None: cannot tell), and
    whether they are kept (``--include-train``, or ``--split train|all``)."""

    name: str
    training: list[bool] | None
    keep_training: bool = False
    warnings: tuple[str, ...] = ()

    def scored(self, i: int) -> bool:
        return self.keep_training or self.training is None or not self.training[i]


def folder_samples(data: str | os.PathLike, classes: Sequence[str]) -> tuple[list[Sample], list[int]]:
    """The images of DATA/<class>/ labelled with the model's class indices, and the present classes."""
    folder, present = scan_labelled_folder(data, tuple(classes))
    return list(folder.samples), list(present)


def score(
    samples: Sequence[Sample],
    present: Sequence[int],
    classes: Sequence[str],
    heads: Sequence[HeadPlan],
    classify: Classify,
    *,
    batch_size: int = 64,
    pp: Preprocessing | None = None,
) -> list[dict[str, Any]]:
    """One result record per head: top-1 over the images it scores, per class, confusion (on the
    ``present`` classes), training images left out or kept, unreadable images skipped.

    Every head sees the same images in one pass (the trunk runs once per batch); an image that is
    a training image of one head but not of another is scored for the other only. ``pp``: the
    model's preprocessing; each image is reduced to its resize size as soon as it is decoded.
    """
    check_batch_size(batch_size)
    wanted = [i for i in range(len(samples)) if any(h.scored(i) for h in heads)]
    loaded: list[int] = []
    skipped: list[dict[str, str]] = []
    preds: dict[str, list[np.ndarray]] = {h.name: [] for h in heads}
    for start in range(0, len(wanted), batch_size):
        batch, images = [], []
        for i in wanted[start : start + batch_size]:
            try:
                images.append(load_image(samples[i].path, pp))
            except DataError as exc:  # an unreadable image is skipped, not the evaluation
                log.warning("skipped unreadable image: %s", exc)
                skipped.append({"path": str(samples[i].path), "reason": str(exc)})
                continue
            batch.append(i)
        if not images:
            continue
        loaded.extend(batch)
        for name, pred in classify(images).items():
            if name in preds:
                preds[name].append(np.asarray(pred))
    results = []
    for head in heads:
        pred = np.concatenate(preds[head.name]) if preds[head.name] else np.zeros(0, dtype=np.int64)
        keep = [j for j, i in enumerate(loaded) if head.scored(i)]
        y_true = [samples[loaded[j]].label for j in keep]
        report = present_classes_report(y_true, pred[keep], list(classes), list(present))
        warnings = list(head.warnings)
        if head.training is None:
            excluded = included = None
        else:
            n_train = sum(head.training)
            excluded, included = (0, n_train) if head.keep_training else (n_train, 0)
        if excluded and report["n"] == 0:
            warnings.append(
                f"all {excluded} image(s) were training images of head {head.name!r}: nothing left to score "
                "(score other images, or a run's validation files with --split val)"
            )
        for message in warnings[len(head.warnings) :]:
            log.warning("%s", message)
        results.append(
            {
                "head": head.name,
                **report,
                "excluded_train": excluded,
                "included_train": included,
                "train_overlap_checked": head.training is not None,
                "skipped": skipped,
                "warnings": warnings,
            }
        )
    return results


def bundle_training(manifest: dict[str, Any], head: str) -> TrainingImages | None:
    """The training images head ``head`` records (None: a bundle exported before they were recorded)."""
    record = manifest["heads"][head].get("training_data") or {}
    text = record.get("train_sha256_prefixes")
    return None if text is None else TrainingImages.from_prefixes(text)


def evaluate_bundle(
    bundle_path: str | os.PathLike,
    data: str | os.PathLike,
    *,
    runtime: str | None = None,
    precision: str | None = None,
    head: str | None = None,
    batch_size: int = 64,
    include_train: bool = False,
) -> dict[str, Any]:
    """Score a bundle's head(s) on the image folder ``data`` (DATA/<class>/<images>, any subset of
    the head's classes); ``head="all"`` scores every head (the trunk runs once per batch).

    Images the head was trained on (recorded in the bundle at export) are left out and counted,
    unless ``include_train``. Returns the context (``model``, ``kind``, ``variant``, ``runtime``,
    ``precision``, ``data``, ...) and ``results``: one record per head (see :func:`score`).
    """
    from edgetl.device.runtime import open_bundle

    check_batch_size(batch_size)
    bundle = open_bundle(bundle_path)
    predictor = bundle.load(runtime=runtime, precision=precision, heads=head)
    names = list(predictor.head_names)
    classes = tuple(predictor.labels[names[0]])
    for name in names[1:]:
        if tuple(predictor.labels[name]) != classes:
            raise ConfigError(
                f"heads {names[0]!r} and {name!r} have different labels; evaluate them one at a time "
                f"(--head {names[0]}, then --head {name}) on a folder with each head's classes"
            )
    samples, present = folder_samples(data, classes)
    paths = [s.path for s in samples]
    plans = []
    for name in names:
        training = bundle_training(bundle.manifest, name)
        warnings: tuple[str, ...] = ()
        if training is None:
            warnings = (
                f"bundle {bundle_path} records no training images for head {name!r} (exported by an older "
                "edgetl): overlap with the training data cannot be checked, so the figure may be optimistic",
            )
            log.warning("%s", warnings[0])
        plans.append(HeadPlan(name, None if training is None else training.flags(paths), include_train, warnings))

    def classify(images: list[Image.Image]) -> dict[str, np.ndarray]:
        logits = predictor.logits(predictor.preprocess(images))
        return {n: value.argmax(axis=1) for n, value in logits.items()}

    results = score(samples, present, classes, plans, classify, batch_size=batch_size, pp=predictor.preprocessing)
    announce_included(results, include_train)
    return {
        "model": str(Path(bundle_path)),
        "kind": "bundle",
        "variant": predictor.variant,
        "runtime": predictor.runtime,
        "precision": predictor.precision,
        "device": None,
        "head": head or names[0],
        "data": str(data),
        "split": None,
        "include_train": include_train,
        "results": results,
    }


def announce_included(results: list[dict[str, Any]], include_train: bool) -> None:
    """With ``--include-train``: say how many training images were scored (the figure is optimistic)."""
    if not include_train:
        return
    for rec in results:
        if rec["included_train"]:
            message = (
                f"--include-train: {rec['included_train']} training image(s) of head {rec['head']!r} are scored; "
                "the figure is optimistic"
            )
            rec["warnings"].append(message)
            log.warning("%s", message)
