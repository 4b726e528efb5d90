"""Evaluate a bundle (through the device runtime, no torch) on a labelled image folder."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edgetl.core.errors import ConfigError, DataError
from edgetl.core.formats import DEFAULT_RUNTIME
from edgetl.core.imagefolder import drop_unreadable, scan_image_folder
from edgetl.core.metrics import classification_report
from edgetl.core.preprocess import Preprocessing, load_image
from edgetl.device.limits import check_batch_size

# images -> predicted class index per head
Classify = Callable[[list[Image.Image]], dict[str, np.ndarray]]


def score_folder(
    data: str | os.PathLike,
    labels: dict[str, Sequence[str]],
    classify: Classify,
    *,
    batch_size: int = 64,
    pp: Preprocessing | None = None,
) -> dict[str, dict[str, Any]]:
    """Top-1, per-class accuracy and confusion of each head on ``data`` (DATA/<label>/<images>).

    Every head is scored on the same images, so every head must have the folder's classes.
    Unreadable images are skipped and listed under ``skipped``. Runs and bundles share this loop.
    ``pp``: the model's preprocessing; each image is reduced to its resize size as soon as it is
    decoded (bit-identical to reducing later), so a batch holds small images whatever the files.
    """
    check_batch_size(batch_size)
    names = list(labels)
    first = tuple(labels[names[0]])
    for name in names[1:]:
        if tuple(labels[name]) != first:
            raise ConfigError(
                f"heads {names[0]!r} and {name!r} have different labels; evaluate them one at a time "
                f"(--head {names[0]}, then --head {name}) on a folder with each head's classes"
            )
    folder = drop_unreadable(scan_image_folder(data, classes=first), min_per_class=0)
    y_pred: dict[str, list[np.ndarray]] = {n: [] for n in names}
    skipped = [{"path": p, "reason": r} for p, r in folder.skipped]
    samples = []
    for i in range(0, len(folder.samples), batch_size):
        batch, images = [], []
        for s in folder.samples[i : i + batch_size]:
            try:
                images.append(load_image(s.path, pp))
            except DataError as exc:  # readable when scanned, not now (or out of memory): skip it, not the run
                skipped.append({"path": str(s.path), "reason": str(exc)})
                continue
            batch.append(s)
        if not images:
            continue
        samples.extend(batch)
        for name, pred in classify(images).items():
            y_pred[name].append(pred)
    y_true = [s.label for s in samples]
    reports = {}
    for name in names:
        pred = np.concatenate(y_pred[name]) if y_pred[name] else np.zeros(0, dtype=np.int64)
        reports[name] = {**classification_report(y_true, pred, list(first)), "skipped": skipped}
    return reports


def evaluate_bundle(
    bundle_path: str | os.PathLike,
    data: str | os.PathLike,
    *,
    runtime: str = DEFAULT_RUNTIME,
    precision: str | None = None,
    head: str | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Score a bundle's head(s) on ``data``; ``head="all"`` scores every head (the trunk runs once per
    batch). Returns the first head's report at the top level and every head's under ``heads``."""
    from edgetl.device.runtime import open_bundle

    predictor = open_bundle(bundle_path).load(runtime=runtime, precision=precision, heads=head)

    def classify(images: list[Image.Image]) -> dict[str, np.ndarray]:
        logits = predictor.logits(predictor.preprocess(images))
        return {name: value.argmax(axis=1) for name, value in logits.items()}

    reports = score_folder(
        data,
        {n: predictor.labels[n] for n in predictor.head_names},
        classify,
        batch_size=batch_size,
        pp=predictor.preprocessing,
    )
    for name, rep in reports.items():
        rep.update(
            {
                "model": str(Path(bundle_path)),
                "kind": f"bundle ({predictor.variant}, head {name})",
                "head": name,
                "variant": predictor.variant,
            }
        )
    first = reports[predictor.head_names[0]]
    return {**first, "heads": reports}
