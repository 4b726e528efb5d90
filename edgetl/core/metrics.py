"""Classification metrics in numpy (shared by training, evaluation of runs and of bundles)."""

from __future__ import annotations

from typing import Any

import numpy as np


def classification_report(y_true, y_pred, labels: list[str]) -> dict[str, Any]:
    """Top-1, per-class accuracy (recall) and the confusion matrix (rows: true, columns: predicted)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    k = len(labels)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    support = confusion.sum(axis=1)
    per_class = {
        labels[i]: {
            "accuracy": float(confusion[i, i] / support[i]) if support[i] else None,
            "n": int(support[i]),
        }
        for i in range(k)
    }
    n = len(y_true)
    return {
        "top1": float((y_true == y_pred).mean()) if n else 0.0,
        "n": n,
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "labels": list(labels),
    }
