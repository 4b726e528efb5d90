"""The training loops: a head on features, and the trunk + head end to end.

Both loops reseed every epoch from (seed, epoch) and draw that epoch's sample order from it, so an
epoch's randomness (order, augmentation, dropout, mixup) does not depend on what ran before it:
a run resumed from the checkpoint of epoch k replays epochs k+1... exactly as an uninterrupted run.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from edgetl.core.errors import RunError
from edgetl.workstation.distributed import SINGLE, DistContext, all_reduce_sums, per_rank_batch, rank_slice

log = logging.getLogger(__name__)

# Called after every epoch with (epoch, checkpoint_state): the caller saves it for --resume.
EpochHook = Callable[[int, dict], None]


class TrainingDiverged(RunError):
    """The loss became NaN or infinite: the model is lost, and going on would only save a NaN model."""


def check_finite(value: float, what: str, epoch: int, cfg) -> None:
    """Stop at the first non-finite loss, in one line that names the epoch and the likely cause.

    Without this a ``--lr inf`` trained to a NaN model, exited 0 and exported: every comparison with
    NaN is false, so no later gate could see it.
    """
    if math.isfinite(value):
        return
    scale = f" x --trunk-lr-scale {cfg.trunk_lr_scale:g}" if cfg.strategy != "feature-extraction" else ""
    raise TrainingDiverged(
        f"training diverged: the {what} is {value} in epoch {epoch}; the learning rate is likely too high "
        f"(--lr {cfg.lr:g}{scale}): try a lower --lr, or check the images and --weights"
    )


class EarlyStopping:
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

    def state_dict(self) -> dict:
        return {
            "best": list(self.best) if self.best else None,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
            "bad_epochs": self.bad_epochs,
        }

    def load_state_dict(self, d: dict) -> None:
        self.best = tuple(d["best"]) if d["best"] else None
        self.best_epoch, self.best_state, self.bad_epochs = d["best_epoch"], d["best_state"], d["bad_epochs"]


def cosine(optimizer, total_steps: int):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))
    )


def seed_epoch(seed: int, epoch: int):
    """Reseed every generator for ``epoch``; returns a torch.Generator for this epoch's order."""
    import torch

    s = (seed * 1_000_003 + epoch) % (2**31)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    return torch.Generator().manual_seed(s)


def epoch_record(epoch, train_loss, train_top1, val_loss, val_top1, opt, t0) -> dict[str, Any]:
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


@dataclasses.dataclass
class LoopIO:
    """What a loop reports to and restores from its caller."""

    progress: Any
    history: list
    resume: dict | None = None  # a checkpoint written by ``on_epoch_end``
    on_epoch_end: EpochHook | None = None


def all_features(source, batch_size: int):
    """A feature source (tensor, or on-the-fly features indexed like one) as one tensor, in batches."""
    import torch

    if isinstance(source, torch.Tensor):
        return source
    idx = torch.arange(len(source))
    return torch.cat([source[idx[i : i + batch_size]] for i in range(0, len(source), batch_size)])


def train_head(head, ftr, ytr, fval, yval, cfg, *, criterion, io: LoopIO) -> int:
    """Train ``head`` on features; ``ftr``/``fval`` are tensors or on-the-fly sources (same indexing).

    Uses ``cfg``'s lr, weight decay, epochs, batch size, seed and patience; appends one record per
    epoch to ``io.history``; leaves the best epoch's weights in ``head`` and returns that epoch.
    """
    import torch

    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = cosine(opt, math.ceil(len(ftr) / cfg.batch_size) * cfg.epochs)
    stopper = EarlyStopping(cfg.patience)
    start = 1
    if io.resume:
        head.load_state_dict(io.resume["model"])
        opt.load_state_dict(io.resume["optimizer"])
        sched.load_state_dict(io.resume["scheduler"])
        stopper.load_state_dict(io.resume["stopper"])
        io.history[:] = io.resume["history"]
        start = io.resume["epoch"] + 1
    task = io.progress.add_task("head epochs", total=cfg.epochs, completed=start - 1, status="")
    stop = bool(io.resume and io.resume.get("stopped"))
    for epoch in range(start, cfg.epochs + 1):
        if stop:
            break
        t0 = time.perf_counter()
        g = seed_epoch(cfg.seed, epoch)
        head.train()
        order = torch.randperm(len(ftr), generator=g)
        loss_sum, correct = 0.0, 0
        for i in range(0, len(ftr), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            logits = head(ftr[idx])
            loss = criterion(logits, ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            value = loss.item()
            check_finite(value, "training loss", epoch, cfg)  # before the step: a NaN step ruins every weight
            opt.step()
            sched.step()
            loss_sum += value * len(idx)
            correct += int((logits.argmax(1) == ytr[idx]).sum())
        head.eval()
        with torch.inference_mode():
            val_logits = head(all_features(fval, cfg.batch_size))
            val_loss = float(torch.nn.functional.cross_entropy(val_logits, yval, label_smoothing=cfg.label_smoothing))
            val_top1 = float((val_logits.argmax(1) == yval).float().mean())
        check_finite(val_loss, "validation loss", epoch, cfg)  # the last step of an epoch can still break it
        io.history.append(epoch_record(epoch, loss_sum / len(ftr), correct / len(ftr), val_loss, val_top1, opt, t0))
        io.progress.update(task, advance=1, status=f"val top-1 {val_top1:.3f}")
        stop = stopper.update(epoch, val_top1, val_loss, head.state_dict)
        if stop:
            log.info("early stopping at epoch %d (best epoch %d)", epoch, stopper.best_epoch)
        if io.on_epoch_end:
            io.on_epoch_end(epoch, _checkpoint(epoch, head, opt, sched, stopper, io, stop))
    head.load_state_dict(stopper.best_state)
    return stopper.best_epoch


def _checkpoint(epoch: int, model, opt, sched, stopper, io, stopped: bool) -> dict:
    """What an epoch checkpoint holds (both loops): enough for --resume to continue exactly."""
    return {
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "stopper": stopper.state_dict(),
        "history": io.history,
        "stopped": stopped,
    }


# --- end to end -------------------------------------------------------------------------------


def amp_settings(mode: str, device):
    """(enabled, dtype, needs_scaler). auto: bf16 on CUDA when supported, else fp16 with loss scaling;
    off on the CPU (bf16 there is slow without AMX), unless asked for explicitly."""
    import torch

    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return False, None, False
    if mode == "auto":
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    return True, dtype, dtype == torch.float16 and device.type == "cuda"


def mix_batch(x, y, cfg):
    """Mixup or CutMix (chosen per batch when both are on). Returns (x, y_a, y_b, lam)."""
    import torch

    modes = [m for m, a in (("mixup", cfg.mixup), ("cutmix", cfg.cutmix)) if a > 0]
    if not modes:
        return x, y, y, 1.0
    mode = modes[int(torch.randint(len(modes), (1,)))]
    alpha = cfg.mixup if mode == "mixup" else cfg.cutmix
    lam = float(np.random.beta(alpha, alpha))
    perm = torch.randperm(x.shape[0], device=x.device)
    if mode == "mixup":
        return lam * x + (1 - lam) * x[perm], y, y[perm], lam
    h, w = x.shape[-2:]
    cut = math.sqrt(1 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = np.random.randint(h), np.random.randint(w)
    y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
    x = x.clone()
    x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    return x, y, y[perm], lam


def _epoch_loader(dataset, indices, *, batch_size, workers, device, generator):
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=indices.tolist(),
        num_workers=workers,
        pin_memory=device.type == "cuda",
        generator=generator,
    )


def predict_logits(model, dataset, indices, *, batch_size, workers, device, amp=(False, None)):
    import torch

    model.eval()
    out, labels = [], []
    loader = _epoch_loader(dataset, indices, batch_size=batch_size, workers=workers, device=device, generator=None)
    with torch.inference_mode():
        for x, y in loader:
            with torch.autocast(device_type=device.type, dtype=amp[1], enabled=amp[0]):
                logits = model(x.to(device, non_blocking=True))
            out.append(logits.float().cpu())
            labels.append(y)
    if not out:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(out), torch.cat(labels)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where an end-to-end loop runs: the torch device, the process group and the data-loader workers."""

    device: Any
    dist: DistContext = SINGLE
    workers: int = 0


def optimizer_step(loss, opt, scaler, sched) -> None:
    """One step of the end-to-end loops: backward through the (possibly fp16-scaled) loss, step, schedule."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    sched.step()


def train_end_to_end(model, train_set, val_set, cfg, *, criterion, io: LoopIO, where: Placement) -> int:
    """fine-tune / full. ``model`` may be DDP-wrapped; ``train_set``/``val_set`` yield (tensor, label)."""
    import torch

    device, dist, workers = where.device, where.dist, where.workers

    from edgetl.workstation.model import freeze_batchnorm_stats

    core = model.module if hasattr(model, "module") else model
    head_params = list(core.head.parameters())
    trunk_params = [p for p in core.trunk.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [{"params": head_params, "lr": cfg.lr}, {"params": trunk_params, "lr": cfg.lr * cfg.trunk_lr_scale}],
        weight_decay=cfg.weight_decay,
    )
    local_bs = per_rank_batch(cfg.batch_size, dist)
    steps_per_epoch = math.ceil(len(rank_slice(torch.arange(len(train_set)), dist)) / local_bs)
    sched = cosine(opt, steps_per_epoch * cfg.epochs)
    amp_on, amp_dtype, needs_scaler = amp_settings(cfg.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=needs_scaler)
    stopper = EarlyStopping(cfg.patience)
    start, stop = 1, False
    if io.resume:
        core.load_state_dict(io.resume["model"])
        opt.load_state_dict(io.resume["optimizer"])
        sched.load_state_dict(io.resume["scheduler"])
        if io.resume.get("scaler"):
            scaler.load_state_dict(io.resume["scaler"])
        stopper.load_state_dict(io.resume["stopper"])
        io.history[:] = io.resume["history"]
        start, stop = io.resume["epoch"] + 1, bool(io.resume.get("stopped"))
    val_idx = torch.arange(len(val_set))[dist.rank :: dist.world_size]  # no padding: each image counted once
    for epoch in range(start, cfg.epochs + 1):
        if stop:
            break
        t0 = time.perf_counter()
        g = seed_epoch(cfg.seed, epoch)
        order = rank_slice(torch.randperm(len(train_set), generator=g), dist)
        loader_gen = torch.Generator().manual_seed(cfg.seed * 7919 + epoch * 31 + dist.rank)
        loader = _epoch_loader(
            train_set, order, batch_size=local_bs, workers=workers, device=device, generator=loader_gen
        )
        model.train()
        freeze_batchnorm_stats(core.trunk)
        task = io.progress.add_task(f"epoch {epoch}/{cfg.epochs}", total=len(order), status="")
        loss_sum, correct, n = 0.0, 0, 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            xm, ya, yb, lam = mix_batch(x, y, cfg)
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_on):
                logits = model(xm)
                loss = (
                    lam * criterion(logits, ya) + (1 - lam) * criterion(logits, yb)
                    if lam < 1
                    else criterion(logits, ya)
                )
            value = loss.item()
            # Every rank sees its own batch; one rank's error ends the process group with it.
            check_finite(value, "training loss", epoch, cfg)
            optimizer_step(loss, opt, scaler, sched)
            loss_sum += value * len(y)
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
            io.progress.update(task, advance=len(y), status=f"loss {loss_sum / n:.3f}")
        val_logits, val_labels = predict_logits(
            core, val_set, val_idx, batch_size=local_bs, workers=workers, device=device, amp=(amp_on, amp_dtype)
        )
        # Validation loss is unweighted (``--balance`` weights only the training loss) and reduced as sums.
        val_loss_sum = (
            float(
                torch.nn.functional.cross_entropy(
                    val_logits, val_labels, reduction="sum", label_smoothing=cfg.label_smoothing
                )
            )
            if len(val_labels)
            else 0.0
        )
        val_correct = float((val_logits.argmax(1) == val_labels).sum()) if len(val_labels) else 0.0
        loss_sum, correct, n, val_loss_sum, val_correct, val_n = all_reduce_sums(
            [loss_sum, correct, n, val_loss_sum, val_correct, float(len(val_labels))], dist, device
        )
        val_loss, val_top1 = val_loss_sum / val_n, val_correct / val_n
        check_finite(val_loss, "validation loss", epoch, cfg)
        io.history.append(epoch_record(epoch, loss_sum / n, correct / n, val_loss, val_top1, opt, t0))
        io.progress.update(task, status=f"val top-1 {val_top1:.3f}")
        stop = stopper.update(epoch, val_top1, val_loss, core.state_dict)
        if stop:
            log.info("early stopping at epoch %d (best epoch %d)", epoch, stopper.best_epoch)
        if io.on_epoch_end:
            state = _checkpoint(epoch, core, opt, sched, stopper, io, stop)
            state["scaler"] = scaler.state_dict() if needs_scaler else None
            io.on_epoch_end(epoch, state)
    core.load_state_dict(stopper.best_state)
    return stopper.best_epoch
