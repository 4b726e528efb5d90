"""Feature extraction: trunk features computed once vs the frozen trunk run every epoch.

Both arms train the same head (same seed, optimiser, schedule, epochs) on the same split of the
digits data with the real ImageNet MobileNetV2 trunk; only where the features come from differs.
Run side by side in one process so machine noise hits both:

    .venv/bin/python benchmarks/feature_extraction_speedup.py --epochs 10 --img-size 96

Prints a table and, with --json, one JSON document.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from edgetl.backbones import get_backbone
from edgetl.data import scan_image_folder, stratified_split, write_digits
from edgetl.model import Head, build_trunk
from edgetl.train import TrainConfig, _cosine, _loader, eval_transform, finetune, seed_everything
from edgetl.weights import resolve_weights


def trunk_every_epoch(data: Path, cfg: TrainConfig) -> tuple[float, float]:
    """Baseline: the frozen trunk runs on every batch of every epoch (what a naive loop does)."""
    spec = get_backbone(cfg.backbone)
    pp = spec.preprocessing(cfg.img_size)
    train, val = stratified_split(scan_image_folder(data), cfg.val_split, cfg.seed)
    seed_everything(cfg.seed)
    state, _ = resolve_weights(spec, cfg.weights)
    trunk = build_trunk(spec, state).eval()
    head = Head(spec.feature_dim, 10, dropout=cfg.dropout)
    device = torch.device("cpu")
    kw = dict(batch_size=cfg.batch_size, seed=cfg.seed, workers=0, device=device)
    tr = _loader(train, eval_transform(pp), shuffle=True, **kw)
    va = _loader(val, eval_transform(pp), shuffle=False, **kw)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = _cosine(opt, math.ceil(len(train) / cfg.batch_size) * cfg.epochs)
    crit = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    t0 = time.perf_counter()
    best = 0.0
    for _ in range(cfg.epochs):
        head.train()
        for x, y in tr:
            with torch.inference_mode():
                f = trunk(x)
            loss = crit(head(f.clone()), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        head.eval()
        correct = n = 0
        with torch.inference_mode():
            for x, y in va:
                correct += int((head(trunk(x)).argmax(1) == y).sum())
                n += len(y)
        best = max(best, correct / n)
    return time.perf_counter() - t0, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--img-size", type=int, default=96)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cfg = TrainConfig(strategy="feature-extraction", epochs=args.epochs, img_size=args.img_size, patience=args.epochs)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "digits"
        write_digits(data)
        t0 = time.perf_counter()
        cached = finetune(data, Path(tmp) / "run", config=cfg, progress=False)
        cached_seconds = time.perf_counter() - t0
        naive_seconds, naive_top1 = trunk_every_epoch(data, cfg)
    doc = {
        "backbone": cfg.backbone,
        "img_size": args.img_size,
        "epochs": args.epochs,
        "features_once": {"seconds": round(cached_seconds, 2), "val_top1": round(cached.val_top1, 4)},
        "trunk_every_epoch": {"seconds": round(naive_seconds, 2), "val_top1": round(naive_top1, 4)},
        "speedup": round(naive_seconds / cached_seconds, 2),
        "top1_diff_pp": round(100 * (cached.val_top1 - naive_top1), 2),
        "torch_threads": torch.get_num_threads(),
    }
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"features once:      {cached_seconds:7.1f}s  val top-1 {cached.val_top1:.4f}")
        print(f"trunk every epoch:  {naive_seconds:7.1f}s  val top-1 {naive_top1:.4f}")
        print(f"speed-up {doc['speedup']}x, top-1 difference {doc['top1_diff_pp']} pp")


if __name__ == "__main__":
    main()
