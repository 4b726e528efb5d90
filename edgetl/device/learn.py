"""``edgetl learn``: teach a deployed bundle a new head, or new classes of a head, on the device.

No torch: features come from the bundle's trunk **through the variant the device runs** (an int8
trunk's head is trained on int8 features), the head is fitted in numpy (:mod:`edgetl.device.learning`:
multinomial logistic regression with weight decay chosen by cross-validation, or weight imprinting
when a class has too few images to cross-validate), and it is written in every format of the bundle
by each runtime's own head writer (:func:`edgetl.device.backends.head_writer`) into a copy of the
bundle that is verified and renamed into place (:mod:`edgetl.device.bundle_edit`, as ``export
--add-to``). The trunk files never change.

``--extend HEAD`` adds classes to an existing head without its original images: the old classes are
retrained from the exemplar features stored in the bundle at export
(:mod:`edgetl.device.head_stats`), and their accuracy before and after is measured on the stored
validation features; above ``max_drop`` pp of loss the bundle is left as it was.

The new head gets its own feature statistics and familiarity threshold, so ``predict`` flags
unfamiliar inputs for it and a later ``learn --extend`` can build on it. docs/on-device.md.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.core.bundle import check_head_name, file_record
from edgetl.core.errors import BackendError, BundleError, ConfigError, DataError, ExportError, OutputExistsError
from edgetl.core.formats import FORMATS
from edgetl.core.imagefolder import drop_unreadable, scan_image_folder
from edgetl.device import familiarity as fam
from edgetl.device import learning
from edgetl.device.head_stats import (
    ACCEPTANCE,
    EXEMPLARS_PER_CLASS,
    VAL_PER_CLASS,
    HeadStats,
    image_features,
    load_stats,
    origin_record,
    stratified_subset,
    write_stats,
)

log = logging.getLogger(__name__)

MAX_DROP = 2.0  # pp of old-class accuracy an extension may cost (docs/on-device.md)
HEAD_PARITY = 1e-3  # a written head file against the numpy head, max abs logit diff
HEAD_AGREEMENT = 0.98  # the same, run in bf16/f16 (OpenVINO's reduced inference precision): top-1 agreement


@dataclasses.dataclass(frozen=True)
class LearnOptions:
    """What ``edgetl learn`` does besides the bundle, the data and the head's name."""

    extend: str | None = None
    folds: int = 5
    max_drop: float = MAX_DROP
    acceptance: float = ACCEPTANCE
    force: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.folds <= 20:
            raise ConfigError(f"--folds {self.folds}: use 2..20")
        if not (0.0 <= self.max_drop <= 100.0):
            raise ConfigError(f"--max-drop {self.max_drop}: use a number of percentage points in 0..100")
        if not (0.5 <= self.acceptance < 1.0):
            raise ConfigError(f"--acceptance {self.acceptance}: use a fraction in 0.5..0.999")


def learn(
    bundle_dir: str | Path,
    data: str | Path,
    head: str,
    options: LearnOptions | None = None,
    *,
    load=None,
    progress=None,
) -> dict[str, Any]:
    """Train head ``head`` on the images of ``data`` (DATA/<class>/<images>) and add it to the bundle.

    ``load``: the :class:`~edgetl.device.bundle_loading.LoadOptions` of the variant whose trunk gives
    the features (runtime, precision, threads; None: as ``predict`` picks). ``progress``: a rich
    Progress (or None). Returns the ``--json`` document's result (see docs/schemas/learn.json).
    """
    from edgetl.device.bundle_edit import drop_head_files, editing_head
    from edgetl.device.bundle_loading import LoadOptions, open_bundle

    o = options or LearnOptions()
    check_head_name(head)
    t0 = time.perf_counter()
    bundle_dir = Path(bundle_dir)
    bundle = open_bundle(bundle_dir)
    base: HeadStats | None = None
    old_labels: tuple[str, ...] = ()
    if o.extend is not None:
        if o.extend not in bundle.heads:
            raise ConfigError(
                f"--extend {o.extend!r}: bundle {bundle_dir} has no such head (it has: {', '.join(bundle.heads)})"
            )
        base = load_stats(bundle, o.extend)
        old_labels = bundle.heads[o.extend]
    if head in bundle.heads and not o.force and head != o.extend:
        raise OutputExistsError(
            f"bundle {bundle_dir} already has a head {head!r}; choose another --head or pass --force"
        )

    folder = _read_data(data, old_labels, o.extend)
    labels = (*old_labels, *folder.classes)
    load = load or LoadOptions()
    predictor = _trunk_predictor(bundle, load)
    paths = [s.path for s in folder.samples]
    y_new = np.array([s.label for s in folder.samples], dtype=np.int64) + len(old_labels)
    feats = _features(predictor, paths, progress)
    t_features = time.perf_counter() - t0

    if base is not None:
        x = np.concatenate([base.exemplars.astype(np.float32), feats])
        y = np.concatenate([base.exemplar_labels, y_new])
    else:
        x, y = feats, y_new
    t1 = time.perf_counter()
    weight, bias, report = _fit(x, y, labels, o)
    if report.get("fallback"):
        log.warning("%s", report["fallback"])
    t_fit = time.perf_counter() - t1
    old = _old_classes(bundle, predictor, base, weight, bias, o) if base is not None else None

    try:
        stats, familiarity = _stats(feats, y_new, base, labels, o)
    except DataError as exc:  # one image per class: no within-class spread to measure
        log.warning("no unfamiliar-input check and no --extend later for head %r: %s", head, exc)
        stats, familiarity = None, None
    record = {
        "labels": list(labels),
        "input": dict(bundle.manifest["heads"][next(iter(bundle.heads))]["input"]),
        "output": {"name": "logits", "shape": ["batch", len(labels)], "dtype": "float32"},
        "run": {"name": None, "strategy": f"device learn ({report['method']})", "val_top1": report.get("cv_top1")},
        "training_data": _training_data(bundle, folder, o.extend, len(labels), len(y)),
        "origin": {
            **origin_record("device", images=len(paths), trunk_variant=predictor.variant),
            "extends": o.extend,
            "old_classes_from": "stored exemplar features" if base is not None else None,
        },
        "learn": {**report, "old_classes": old},
    }
    with editing_head(bundle_dir, head) as (tmp, m):
        if head == m.get("default_head", next(iter(m["heads"]))) and head in m["heads"]:
            # The variants' export metrics measured the head being replaced: they no longer hold.
            for var in m["variants"].values():
                var["metrics"] = {k: v for k, v in var.get("metrics", {}).items() if k == "features_sqnr_db"}
        drop_head_files(tmp, m, head)
        m["heads"][head] = record
        variants, left_out = _write_heads(tmp, m, head, weight, bias, feats[:64])
        if not variants:
            raise BackendError(
                f"no variant of bundle {bundle_dir} can take a head written here: " + "; ".join(left_out.values())
            )
        if left_out:
            m["heads"][head]["left_out"] = left_out
        m["heads"][head]["metrics"] = variants
        if stats is not None:
            write_stats(tmp, m, head, stats, familiarity, trunk_variant=predictor.variant)
        size = sum(_file_bytes(m, r) for r, rec in m["files"].items() if rec.get("head") == head)
    seconds = time.perf_counter() - t0
    log.info(
        "learned head %r on %d images in %.1fs (features %.1fs, fit %.1fs)",
        head,
        len(paths),
        seconds,
        t_features,
        t_fit,
    )
    return {
        "bundle": str(bundle_dir),
        "head": head,
        "extends": o.extend,
        "labels": list(labels),
        "images": len(paths),
        "trunk_variant": predictor.variant,
        "learn": record["learn"],
        "familiarity": familiarity,
        "variants": variants,
        "left_out": left_out,
        "bytes_added": size,
        "seconds": {"total": seconds, "features": t_features, "fit": t_fit},
    }


def _read_data(data: str | Path, old_labels: tuple[str, ...], extend: str | None):
    folder = scan_image_folder(data, min_classes=1 if old_labels else 2)
    clash = [c for c in folder.classes if c in old_labels]
    if clash:
        raise DataError(
            f"class {clash[0]!r} of {data} is already in head {extend!r}; --extend adds new classes only "
            "(rename the folder, or learn a new head with --head NAME)"
        )
    return drop_unreadable(folder, on_bad_image="skip", min_per_class=1)  # each skipped file is logged


def _trunk_predictor(bundle, load):
    """The variant whose trunk gives the features (as ``predict`` picks it), with its heads."""
    from edgetl.device.bundle_loading import ALL_HEADS

    return bundle.load(dataclasses.replace(load, heads=ALL_HEADS))


def _features(predictor, paths: list[str], progress) -> np.ndarray:
    advance = None
    if progress is not None:
        task = progress.add_task(f"features ({predictor.variant})", total=len(paths), status="")
        advance = lambda n: progress.advance(task, n)  # noqa: E731
    return image_features(predictor, paths, advance)


def _training_data(bundle, folder, extend: str | None, n_classes: int, images: int) -> dict[str, Any]:
    """The head's ``training_data``: what ``evaluate`` leaves out. The device's images by hash, and
    with ``--extend`` the old head's training images too (when its record has them)."""
    from edgetl.core.imagefolder import hash_prefixes, image_sha256, parse_hash_prefixes

    record: dict[str, Any] = {
        "folder": Path(folder.root).name,
        "classes": n_classes,
        "train_images": images,
        "val_images": 0,
    }
    hashes = {image_sha256(s.path) for s in folder.samples}
    if extend is not None:
        old = bundle.manifest["heads"][extend].get("training_data", {}).get("train_sha256_prefixes")
        if old is None:
            return record  # the old images are unknown: no list rather than an incomplete one
        hashes |= parse_hash_prefixes(old)
    record["train_sha256_prefixes"] = hash_prefixes(hashes)
    return record


def _fit(x: np.ndarray, y: np.ndarray, labels: tuple[str, ...], o: LearnOptions):
    """The head: logistic regression with its weight decay chosen by ``o.folds``-fold cross-validation;
    weight imprinting when a class has fewer images than folds (said in ``fallback``; its
    cross-validated top-1 is still reported when every class has two images)."""
    counts = np.bincount(y, minlength=len(labels))
    small = int(np.argmin(counts))
    if counts[small] >= o.folds:
        return learning.train_head(x, y, len(labels), folds=o.folds, seed=o.seed)
    weight, bias = learning.imprint(x, y, len(labels))
    cv = learning.cross_validate(x, y, len(labels), folds=o.folds, seed=o.seed) if counts[small] >= 2 else None
    report = {
        "method": "imprinting",
        "weight_decay": None,
        "cv_top1": cv.imprint_top1 if cv else None,
        "folds": cv.folds if cv else 0,
        "fallback": f"class {labels[small]!r} has {counts[small]} image(s), fewer than --folds {o.folds}: "
        "the head is weight imprinting (normalised class means), not logistic regression",
        "cv": cv.as_dict() if cv else None,
    }
    return weight, bias, report


def _old_classes(bundle, predictor, base: HeadStats, weight, bias, o: LearnOptions) -> dict[str, Any]:
    """Old-class top-1 on the stored validation features: the old head before, the extended head after
    (over all classes: an old image called a new class counts as wrong). Refused above ``max_drop``."""
    val = base.val.astype(np.float32)
    if not len(val):
        raise BundleError(
            f"bundle {bundle.path}: head {o.extend!r} stores no validation features; re-export the bundle"
        )
    old_head = bundle.load(runtime=predictor.runtime, precision=predictor.precision, heads=[o.extend])
    before = float((old_head.head_logits(val)[o.extend].argmax(1) == base.val_labels).mean())
    after = float(((val @ weight.T + bias).argmax(1) == base.val_labels).mean())
    drop = (before - after) * 100.0
    result = {"images": len(val), "top1_before": before, "top1_after": after, "drop_pp": drop, "max_drop": o.max_drop}
    if not drop <= o.max_drop:  # NaN fails too
        raise ExportError(
            f"extending head {o.extend!r} costs its old classes {drop:.1f} pp of top-1 on the stored validation "
            f"features ({before:.4f} -> {after:.4f}, {len(val)} images), over --max-drop {o.max_drop:g}; the bundle "
            "is unchanged (more images of the new classes usually help; or raise --max-drop)"
        )
    return result


def _stats(feats, y_new, base: HeadStats | None, labels, o: LearnOptions) -> tuple[HeadStats, dict[str, Any]]:
    """The new head's statistics and familiarity record. A new head: its own means and covariance, the
    threshold from cross-validated scores (each image scored by a model fitted without it) when every
    class has two images or more. An extended head: the stored covariance (many more images than the
    new ones), the new classes' means added, the threshold the higher of the stored one and what
    accepts ``acceptance`` of the new images."""
    n_classes = len(labels)
    rng_seed = o.seed
    if base is not None:
        offset = len(base.means)
        new_means = np.stack([feats[y_new == c].mean(0) for c in range(offset, n_classes)])
        model = base.familiarity.with_means(new_means)
        new_scores = model.score(feats)
        threshold = max(
            float(fam.threshold_for(base.familiarity.score(base.val.astype(np.float32)), o.acceptance)),
            float(fam.threshold_for(new_scores, o.acceptance)),
        )
        calibrated = "stored validation features (old classes) and the new images"
        ex = stratified_subset(y_new, EXEMPLARS_PER_CLASS, rng_seed)
        exemplars = np.concatenate([base.exemplars, feats[ex].astype(np.float16)])
        exemplar_labels = np.concatenate([base.exemplar_labels, y_new[ex]])
        vs = stratified_subset(y_new, VAL_PER_CLASS, rng_seed)
        val = np.concatenate([base.val, feats[vs].astype(np.float16)])
        val_labels = np.concatenate([base.val_labels, y_new[vs]])
        counts = np.concatenate([base.counts, np.bincount(y_new - offset, minlength=n_classes - offset)])
        images = len(base.val) + len(feats)
    else:
        model = fam.fit(feats, y_new, n_classes)
        scores, calibrated = _held_out_scores(feats, y_new, n_classes, o)
        threshold = float(fam.threshold_for(scores, o.acceptance))
        ex = stratified_subset(y_new, EXEMPLARS_PER_CLASS, rng_seed)
        exemplars, exemplar_labels = feats[ex].astype(np.float16), y_new[ex]
        vs = stratified_subset(y_new, VAL_PER_CLASS, rng_seed)
        val, val_labels = feats[vs].astype(np.float16), y_new[vs]
        counts = np.bincount(y_new, minlength=n_classes)
        images = len(feats)
    stats = HeadStats(
        means=model.means.astype(np.float32),
        counts=counts.astype(np.int64),
        exemplars=exemplars,
        exemplar_labels=exemplar_labels.astype(np.int32),
        val=val,
        val_labels=val_labels.astype(np.int32),
        familiarity=model,
    )
    record = {
        "method": "mahalanobis",
        "detail": "squared Mahalanobis distance to the nearest class mean over D (see docs/on-device.md)",
        "threshold": threshold,
        "acceptance": o.acceptance,
        "calibrated_on": calibrated,
        "images": int(images),
    }
    return stats, record


def _held_out_scores(feats, y, n_classes, o: LearnOptions) -> tuple[np.ndarray, str]:
    counts = np.bincount(y, minlength=n_classes)
    k = min(o.folds, int(counts.min()))
    if k < 2:
        return fam.fit(feats, y, n_classes).score(feats), "the training images (a class has one image: optimistic)"
    scores = np.empty(len(y))
    fold_of = learning.stratified_folds(y, n_classes, k, o.seed)
    for f in range(k):
        train = fold_of != f
        scores[~train] = fam.fit(feats[train], y[train], n_classes).score(feats[~train])
    return scores, f"held-out scores of the training images ({k}-fold)"


def _write_heads(tmp: Path, m: dict[str, Any], head: str, weight, bias, probe: np.ndarray):
    """The head in each format of the bundle, by that runtime's writer, checked through the runtime
    against the numpy head on ``probe`` features. A format whose runtime is not installed here (or
    has no writer) leaves its variants out, saying why."""
    import importlib.util

    from edgetl.device.backends import head_writer
    from edgetl.device.bundle_loading import Bundle

    c, d = weight.shape
    expected = probe @ weight.T + bias
    rels: dict[str, str] = {}
    why: dict[str, str] = {}
    for fmt in dict.fromkeys(v["format"] for v in m["variants"].values()):
        spec = FORMATS[fmt]
        writer = head_writer(spec.runtime)
        if writer is None:
            why[fmt] = f"the {spec.runtime} back-end cannot write heads"
            continue
        if importlib.util.find_spec(spec.runtime_module) is None:
            why[fmt] = f"{spec.runtime} is not installed here to check the head ({spec.install_hint})"
            continue
        rel = f"{fmt}/head.{head}{spec.extension}"
        writer(weight.astype(np.float32), bias.astype(np.float32), tmp / rel)
        rels[fmt] = rel
        m["files"][rel] = file_record(
            tmp,
            rel,
            fmt=fmt,
            precision="fp32",
            role="head",
            head=head,
            inputs=[{"name": "features", "shape": ["batch", d], "dtype": "float32"}],
            outputs=[{"name": "logits", "shape": ["batch", c], "dtype": "float32"}],
            derived_from="edgetl learn (numpy)",
            extra_files=spec.sidecar_paths(rel),
        )
    metrics: dict[str, dict[str, Any]] = {}
    left_out: dict[str, str] = {}
    for name, var in m["variants"].items():
        if var["format"] not in rels:
            left_out[name] = why[var["format"]]
            continue
        var["heads"][head] = rels[var["format"]]
    bundle = Bundle(tmp, m)
    for name, var in m["variants"].items():
        if name in left_out:
            continue
        predictor = bundle.load(runtime=FORMATS[var["format"]].runtime, precision=var["precision"], heads=[head])
        got = predictor.head_logits(probe)[head]
        diff = float(np.abs(got - expected).max())
        agreement = float((got.argmax(1) == expected.argmax(1)).mean())
        reduced = var.get("inference_precision") not in (None, "f32")  # OpenVINO's bf16/f16 variants
        # f32: the written head is the fitted one (1e-3); a variant the runtime runs in bf16 or f16
        # rounds every logit (~1e-2 here), and is held to the same top-1 as the fitted head instead.
        if not (agreement >= HEAD_AGREEMENT if reduced else diff <= HEAD_PARITY):
            raise ExportError(
                f"{name}: the head written for {var['format']} differs from the fitted one (max abs diff {diff:.2e}, "
                f"top-1 agreement {agreement:.3f}); this is a bug"
            )
        metrics[name] = {
            "max_abs_diff": diff,
            "top1_agreement": agreement,
            "checked": "top-1 agreement" if reduced else "max abs diff",
            "bytes": bundle.model_bytes(var, [head]),
        }
    return metrics, left_out


def _file_bytes(m: dict[str, Any], rel: str) -> int:
    rec = m["files"][rel]
    return int(rec["bytes"]) + sum(int(r["bytes"]) for r in (rec.get("extra_files") or {}).values())


__all__ = ["LearnOptions", "learn"]
