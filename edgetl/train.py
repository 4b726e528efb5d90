"""Transfer learning: adapt a pretrained trunk to an image folder with one of three strategies.

* ``feature-extraction``: the trunk is frozen; its features are computed **once** per image and the
  head is trained on those (the trunk never runs again during training).
* ``fine-tune``: the last ``unfreeze`` blocks of the trunk train with a lower learning rate than the
  head; frozen blocks keep their batch-norm statistics.
* ``full``: everything trains (trunk at the lower learning rate).

All strategies use AdamW, a cosine schedule, weight decay, head dropout, label smoothing and early
stopping on validation top-1 with the best epoch kept.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgetl import __version__
from edgetl.atomic import atomic_directory, write_json_atomic
from edgetl.backbones import get_backbone
from edgetl.data import Sample, class_counts, drop_unreadable, scan_image_folder, stratified_split
from edgetl.errors import ConfigError
from edgetl.metrics import classification_report
from edgetl.preprocess import Preprocessing, load_image

log = logging.getLogger(__name__)

STRATEGIES = ("feature-extraction", "fine-tune", "full")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    backbone: str = "mobilenet_v2"
    strategy: str = "feature-extraction"
    unfreeze: int = 3
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-2  # head; the trunk gets lr * trunk_lr_scale
    trunk_lr_scale: float = 0.1
    weight_decay: float = 1e-4
    dropout: float = 0.2
    label_smoothing: float = 0.1
    img_size: int | None = None
    val_split: float = 0.2
    seed: int = 0
    device: str = "auto"
    weights: str = "imagenet"
    patience: int = 5
    augment: bool = True
    hflip: bool = False
    workers: int = 0
    on_bad_image: str = "skip"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"--strategy must be one of {', '.join(STRATEGIES)}, not {self.strategy!r}")
        for name in ("epochs", "batch_size", "unfreeze", "patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, not {getattr(self, name)}")
        if self.lr <= 0 or self.trunk_lr_scale <= 0:
            raise ConfigError("--lr and the trunk learning-rate scale must be > 0")
        if self.weight_decay < 0 or not 0 <= self.dropout < 1 or not 0 <= self.label_smoothing < 1:
            raise ConfigError("weight decay must be >= 0, dropout and label smoothing in [0, 1)")
        if self.img_size is not None and self.img_size < 16:
            raise ConfigError(f"--img-size must be >= 16, not {self.img_size}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device must be auto, cpu or cuda, not {self.device!r}")
        if self.on_bad_image not in ("skip", "fail"):
            raise ConfigError(f"--on-bad-image must be skip or fail, not {self.on_bad_image!r}")
        if self.workers < 0:
            raise ConfigError("--workers must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- transforms and datasets --------------------------------------------------------------------


def eval_transform(pp: Preprocessing):
    """The torchvision eval transform; ``edgetl.preprocess`` is its torch-free twin (tested equal)."""
    from torchvision import transforms as T

    interp = T.InterpolationMode(pp.interpolation)
    return T.Compose(
        [T.Resize(pp.resize_size, interpolation=interp), T.CenterCrop(pp.input_size), T.ToTensor(), T.Normalize(pp.mean, pp.std)]
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
    def __init__(self, samples: list[Sample], transform):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        return self.transform(load_image(s.path)), s.label


def _loader(samples, transform, *, batch_size, shuffle, seed, workers, device):
    import torch
    from torch.utils.data import DataLoader

    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(
        _ImageDataset(samples, transform),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=g,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )


def seed_everything(seed: int) -> None:
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


# --- training -----------------------------------------------------------------------------------


def _progress(enabled: bool):
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
        transient=False,
    )


def extract_features(trunk, loader, device, progress=None, description="features"):
    """One pass of the frozen trunk over a loader -> (features, labels) tensors on the CPU."""
    import torch

    trunk.eval()
    feats, labels = [], []
    task = progress.add_task(description, total=len(loader.dataset), status="") if progress else None
    with torch.inference_mode():
        for x, y in loader:
            feats.append(trunk(x.to(device, non_blocking=True)).float().cpu())
            labels.append(y)
            if progress:
                progress.advance(task, len(y))
    return torch.cat(feats), torch.cat(labels)


def _cosine(optimizer, total_steps: int):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))
    )


class _EarlyStopping:
    """Best = highest val top-1 (ties: lower val loss); stop after ``patience`` epochs without one."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best: tuple[float, float] | None = None
        self.best_epoch = 0
        self.best_state: dict | None = None
        self.bad_epochs = 0

    def update(self, epoch: int, top1: float, loss: float, state_fn) -> bool:
        key = (top1, -loss)
        if self.best is None or key > self.best:
            self.best, self.best_epoch, self.bad_epochs = key, epoch, 0
            self.best_state = copy.deepcopy(state_fn())
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience


def _evaluate_logits(logits, labels, criterion) -> tuple[float, float]:
    return float(criterion(logits, labels)), float((logits.argmax(1) == labels).float().mean())


def train_head(head, ftr, ytr, fval, yval, cfg: TrainConfig, *, criterion, progress, history: list) -> int:
    """Train ``head`` on precomputed features (tensors); the trunk does not run here at all.

    Uses ``cfg``'s lr, weight decay, epochs, batch size, seed and patience; appends one record per
    epoch to ``history``; leaves the best epoch's weights in ``head`` and returns that epoch.
    """
    import torch

    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(ftr) / cfg.batch_size)
    sched = _cosine(opt, steps_per_epoch * cfg.epochs)
    stopper = _EarlyStopping(cfg.patience)
    g = torch.Generator().manual_seed(cfg.seed)
    task = progress.add_task("head epochs", total=cfg.epochs, status="")
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        head.train()
        order = torch.randperm(len(ftr), generator=g)
        loss_sum, correct = 0.0, 0
        for i in range(0, len(ftr), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            logits = head(ftr[idx])
            loss = criterion(logits, ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == ytr[idx]).sum())
        head.eval()
        with torch.inference_mode():
            val_loss, val_top1 = _evaluate_logits(head(fval), yval, criterion)
        rec = _epoch_record(epoch, loss_sum / len(ftr), correct / len(ftr), val_loss, val_top1, opt, t0)
        history.append(rec)
        progress.update(task, advance=1, status=f"val top-1 {val_top1:.3f}")
        if stopper.update(epoch, val_top1, val_loss, head.state_dict):
            log.info("early stopping at epoch %d (best epoch %d)", epoch, stopper.best_epoch)
            break
    head.load_state_dict(stopper.best_state)
    return stopper.best_epoch


def _epoch_record(epoch, train_loss, train_top1, val_loss, val_top1, opt, t0) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "train_loss": round(train_loss, 6),
        "train_top1": round(train_top1, 6),
        "val_loss": round(val_loss, 6),
        "val_top1": round(val_top1, 6),
        "gap_top1": round(train_top1 - val_top1, 6),
        "lr": [g["lr"] for g in opt.param_groups],
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _train_end_to_end(model, train_loader, val_loader, cfg: TrainConfig, criterion, device, progress, history):
    """fine-tune / full: the trunk runs every step; frozen blocks keep their batch-norm statistics."""
    import torch

    from edgetl.model import freeze_batchnorm_stats

    head_params = list(model.head.parameters())
    trunk_params = [p for p in model.trunk.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [{"params": head_params, "lr": cfg.lr}, {"params": trunk_params, "lr": cfg.lr * cfg.trunk_lr_scale}],
        weight_decay=cfg.weight_decay,
    )
    sched = _cosine(opt, len(train_loader) * cfg.epochs)
    stopper = _EarlyStopping(cfg.patience)
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        freeze_batchnorm_stats(model.trunk)
        task = progress.add_task(f"epoch {epoch}/{cfg.epochs}", total=len(train_loader.dataset), status="")
        loss_sum, correct, n = 0.0, 0, 0
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x)
            loss = criterion(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
            progress.update(task, advance=len(y), status=f"loss {loss_sum / n:.3f}")
        val_logits, val_labels = predict_logits(model, val_loader, device)
        val_loss, val_top1 = _evaluate_logits(val_logits, val_labels, criterion)
        history.append(_epoch_record(epoch, loss_sum / n, correct / n, val_loss, val_top1, opt, t0))
        progress.update(task, status=f"val top-1 {val_top1:.3f}")
        if stopper.update(epoch, val_top1, val_loss, model.state_dict):
            log.info("early stopping at epoch %d (best epoch %d)", epoch, stopper.best_epoch)
            break
    model.load_state_dict(stopper.best_state)
    return stopper.best_epoch


def predict_logits(model, loader, device):
    import torch

    model.eval()
    out, labels = [], []
    with torch.inference_mode():
        for x, y in loader:
            out.append(model(x.to(device)).float().cpu())
            labels.append(y)
    return torch.cat(out), torch.cat(labels)


def _plot_history(history: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no history plot")
        return
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.plot(epochs, [h["train_loss"] for h in history], label="train")
    a.plot(epochs, [h["val_loss"] for h in history], label="validation")
    a.set_xlabel("epoch")
    a.set_title("loss")
    a.legend()
    b.plot(epochs, [h["train_top1"] for h in history], label="train")
    b.plot(epochs, [h["val_top1"] for h in history], label="validation")
    b.set_xlabel("epoch")
    b.set_title("top-1")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def finetune(
    data: str | Path,
    out: str | Path,
    *,
    config: TrainConfig,
    val_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> FinetuneResult:
    """Train ``config.strategy`` on the image folder ``data``; write the run directory ``out``."""
    import torch

    from edgetl.model import Head, TransferModel, build_trunk, set_trainable
    from edgetl.weights import resolve_weights

    cfg = config
    spec = get_backbone(cfg.backbone)
    pp = spec.preprocessing(cfg.img_size)
    out = Path(out)
    if out.exists() and not force:
        # Fail before minutes of training, not after.
        from edgetl.errors import OutputExistsError

        raise OutputExistsError(f"{out} already exists; pass --force to replace it, or choose another --out")

    folder = drop_unreadable(scan_image_folder(data), on_bad_image=cfg.on_bad_image, min_per_class=1 if val_dir else 2)
    if val_dir is not None:
        val_folder = drop_unreadable(scan_image_folder(val_dir, classes=folder.classes), on_bad_image=cfg.on_bad_image)
        train_samples, val_samples = list(folder.samples), list(val_folder.samples)
        skipped = list(folder.skipped) + list(val_folder.skipped)
    else:
        train_samples, val_samples = stratified_split(folder, cfg.val_split, cfg.seed)
        skipped = list(folder.skipped)
    labels = list(folder.classes)
    train_counts = class_counts(train_samples, len(labels))
    if max(train_counts) > 3 * min(train_counts):
        log.warning(
            "classes are imbalanced (train images per class from %d to %d): per-class accuracy in metrics.json "
            "tells whether the small classes suffer",
            min(train_counts),
            max(train_counts),
        )

    seed_everything(cfg.seed)
    device = select_device(cfg.device)
    state_dict, weights_source = resolve_weights(spec, cfg.weights)
    trunk = build_trunk(spec, state_dict)
    del state_dict
    head = Head(spec.feature_dim, len(labels), dropout=cfg.dropout)
    model = TransferModel(trunk, head).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    loader_kw = dict(batch_size=cfg.batch_size, seed=cfg.seed, workers=cfg.workers, device=device)
    evaluation = eval_transform(pp)
    history: list[dict] = []
    log.info(
        "%s on %s: %d train / %d validation images, %d classes, %s, %s",
        cfg.strategy, spec.name, len(train_samples), len(val_samples), len(labels), device,
        "pretrained " + weights_source.kind if weights_source.kind != "none" else "RANDOM INIT",
    )

    t_start = time.perf_counter()
    feature_seconds = 0.0
    with _progress(progress) as bar:
        if cfg.strategy == "feature-extraction":
            set_trainable(trunk, 0)
            tr_loader = _loader(train_samples, evaluation, shuffle=False, **loader_kw)
            va_loader = _loader(val_samples, evaluation, shuffle=False, **loader_kw)
            ftr, ytr = extract_features(trunk, tr_loader, device, bar, "trunk features (train)")
            fval, yval = extract_features(trunk, va_loader, device, bar, "trunk features (val)")
            feature_seconds = time.perf_counter() - t_start
            head.cpu()
            best_epoch = train_head(head, ftr, ytr, fval, yval, cfg, criterion=criterion, progress=bar, history=history)
            model = model.cpu()
        else:
            set_trainable(trunk, cfg.unfreeze if cfg.strategy == "fine-tune" else None)
            train_tf = train_transform(pp, hflip=cfg.hflip) if cfg.augment else evaluation
            tr_loader = _loader(train_samples, train_tf, shuffle=True, **loader_kw)
            va_loader = _loader(val_samples, evaluation, shuffle=False, **loader_kw)
            best_epoch = _train_end_to_end(model, tr_loader, va_loader, cfg, criterion, device, bar, history)
    train_seconds = time.perf_counter() - t_start

    model = model.cpu().eval()
    va_loader = _loader(val_samples, evaluation, shuffle=False, **{**loader_kw, "device": torch.device("cpu")})
    if cfg.strategy == "feature-extraction":
        with torch.inference_mode():
            val_logits, val_labels = head(fval), yval
    else:
        val_logits, val_labels = predict_logits(model, va_loader, torch.device("cpu"))
    report = classification_report(val_labels.numpy(), val_logits.argmax(1).numpy(), labels)
    last = history[-1]
    metrics = {
        "val_top1": report["top1"],
        "val_loss": float(criterion(val_logits, val_labels)),
        "n_val": report["n"],
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "stopped_early": len(history) < cfg.epochs,
        "train_top1_last": last["train_top1"],
        "gap_top1_last": last["gap_top1"],
        "train_seconds": round(train_seconds, 3),
        "feature_seconds": round(feature_seconds, 3),
        "per_class": report["per_class"],
        "confusion": report["confusion"],
    }
    root = Path(data).resolve()
    run_config = {
        "edgetl_version": __version__,
        "torch_version": torch.__version__,
        "backbone": spec.name,
        "train": cfg.to_dict(),
        "preprocessing": pp.to_dict(),
        "weights": weights_source.to_dict(),
        "pretrained": weights_source.kind != "none",
        "device": str(device),
        "data": {
            "root": str(root),
            "val_dir": str(Path(val_dir).resolve()) if val_dir else None,
            "classes": labels,
            "train_counts": train_counts,
            "val_counts": class_counts(val_samples, len(labels)),
            "skipped": [{"path": p, "reason": r} for p, r in skipped],
        },
    }
    with atomic_directory(out, force=force) as tmp:
        write_json_atomic(tmp / "config.json", run_config)
        write_json_atomic(tmp / "labels.json", labels)
        write_json_atomic(
            tmp / "split.json",
            {"train": [[s.path, s.label] for s in train_samples], "val": [[s.path, s.label] for s in val_samples]},
        )
        torch.save({"trunk": model.trunk.state_dict(), "head": model.head.state_dict()}, tmp / "model.pt")
        write_json_atomic(tmp / "history.json", history)
        write_json_atomic(tmp / "metrics.json", metrics)
        _plot_history(history, tmp / "history.png")
    log.info("run written to %s: val top-1 %.4f (best epoch %d) in %.1fs", out, metrics["val_top1"], best_epoch, train_seconds)
    return FinetuneResult(
        run_dir=str(out),
        backbone=spec.name,
        strategy=cfg.strategy,
        pretrained=weights_source.kind != "none",
        epochs=cfg.epochs,
        epochs_run=len(history),
        best_epoch=best_epoch,
        val_top1=metrics["val_top1"],
        train_seconds=round(train_seconds, 3),
        feature_seconds=round(feature_seconds, 3),
        skipped=skipped,
    )
