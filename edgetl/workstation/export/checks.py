"""The checks every exported variant passes, in ``export`` and in ``export --add-to`` alike.

* parity: an fp32 variant matches PyTorch (max abs logit diff <= :data:`FP32_MAX_ABS_DIFF`, 100%
  top-1 agreement); a reduced precision (fp16, bf16, int8) loses at most ``max_drop`` pp top-1
  against the same format's fp32 (:func:`check_bar`);
* the precision pin: a runtime that can pin its inference precision (OpenVINO) ran the one the
  variant pins; otherwise this CPU cannot measure that variant (:func:`check_precision_pin`);
* merged graphs compute what their trunk and head files compute: exactly (within
  :data:`MERGED_MAX_ABS_DIFF`) in f32, with the variant's own accuracy bar in bf16
  (:func:`check_merged`).

Every comparison is written so that NaN fails it (``not (x <= bar)``): a graph that produces NaN
never passes a gate.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from edgetl.core.errors import ExportError

FP32_MAX_ABS_DIFF = 1e-3  # docs/design.md quality bar: fp32 parity with PyTorch
# A merged graph computes what its trunk and head files compute; only kernel choice may differ.
MERGED_MAX_ABS_DIFF = 1e-3


def variant_metrics(logits: np.ndarray, ref_logits: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """Top-1 of ``logits`` and how far they are from the reference (PyTorch) logits."""
    pred, ref_pred = logits.argmax(1), ref_logits.argmax(1)
    return {
        "val_top1": float((pred == y).mean()),
        "max_abs_diff": float(np.abs(logits.astype(np.float64) - ref_logits).max()),
        "top1_agreement": float((pred == ref_pred).mean()),
        "n": len(y),
    }


def _require_numbers(name: str, metrics: dict[str, Any]) -> None:
    bad = [k for k in ("val_top1", "max_abs_diff", "top1_agreement") if k in metrics and math.isnan(metrics[k])]
    if bad:
        raise ExportError(
            f"variant {name} produced NaN ({', '.join(bad)}) on {metrics.get('n', '?')} validation images; "
            "this is a bug, please report it"
        )


def check_bar(
    name: str,
    var: dict[str, Any],
    metrics: dict[str, Any],
    reference_top1: float | None,
    max_drop: float,
    *,
    remedy: str | None = None,
) -> dict[str, Any]:
    """Apply the variant's bar: fp32 parity, or the top-1 drop of a reduced precision; returns the
    metrics with ``top1_drop_pp`` added for reduced precisions."""
    _require_numbers(name, metrics)
    if var["precision"] == "fp32":
        if not (metrics["max_abs_diff"] <= FP32_MAX_ABS_DIFF) or not (metrics["top1_agreement"] >= 1.0):
            raise ExportError(
                f"variant {name} does not match PyTorch on {metrics['n']} validation images: max abs logit "
                f"diff {metrics['max_abs_diff']:.2e} (bar {FP32_MAX_ABS_DIFF:g}), top-1 agreement "
                f"{metrics['top1_agreement']:.4f} (bar 1.0); this is a bug, please report it"
            )
        return metrics
    if reference_top1 is None:
        raise ExportError(f"variant {name}: no fp32 variant of {var['format']} to measure its top-1 drop against")
    drop = (reference_top1 - metrics["val_top1"]) * 100.0
    metrics = {"val_top1": metrics["val_top1"], "top1_drop_pp": round(drop, 4), **metrics}
    if not (drop <= max_drop + 1e-9):
        raise ExportError(
            f"variant {name} loses {drop:.2f} pp validation top-1 against {var['format']}-fp32 "
            f"({reference_top1:.4f} -> {metrics['val_top1']:.4f} on {metrics['n']} images), over --max-drop "
            f"{max_drop:g} pp{search_summary(var.get('quantization'))}; "
            + (remedy or f"raise --max-drop to accept it, or leave {var['precision']} out (--precision)")
        )
    return metrics


def search_summary(q: dict[str, Any] | None) -> str:
    if not q:
        return ""
    settings = [q["calibration"]["method"], "per-channel" if q["per_channel"] else "per-tensor"]
    if q.get("bias_correction"):
        settings.append(f"{q['bias_correction']} bias correction")
    return (
        f" (best of {len(q['attempts'])} quantization attempts: {', '.join(settings)}, "
        f"{len(q['excluded_nodes'])} layer(s) kept in float)"
    )


def check_precision_pin(
    name: str, var: dict[str, Any], runtime_info: dict[str, Any], *, remedy: str = "leave it out with --precision"
) -> str | None:
    """What the runtime ran (None: it has no such setting); raises when it is not the pinned precision.

    Without the pin NCNN stores fp16 by itself (and computes in fp16 on ARMv8.2), and OpenVINO's
    CPU plugin runs bf16 by itself on CPUs with bf16 support while a CPU without it answers f32 to a
    bf16 hint: either way the variant would be measured in another precision than the one the
    device will run.
    """
    ran = runtime_info.get("inference_precision")
    pinned = var.get("inference_precision")
    if pinned is not None and ran != pinned:
        fmt = var.get("format") or name.split("-")[0]
        runtime = {"openvino": "OpenVINO", "ncnn": "NCNN"}.get(fmt, fmt)
        raise ExportError(
            f"variant {name}: {runtime} ran {ran} although {pinned} was pinned; "
            f"this CPU cannot check {var['precision']} ({remedy})"
        )
    return ran


def check_merged(
    name: str,
    var: dict[str, Any],
    merged_logits: np.ndarray,
    split_logits: np.ndarray,
    *,
    what: str,
    reference: tuple[np.ndarray, np.ndarray, float | None],
    max_drop: float,
) -> dict[str, Any]:
    """The merged graph ``what`` of variant ``name`` against the same variant's trunk + head files.

    ``reference`` is (PyTorch logits, labels, the format's fp32 top-1). Returns
    ``merged_max_abs_diff`` and ``merged_val_top1``. f32 must match exactly (kernel choice aside);
    bf16 rounds where the graphs meet (the split trunk hands over f32 features), so the merged
    graph gets the variant's own accuracy bar instead.
    """
    ref_logits, y, reference_top1 = reference
    diff = float(np.abs(merged_logits.astype(np.float64) - split_logits).max())
    agreement = float((merged_logits.argmax(1) == split_logits.argmax(1)).mean())
    out = {"merged_max_abs_diff": diff, "merged_val_top1": float((merged_logits.argmax(1) == y).mean())}
    if var.get("inference_precision") in (None, "f32"):
        if not (diff <= MERGED_MAX_ABS_DIFF) or not (agreement >= 1.0):
            raise ExportError(
                f"variant {name}: {what} differs from trunk + head by {diff:.2e} "
                f"(bar {MERGED_MAX_ABS_DIFF:g}), top-1 agreement {agreement:.4f}; this is a bug, please report it"
            )
    else:
        merged = variant_metrics(merged_logits, ref_logits, y)
        check_bar(f"{name} (merged graph)", var, merged, reference_top1, max_drop)
    return out
