"""The searched head (edgetl.workstation.head_search) against the plain script's head, on real features.

For one image folder SET with train/ and val/ (e.g. /tmp/sets/patches, written by
benchmarks/datasets.py): MobileNetV2 (ImageNet) features of both splits at ``--img-size`` through
edgetl's preprocessing (cached after the first run), then

* searched: ``search_head`` on the training features only (k-fold), the chosen head scored on val;
* script: ``nn.Linear`` trained on the same training features as the forty-line script does
  (AdamW lr 1e-2, weight decay 1e-4, 100 epochs, batch 64, no label smoothing), scored on val.

Prints one table (the search's candidates, best first), the chosen setting, both validation top-1
and both times:

    .venv/bin/python benchmarks/head_search.py /tmp/sets/patches [--img-size 96] [--folds 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from edgetl.core.imagefolder import scan_image_folder
from edgetl.workstation.backbones import get_backbone
from edgetl.workstation.features import FeatureSettings, backbone_features
from edgetl.workstation.head_search import search_head


def features(folder: Path, img_size: int, classes=None):
    spec = get_backbone("mobilenet_v2")
    pp = spec.preprocessing(img_size)
    scanned = scan_image_folder(folder, classes=classes)
    samples = list(scanned.samples)
    feats, _, _ = backbone_features(
        spec,
        "imagenet",
        samples,
        pp,
        FeatureSettings(torch.device("cpu"), 64),
        progress=None,
        description=folder.name,
    )
    return feats.astype(np.float32), np.array([s.label for s in samples]), scanned.classes


def script_head(xtr, ytr, xval, yval, num_classes: int, seed: int = 0) -> float:
    """The plain script's linear probe on the same features; validation top-1."""
    torch.manual_seed(seed)
    ftr, ttr = torch.from_numpy(xtr), torch.from_numpy(ytr).long()
    head = torch.nn.Linear(xtr.shape[1], num_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(100):
        for idx in torch.randperm(len(ftr)).split(64):
            loss = torch.nn.functional.cross_entropy(head(ftr[idx]), ttr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return float((head(torch.from_numpy(xval)).argmax(1).numpy() == yval).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("set", type=Path, help="folder with train/<class>/* and val/<class>/*")
    p.add_argument("--img-size", type=int, default=96)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    a = p.parse_args()
    torch.set_num_threads(2)

    t = time.perf_counter()
    xtr, ytr, classes = features(a.set / "train", a.img_size)
    xval, yval, _ = features(a.set / "val", a.img_size, classes=tuple(classes))
    feature_seconds = time.perf_counter() - t
    k = len(classes)

    search_head(xtr[:: max(1, len(xtr) // 40)], ytr[:: max(1, len(ytr) // 40)], k, folds=2)  # imports, not timed
    cpu = time.process_time()
    result = search_head(xtr, ytr, k, folds=a.folds, seed=a.seed)
    cpu = time.process_time() - cpu
    searched_val = float(((xval @ result.weight.T + result.bias).argmax(1) == yval).mean())

    t = time.perf_counter()
    script_val = script_head(xtr, ytr, xval, yval, k, a.seed)
    script_seconds = time.perf_counter() - t

    doc = {
        "set": str(a.set),
        "train_rows": len(xtr),
        "val_rows": len(xval),
        "classes": k,
        "dim": int(xtr.shape[1]),
        "feature_seconds": round(feature_seconds, 2),
        "search": result.to_dict(),
        "search_cpu_seconds": round(cpu, 3),
        "searched_val_top1": round(searched_val, 4),
        "script_val_top1": round(script_val, 4),
        "script_seconds": round(script_seconds, 2),
    }
    if a.json:
        print(json.dumps(doc, indent=2))
        return
    print(f"{a.set.name}: {len(xtr)} train / {len(xval)} val rows, {k} classes, features {xtr.shape[1]}")
    print(f"{'weight_decay':>12} {'smoothing':>9} {'cv_top1':>8} {'+-':>6} {'cv_loss':>8} {'seconds':>8}")
    for row in result.table:
        print(
            f"{row['weight_decay']:>12g} {row['label_smoothing']:>9g} {row['cv_top1']:>8.4f} "
            f"{row['cv_top1_std']:>6.3f} {row['cv_loss']:>8.4f} {row['seconds']:>8.3f}"
        )
    chosen = result.chosen
    print(
        f"chosen: weight_decay {chosen['weight_decay']:g}, label smoothing {chosen['label_smoothing']:g} "
        f"({result.folds} folds{'; ' + result.fallback if result.fallback else ''})"
    )
    print(f"searched head: val top-1 {searched_val:.4f}  search {result.seconds:.2f} s (cpu {cpu:.2f} s)")
    print(f"script head:   val top-1 {script_val:.4f}  training {script_seconds:.2f} s")


if __name__ == "__main__":
    main()
