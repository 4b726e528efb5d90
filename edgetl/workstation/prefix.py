"""Fine-tune at feature-extraction speed: cache the frozen prefix's activations, train only the rest.

``--strategy fine-tune`` trains the last ``unfreeze`` trunk blocks and the head. Everything before
the first unfrozen block (the *prefix*) is frozen with its batch norms in eval mode, so it is a
constant function of the image: its output (the input of the first unfrozen block) is computed once
per image view and kept, and each epoch runs only the unfrozen blocks (the *suffix*) and the head.

The pieces, in the order a run uses them:

* :func:`split_trunk` cuts a :class:`~edgetl.workstation.model.Trunk` into ``prefix`` and
  ``suffix`` with ``trunk(x) == suffix(prefix(x))``; the suffix's modules are the trunk's own, so
  training the suffix trains the trunk.
* :class:`ImageStore` decodes every image once and keeps it, resized as the eval transform resizes,
  as uint8 in memory within a budget (beyond it, images are read from disk each time).
* :class:`Views` are K views per image: view 0 is the eval transform; views 1..K-1 are random
  resized crops with mild colour jitter (and flips only with ``hflip``), each deterministic per
  (seed, image, view).
* :func:`prefix_activations` runs the prefix once over every view (through
  :func:`edgetl.workstation.fast_trunk.frozen_runner`: ONNX Runtime on the CPU) into float16.
* :func:`finetune_cached` trains suffix + head on those activations, one view per image per epoch.
* :func:`edgetl.workstation.fit.refit_head` then searches the run's head again on the fine-tuned
  trunk's features of the plain views (the pooled taps inside the prefix come from the same prefix
  pass: :class:`edgetl.workstation.model.PrefixWithTaps`).

What differs from the end-to-end loop (:func:`edgetl.workstation.loops.train_end_to_end`): the
augmentation is a fixed set of K views instead of a fresh draw every epoch; mixup/CutMix (which mix
images) are not applied; and the loop never picks an epoch by validation: it trains ``cfg.epochs``
epochs and keeps the last (the validation split is reported, never used to choose).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import os
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np

from edgetl.core.errors import ConfigError, RunError
from edgetl.core.preprocess import load_image

if TYPE_CHECKING:
    import torch.nn as nn

    from edgetl.core.imagefolder import Sample
    from edgetl.core.preprocess import Preprocessing

log = logging.getLogger(__name__)

DEFAULT_IMAGE_MEMORY = 2 << 30  # bytes
IMAGE_MEMORY_ENV = "EDGETL_IMAGE_MEMORY"  # MiB
FP16_MAX = 65504.0

# Random views: the crop and colour jitter of views 1..K-1.
CROP_SCALE = (0.64, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
JITTER = 0.2  # brightness, contrast, saturation: factors in [1 - JITTER, 1 + JITTER]


# --- the split ------------------------------------------------------------------------------------


@dataclasses.dataclass
class SplitTrunk:
    prefix: nn.Module  # frozen: image -> activation (N, C, H, W)
    suffix: nn.Module  # trainable blocks (+ any frozen tail) + the trunk's pooling -> (N, feature_dim)
    depth: int  # number of trailing trunk blocks in the suffix (== unfreeze)


def split_trunk(trunk, unfreeze: int) -> SplitTrunk | None:
    """``trunk`` cut before its last ``unfreeze`` blocks: ``trunk(x) == suffix(prefix(x))`` (the
    suffix ends in the last feature map's pooled features: a trunk's taps are not in it).

    Works for bodies that are a plain ``nn.Sequential`` (torchvision's MobileNets and EfficientNets,
    the ResNet body of backbones.py) and timm EfficientNet-family models (EfficientNet-Lite0
    included), cut inside their ``blocks``. None (with the reason in a DEBUG log) when the body
    cannot be cut there. The suffix holds the trunk's own modules (shared parameters).
    """
    import torch.nn as nn

    from edgetl.workstation.model import Trunk, body_atoms

    if not isinstance(trunk, Trunk) or type(trunk).forward is not Trunk.forward:
        log.debug("no prefix cache: %s is not a plain edgetl Trunk", type(trunk).__name__)
        return None
    blocks = list(trunk.blocks)
    if not blocks or unfreeze < 1:
        log.debug("no prefix cache: the trunk has %d blocks, unfreeze %d", len(blocks), unfreeze)
        return None
    found = body_atoms(trunk)
    if found is None:
        log.debug("no prefix cache: cannot cut a %s body into a sequence", type(trunk.body).__name__)
        return None
    atoms, tail = found
    first = max(0, len(blocks) - unfreeze)
    trainable = {id(p) for block in blocks[first:] for p in block.parameters()}
    cut = next((i for i, m in enumerate(atoms) if any(id(p) in trainable for p in m.parameters())), None)
    if cut is None:
        log.debug("no prefix cache: block %d of the trunk is not a module of its body", first)
        return None
    # The cut is at the first module holding a trainable parameter: parameter-free modules before it
    # (an activation, a pooling) are constant and stay in the prefix.
    suffix_params = {id(p) for m in atoms[cut:] for p in m.parameters()}
    if not trainable <= suffix_params:
        log.debug("no prefix cache: the trainable blocks are not all after the cut at module %d", cut)
        return None
    body_params = {id(p) for p in trunk.body.parameters()}
    split_params = {id(p) for m in atoms for p in m.parameters()} | {id(p) for m in tail for p in m.parameters()}
    if split_params != body_params:
        log.debug("no prefix cache: the body has modules outside its sequence of layers")
        return None
    prefix = nn.Sequential(*atoms[:cut])
    parts = [("layers", nn.Sequential(*atoms[cut:]))]
    if tail:
        parts.append(("head", nn.Sequential(*tail)))
    parts += [("pool", trunk.pool), ("flatten", nn.Flatten(1))]
    suffix = nn.Sequential(OrderedDict(parts))
    return SplitTrunk(prefix=prefix, suffix=suffix, depth=len(blocks) - first)


# --- images in memory ------------------------------------------------------------------------------


def memory_budget(env: str, default: int) -> int:
    """A memory budget in bytes from the environment variable ``env`` (MiB), else ``default``."""
    raw = os.environ.get(env, "").strip()
    if not raw:
        return default
    try:
        mib = float(raw)
    except ValueError:
        mib = float("nan")
    if not (math.isfinite(mib) and mib >= 0):
        raise ConfigError(f"{env} must be a number of MiB (0 or more), not {raw!r}")
    return int(mib * (1 << 20))


def image_memory_budget() -> int:
    """The image memory budget in bytes: ``EDGETL_IMAGE_MEMORY`` (MiB) or 2 GiB."""
    return memory_budget(IMAGE_MEMORY_ENV, DEFAULT_IMAGE_MEMORY)


class ImageStore:
    """Training/validation images decoded ONCE and kept in memory as uint8 (resized so the shorter
    side is ``pp.resize_size``, as the eval transform does first), within a memory budget
    (default 2 GiB, env ``EDGETL_IMAGE_MEMORY`` in MiB); past the budget the remaining images are
    read from disk on each access (one INFO line says so). ``get(i)`` -> PIL.Image (RGB)."""

    def __init__(self, samples, pp, *, budget_bytes=None, progress=None):
        self.samples: list[Sample] = list(samples)
        self.pp: Preprocessing = pp
        self.budget = image_memory_budget() if budget_bytes is None else int(budget_bytes)
        self._arrays: list[np.ndarray | None] = [None] * len(self.samples)
        self.bytes = 0
        self.in_memory = 0
        self._fill(progress)

    def _load(self, i: int) -> np.ndarray:
        return np.asarray(load_image(self.samples[i].path, self.pp), dtype=np.uint8)

    def _fill(self, progress) -> None:
        n = len(self.samples)
        task = progress.add_task("decoding images", total=n, status="") if progress is not None and n else None
        workers = max(1, min(4, os.cpu_count() or 1))
        chunk = 64
        full = False
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # PIL decodes and resizes without the GIL
            for start in range(0, n, chunk):
                for i, arr in zip(
                    range(start, min(n, start + chunk)),
                    pool.map(self._load, range(start, min(n, start + chunk))),
                    strict=True,
                ):
                    if self.bytes + arr.nbytes > self.budget:
                        full = True
                        break
                    self._arrays[i] = arr
                    self.bytes += arr.nbytes
                    self.in_memory += 1
                if task is not None:
                    progress.advance(task, min(n, start + chunk) - start)
                if full:
                    break
        if full:
            log.info(
                "images: %d of %d kept in memory (%.0f MiB budget, %s MiB to change it); the rest are read "
                "from disk each time",
                self.in_memory,
                n,
                self.budget / (1 << 20),
                IMAGE_MEMORY_ENV,
            )
            if task is not None:
                progress.update(task, completed=n)

    def __len__(self) -> int:
        return len(self.samples)

    def get(self, i: int):
        from PIL import Image

        arr = self._arrays[i]
        if arr is None:
            return load_image(self.samples[i].path, self.pp)
        return Image.fromarray(arr, mode="RGB")


# --- views ----------------------------------------------------------------------------------------


def _crop_params(width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params (scale CROP_SCALE, ratio CROP_RATIO) drawn from ``rng``."""
    area = height * width
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(CROP_RATIO):
        w, h = width, round(width / min(CROP_RATIO))
    elif in_ratio > max(CROP_RATIO):
        h, w = height, round(height * max(CROP_RATIO))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclasses.dataclass(frozen=True)
class Views:
    """K views per image. View 0 is the eval transform (resize, centre crop); views 1..K-1 are a
    random crop (``RandomResizedCrop(input_size, scale=(0.64, 1), ratio=(3/4, 4/3))`` of the resized
    image), mild colour jitter (0.2, 0.2, 0.2) and a flip only when ``hflip``, deterministic per
    (seed, image index, view)."""

    count: int
    hflip: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ConfigError(f"the number of views per image must be an integer >= 1, not {self.count!r}")

    def transform(self, pp, view: int, index: int):
        """A callable PIL image -> normalised CHW float tensor for ``view`` of image ``index``."""
        from edgetl.workstation.prepare import eval_transform

        if not 0 <= view < self.count:
            raise ValueError(f"view {view} is outside 0..{self.count - 1}")
        if view == 0:
            return eval_transform(pp)
        key = (int(self.seed), int(index), int(view))
        return lambda img: _random_view(img, pp, np.random.default_rng(key), self.hflip)


def _random_view(img, pp, rng: np.random.Generator, hflip: bool):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    top, left, h, w = _crop_params(img.width, img.height, rng)
    img = F.resized_crop(
        img, top, left, h, w, [pp.input_size, pp.input_size], InterpolationMode(pp.interpolation), antialias=True
    )
    factors = rng.uniform(1 - JITTER, 1 + JITTER, size=3)
    ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)
    for k in rng.permutation(3):  # ColorJitter applies its adjustments in a random order
        img = ops[k](img, float(factors[k]))
    if hflip and rng.random() < 0.5:
        img = F.hflip(img)
    return F.normalize(F.to_tensor(img), pp.mean, pp.std)


# --- the prefix pass ------------------------------------------------------------------------------


def prefix_activations(
    runner,
    store: ImageStore,
    views: Views,
    pp,
    *,
    batch_size=64,
    progress=None,
    description="frozen blocks",
    act_shape: tuple[int, ...] | None = None,
    taps: np.ndarray | None = None,
) -> np.ndarray:
    """(n_images, K, C, H, W) float16 activations of the frozen prefix for every view of every image
    (``runner`` from ``frozen_runner(split.prefix, ...)``).

    ``taps``, an (n_images, F) float32 array to fill: the runner is a
    :class:`edgetl.workstation.model.PrefixWithTaps`'s, whose output is the activation flattened
    (``act_shape``) then F pooled taps; those of the plain view 0 are written into ``taps``."""
    import torch

    n, k = len(store), views.count
    width = 0 if taps is None else taps.shape[1]
    out: np.ndarray | None = None
    task = progress.add_task(description, total=n * k, status="") if progress is not None and n else None
    clipped = 0
    for view in range(k):
        transforms = {}
        for start in range(0, n, batch_size):
            idx = range(start, min(n, start + batch_size))
            if view == 0:
                tf = transforms.setdefault(0, views.transform(pp, 0, 0))
                x = torch.stack([tf(store.get(i)) for i in idx])
            else:
                x = torch.stack([views.transform(pp, view, i)(store.get(i)) for i in idx])
            y = runner(x).numpy()
            if taps is not None:
                if view == 0:
                    taps[start : start + len(idx)] = y[:, y.shape[1] - width :]
                y = y[:, : y.shape[1] - width].reshape(len(idx), *act_shape)
            if out is None:
                out = np.empty((n, k, *y.shape[1:]), dtype=np.float16)
            big = np.abs(y) > FP16_MAX
            if big.any():
                clipped += int(big.sum())
                y = np.clip(y, -FP16_MAX, FP16_MAX)
            out[start : start + len(idx), view] = y
            if task is not None:
                progress.advance(task, len(idx))
    if clipped:
        log.warning("%s: %d activations beyond float16's range were clipped to +-%g", description, clipped, FP16_MAX)
    if out is None:
        return np.zeros((0, k, 0, 0, 0), dtype=np.float16)
    return out


# --- the loop -------------------------------------------------------------------------------------

LOOP_NAME = "finetune_cached"


def view0_batches(acts, batch_size: int, device):
    """The plain view 0 of cached activations as float32 channels-last batches on ``device``, for
    inference (call it under ``torch.inference_mode``)."""
    import torch

    for i in range(0, len(acts), batch_size):
        x = torch.from_numpy(np.asarray(acts[i : i + batch_size, 0], dtype=np.float32)).to(device)
        yield x.contiguous(memory_format=torch.channels_last)


def view0_logits(split, head, acts, batch_size: int, device, amp=(False, None)):
    """Logits (a CPU float tensor) of suffix + head, in eval mode, on the plain view 0 of cached
    activations: the fine-tune's per-epoch validation and the run's record of it."""
    import torch

    split.suffix.eval()
    head.eval()
    logits = []
    with torch.inference_mode():
        for x in view0_batches(acts, batch_size, device):
            with torch.autocast(device_type=device.type, dtype=amp[1], enabled=amp[0]):
                logits.append(head(split.suffix(x)).float().cpu())
    return torch.cat(logits) if logits else torch.zeros((0, head.fc.out_features))


def _evaluate(split, head, acts, y, cfg, device, amp) -> tuple[float, float]:
    """(loss, top-1) of suffix + head on view 0 of ``acts``; loss unweighted, with label smoothing."""
    import torch

    if len(acts) == 0:
        return 0.0, 0.0
    all_logits = view0_logits(split, head, acts, cfg.batch_size, device, amp)
    loss = float(torch.nn.functional.cross_entropy(all_logits, y.cpu(), label_smoothing=cfg.label_smoothing))
    return loss, float((all_logits.argmax(1) == y.cpu()).float().mean())


def finetune_cached(split: SplitTrunk, head, acts_train, ytr, acts_val, yval, cfg, *, criterion, io, device) -> int:
    """Train ``split.suffix`` (its trainable blocks) + ``head`` on cached prefix activations.

    Each epoch uses ONE view per image (drawn per image per epoch from ``seed_epoch``'s generator;
    K = 1: always the clean view); AdamW with head lr ``cfg.lr`` and trunk lr
    ``cfg.lr * cfg.trunk_lr_scale``, weight decay, cosine schedule, label smoothing via
    ``criterion``, batches of ``cfg.batch_size``, ``cfg.epochs`` epochs; the loss is checked finite.
    Frozen batch norms in the suffix stay in eval mode; the head's dropout applies. Starts from the
    head as given. One ``epoch_record`` per epoch in ``io.history`` (val top-1 on view 0 of
    ``acts_val``), a progress task, ``io.on_epoch_end(epoch, checkpoint)`` each epoch, ``io.resume``
    honoured. Returns ``cfg.epochs`` and leaves the LAST epoch's weights (on ``device``): the
    validation split never chooses.
    """
    import torch

    from edgetl.workstation.loops import (
        TrainingDiverged,
        amp_settings,
        check_finite,
        cosine,
        epoch_record,
        optimizer_step,
        seed_epoch,
    )
    from edgetl.workstation.model import freeze_batchnorm_stats

    device = torch.device(device)
    for name in ("lr", "trunk_lr_scale"):
        if not math.isfinite(getattr(cfg, name)):
            raise TrainingDiverged(
                f"training cannot start: --{name.replace('_', '-')} is {getattr(cfg, name)}; give a finite value"
            )
    if (getattr(cfg, "mixup", 0) or getattr(cfg, "cutmix", 0)) and not io.resume:
        log.info("mixup/CutMix mix images and are not applied when training on cached activations")
    n, k = int(acts_train.shape[0]), int(acts_train.shape[1])
    # channels-last: 1.3-1.8x faster training steps on the CPU (oneDNN), the layout CUDA prefers too.
    suffix = split.suffix.to(device, memory_format=torch.channels_last)
    head = head.to(device)
    ytr_d, yval = ytr.to(device), yval.cpu()
    criterion = criterion.to(device) if hasattr(criterion, "to") else criterion
    head_params = list(head.parameters())
    trunk_params = [p for p in suffix.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [{"params": head_params, "lr": cfg.lr}, {"params": trunk_params, "lr": cfg.lr * cfg.trunk_lr_scale}],
        weight_decay=cfg.weight_decay,
    )
    sched = cosine(opt, math.ceil(n / cfg.batch_size) * cfg.epochs)
    amp_on, amp_dtype, needs_scaler = amp_settings(cfg.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=needs_scaler)
    start = 1
    if io.resume:
        state = io.resume
        if state.get("loop") != LOOP_NAME:
            raise RunError("this checkpoint was not written by the cached-prefix fine-tune; start over with --force")
        suffix.load_state_dict(state["model"]["suffix"])
        head.load_state_dict(state["model"]["head"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        io.history[:] = state["history"]
        start = state["epoch"] + 1
    task = io.progress.add_task("fine-tune epochs", total=cfg.epochs, completed=start - 1, status="")
    for epoch in range(start, cfg.epochs + 1):
        t0 = time.perf_counter()
        g = seed_epoch(cfg.seed, epoch)
        order = torch.randperm(n, generator=g).numpy()
        view_of = torch.randint(k, (n,), generator=g).numpy() if k > 1 else np.zeros(n, dtype=np.int64)
        suffix.train()
        freeze_batchnorm_stats(suffix)
        head.train()
        loss_sum, correct = 0.0, 0
        for i in range(0, n, cfg.batch_size):
            idx = np.sort(order[i : i + cfg.batch_size])  # sorted: faster gathering, same batch
            x = torch.from_numpy(acts_train[idx, view_of[idx]].astype(np.float32)).to(device, non_blocking=True)
            x = x.contiguous(memory_format=torch.channels_last)
            y = ytr_d[torch.from_numpy(idx).to(device)]
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_on):
                logits = head(suffix(x))
                loss = criterion(logits, y)
            value = loss.item()
            check_finite(value, "training loss", epoch, cfg)  # before the step: a NaN step ruins every weight
            optimizer_step(loss, opt, scaler, sched)
            loss_sum += value * len(idx)
            correct += int((logits.argmax(1) == y).sum())
        val_loss, val_top1 = _evaluate(split, head, acts_val, yval, cfg, device, (amp_on, amp_dtype))
        check_finite(val_loss, "validation loss", epoch, cfg)
        io.history.append(epoch_record(epoch, loss_sum / max(1, n), correct / max(1, n), val_loss, val_top1, opt, t0))
        io.progress.update(task, advance=1, status=f"val top-1 {val_top1:.3f}")
        if io.on_epoch_end:
            io.on_epoch_end(
                epoch,
                {
                    "loop": LOOP_NAME,
                    "epoch": epoch,
                    "model": {"suffix": suffix.state_dict(), "head": head.state_dict()},
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "scaler": scaler.state_dict() if needs_scaler else None,
                    "history": io.history,
                    "stopped": False,
                },
            )
    suffix.to(memory_format=torch.contiguous_format)  # the trunk's tensors back in their usual layout
    suffix.eval()
    head.eval()
    return cfg.epochs
