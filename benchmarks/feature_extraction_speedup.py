"""Feature extraction: trunk features computed once (cold and warm cache) vs the trunk run every epoch.

All three arms are `edgetl.workstation.train.finetune` on the same split of the digits data with the real
ImageNet MobileNetV2 trunk, the same head settings, seed and epochs; only where the features come
from differs:

* ``no-cache``:   ``--no-feature-cache --no-augment``: the frozen trunk runs on every batch of every epoch;
* ``cold cache``: features computed once into an empty cache, then the head trains on them;
* ``warm cache``: a second run with *other head settings* (dropout, lr) on the same images: a cache hit.

Run side by side in one process so machine noise hits all arms:

    .venv/bin/python benchmarks/feature_extraction_speedup.py --epochs 10 --img-size 96 [--json]

Times are wall-clock seconds of the whole `finetune` call (data scan, weights, training, run writing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from edgetl.workstation.data import write_digits
from edgetl.workstation.options import TrainConfig
from edgetl.workstation.train import finetune


def timed(data: Path, out: Path, cfg: TrainConfig):
    t0 = time.perf_counter()
    result = finetune(data, out, config=cfg, progress=False)
    return time.perf_counter() - t0, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--img-size", type=int, default=96)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    base = TrainConfig(  # the same epochs on both sides: the head trains as given (no head search)
        strategy="feature-extraction",
        epochs=args.epochs,
        img_size=args.img_size,
        patience=args.epochs,
        augment=False,
        head_search=False,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["EDGETL_CACHE"] = str(tmp / "cache")  # a cold cache, private to this benchmark
        data = tmp / "digits"
        write_digits(data)
        t_plain, plain = timed(data, tmp / "plain", dataclasses.replace(base, feature_cache=False))
        t_cold, cold = timed(data, tmp / "cold", base)
        t_warm, warm = timed(data, tmp / "warm", dataclasses.replace(base, dropout=0.3, lr=5e-3))
    doc = {
        "backbone": base.backbone,
        "img_size": args.img_size,
        "epochs": args.epochs,
        "torch_threads": torch.get_num_threads(),
        "no_cache": {"seconds": round(t_plain, 2), "val_top1": round(plain.val_top1, 4)},
        "cold_cache": {"seconds": round(t_cold, 2), "val_top1": round(cold.val_top1, 4), "cache": cold.feature_cache},
        "warm_cache_other_head": {
            "seconds": round(t_warm, 2),
            "val_top1": round(warm.val_top1, 4),
            "cache": warm.feature_cache,
        },
        "speedup_cold": round(t_plain / t_cold, 2),
        "speedup_warm": round(t_plain / t_warm, 2),
        "top1_diff_cold_pp": round(100 * (cold.val_top1 - plain.val_top1), 2),
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(f"no cache (trunk every epoch): {t_plain:7.1f}s  val top-1 {plain.val_top1:.4f}")
    print(f"cold cache (features once):   {t_cold:7.1f}s  val top-1 {cold.val_top1:.4f}  {cold.feature_cache}")
    print(f"warm cache, other head:       {t_warm:7.1f}s  val top-1 {warm.val_top1:.4f}  {warm.feature_cache}")
    print(
        f"speed-up: cold {doc['speedup_cold']}x, warm {doc['speedup_warm']}x; "
        f"top-1 cold vs no cache {doc['top1_diff_cold_pp']:+.2f} pp"
    )


if __name__ == "__main__":
    main()
