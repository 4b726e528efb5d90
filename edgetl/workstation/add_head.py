"""Add a head (trained with ``finetune --trunk-from``) to the bundle whose trunk it was trained on.

``edgetl export RUN --add-to BUNDLE --head NAME``: copy -> add -> verify every variant through the
device runtime -> replace. The trunk files are never rewritten. Each format's plug-in
(:mod:`edgetl.workstation.export.formats`) writes the head and merged graphs, and every variant
passes the same checks as in ``export`` (:mod:`edgetl.workstation.export.checks`: parity or
accuracy bar, the pinned inference precision, merged graphs). Training the head:
:mod:`edgetl.workstation.heads`.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.core.bundle import check_head_name, file_record, write_manifest
from edgetl.core.errors import ExportError, OutputExistsError
from edgetl.core.formats import FORMATS, variant_name
from edgetl.device.bundle_edit import drop_head_files, editing_head, leave_out
from edgetl.device.head_stats import add_stats, origin_record
from edgetl.workstation.export.checks import check_bar, check_merged, check_precision_pin, variant_metrics
from edgetl.workstation.export.common import (
    batches,
    int8_as_written,
    load_arrays,
    onnx_as_written,
    progress_bar,
    run_lineage,
    run_origin,
    tensor_spec,
    training_data_record,
)
from edgetl.workstation.export.formats import registry
from edgetl.workstation.heads import TRUNK_VARIANT

log = logging.getLogger(__name__)


def add_head(
    run_dir: str | Path,
    bundle_dir: str | Path,
    head: str,
    *,
    max_drop: float = 1.0,
    partial: bool = False,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Add the head of run ``run_dir`` (trained with ``--trunk-from``) to the bundle as ``head``.

    Copy -> add -> verify every variant through the device runtime -> replace. The trunk files are
    never rewritten. Refused: a run trained on another trunk (sha256), a head name already in the
    bundle (unless ``force``), a variant where the new head misses its bar (fp32 parity with
    PyTorch; fp16/bf16/int8 top-1 drop <= ``max_drop`` pp against fp32). An int8 trunk was
    quantized and checked with the bundle's first head; another task can suffer more from the same
    trunk. With ``partial`` such a reduced-precision variant is left without the new head (and
    says why in ``heads.<name>.left_out``) instead of failing the whole addition.
    """
    from edgetl.device.runtime import open_bundle
    from edgetl.workstation.run import load_run

    check_head_name(head)
    bundle_dir = Path(bundle_dir)
    run = load_run(run_dir)
    tf = run.trunk_from
    if not tf:
        raise ExportError(
            f"run {run.path} was not trained on a bundle's trunk; train the head with "
            f"`edgetl finetune DATA --trunk-from {bundle_dir} --out RUN`, or export this run to its own bundle"
        )
    bundle = open_bundle(bundle_dir)  # schema and every checksum
    manifest = bundle.manifest
    have = manifest["files"].get(tf["trunk"], {}).get("sha256")
    if have != tf["sha256"]:
        raise ExportError(
            f"bundle {bundle_dir}'s trunk {tf['trunk']} (sha256 {str(have)[:12]}...) is not the trunk run {run.path} "
            f"was trained on (sha256 {tf['sha256'][:12]}..., from {tf['bundle']}); train the head on this bundle: "
            f"`edgetl finetune DATA --trunk-from {bundle_dir}`"
        )
    if run.config["preprocessing"] != manifest["preprocessing"]:
        raise ExportError(f"run {run.path} was trained with other preprocessing than bundle {bundle_dir}'s")
    if head in manifest["heads"] and not force:
        raise OutputExistsError(
            f"bundle {bundle_dir} already has a head {head!r}; choose another --head or pass --force"
        )
    if not run.val_samples:
        raise ExportError(f"run {run.path} has no validation images: the new head cannot be checked")

    t0 = time.perf_counter()
    x_val, y_val = load_arrays(run.val_samples, bundle.preprocessing)
    reference = _reference_logits(bundle, run, x_val)
    with progress_bar(progress) as bar, editing_head(bundle_dir, head, inputs=[run.path]) as (tmp, m):
        drop_head_files(tmp, m, head)
        _write_head_files(tmp, m, run, head)
        write_manifest(tmp, m)
        check = _HeadCheck(x_val=x_val, y_val=y_val, reference=reference, max_drop=max_drop, partial=partial)
        results, left_out = _check_new_head(tmp, m, head, check, bar)
        m["heads"][head]["metrics"] = results
        if left_out:
            leave_out(tmp, m, head, left_out)
        paths, labels = [s.path for s in run.train_samples], np.array([s.label for s in run.train_samples])
        add_stats(tmp, m, head, paths, labels, x_val, y_val, progress=bar)
    log.info(
        "added head %r to %s in %.1fs%s",
        head,
        bundle_dir,
        time.perf_counter() - t0,
        f" (left out of {', '.join(left_out)})" if left_out else "",
    )
    return {"bundle": str(bundle_dir), "head": head, "variants": results, "left_out": left_out}


def _reference_logits(bundle, run, x_val: np.ndarray) -> np.ndarray:
    """PyTorch's head on the bundle's own fp32 trunk features (through ONNX Runtime, as in training)."""
    import torch

    predictor = bundle.load(runtime="onnxruntime", precision="fp32", heads=[next(iter(bundle.heads))])
    features = np.concatenate([predictor.features(b) for b in batches(x_val)])
    with torch.inference_mode():
        return run.build_head()(torch.from_numpy(features)).numpy().astype(np.float64)


def _write_head_files(tmp: Path, m: dict[str, Any], run, head: str) -> None:
    """Export the head in each format of the bundle (and merged graphs where the bundle has them),
    each written by its format's plug-in."""
    import torch

    from edgetl.workstation.export.formats.onnx import export_onnx

    plugins = registry()
    d, c = run.feature_dim, len(run.labels)
    head_in, head_out = tensor_spec("features", ["batch", d]), tensor_spec("logits", ["batch", c])
    formats = [f for f in FORMATS if any(v["format"] == f for v in m["variants"].values())]
    origin = run_origin(run)
    onnx_rel = f"onnx/head.{head}{FORMATS['onnx'].extension}"
    rels = {}
    work = Path(tempfile.mkdtemp(prefix="edgetl-head-"))
    try:
        # Every format starts from the ONNX head (as in export); the shipped ONNX head, when the
        # bundle has one, is what the other formats' heads are derived from.
        source = work / "head.onnx"
        export_onnx(run.build_head(), torch.zeros(2, d), source, input_name="features", output_name="logits")
        for fmt in formats:
            rel = f"{fmt}/head.{head}{FORMATS[fmt].extension}"
            (tmp / fmt).mkdir(exist_ok=True)
            plugins[fmt].write_head(source, tmp / rel)
            rels[fmt] = rel
            m["files"][rel] = file_record(
                tmp,
                rel,
                fmt=fmt,
                precision="fp32",
                role="head",
                head=head,
                inputs=[head_in],
                outputs=[head_out],
                derived_from=onnx_rel if fmt != "onnx" and "onnx" in formats else origin,
                extra_files=FORMATS[fmt].sidecar_paths(rel),
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    m["heads"][head] = {
        "labels": list(run.labels),
        "input": head_in,
        "output": head_out,
        "run": run_lineage(run, "feature-extraction (trunk from bundle)"),
        "training_data": training_data_record(run),
        "origin": origin_record(
            "workstation", images=len(run.train_samples), trunk_variant=TRUNK_VARIANT, run=run.path.resolve().name
        ),
    }
    for var in m["variants"].values():
        fmt = var["format"]
        var["heads"][head] = rels[fmt]
        if var.get("merged"):
            trunk = m["files"][var["trunk"]]
            rel = f"{fmt}/merged.{head}.{trunk['precision']}{FORMATS[fmt].extension}"
            if rel not in m["files"]:
                plugins[fmt].merge(tmp / var["trunk"], tmp / rels[fmt], tmp / rel)
                m["files"][rel] = file_record(
                    tmp,
                    rel,
                    fmt=fmt,
                    precision=trunk["precision"],
                    role="merged",
                    head=head,
                    inputs=[m["trunk"]["input"]],
                    outputs=[head_out],
                    derived_from=f"{var['trunk']} + {rels[fmt]}",
                    extra_files=FORMATS[fmt].sidecar_paths(rel),
                )
            var["merged"][head] = rel


@dataclasses.dataclass(frozen=True, kw_only=True)
class _HeadCheck:
    """What the new head is checked against: the run's validation images, PyTorch's logits on them,
    the accuracy gate, and whether a reduced-precision variant that misses it is left out (``partial``)."""

    x_val: np.ndarray
    y_val: np.ndarray
    reference: np.ndarray
    max_drop: float
    partial: bool = False


def _check_new_head(
    tmp: Path, m: dict[str, Any], head: str, check: _HeadCheck, bar
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Every variant with the new head, through the device runtime, against its bar; returns the
    metrics and (with ``check.partial``) the reduced-precision variants that missed it, with the reason."""
    from edgetl.device.runtime import open_bundle

    x_val, y_val, reference, max_drop = check.x_val, check.y_val, check.reference, check.max_drop

    bundle = open_bundle(tmp)
    results: dict[str, dict[str, Any]] = {}
    left_out: dict[str, str] = {}
    order = sorted(m["variants"], key=lambda v: (m["variants"][v]["precision"] != "fp32", v))
    for name in order:
        var = m["variants"][name]
        runtime = FORMATS[var["format"]].runtime
        predictor = bundle.load(runtime=runtime, precision=var["precision"], heads=[head])
        task = bar.add_task(f"check {name} with head {head}", total=len(x_val), status="")
        chunks = []
        for b in batches(x_val):
            chunks.append(predictor.logits(b)[head])
            bar.advance(task, len(b))
        split = np.concatenate(chunks)
        metrics = variant_metrics(split, reference, y_val)
        if var["precision"] == "int8" and int8_as_written(var["format"]):
            # As at export: this CPU's int8 kernels saturate, the bar holds for the graph as written.
            written, _ = onnx_as_written(tmp, var["trunk"], var["heads"][head], x_val)
            metrics = {**variant_metrics(written, reference, y_val), "scored": "as written"}
            metrics["this_cpu"] = {"val_top1": float((split.argmax(1) == y_val).mean())}
        metrics["bytes"] = bundle.model_bytes(var, [head])
        fp32 = results.get(variant_name(var["format"], "fp32")) or results.get("onnx-fp32")
        fp32_top1 = fp32["val_top1"] if fp32 else None
        remedy = (
            f"the {var['precision']} trunk was tuned with the bundle's first head: raise --max-drop to accept "
            "it, or pass --partial to add the head to the other variants only"
        )
        try:
            ran = check_precision_pin(
                f"{name} (head {head})", var, predictor.runtime_info, remedy="pass --partial to leave it out"
            )
            if ran:
                metrics["inference_precision"] = ran
            results[name] = check_bar(f"{name} (head {head})", var, metrics, fp32_top1, max_drop, remedy=remedy)
            if head in (var.get("merged") or {}):
                merged = bundle.load(runtime=runtime, precision=var["precision"], heads=[head], merged=True)
                logits = np.concatenate([merged.logits(b)[head] for b in batches(x_val)])
                results[name].update(
                    check_merged(
                        name,
                        var,
                        logits,
                        split,
                        what=f"the merged graph of head {head!r}",
                        reference=(reference, y_val, fp32_top1),
                        max_drop=max_drop,
                    )
                )
        except ExportError as exc:
            if not check.partial or var["precision"] == "fp32":
                raise
            log.warning("%s; head %r left out of %s", str(exc).split("; ")[0], head, name)
            left_out[name] = str(exc)
            continue
        log.info(
            "%s, head %s: val top-1 %.4f, max abs diff %.2e, agreement %.4f",
            name,
            head,
            metrics["val_top1"],
            metrics["max_abs_diff"],
            metrics["top1_agreement"],
        )
    return results, left_out
