"""Training-loop overhead: edgetl's end-to-end loop vs a hand-written PyTorch loop, side by side.

Same model (MobileNetV2 trunk + head, last N blocks trainable), same images, transforms, batch
size, optimiser and schedule; the arms alternate (A B A B ...) so machine drift hits both. Both
validate once per epoch on the same images, as a real training loop must; the figure is the ratio
of median wall-clock times (edgetl / hand-written), and images/s over the training images.

    .venv/bin/python benchmarks/train_loop_overhead.py --epochs 1 --repeats 3 --img-size 96 [--json]

On a CUDA machine add --device cuda to measure the AMP/channels-last path.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from edgetl.workstation.backbones import get_backbone
from edgetl.workstation.data import write_digits
from edgetl.workstation.loops import cosine
from edgetl.workstation.model import Head, TransferModel, build_trunk, freeze_batchnorm_stats, set_trainable
from edgetl.workstation.options import TrainConfig
from edgetl.workstation.prepare import ImageDataset, eval_transform, prepare_data, select_device, train_transform
from edgetl.workstation.train import train_model
from edgetl.workstation.weights import resolve_weights


def hand_written(prepared, cfg: TrainConfig, device) -> float:
    """The loop a careful user writes by hand; returns seconds."""
    spec = get_backbone(cfg.backbone)
    pp = spec.preprocessing(cfg.img_size)
    torch.manual_seed(cfg.seed)
    state, _ = resolve_weights(spec, cfg.weights)
    model = TransferModel(build_trunk(spec, state), Head(spec.feature_dim, len(prepared.labels), cfg.dropout))
    set_trainable(model.trunk, cfg.unfreeze)
    model.to(device)
    train = torch.utils.data.DataLoader(
        ImageDataset(prepared.train, train_transform(pp, hflip=False)),
        batch_size=cfg.batch_size,
        shuffle=True,
        pin_memory=device.type == "cuda",
    )
    val = torch.utils.data.DataLoader(ImageDataset(prepared.val, eval_transform(pp)), batch_size=cfg.batch_size)
    opt = torch.optim.AdamW(
        [
            {"params": model.head.parameters(), "lr": cfg.lr},
            {"params": [p for p in model.trunk.parameters() if p.requires_grad], "lr": cfg.lr * cfg.trunk_lr_scale},
        ],
        weight_decay=cfg.weight_decay,
    )
    sched = cosine(opt, math.ceil(len(prepared.train) / cfg.batch_size) * cfg.epochs)
    crit = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    t0 = time.perf_counter()
    for _ in range(cfg.epochs):
        model.train()
        freeze_batchnorm_stats(model.trunk)
        for x, y in train:
            x, y = x.to(device), y.to(device)
            loss = crit(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.inference_mode():
            for x, _y in val:
                model(x.to(device))
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--img-size", type=int, default=96)
    parser.add_argument("--unfreeze", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cfg = TrainConfig(
        strategy="fine-tune",
        unfreeze=args.unfreeze,
        epochs=args.epochs,
        img_size=args.img_size,
        patience=args.epochs,
        device=args.device,
        workers=0,
        head_search=False,  # the end-to-end loop (the cached fine-tune is benchmarks/finetune_speed.py)
    )
    device = select_device(cfg.device)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "digits"
        write_digits(data)
        prepared = prepare_data(data, cfg)
        ours, theirs = [], []
        for _ in range(args.repeats):
            ours.append(train_model(prepared, cfg, progress=False).train_seconds)
            theirs.append(hand_written(prepared, cfg, device))
    images = len(prepared.train) * cfg.epochs
    doc = {
        "device": str(device),
        "img_size": args.img_size,
        "epochs": cfg.epochs,
        "repeats": args.repeats,
        "train_images_per_run": images,
        "edgetl_seconds": [round(t, 2) for t in ours],
        "hand_written_seconds": [round(t, 2) for t in theirs],
        "edgetl_images_per_s": round(images / statistics.median(ours), 1),
        "hand_written_images_per_s": round(images / statistics.median(theirs), 1),
        "ratio_median": round(statistics.median(ours) / statistics.median(theirs), 3),
    }
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"edgetl loop:       median {statistics.median(ours):.1f}s ({doc['edgetl_images_per_s']} img/s)")
        print(f"hand-written loop: median {statistics.median(theirs):.1f}s ({doc['hand_written_images_per_s']} img/s)")
        print(f"edgetl / hand-written time: {doc['ratio_median']}x")


if __name__ == "__main__":
    main()
