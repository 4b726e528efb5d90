"""On-device learning on the digits split in two halves of classes (issue: one task to many, on the device).

Digits 0-4 are trained on the workstation (ImageNet MobileNetV2, feature extraction) and exported with
their feature statistics; digits 5-9 are then learned **on the device** with ``edgetl learn --extend``
from K images per class (K = 5, 10, 25), without the images of 0-4. The extended head is scored on
the validation images of all ten classes and compared with a workstation feature-extraction run on
the same images (0-4's training images plus the same K images of 5-9, validated on the same images).
Also measured: the time of each learn, the bytes the head and its statistics add, the old classes'
top-1 before and after (stored validation features), and how well the unfamiliar score separates
digits from images of another offline dataset (scikit-image's sample images, random crops): AUROC.

The split: per class, the files sorted by name, shuffled with ``--seed`` and 20% held out for
validation; the K images of a new class are the first K of its training files.

    .venv/bin/python benchmarks/on_device.py --out benchmarks/results/on_device.json   # ~6 min on 2 cores

``tests/test_on_device_real.py`` runs one budget of it (slow) with the bar: extended head >= the
workstation run - 2 pp.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

OLD, NEW = tuple("01234"), tuple("56789")


def edgetl(*args: object) -> dict:
    """``python -m edgetl ARGS --json --no-progress``: the first result (a failure prints its output)."""
    cmd = [sys.executable, "-m", "edgetl", *map(str, args), "--json", "--no-progress", "-q"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "EDGETL_OFFLINE": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout)["results"][0]


def split(source: Path, seed: int = 0, val_fraction: float = 0.2) -> dict[str, tuple[list[Path], list[Path]]]:
    """Class -> (training files, validation files): sorted, shuffled with ``seed``, the first 20% validation."""
    rng = np.random.default_rng(seed)
    out = {}
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        files = sorted(folder.iterdir())
        order = rng.permutation(len(files))
        n_val = max(1, round(val_fraction * len(files)))
        out[folder.name] = ([files[i] for i in order[n_val:]], [files[i] for i in order[:n_val]])
    return out


def folder(root: Path, files: dict[str, list[Path]]) -> Path:
    """An image folder at ``root`` with links to ``files`` (class -> files)."""
    shutil.rmtree(root, ignore_errors=True)
    for name, paths in files.items():
        (root / name).mkdir(parents=True)
        for p in paths:
            (root / name / p.name).symlink_to(p.resolve())
    return root


def ood_images(root: Path, n: int = 200, seed: int = 0) -> Path:
    """``n`` random 64-128 px crops of scikit-image's sample images: another offline dataset."""
    from PIL import Image
    from skimage import data as skdata

    names = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "page", "text", "horse")
    rng = np.random.default_rng(seed)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    images = [np.asarray(getattr(skdata, name)()) for name in names]
    for i in range(n):
        img = images[i % len(images)]
        size = int(rng.integers(64, 129))
        y, x = int(rng.integers(0, img.shape[0] - size)), int(rng.integers(0, img.shape[1] - size))
        crop = img[y : y + size, x : x + size]
        if crop.dtype != np.uint8:
            crop = (255 * crop.astype(np.float64) / max(float(crop.max()), 1.0)).astype(np.uint8)
        Image.fromarray(crop).convert("RGB").save(root / f"{i:03d}.png")
    return root


def unfamiliar_scores(bundle: Path, images: list[Path], head: str = "default") -> np.ndarray:
    """The head's familiarity score over its threshold, per image (edgetl's Python API, as predict)."""
    from edgetl.device.runtime import open_bundle

    predictor = open_bundle(bundle).load(heads=[head])
    return np.array([r["unfamiliar_score"] for r in predictor.predict(images, top_k=1)])


def exemplar_tradeoff(work: Path, parts, budgets, exemplars=(10, 20, 50, 100, None), seed: int = 0) -> list[dict]:
    """How many exemplar features per old class ``learn --extend`` needs: the extension done in numpy
    exactly as learn does it (edgetl.device.learning.train_head on E exemplars per old class + K
    images per new class), for several E (None: every training image), on the old bundle's features.
    Old-class, new-class and overall top-1 on all validation images; what E costs per class in bytes."""
    from edgetl.device import learning
    from edgetl.device.head_stats import image_features, stratified_subset
    from edgetl.device.runtime import open_bundle

    predictor = open_bundle(work / "bundle-old").load()
    feats = {
        c: (
            image_features(predictor, [str(p) for p in parts[c][0]]),
            image_features(predictor, [str(p) for p in parts[c][1]]),
        )
        for c in OLD + NEW
    }
    x_old = np.concatenate([feats[c][0] for c in OLD])
    y_old = np.concatenate([np.full(len(feats[c][0]), i) for i, c in enumerate(OLD)])
    x_val = np.concatenate([feats[c][1] for c in OLD + NEW])
    y_val = np.concatenate([np.full(len(feats[c][1]), i) for i, c in enumerate(OLD + NEW)])
    old = y_val < len(OLD)
    rows = []
    for k in budgets:
        x_new = np.concatenate([feats[c][0][:k] for c in NEW])
        y_new = np.concatenate([np.full(k, len(OLD) + i) for i in range(len(NEW))])
        for e in exemplars:
            pick = stratified_subset(y_old, e if e is not None else len(y_old), seed)
            w, b, _ = learning.train_head(
                np.concatenate([x_old[pick], x_new]), np.concatenate([y_old[pick], y_new]), 10, seed=seed
            )
            pred = (x_val @ w.T + b).argmax(1)
            rows.append(
                {
                    "images_per_new_class": k,
                    "exemplars_per_old_class": e if e is not None else "all",
                    "top1": float((pred == y_val).mean()),
                    "old_classes_top1": float((pred[old] == y_val[old]).mean()),
                    "new_classes_top1": float((pred[~old] == y_val[~old]).mean()),
                    "bytes_per_class": 2 * x_old.shape[1] * (e if e is not None else round(len(y_old) / len(OLD))),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def experiment(
    work: Path, *, budgets=(5, 10, 25), img_size: int = 96, seed: int = 0, ood: bool = True, tradeoff: bool = True
) -> dict:
    from edgetl.device.familiarity import auroc

    work.mkdir(parents=True, exist_ok=True)
    digits = Path(edgetl("data", "digits", "--out", work / "digits", "--force")["path"])
    parts = split(digits, seed)
    val_all = folder(work / "val", {c: parts[c][1] for c in OLD + NEW})
    val_old = folder(work / "val-old", {c: parts[c][1] for c in OLD})
    old = folder(work / "old", {c: parts[c][0] for c in OLD})
    common = ("--strategy", "feature-extraction", "--img-size", img_size, "--seed", seed)
    t0 = time.perf_counter()
    edgetl("finetune", old, "--out", work / "run-old", "--val-dir", val_old, "--force", *common)
    edgetl(
        "export",
        work / "run-old",
        "--out",
        work / "bundle-old",
        "--model-format",
        "onnx",
        "--precision",
        "fp32",
        "--force",
    )
    workstation_s = time.perf_counter() - t0
    base_manifest = json.loads((work / "bundle-old" / "manifest.json").read_text())
    rows = []
    for k in budgets:
        new = folder(work / f"new-{k}", {c: parts[c][0][:k] for c in NEW})
        bundle = work / f"bundle-{k}"
        shutil.rmtree(bundle, ignore_errors=True)
        shutil.copytree(work / "bundle-old", bundle)
        learned = edgetl("learn", bundle, new, "--head", "default", "--extend", "default")
        device = edgetl("evaluate", bundle, val_all, "--head", "default")
        union = folder(work / f"union-{k}", {**{c: parts[c][0] for c in OLD}, **{c: parts[c][0][:k] for c in NEW}})
        ws = edgetl("finetune", union, "--out", work / f"run-{k}", "--val-dir", val_all, "--force", *common)
        new_top1 = float(np.mean([device["per_class"][c]["accuracy"] for c in NEW]))
        rows.append(
            {
                "images_per_new_class": k,
                "extended_top1": device["top1"],
                "workstation_top1": ws["val_top1"],
                "difference_pp": (device["top1"] - ws["val_top1"]) * 100,
                "new_classes_top1": new_top1,
                "old_classes": learned["learn"]["old_classes"],
                "method": learned["learn"]["method"],
                "weight_decay": learned["learn"].get("weight_decay"),
                "cv_top1": learned["learn"]["cv_top1"],
                "learn_s": learned["seconds"],
                "bytes_added": learned["bytes_added"],
                "n_val": device["n"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    tradeoff_rows = exemplar_tradeoff(work, parts, budgets, seed=seed) if tradeoff else None
    result = {
        "machine": {
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
        },
        "img_size": img_size,
        "seed": seed,
        "old_head": {
            "workstation_s": workstation_s,
            "stats_bytes": base_manifest["heads"]["default"]["stats"]["bytes"],
        },
        "budgets": rows,
        "exemplar_tradeoff": tradeoff_rows,
    }
    if ood:
        others = sorted(ood_images(work / "ood").iterdir())
        digits_val = sorted(p for c in OLD + NEW for p in (val_all / c).iterdir())
        last = work / f"bundle-{budgets[-1]}"
        result["ood"] = {
            "in_distribution": f"digits validation images, all ten classes ({len(digits_val)})",
            "out_of_distribution": f"random crops of scikit-image sample images ({len(others)})",
            "auroc_extended_head": auroc(unfamiliar_scores(last, digits_val), unfamiliar_scores(last, others)),
            "auroc_old_head": auroc(
                unfamiliar_scores(work / "bundle-old", [p for c in OLD for p in (val_all / c).iterdir()]),
                unfamiliar_scores(work / "bundle-old", others),
            ),
            "auroc_old_head_unseen_digits": auroc(
                unfamiliar_scores(work / "bundle-old", [p for c in OLD for p in (val_all / c).iterdir()]),
                unfamiliar_scores(work / "bundle-old", [p for c in NEW for p in (val_all / c).iterdir()]),
            ),
            "accepted_in_distribution": float(np.mean(unfamiliar_scores(last, digits_val) <= 1.0)),
            "flagged_out_of_distribution": float(np.mean(unfamiliar_scores(last, others) > 1.0)),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgetl-on-device"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--img-size", type=int, default=96)
    parser.add_argument("--budgets", default="5,10,25")
    args = parser.parse_args()
    result = experiment(args.work, budgets=tuple(int(b) for b in args.budgets.split(",")), img_size=args.img_size)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
