"""Evaluate a run (PyTorch) on a labelled image folder; bundles: :mod:`edgetl.device.evaluate`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edgetl.core.errors import RunError
from edgetl.device.evaluate import score_folder


def evaluate_run(run_path: str | os.PathLike, data: str | os.PathLike, *, batch_size: int = 64) -> dict[str, Any]:
    """Top-1, per-class accuracy and confusion matrix of run ``run_path``'s model on ``data``."""
    import torch

    from edgetl.workstation.prepare import eval_transform
    from edgetl.workstation.run import is_run, load_run

    if not is_run(run_path):
        raise RunError(f"{run_path} is neither a run (from `edgetl finetune`) nor a bundle (from `edgetl export`)")
    run = load_run(run_path)
    model = run.build_model()
    transform = eval_transform(run.preprocessing)

    def classify(images):
        with torch.inference_mode():
            return {"default": model(torch.stack([transform(img) for img in images])).argmax(1).numpy()}

    report = score_folder(data, {"default": run.labels}, classify, batch_size=batch_size, pp=run.preprocessing)[
        "default"
    ]
    report.update({"model": str(Path(run_path)), "kind": "run (pytorch)"})
    return report
