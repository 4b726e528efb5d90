"""Evaluate a run (PyTorch) or a bundle (the device runtime) on a labelled image folder."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.data import drop_unreadable, scan_image_folder
from edgetl.errors import EdgetlError
from edgetl.metrics import classification_report
from edgetl.preprocess import load_image

log = logging.getLogger(__name__)


def evaluate(
    model_path: str | Path,
    data: str | Path,
    *,
    runtime: str = "onnxruntime",
    precision: str | None = None,
    head: str | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Top-1, per-class accuracy and confusion matrix of a run or bundle on ``data``.

    ``data`` must have one sub-folder per label of the model (the same names); unreadable images
    are skipped and listed under ``skipped``.
    """
    from edgetl.bundle import MANIFEST_NAME
    from edgetl.run import is_run

    model_path = Path(model_path)
    if (model_path / MANIFEST_NAME).is_file():
        kind, labels, predict = _bundle_predictor(model_path, runtime=runtime, precision=precision, head=head)
    elif is_run(model_path):
        kind, labels, predict = _run_predictor(model_path)
    else:
        raise EdgetlError(f"{model_path} is neither a run (from `edgetl finetune`) nor a bundle (from `edgetl export`)")
    folder = drop_unreadable(scan_image_folder(data, classes=tuple(labels)), min_per_class=0)
    y_pred = []
    for i in range(0, len(folder.samples), batch_size):
        batch = folder.samples[i : i + batch_size]
        y_pred.append(predict([load_image(s.path) for s in batch]))
    y_true = [s.label for s in folder.samples]
    report = classification_report(y_true, np.concatenate(y_pred), labels)
    report.update({"model": str(model_path), "kind": kind, "skipped": [{"path": p, "reason": r} for p, r in folder.skipped]})
    return report


def _bundle_predictor(path: Path, *, runtime: str, precision: str | None, head: str | None):
    from edgetl.runtime import open_bundle

    bundle = open_bundle(path)
    predictor = bundle.load(runtime=runtime, precision=precision, heads=head)
    name = predictor.head_names[0]

    def predict(images):
        return predictor.logits(predictor.preprocess(images))[name].argmax(axis=1)

    return f"bundle ({predictor.variant}, head {name})", list(predictor.labels[name]), predict


def _run_predictor(path: Path):
    import torch

    from edgetl.run import load_run
    from edgetl.train import eval_transform

    run = load_run(path)
    model = run.build_model()
    transform = eval_transform(run.preprocessing)

    def predict(images):
        with torch.inference_mode():
            return model(torch.stack([transform(img) for img in images])).argmax(1).numpy()

    return "run (pytorch)", run.labels, predict
