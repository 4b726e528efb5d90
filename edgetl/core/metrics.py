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


def present_classes_report(y_true, y_pred, labels: list[str], present: list[int]) -> dict[str, Any]:
    """Scores on the classes ``present`` in the data (indices into ``labels``, the model's classes).

    Top-1 over every image; ``per_class`` and the confusion matrix for the present classes only
    (rows: true, columns: predicted), with each row's predictions of a class that is not present
    counted in ``confusion_other``; the model's other classes are listed in ``missing_classes``.
    ``top1`` is None when there is no image to score.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    k = len(labels)
    full = np.zeros((k, k), dtype=np.int64)
    np.add.at(full, (y_true, y_pred), 1)
    rows = full[list(present)]
    confusion = rows[:, list(present)]
    support = rows.sum(axis=1)
    per_class = {
        labels[c]: {
            "accuracy": float(full[c, c] / support[i]) if support[i] else None,
            "n": int(support[i]),
        }
        for i, c in enumerate(present)
    }
    n = len(y_true)
    return {
        "top1": float((y_true == y_pred).mean()) if n else None,
        "n": n,
        "per_class": per_class,
        "labels": [labels[c] for c in present],
        "confusion": confusion.tolist(),
        "confusion_other": (support - confusion.sum(axis=1)).tolist(),
        "missing_classes": [labels[c] for c in range(k) if c not in set(present)],
    }
