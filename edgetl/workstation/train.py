"""Transfer learning: adapt a pretrained trunk to an image folder with one of three strategies.

* ``feature-extraction``: the trunk is frozen; its features are computed **once** per image (and
  kept in a persistent on-disk cache, :mod:`edgetl.workstation.featcache`) and the head is trained on those.
  ``--no-feature-cache`` runs the trunk on every batch instead (needed when augmenting).
* ``fine-tune``: the last ``unfreeze`` blocks of the trunk train with a lower learning rate than the
  head; frozen blocks keep their batch-norm statistics.
* ``full``: everything trains (trunk at the lower learning rate).

All strategies use AdamW, a cosine schedule, weight decay, head dropout, label smoothing and early
stopping on validation top-1 with the best epoch kept; ``--balance`` weights the loss by inverse
class frequency; fine-tune and full add light augmentation and optionally mixup/CutMix.

A run is built in ``RUN.partial/`` with a checkpoint after every epoch (``--resume RUN`` continues
it) and renamed to ``RUN`` once complete. The training loops live in :mod:`edgetl.workstation.loops`, feature
computation in :mod:`edgetl.workstation.features`, multi-process training in :mod:`edgetl.workstation.distributed`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgetl import __version__
from edgetl.core.errors import ConfigError, OutputExistsError, RunError
from edgetl.core.imagefolder import Sample, class_counts, drop_unreadable, scan_image_folder
from edgetl.core.metrics import classification_report
from edgetl.core.preprocess import Preprocessing, load_image
from edgetl.workstation.backbones import get_backbone
from edgetl.workstation.data import stratified_split
from edgetl.workstation.loops import EarlyStopping, LoopIO, cosine, predict_logits, train_end_to_end, train_head  # noqa: F401
from edgetl.workstation.options import AMP_MODES, STRATEGIES, TrainConfig  # noqa: F401 (re-exported)
from edgetl.workstation.run import finish_run, plot_history, start_run  # noqa: F401 (plot_history: re-exported)

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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PreparedData:
    labels: list[str]
    train: list[Sample]
    val: list[Sample]
    skipped: list[tuple[str, str]]
    root: str
    val_dir: str | None = None


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


# --- transforms and datasets --------------------------------------------------------------------


def eval_transform(pp: Preprocessing):
    """The torchvision eval transform; ``edgetl.core.preprocess`` is its torch-free twin (tested equal)."""
    from torchvision import transforms as T

    interp = T.InterpolationMode(pp.interpolation)
    return T.Compose(
        [
            T.Resize(pp.resize_size, interpolation=interp),
            T.CenterCrop(pp.input_size),
            T.ToTensor(),
            T.Normalize(pp.mean, pp.std),
        ]
    )


def train_transform(pp: Preprocessing, *, hflip: bool):
    """Light augmentation at the eval scale: random crop position, mild colour jitter, optional flip.

    Cropping after the same resize as evaluation keeps objects at the scale the model is tested on;
    flips are off by default because many targets (digits, text, parts with handedness) are not
    mirror-symmetric.
    """
    from torchvision import transforms as T

    interp = T.InterpolationMode(pp.interpolation)
    steps = [T.Resize(pp.resize_size, interpolation=interp), T.RandomCrop(pp.input_size)]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ColorJitter(0.2, 0.2, 0.2), T.ToTensor(), T.Normalize(pp.mean, pp.std)]
    return T.Compose(steps)


class _ImageDataset:
    """Images decoded and transformed on access (benchmarks/train_loop_overhead.py builds its baseline on it)."""

    def __init__(self, samples: list[Sample], transform):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        return self.transform(load_image(s.path)), s.label


def seed_everything(seed: int) -> None:
    import random

    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def select_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    return torch.device(name)


def progress_bar(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=Console(stderr=True),
        disable=not enabled,
    )


# --- data -----------------------------------------------------------------------------------------


def prepare_data(data: str | Path, cfg: TrainConfig, *, val_dir: str | Path | None = None) -> PreparedData:
    """Scan ``data`` (and ``val_dir``), drop unreadable images, split by ``cfg.seed``."""
    folder = drop_unreadable(scan_image_folder(data), on_bad_image=cfg.on_bad_image, min_per_class=1 if val_dir else 2)
    if val_dir is not None:
        val_folder = drop_unreadable(scan_image_folder(val_dir, classes=folder.classes), on_bad_image=cfg.on_bad_image)
        train, val = list(folder.samples), list(val_folder.samples)
        skipped = list(folder.skipped) + list(val_folder.skipped)
    else:
        train, val = stratified_split(folder, cfg.val_split, cfg.seed)
        skipped = list(folder.skipped)
    return PreparedData(
        list(folder.classes),
        train,
        val,
        skipped,
        str(Path(data).resolve()),
        str(Path(val_dir).resolve()) if val_dir else None,
    )


def subsample_per_class(samples: list[Sample], n: int | None, seed: int) -> list[Sample]:
    """At most ``n`` samples per class, chosen by ``seed`` (None: all). Order is kept."""
    if n is None:
        return list(samples)
    rng = np.random.default_rng(seed)
    keep: set[int] = set()
    by_class: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        by_class.setdefault(s.label, []).append(i)
    for idx in by_class.values():
        keep.update(idx if len(idx) <= n else rng.choice(idx, size=n, replace=False).tolist())
    return [s for i, s in enumerate(samples) if i in keep]


def class_weights(counts: list[int]):
    """Inverse-frequency weights normalised to mean 1 (``--balance``)."""
    import torch

    counts_t = torch.tensor([max(c, 1) for c in counts], dtype=torch.float32)
    w = counts_t.sum() / (len(counts) * counts_t)
    return w / w.mean()


def warn_imbalance(counts: list[int], labels: list[str], balance: bool) -> None:
    if max(counts) > 3 * min(counts):
        small = labels[counts.index(min(counts))]
        log.warning(
            "classes are imbalanced (train images per class from %d (%r) to %d)%s; "
            "per-class accuracy is in metrics.json",
            min(counts),
            small,
            max(counts),
            "" if balance else ": consider --balance",
        )


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
    from edgetl.workstation.features import OnTheFlyFeatures, cached_trunk_features
    from edgetl.workstation.model import Head, TransferModel, build_trunk, set_trainable
    from edgetl.workstation.weights import resolve_weights

    spec = get_backbone(cfg.backbone)
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
    amp_on, amp_dtype, _ = _amp(cfg, device)
    autocast = (lambda: torch.autocast(device_type=device.type, dtype=amp_dtype)) if amp_on else None
    with progress_bar(progress and dist.is_main) as bar:
        if cfg.strategy == "feature-extraction":
            set_trainable(trunk, 0)
            trunk.to(device)
            if cfg.feature_cache:
                feats = {}
                # Rank 0 fills the cache first; the other ranks then read it (all hits).
                for turn in (0,) if not dist.enabled else (0, 1):
                    if (turn == 0) == dist.is_main:
                        for part, samples in (("train", prepared.train), ("val", prepared.val)):
                            feats[part] = cached_trunk_features(
                                trunk,
                                backbone=spec.name,
                                weights_sha256=weights_source.sha256,
                                pp=pp,
                                samples=samples,
                                transform=evaluation,
                                device=device,
                                batch_size=cfg.batch_size,
                                progress=bar,
                                description=f"trunk features ({part})",
                                cache_dir=cache_dir,
                                autocast=autocast,
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
            best_epoch = train_head(
                head,
                ftr,
                ytr,
                fval,
                yval,
                cfg,
                criterion=criterion,
                progress=bar,
                history=history,
                resume=resume,
                on_epoch_end=on_epoch_end,
            )
            trunk.cpu()
            with torch.inference_mode():
                head.eval()
                val_logits = head(
                    fval if isinstance(fval, torch.Tensor) else torch.from_numpy(_features_array(fval, cfg.batch_size))
                )
        else:
            set_trainable(trunk, cfg.unfreeze if cfg.strategy == "fine-tune" else None)
            model.to(device)
            if device.type == "cuda":
                model = model.to(memory_format=torch.channels_last)
            train_tf = train_transform(pp, hflip=cfg.hflip) if cfg.augment else evaluation
            train_set = _ImageDataset(prepared.train, train_tf)
            val_set = _ImageDataset(prepared.val, evaluation)
            wrapped = model
            if dist.enabled:
                wrapped = torch.nn.parallel.DistributedDataParallel(
                    model, device_ids=[device.index] if device.type == "cuda" else None
                )
            io = LoopIO(progress=bar, history=history, resume=resume, on_epoch_end=on_epoch_end)
            best_epoch = train_end_to_end(
                wrapped,
                train_set,
                val_set,
                cfg,
                criterion=criterion.to(device),
                device=device,
                io=io,
                dist=dist,
                workers=workers,
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
        val_logits,
        yval,
        labels,
        cfg,
        history=history,
        best_epoch=best_epoch,
        train_seconds=train_seconds,
        feature_seconds=feature_seconds,
        feature_cache=cache_info,
    )
    if dist.is_main:
        warn_overfitting(metrics)
    return TrainOutcome(model, history, metrics, weights_source, best_epoch, train_seconds, feature_seconds, cache_info)


def run_metrics(
    val_logits,
    yval,
    labels: list[str],
    cfg: TrainConfig,
    *,
    history: list[dict],
    best_epoch: int,
    train_seconds: float,
    feature_seconds: float,
    feature_cache: dict | None = None,
) -> dict[str, Any]:
    """A run's metrics.json from the best epoch's validation logits (torch tensors) and the history:
    top-1, loss (unweighted, with the run's label smoothing), per class, confusion, train/val gap."""
    import torch

    report = classification_report(yval.numpy(), val_logits.argmax(1).numpy(), labels)
    last = history[-1]
    return {
        "val_top1": report["top1"],
        "val_loss": float(torch.nn.functional.cross_entropy(val_logits, yval, label_smoothing=cfg.label_smoothing)),
        "n_val": report["n"],
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "stopped_early": len(history) < cfg.epochs,
        "train_top1_last": last["train_top1"],
        "gap_top1_last": last["gap_top1"],
        "gap_top1_max": max(h["gap_top1"] for h in history),
        "train_seconds": round(train_seconds, 3),
        "feature_seconds": round(feature_seconds, 3),
        "feature_cache": feature_cache,
        "per_class": report["per_class"],
        "confusion": report["confusion"],
    }


def warn_overfitting(metrics: dict[str, Any]) -> None:
    if metrics["gap_top1_last"] > 0.1:
        log.warning(
            "train top-1 exceeds validation top-1 by %.1f pp at the last epoch: the head may be overfitting",
            100 * metrics["gap_top1_last"],
        )


def _amp(cfg: TrainConfig, device):
    from edgetl.workstation.loops import amp_settings

    return amp_settings(cfg.amp, device)


def _features_array(source, batch_size: int) -> np.ndarray:
    import torch

    idx = torch.arange(len(source))
    return torch.cat([source[idx[i : i + batch_size]] for i in range(0, len(source), batch_size)]).numpy()


# --- the run directory ----------------------------------------------------------------------------


def partial_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


def _save_checkpoint(path: Path, state: dict) -> None:
    import torch

    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def run_config(cfg: TrainConfig, prepared: PreparedData, pp: Preprocessing, device: str) -> dict[str, Any]:
    """A run's config.json as training starts (the weights are added when known, see :func:`finish_run`)."""
    import torch

    return {
        "edgetl_version": __version__,
        "torch_version": torch.__version__,
        "backbone": cfg.backbone,
        "train": cfg.to_dict(),
        "preprocessing": pp.to_dict(),
        "device": device,
        "data": {
            "root": prepared.root,
            "val_dir": prepared.val_dir,
            "classes": prepared.labels,
            "train_counts": class_counts(prepared.train, len(prepared.labels)),
            "val_counts": class_counts(prepared.val, len(prepared.labels)),
            "skipped": [{"path": p, "reason": r} for p, r in prepared.skipped],
        },
    }


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
    """Train ``config.strategy`` on the image folder ``data``; write the run directory ``out``."""
    out = Path(out)
    partial = partial_dir(out)
    # Fail before minutes of training, not after.
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; pass --force to replace it, or choose another --out")
    if partial.exists():
        if not force:
            raise OutputExistsError(
                f"an interrupted run is in {partial}; continue it with `edgetl finetune --resume {out}`, "
                "or pass --force to start over"
            )
        shutil.rmtree(partial)
    prepared = prepare_data(data, config, val_dir=val_dir)
    return _train_into(out, partial, config, prepared, progress=progress, force=force, cache_dir=cache_dir)


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
    saved = json.loads((partial / "config.json").read_text())
    values = dict(saved["train"])
    for key, value in (overrides or {}).items():
        if key not in _RESUMABLE_OVERRIDES:
            raise ConfigError(f"--{key.replace('_', '-')} cannot change when resuming (it changes what is learned)")
        values[key] = value
    cfg = TrainConfig(**values)
    split = json.loads((partial / "split.json").read_text())
    prepared = PreparedData(
        labels=json.loads((partial / "labels.json").read_text()),
        train=[Sample(p, int(label)) for p, label in split["train"]],
        val=[Sample(p, int(label)) for p, label in split["val"]],
        skipped=[(d["path"], d["reason"]) for d in saved["data"]["skipped"]],
        root=saved["data"]["root"],
        val_dir=saved["data"]["val_dir"],
    )
    checkpoint = None
    if (partial / "checkpoint.pt").is_file():
        checkpoint = torch.load(partial / "checkpoint.pt", map_location="cpu", weights_only=True)
        log.info("resuming %s after epoch %d", out, checkpoint["epoch"])
    return _train_into(
        out, partial, cfg, prepared, progress=progress, force=True, resume_state=checkpoint, cache_dir=cache_dir
    )


def _train_into(
    out: Path,
    partial: Path,
    cfg: TrainConfig,
    prepared: PreparedData,
    *,
    progress: bool,
    force: bool,
    resume_state: dict | None = None,
    cache_dir=None,
) -> FinetuneResult:

    from edgetl.workstation import distributed

    spec = get_backbone(cfg.backbone)
    pp = spec.preprocessing(cfg.img_size)
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main and resume_state is None:
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

    outcome = train_model(
        prepared, cfg, progress=progress, resume=resume_state, on_epoch_end=on_epoch_end, cache_dir=cache_dir
    )
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
            },
        )
        (partial / "checkpoint.pt").unlink(missing_ok=True)
        if out.exists():
            if not force:
                raise OutputExistsError(f"{out} appeared while training; the finished run is in {partial}")
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(partial, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, out)
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
        strategy=cfg.strategy,
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
    )
