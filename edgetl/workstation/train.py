"""Transfer learning: adapt a pretrained trunk to an image folder with one of three strategies.

* ``feature-extraction``: the trunk is frozen; its features are computed **once** per image (and
  kept in a persistent on-disk cache, :mod:`edgetl.workstation.featcache`) and the head is trained on those.
  ``--no-feature-cache`` runs the trunk on every batch instead (needed when augmenting).
* ``fine-tune``: the last ``unfreeze`` blocks of the trunk train with a lower learning rate than the
  head; frozen blocks keep their batch-norm statistics. On the searched path the head is then
  searched again on the fine-tuned trunk's features (:func:`edgetl.workstation.fit.refit_head`).
* ``full``: everything trains (trunk at the lower learning rate).

All strategies use AdamW, a cosine schedule, weight decay, head dropout, label smoothing and early
stopping on validation top-1 with the best epoch kept; ``--balance`` weights the loss by inverse
class frequency; fine-tune and full add light augmentation and optionally mixup/CutMix.

A run is built in ``RUN.partial/`` with a checkpoint after every epoch (``--resume RUN`` continues
it) and renamed to ``RUN`` once complete. The training loops live in :mod:`edgetl.workstation.loops`, feature
computation in :mod:`edgetl.workstation.features`, multi-process training in :mod:`edgetl.workstation.distributed`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgetl.core.atomic import check_data_folders, check_output, output_lock, replace_directory
from edgetl.core.errors import ConfigError, OutputExistsError, RunError
from edgetl.core.imagefolder import class_counts
from edgetl.core.preprocess import Preprocessing
from edgetl.core.runfiles import data_record_problem, run_files_problem
from edgetl.workstation.backbones import get_backbone
from edgetl.workstation.export.common import progress_bar
from edgetl.workstation.loops import (
    LoopIO,
    Placement,
    TrainingDiverged,
    all_features,
    amp_settings,
    predict_logits,
    train_end_to_end,
    train_head,
)
from edgetl.workstation.options import TrainConfig
from edgetl.workstation.prepare import (
    ImageDataset,
    PreparedData,
    class_weights,
    eval_transform,
    prepare_data,
    seed_everything,
    select_device,
    train_transform,
    warn_imbalance,
)
from edgetl.workstation.run import (
    FitRecord,
    finish_run,
    read_json,
    run_config,
    run_metrics,
    split_samples,
    start_run,
    warn_overfitting,
)

log = logging.getLogger(__name__)

# Fields that do not change what is learned: they may differ when a run is resumed.
_RESUMABLE_OVERRIDES = ("device", "workers", "amp")


@dataclasses.dataclass(frozen=True)
class FinetuneResult:
    run_dir: str
    backbone: str
    strategy: str
    pretrained: bool
    epochs: int
    epochs_run: int
    best_epoch: int
    val_top1: float
    train_seconds: float
    feature_seconds: float
    skipped: list[tuple[str, str]]
    feature_cache: dict | None = None
    resumed_from_epoch: int | None = None
    head_search: dict | None = None  # the searched head: chosen settings and the cross-validation table
    crop: dict | None = None  # the preprocessing crop: mode, chosen, why, the comparison table
    strategy_choice: dict | None = None  # --strategy auto: chosen, why, the held-out comparison
    features: dict | None = None  # what the head sees: mode (last | blocks), taps, dim, why
    head_refit: dict | None = None  # a cached fine-tune: its head searched again; the replaced head's val top-1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class TrainOutcome:
    """What :func:`train_model` learned; ``model`` is a CPU TransferModel in eval mode."""

    model: Any
    history: list[dict]
    metrics: dict[str, Any]
    weights_source: Any
    best_epoch: int
    train_seconds: float
    feature_seconds: float
    feature_cache: dict | None
    strategy: str = ""  # the strategy that ran (auto resolved)
    choices: dict = dataclasses.field(default_factory=dict)  # head_search, crop, strategy_choice, preprocessing


# --- training -------------------------------------------------------------------------------------


def train_model(
    prepared: PreparedData,
    cfg: TrainConfig,
    *,
    progress: bool = True,
    resume: dict | None = None,
    on_epoch_end=None,
    cache_dir: str | Path | None = None,
) -> TrainOutcome:
    """Train ``cfg.strategy`` on prepared data; nothing is written except the feature cache."""
    import torch

    from edgetl.workstation import distributed
    from edgetl.workstation.features import FeatureSettings, OnTheFlyFeatures, cached_trunk_features
    from edgetl.workstation.model import Head, TransferModel, build_trunk, set_trainable
    from edgetl.workstation.weights import resolve_weights

    spec = get_backbone(cfg.backbone)
    cfg = spec.train_config(cfg)  # finetune and study resolved it already; other callers may not have
    pp = spec.preprocessing(cfg.img_size)
    labels = prepared.labels
    device = select_device(cfg.device)
    dist = distributed.init_from_env(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    workers = cfg.workers if cfg.workers is not None else (4 if device.type == "cuda" else 0)
    train_counts = class_counts(prepared.train, len(labels))
    if dist.is_main:
        warn_imbalance(train_counts, labels, cfg.balance)

    seed_everything(cfg.seed)
    state_dict, weights_source = resolve_weights(spec, cfg.weights)
    trunk = build_trunk(spec, state_dict)
    del state_dict
    if dist.is_main and cfg.strategy in ("fine-tune", "auto") and cfg.unfreeze > len(trunk.blocks):
        log.warning(
            "--unfreeze %d is more than %s's %d blocks: the fine-tune trains all %d",
            cfg.unfreeze,
            spec.name,
            len(trunk.blocks),
            len(trunk.blocks),
        )
    head = Head(spec.feature_dim, len(labels), dropout=cfg.dropout)
    model = TransferModel(trunk, head)
    weight = class_weights(train_counts) if cfg.balance else None
    criterion = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    evaluation = eval_transform(pp)
    history: list[dict] = []
    if dist.is_main:
        log.info(
            "%s on %s: %d train / %d validation images, %d classes, %s%s, %s",
            cfg.strategy,
            spec.name,
            len(prepared.train),
            len(prepared.val),
            len(labels),
            device,
            f" x{dist.world_size} processes" if dist.enabled else "",
            "pretrained " + weights_source.kind if weights_source.kind != "none" else "RANDOM INIT (no transfer)",
        )
    ytr = torch.tensor([s.label for s in prepared.train])
    yval = torch.tensor([s.label for s in prepared.val])
    t_start = time.perf_counter()
    feature_seconds, cache_info = 0.0, None
    fallback_choices: dict[str, Any] = {}
    amp_on, amp_dtype, _ = amp_settings(cfg.amp, device)
    autocast = (lambda: torch.autocast(device_type=device.type, dtype=amp_dtype)) if amp_on else None
    if searched(cfg, dist.enabled):
        with progress_bar(progress) as bar:
            io = LoopIO(progress=bar, history=history, resume=resume, on_epoch_end=on_epoch_end)
            settings = FeatureSettings(device, cfg.batch_size, cache_dir=cache_dir, autocast=autocast)
            ctx = {
                "backbone": spec.name,
                "weights_sha256": weights_source.sha256,
                "settings": settings,
                "progress": bar,
            }
            outcome = _train_searched(model, prepared, cfg, pp, ctx, criterion=criterion, io=io, t_start=t_start)
        if isinstance(outcome, TrainOutcome):
            outcome.weights_source = weights_source
            warn_overfitting(outcome.metrics)
            return outcome
        # A fine-tune the cached prefix cannot take: end to end, with the preprocessing the search chose.
        fallback_choices = outcome
        pp = Preprocessing.from_dict(fallback_choices["preprocessing"])
        evaluation = eval_transform(pp)
        log.info("fine-tuning end to end: every epoch decodes the images and runs the whole trunk")
    with progress_bar(progress and dist.is_main) as bar:
        io = LoopIO(progress=bar, history=history, resume=resume, on_epoch_end=on_epoch_end)
        if cfg.strategy in ("feature-extraction", "auto"):
            set_trainable(trunk, 0)
            fallback_choices["features"] = use_features(trunk, cfg, searched=False)
            if trunk.taps:
                head = Head(trunk.feature_dim, len(labels), dropout=cfg.dropout)
            trunk.to(device)
            if cfg.feature_cache:
                settings = FeatureSettings(device, cfg.batch_size, cache_dir=cache_dir, autocast=autocast)
                feats = {}
                # Rank 0 fills the cache first; the other ranks then read it (all hits).
                for turn in (0,) if not dist.enabled else (0, 1):
                    if (turn == 0) == dist.is_main:
                        for part, samples in (("train", prepared.train), ("val", prepared.val)):
                            feats[part] = cached_trunk_features(
                                trunk,
                                samples,
                                backbone=spec.name,
                                weights_sha256=weights_source.sha256,
                                pp=pp,
                                settings=settings,
                                progress=bar,
                                description=f"trunk features ({part})",
                            )
                    distributed.barrier(dist)
                (ftr_np, st_tr), (fval_np, st_val) = feats["train"], feats["val"]
                ftr, fval = torch.from_numpy(ftr_np), torch.from_numpy(fval_np)
                hits, misses = st_tr.hits + st_val.hits, st_tr.misses + st_val.misses
                cache_info = {
                    "status": "hit" if not misses else ("miss" if not hits else "partial"),
                    "hits": hits,
                    "misses": misses,
                }
            else:
                train_tf = train_transform(pp, hflip=cfg.hflip) if cfg.augment else evaluation
                ftr = OnTheFlyFeatures(trunk, prepared.train, train_tf, device)
                fval = OnTheFlyFeatures(trunk, prepared.val, evaluation, device)
            feature_seconds = time.perf_counter() - t_start
            best_epoch = train_head(head, ftr, ytr, fval, yval, cfg, criterion=criterion, io=io)
            trunk.cpu()
            with torch.inference_mode():
                head.eval()
                val_logits = head(all_features(fval, cfg.batch_size))
        else:
            set_trainable(trunk, cfg.unfreeze if cfg.strategy == "fine-tune" else None)
            model.to(device)
            if device.type == "cuda":
                model = model.to(memory_format=torch.channels_last)
            train_tf = train_transform(pp, hflip=cfg.hflip) if cfg.augment else evaluation
            train_set = ImageDataset(prepared.train, train_tf)
            val_set = ImageDataset(prepared.val, evaluation)
            wrapped = model
            if dist.enabled:
                wrapped = torch.nn.parallel.DistributedDataParallel(
                    model, device_ids=[device.index] if device.type == "cuda" else None
                )
            best_epoch = train_end_to_end(
                wrapped,
                train_set,
                val_set,
                cfg,
                criterion=criterion.to(device),
                io=io,
                where=Placement(device, dist=dist, workers=workers),
            )
            model = model.cpu().eval()
            val_logits, _ = predict_logits(
                model,
                val_set,
                torch.arange(len(val_set)),
                batch_size=cfg.batch_size,
                workers=0,
                device=torch.device("cpu"),
            )
    train_seconds = time.perf_counter() - t_start
    model = TransferModel(trunk.cpu(), head.cpu()).eval()
    metrics = run_metrics(
        val_logits, yval, labels, cfg, FitRecord(history, best_epoch, train_seconds, feature_seconds, cache_info)
    )
    if dist.is_main:
        warn_overfitting(metrics)
    strategy = "feature-extraction" if cfg.strategy == "auto" else cfg.strategy
    return TrainOutcome(
        model,
        history,
        metrics,
        weights_source,
        best_epoch,
        train_seconds,
        feature_seconds,
        cache_info,
        strategy,
        fallback_choices,
    )


def use_features(trunk, cfg: TrainConfig, *, searched: bool) -> dict[str, Any]:
    """Tap ``trunk`` for what ``cfg.features`` asks a searched head to see (``auto``: every block's
    output on the searched paths, the last feature map elsewhere) -> the run's record of it."""
    from edgetl.workstation.model import tap_positions

    mode = cfg.features
    if mode == "auto":
        mode = "blocks" if searched and cfg.strategy in ("auto", "feature-extraction", "fine-tune") else "last"
    if mode == "last":
        trunk.set_taps(())
        return {"mode": "last", "dim": trunk.feature_dim}
    taps = tap_positions(trunk)
    if not taps:
        if cfg.features == "blocks":
            raise ConfigError(
                f"--features blocks: {cfg.backbone}'s body is not a chain of blocks, so it cannot be tapped; "
                "use --features last"
            )
        log.info("%s's body is not a chain of blocks: the head sees the last feature map only", cfg.backbone)
        return {"mode": "last", "dim": trunk.feature_dim}
    trunk.set_taps(taps)
    return {"mode": "blocks", "taps": taps, "dim": trunk.feature_dim, "last_dim": trunk.last_dim}


def searched(cfg: TrainConfig, distributed: bool) -> bool:
    """Whether ``cfg`` trains on the searched paths (:mod:`edgetl.workstation.fit`): head search on, the
    feature cache on, one process, no image mixing, and a strategy that freezes at least the trunk's start."""
    return (
        cfg.head_search
        and cfg.feature_cache
        and not distributed
        and cfg.strategy in ("auto", "feature-extraction", "fine-tune")
        and not (cfg.mixup or cfg.cutmix)
    )


def _train_searched(
    model, prepared: PreparedData, cfg: TrainConfig, pp, ctx, *, criterion, io, t_start
) -> TrainOutcome | dict[str, Any]:
    """The searched paths: feature extraction with a cross-validated head, the cached-prefix fine-tune
    started from it, and auto between the two. A dict instead of an outcome: a fine-tune whose prefix
    cannot be cached (a trunk it cannot cut, activations over the memory budget); the caller then
    fine-tunes end to end with what the dict records as chosen (preprocessing, crop)."""
    import numpy as np
    import torch

    from edgetl.workstation.fit import (
        cache_prefix,
        decide_auto,
        fit_features,
        head_history,
        linear_logits,
        refit_head,
    )
    from edgetl.workstation.head_search import load_into
    from edgetl.workstation.model import Head, set_trainable
    from edgetl.workstation.prefix import finetune_cached

    trunk, head = model.trunk, model.head  # head: a fresh one on the last feature map (the fine-tune's)
    device = ctx["settings"].device
    labels = prepared.labels
    ytr = np.array([s.label for s in prepared.train], dtype=np.int64)
    yval = np.array([s.label for s in prepared.val], dtype=np.int64)
    set_trainable(trunk, 0)
    features = use_features(trunk, cfg, searched=True)
    trunk.to(device)
    fit = fit_features(trunk, prepared, cfg, pp, ctx, head=cfg.strategy != "fine-tune")
    feature_seconds = time.perf_counter() - t_start
    fe_head = None
    if cfg.strategy != "fine-tune":
        fe_head = Head(trunk.feature_dim, len(labels), dropout=cfg.dropout)
        load_into(fe_head, fit.search)
    choices: dict[str, Any] = {
        "preprocessing": fit.pp.to_dict(),
        "crop": fit.crop,
        "head_search": fit.search.to_dict() if fit.search is not None else None,
        "views": {"feature-extraction": cfg.views_for("feature-extraction"), "fine-tune": cfg.views_for("fine-tune")},
        "features": features,
    }
    strategy, choice, cached = cfg.strategy, None, None
    if strategy == "auto":
        choice = (io.resume or {}).get("strategy_choice") or decide_auto(trunk, prepared, cfg, fit, ctx)
        choices["strategy_choice"] = choice
        strategy = choice["chosen"]
    if strategy == "fine-tune":
        cached = cache_prefix(trunk, prepared.train, prepared.val, cfg, fit.pp, ctx, views=cfg.views_for("fine-tune"))
        if cached is None:  # end to end instead: the head trains on the last feature map
            trunk.set_taps(())
            return {
                "preprocessing": choices["preprocessing"],
                "crop": choices["crop"],
                "features": {"mode": "last", "dim": trunk.feature_dim, "why": "a fine-tune end to end"},
            }
    if strategy == "feature-extraction":
        fval = fit.val_features()
        record, val_logits = head_history(fit.search, fit.ftr, ytr, fval, yval, cfg.label_smoothing)
        io.history.append(record)
        best_epoch = 1
        head = fe_head
    else:
        # A fresh head, not the searched one: started from the linear probe (at the default learning
        # rate or at 1/10 of it) the fine-tune ended 0.5-4 pp lower on the digits and the patches
        # (docs/training.md). It trains along with the blocks, on the last feature map (the cached
        # suffix ends there); then the head is searched again on the fine-tuned trunk's features,
        # taps included, and replaces it (refit_head).
        set_trainable(trunk, cfg.unfreeze)
        head.to(device)
        hook = io.on_epoch_end
        if hook is not None and choice is not None:
            io.on_epoch_end = lambda epoch, state: hook(epoch, {**state, "strategy_choice": choice})
        finetune_cached(
            cached.split,
            head,
            cached.train,
            torch.from_numpy(ytr),
            cached.val,
            torch.from_numpy(yval),
            cfg,
            criterion=criterion.to(device),
            io=io,
            device=device,
        )
        best_epoch = cfg.epochs
        trained_top1 = float(io.history[-1]["val_top1"])  # the loop scored the last epoch's head
        refit, _, fval = refit_head(trunk, cached, ytr, len(labels), cfg, ctx)
        head = Head(trunk.feature_dim, len(labels), dropout=cfg.dropout)
        load_into(head, refit)
        val_logits = torch.from_numpy(linear_logits(refit.weight, refit.bias, fval))
        choices["head_search"] = refit.to_dict()  # the run's head comes from this search
        choices["head_refit"] = {
            "features_dim": trunk.feature_dim,
            # reported, never used to choose: the head trained along with the blocks, on the validation split
            "finetune_head_val_top1": round(trained_top1, 6),
        }
        log.info(
            "head searched again on the fine-tuned trunk's %d features: val top-1 %.4f (the head trained with "
            "the blocks: %.4f)",
            trunk.feature_dim,
            float((val_logits.argmax(1).numpy() == yval).mean()),
            trained_top1,
        )
        fit.search = refit  # the run's head search is the one its head comes from
        choices["prefix_seconds"] = round(cached.seconds, 3)
    train_seconds = time.perf_counter() - t_start
    trunk.cpu()
    head.cpu()
    model = type(model)(trunk, head).eval()
    metrics = run_metrics(
        val_logits,
        torch.from_numpy(yval),
        labels,
        cfg,
        FitRecord(io.history, best_epoch, train_seconds, feature_seconds, fit.cache),
    )
    metrics["stopped_early"] = False  # nothing stops early here: the validation split does not choose
    metrics["strategy"] = strategy
    if fit.search is not None:
        metrics["head_search"] = {"chosen": fit.search.chosen, "cv_top1": fit.search.table[0]["cv_top1"]}
    return TrainOutcome(
        model, io.history, metrics, None, best_epoch, train_seconds, feature_seconds, fit.cache, strategy, choices
    )


# --- the run directory ----------------------------------------------------------------------------


def partial_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


def _save_checkpoint(path: Path, state: dict) -> None:
    import torch

    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def finetune(
    data: str | Path,
    out: str | Path,
    *,
    config: TrainConfig,
    val_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    cache_dir: str | Path | None = None,
) -> FinetuneResult:
    """Train ``config.strategy`` on the image folder ``data``; write the run directory ``out``.

    With ``force`` an existing ``out`` (and an interrupted ``out.partial``) is replaced, but only
    when it is a run folder that is not and does not hold ``data`` or ``val_dir``. The whole
    command holds the output's lock: a second finetune to the same ``out`` fails at once.
    """
    out = Path(out)
    partial = partial_dir(out)
    inputs = [p for p in (data, val_dir) if p is not None]
    # Fail before minutes of training, not after.
    check_data_folders([out], data, val_dir)
    _check_outputs(out, partial, force=force, inputs=inputs)
    with _held(out):
        _check_outputs(out, partial, force=force, inputs=inputs)  # again, now that the output is ours
        if partial.exists():
            shutil.rmtree(partial)
        prepared = prepare_data(data, config, val_dir=val_dir)
        return _train_into(
            out, partial, config, prepared, progress=progress, force=force, inputs=inputs, cache_dir=cache_dir
        )


def _check_outputs(out: Path, partial: Path, *, force: bool, inputs: list) -> None:
    check_output(out, force=force, kind="run", inputs=inputs)
    if partial.exists() or partial.is_symlink():
        if not force:
            raise OutputExistsError(
                f"an interrupted run is in {partial}; continue it with `edgetl finetune --resume {out}`, "
                "or pass --force to start over"
            )
        check_output(partial, force=True, kind="run", inputs=inputs)


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def _held(out: Path) -> Iterator[None]:
    """The output's lock, held by the process that writes the run (rank 0 of a multi-process run)."""
    if _is_main():
        with output_lock(out):
            yield
    else:
        yield


def resume(
    out: str | Path,
    *,
    progress: bool = True,
    overrides: dict[str, Any] | None = None,
    cache_dir: str | Path | None = None,
) -> FinetuneResult:
    """Continue the interrupted run ``out`` (its ``out.partial/`` folder) from its last checkpoint."""
    import torch

    out = Path(out)
    partial = out if out.name.endswith(".partial") else partial_dir(out)
    if partial == out:
        out = out.with_name(out.name[: -len(".partial")])
    if not (partial / "config.json").is_file():
        if (out / "model.pt").is_file():
            raise RunError(f"run {out} is already complete; nothing to resume")
        raise RunError(f"no interrupted run at {partial} (it is created when `edgetl finetune --out {out}` starts)")
    saved, labels, split = (read_json(partial / name) for name in ("config.json", "labels.json", "split.json"))
    damaged = f"the interrupted run {partial} is damaged or was edited"
    problem = run_files_problem(saved, labels, split) or data_record_problem(saved.get("data"))
    if problem:
        raise RunError(f"{damaged}: {problem}; start over with `edgetl finetune ... --force`")
    try:
        saved_cfg = TrainConfig(**saved["train"])  # checked again: config.json may have been edited since
    except (TypeError, ConfigError) as exc:
        raise RunError(f"{damaged}: config.json's training options: {exc}; start over with --force") from None
    for key in overrides or {}:
        if key not in _RESUMABLE_OVERRIDES:
            raise ConfigError(f"--{key.replace('_', '-')} cannot change when resuming (it changes what is learned)")
    cfg = dataclasses.replace(saved_cfg, **(overrides or {}))
    train, val = split_samples(split)
    prepared = PreparedData(
        labels=labels,
        train=train,
        val=val,
        skipped=[(d["path"], d["reason"]) for d in saved["data"]["skipped"]],
        root=saved["data"]["root"],
        val_dir=saved["data"]["val_dir"],
    )
    inputs = [p for p in (prepared.root, prepared.val_dir) if p]
    with _held(out):
        # --resume finishes the run it continues: an ``out`` there now is replaced only if it is a run
        # folder (one that was finished meanwhile, or by hand) and not the data.
        check_output(out, force=True, kind="run", inputs=inputs)
        checkpoint = None
        if (partial / "checkpoint.pt").is_file():
            try:
                checkpoint = torch.load(partial / "checkpoint.pt", map_location="cpu", weights_only=True)
                epoch = int(checkpoint["epoch"])
            except Exception as exc:
                from edgetl.workstation.weights import load_failure

                raise RunError(
                    f"cannot read {partial / 'checkpoint.pt'}: {load_failure(exc)}; start over with "
                    "`edgetl finetune ... --force`"
                ) from None
            log.info("resuming %s after epoch %d", out, epoch)
        return _train_into(
            out,
            partial,
            cfg,
            prepared,
            progress=progress,
            force=True,
            inputs=inputs,
            resume_state=checkpoint,
            cache_dir=cache_dir,
        )


def _train_into(
    out: Path,
    partial: Path,
    cfg: TrainConfig,
    prepared: PreparedData,
    *,
    progress: bool,
    force: bool,
    inputs: list,
    resume_state: dict | None = None,
    cache_dir=None,
) -> FinetuneResult:

    from edgetl.workstation import distributed

    spec = get_backbone(cfg.backbone)
    cfg = spec.train_config(cfg)  # the backbone's defaults, recorded in config.json
    pp = spec.preprocessing(cfg.img_size)
    is_main = _is_main()
    created = is_main and resume_state is None
    if created:
        start_run(
            partial,
            config=run_config(cfg, prepared, pp, cfg.device),
            labels=prepared.labels,
            train=prepared.train,
            val=prepared.val,
        )

    def on_epoch_end(epoch: int, state: dict) -> None:
        if is_main:
            _save_checkpoint(partial / "checkpoint.pt", state)

    try:
        outcome = train_model(
            prepared, cfg, progress=progress, resume=resume_state, on_epoch_end=on_epoch_end, cache_dir=cache_dir
        )
    except BaseException as exc:
        # A run that failed before its first checkpoint has nothing to resume: its RUN.partial (made by
        # this call, never an older one) would only block the retry. A diverged run neither: resuming
        # replays the same steps into the same NaN, so the retry (with another --lr) must start afresh.
        checkpointed = (partial / "checkpoint.pt").is_file()
        if created and (not checkpointed or isinstance(exc, TrainingDiverged)):
            shutil.rmtree(partial, ignore_errors=True)
        elif is_main and isinstance(exc, TrainingDiverged):
            raise TrainingDiverged(f"{exc}; start over with `edgetl finetune ... --force`") from None
        raise
    dist = distributed.init_from_env("cpu") if os.environ.get("WORLD_SIZE", "1") != "1" else distributed.SINGLE
    if is_main:
        finish_run(
            partial,
            model_state={"trunk": outcome.model.trunk.state_dict(), "head": outcome.model.head.state_dict()},
            history=outcome.history,
            metrics=outcome.metrics,
            config_update={
                "weights": outcome.weights_source.to_dict(),
                "pretrained": outcome.weights_source.kind != "none",
                "strategy": outcome.strategy,
                **outcome.choices,
            },
        )
        (partial / "checkpoint.pt").unlink(missing_ok=True)
        if out.exists() or out.is_symlink():
            # Written by something that does not take the lock (edgetl writers do): the same rules again.
            try:
                check_output(out, force=force, kind="run", inputs=inputs)
            except OutputExistsError as exc:
                where = f"it appeared while training; the finished run is in {partial}"
                raise OutputExistsError(f"{exc} ({where})") from None
        replace_directory(partial, out)
        log.info(
            "run written to %s: val top-1 %.4f (best epoch %d) in %.1fs",
            out,
            outcome.metrics["val_top1"],
            outcome.best_epoch,
            outcome.train_seconds,
        )
    distributed.shutdown(dist)
    return FinetuneResult(
        run_dir=str(out),
        backbone=spec.name,
        strategy=outcome.strategy,
        pretrained=outcome.weights_source.kind != "none",
        epochs=cfg.epochs,
        epochs_run=len(outcome.history),
        best_epoch=outcome.best_epoch,
        val_top1=outcome.metrics["val_top1"],
        train_seconds=round(outcome.train_seconds, 3),
        feature_seconds=round(outcome.feature_seconds, 3),
        feature_cache=outcome.feature_cache,
        resumed_from_epoch=resume_state["epoch"] if resume_state else None,
        skipped=list(prepared.skipped),
        head_search=outcome.choices.get("head_search"),
        crop=outcome.choices.get("crop"),
        strategy_choice=outcome.choices.get("strategy_choice"),
        features=outcome.choices.get("features"),
        head_refit=outcome.choices.get("head_refit"),
    )
