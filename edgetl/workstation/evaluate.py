"""Score a run (PyTorch) on labelled images; bundles: :mod:`edgetl.device.evaluate`.

On a folder, the run's training images (its ``split.json``) are left out and counted unless
``include_train``: a run scored on the folder it was trained on gets its validation figure.
``split`` scores exactly the files the run recorded instead (``val``, ``train`` or ``all``).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from edgetl.core.errors import ConfigError, DataError, RunError
from edgetl.device.evaluate import SPLITS, HeadPlan, TrainingImages, announce_included, folder_samples, score

log = logging.getLogger(__name__)

HEAD = "default"  # a run has one head; exported, it becomes the bundle's head of this name


def evaluate_run(
    run_path: str | os.PathLike,
    data: str | os.PathLike | None = None,
    *,
    split: str | None = None,
    include_train: bool = False,
    batch_size: int = 64,
    device: str = "cpu",
) -> dict[str, Any]:
    """Top-1, per-class accuracy and confusion of run ``run_path``'s model on ``data`` (an image folder
    with any subset of the run's classes) or on its recorded ``split``; returns the context and
    ``results`` (one record, see :func:`edgetl.device.evaluate.score`)."""
    import torch

    from edgetl.workstation.prepare import eval_transform, select_device
    from edgetl.workstation.run import is_run, load_run

    if (data is None) == (split is None):
        raise ConfigError("give DATA (an image folder) or --split val|train|all, not both")
    if split is not None and split not in SPLITS:
        raise ConfigError(f"--split {split!r}: choose from {', '.join(SPLITS)}")
    if device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", str(device)):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, not {device!r}")
    if not is_run(run_path):
        raise RunError(f"{run_path} is neither a run (from `edgetl finetune`) nor a bundle (from `edgetl export`)")
    run = load_run(run_path)
    torch_device = select_device(device)
    model = run.build_model().to(torch_device)
    transform = eval_transform(run.preprocessing)
    classes = list(run.labels)
    train_paths = [s.path for s in run.train_samples]

    if split is None:
        samples, present = folder_samples(data, classes)
        training = TrainingImages.from_split(train_paths, [s.path for s in run.val_samples]).flags(
            [s.path for s in samples]
        )
        plan = HeadPlan(HEAD, training, include_train)
    else:
        samples = {"val": run.val_samples, "train": run.train_samples, "all": run.train_samples + run.val_samples}[
            split
        ]
        if not samples:
            raise RunError(f"run {run.path} records no {split} files in split.json")
        gone = [s.path for s in samples if not Path(s.path).is_file()]
        if len(gone) == len(samples):
            raise DataError(
                f"none of the {len(samples)} {split} files run {run.path} recorded is still there "
                f"(e.g. {gone[0]}); was the data moved? Evaluate the folder where it is now instead"
            )
        if gone:
            log.warning("%d of the %d %s files of run %s are gone; skipped", len(gone), len(samples), split, run.path)
        present = sorted({s.label for s in samples})
        n_train = len(run.train_samples) if split != "val" else 0
        plan = HeadPlan(HEAD, [i < n_train if split == "all" else split == "train" for i in range(len(samples))], True)

    def classify(images):
        x = torch.stack([transform(img) for img in images]).to(torch_device)
        with torch.inference_mode():
            return {HEAD: model(x).argmax(1).cpu().numpy()}

    results = score(samples, present, classes, [plan], classify, batch_size=batch_size, pp=run.preprocessing)
    if split is None:
        announce_included(results, include_train)
    return {
        "model": str(Path(run_path)),
        "kind": "run",
        "variant": None,
        "runtime": "pytorch",
        "precision": "fp32",
        "device": str(torch_device),
        "head": HEAD,
        "data": None if data is None else str(data),
        "split": split,
        "include_train": include_train if split is None else split != "val",
        "results": results,
    }
