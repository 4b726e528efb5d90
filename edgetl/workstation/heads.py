"""Many heads, one trunk: train a new head on a bundle's trunk (adding it: edgetl.workstation.add_head).

``finetune DATA2 --trunk-from BUNDLE`` (:func:`finetune_head`) computes features with the
bundle's own fp32 ONNX trunk through ONNX Runtime and its manifest's preprocessing, exactly what
the device runs, and trains only a head on them: on the training images' features through each of
the bundle's int8 trunks as well (:func:`int8_trunks`), so that the one head holds on every variant.
The run directory records which trunk (sha256) the head belongs to. ``export RUN2 --add-to BUNDLE
--head NAME`` (:mod:`edgetl.workstation.add_head`) then writes the head in every format the bundle
has into a copy of the bundle, checks every variant with the new head through the device runtime,
and replaces the bundle; the trunk files are copied byte for byte, so their sha256 do not change
and a device that already has them needs only the new head.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.core.atomic import atomic_directory, check_data_folders, check_output
from edgetl.core.errors import BundleError, ConfigError
from edgetl.core.imagefolder import class_counts
from edgetl.core.preprocess import Preprocessing
from edgetl.workstation.run import write_run
from edgetl.workstation.train import FinetuneResult

log = logging.getLogger(__name__)

TRUNK_VARIANT = "onnx-fp32"
# Training options that mean nothing when the trunk is fixed by the bundle.
TRUNK_OPTIONS = (
    "backbone",
    "strategy",
    "unfreeze",
    "trunk_lr_scale",
    "img_size",
    "weights",
    "augment",
    "hflip",
    "mixup",
    "cutmix",
    "feature_cache",
    "amp",
)


@dataclasses.dataclass(frozen=True)
class HeadResult(FinetuneResult):
    """What ``finetune --trunk-from`` did: what ``finetune`` reports, plus the trunk it used."""

    trunk_from: dict[str, Any] = dataclasses.field(default_factory=dict)


def trunk_reference(bundle) -> dict[str, Any]:
    """Which trunk a head is trained on: the bundle's fp32 ONNX trunk, by sha256."""
    variant = bundle.manifest["variants"].get(TRUNK_VARIANT)
    if variant is None:
        raise BundleError(
            f"bundle {bundle.path} has no {TRUNK_VARIANT} variant (it has: {', '.join(bundle.variants)}); "
            "--trunk-from needs the fp32 ONNX trunk: export the bundle with --model-format onnx and --precision fp32"
        )
    rel = variant["trunk"]
    backbone = bundle.manifest["backbone"]
    return {
        "bundle": str(bundle.path.resolve()),
        "trunk": rel,
        "sha256": bundle.manifest["files"][rel]["sha256"],
        "backbone": backbone["name"],
        "feature_dim": int(backbone["feature_dim"]),
    }


def _features(predictors: dict[str, Any], samples, progress, description: str) -> dict[str, np.ndarray]:
    """Each image decoded and preprocessed once, then through every predictor's trunk: {name: (N, D)}."""
    from edgetl.core.preprocess import load_image
    from edgetl.workstation.export import BATCH

    task = progress.add_task(description, total=len(samples), status="")
    out: dict[str, list[np.ndarray]] = {name: [] for name in predictors}
    for i in range(0, len(samples), BATCH):
        chunk = samples[i : i + BATCH]
        x = next(iter(predictors.values())).preprocess([load_image(s.path) for s in chunk])
        for name, predictor in predictors.items():
            out[name].append(predictor.features(x))
        progress.advance(task, len(chunk))
    return {name: np.concatenate(parts).astype(np.float32) for name, parts in out.items()}


def int8_trunks(bundle) -> tuple[dict[str, Any], dict[str, str]]:
    """A predictor for each int8 variant of the bundle whose runtime is installed here:
    ({variant: predictor}, {variant left out: why}).

    An int8 trunk's features are the fp32 trunk's plus quantization noise (14-15 dB SQNR for
    MobileNetV2 at 224 px); a head fitted on fp32 features alone meets that noise first on the
    device: a parity head on the digits lost 4.18 pp on ONNX Runtime int8 and 2.51 pp on OpenVINO
    int8. Fitted on the training images' features through these trunks as well (each image once per
    trunk, kept in one cross-validation fold), the same head lost 0.28 and 0.56 pp
    (benchmarks/int8_speed_accuracy.py, docs/export.md).
    """
    from edgetl.core.errors import BackendError
    from edgetl.core.formats import FORMATS

    predictors: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name, variant in bundle.manifest["variants"].items():
        if variant.get("precision") != "int8":
            continue
        try:
            predictors[name] = bundle.load(
                runtime=FORMATS[variant["format"]].runtime, precision="int8", heads=[next(iter(bundle.heads))]
            )
        except BackendError as exc:  # its runtime is not installed here: the head is still checked on it at --add-to
            skipped[name] = str(exc)
            log.info("head features: %s left out (%s)", name, exc)
    return predictors, skipped


def head_config(given: dict[str, Any], *, recipe: str | None = None, resume: str | None = None):
    """The head's :class:`~edgetl.workstation.options.TrainConfig` from the options given with
    ``--trunk-from``; options that shape the trunk (:data:`TRUNK_OPTIONS`), a recipe and ``--resume``
    do not apply (the trunk and its preprocessing come from the bundle) and are refused by name."""
    from edgetl.workstation.options import TrainConfig
    from edgetl.workstation.recipes import HEAD_SETTINGS

    fixed = sorted(
        k for k in given if k in TRUNK_OPTIONS and not (k == "strategy" and given[k] in ("feature-extraction", "auto"))
    )
    if resume or recipe or fixed:
        what = "--resume" if resume else "--recipe" if recipe else "--" + fixed[0].replace("_", "-")
        raise ConfigError(
            f"{what} does not apply with --trunk-from: the trunk and its preprocessing come from the bundle"
        )
    given = dict(given)
    if "head_search" not in given and any(k in given for k in HEAD_SETTINGS):
        given["head_search"] = False  # as `finetune`: head settings given are used, not searched
    return TrainConfig(**given)


def finetune_head(
    data: str | Path,
    out: str | Path,
    *,
    trunk_from: str | Path,
    config=None,
    val_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> HeadResult:
    """Train a head for the image folder ``data`` on the trunk of bundle ``trunk_from``; write run ``out``.

    ``config`` (a :class:`edgetl.workstation.options.TrainConfig`) supplies the head's training options (epochs,
    lr, weight decay, dropout, label smoothing, batch size, patience, seed, validation split); its
    strategy must be feature-extraction, and an ``img_size`` must match the bundle's input size.
    """
    import torch

    from edgetl.device.runtime import open_bundle
    from edgetl.workstation.export import progress_bar
    from edgetl.workstation.fit import head_history
    from edgetl.workstation.head_search import load_into, search_head
    from edgetl.workstation.loops import LoopIO, train_head
    from edgetl.workstation.model import Head
    from edgetl.workstation.options import TrainConfig
    from edgetl.workstation.prepare import class_weights, prepare_data, warn_imbalance
    from edgetl.workstation.run import FitRecord, run_config, run_metrics, warn_overfitting

    cfg = config or TrainConfig()
    if cfg.strategy not in ("feature-extraction", "auto"):
        raise ConfigError(f"--trunk-from trains a head on a fixed trunk: --strategy {cfg.strategy} does not apply")
    cfg = dataclasses.replace(cfg, strategy="feature-extraction")
    out = Path(out)
    # --force replaces a run folder, never the data, the validation folder or the bundle read here.
    inputs = [p for p in (data, val_dir, trunk_from) if p is not None]
    check_data_folders([out], data, val_dir)
    check_output(out, force=force, kind="run", inputs=inputs)
    bundle = open_bundle(trunk_from)  # checksums verified: the features come from exactly this trunk
    ref = trunk_reference(bundle)
    pp: Preprocessing = bundle.preprocessing
    if cfg.img_size is not None and cfg.img_size != pp.input_size:
        raise ConfigError(
            f"--img-size {cfg.img_size} differs from the bundle's input size {pp.input_size}; leave it out"
        )
    cfg = dataclasses.replace(cfg, backbone=ref["backbone"], img_size=pp.input_size)

    # The same scan, unreadable-image policy and split as `finetune`: a head run and a full run of the
    # same data and seed train and validate on the same files.
    prepared = prepare_data(data, cfg, val_dir=val_dir)
    train, val, labels = prepared.train, prepared.val, prepared.labels
    train_counts = class_counts(train, len(labels))
    warn_imbalance(train_counts, labels, cfg.balance)
    log.info(
        "head on the trunk of %s (%s, sha256 %s...): %d train / %d validation images, %d classes",
        bundle.path,
        ref["backbone"],
        ref["sha256"][:12],
        len(train),
        len(val),
        len(labels),
    )

    predictor = bundle.load(runtime="onnxruntime", precision="fp32", heads=[next(iter(bundle.heads))])
    t_start = time.perf_counter()
    with progress_bar(progress) as bar:
        # Each training image also through the bundle's int8 trunks: one head for every variant.
        int8, views_skipped = int8_trunks(bundle)
        views = _features({TRUNK_VARIANT: predictor, **int8}, train, bar, "trunk features (train)")
        ftr = torch.from_numpy(views.pop(TRUNK_VARIANT))
        fval = torch.from_numpy(_features({TRUNK_VARIANT: predictor}, val, bar, "trunk features (val)")[TRUNK_VARIANT])
        feature_seconds = time.perf_counter() - t_start
        ytr = torch.tensor([s.label for s in train], dtype=torch.long)
        yval = torch.tensor([s.label for s in val], dtype=torch.long)
        copies = 1 + len(views)
        if views:
            ftr = torch.cat([ftr, *(torch.from_numpy(v) for v in views.values())])
            ytr = ytr.repeat(copies)
        groups = np.tile(np.arange(len(train)), copies) if views else None  # an image's views: one fold
        torch.manual_seed(cfg.seed)
        head = Head(ref["feature_dim"], len(labels), dropout=cfg.dropout)
        weight = class_weights(train_counts) if cfg.balance else None  # --balance, as in `finetune`
        criterion = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
        history: list[dict] = []
        search = None
        if cfg.head_search:
            # As `finetune` does: the head's settings cross-validated on the training split only.
            search = search_head(
                ftr.numpy(), ytr.numpy(), len(labels), groups=groups, folds=cfg.folds, seed=cfg.seed, progress=bar
            )
            if search.fallback:
                log.warning("head search: %s", search.fallback)
            load_into(head, search)
            record, val_logits = head_history(
                search, ftr.numpy(), ytr.numpy(), fval.numpy(), yval.numpy(), cfg.label_smoothing
            )
            history.append(record)
            best_epoch = 1
        else:
            best_epoch = train_head(head, ftr, ytr, fval, yval, cfg, criterion=criterion, io=LoopIO(bar, history))
            head.eval()
            with torch.inference_mode():
                val_logits = head(fval)
    train_seconds = time.perf_counter() - t_start
    head.eval()
    metrics = run_metrics(val_logits, yval, labels, cfg, FitRecord(history, best_epoch, train_seconds, feature_seconds))
    if search is not None:
        metrics["stopped_early"] = False
    warn_overfitting(metrics)
    weights = bundle.manifest["backbone"].get("weights") or {}
    config = run_config(cfg, prepared, pp, "cpu (trunk: onnxruntime)")
    config.update({"weights": weights, "pretrained": weights.get("kind") not in (None, "none"), "trunk_from": ref})
    config["trunk_views"] = {"trained_on": [TRUNK_VARIANT, *views], "left_out": views_skipped}
    if search is not None:
        config["head_search"] = search.to_dict()
    with atomic_directory(out, force=force, kind="run", inputs=inputs) as tmp:
        write_run(
            tmp,
            config=config,
            labels=labels,
            train=train,
            val=val,
            model_state={"head": head.state_dict()},
            history=history,
            metrics=metrics,
        )
    log.info(
        "head run written to %s: val top-1 %.4f (best epoch %d) in %.1fs",
        out,
        metrics["val_top1"],
        best_epoch,
        train_seconds,
    )
    return HeadResult(
        run_dir=str(out),
        backbone=ref["backbone"],
        strategy=cfg.strategy,
        pretrained=config["pretrained"],
        epochs=cfg.epochs,
        epochs_run=len(history),
        best_epoch=best_epoch,
        val_top1=metrics["val_top1"],
        train_seconds=round(train_seconds, 3),
        feature_seconds=round(feature_seconds, 3),
        trunk_from=ref,
        skipped=list(prepared.skipped),
        head_search=search.to_dict() if search is not None else None,
    )
