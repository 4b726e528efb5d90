"""Fine-tune speed: today's end-to-end fine-tune against the cached-prefix fine-tune, same data, seed, epochs.

Arms, all in one process on the same split, seed, epochs and TrainConfig (``--strategy fine-tune``,
``unfreeze`` 3, the config's lr / trunk-lr scale / batch):

* ``end-to-end``: train_model's end-to-end loop, ``train_end_to_end`` (decodes every image and
  runs the whole trunk every epoch); its per-epoch time includes the validation pass, as every arm's does;
* ``cached K=k, head=zero|probe``: images decoded once (:class:`ImageStore`), the frozen prefix run
  once over K views (:func:`prefix_activations`, ONNX Runtime on the CPU unless
  ``EDGETL_FROZEN_ENGINE=eager``), then :func:`finetune_cached` from a freshly initialised head
  (``zero``: the Head's own random init) or from a linear-probe head (scikit-learn's
  LogisticRegression fitted on the suffix's features of the clean training view).

Reported: the one-off seconds (decode, prefix pass, probe fit), the median seconds per epoch, the
speed-up per epoch against end-to-end, and val top-1 after the last epoch (and end-to-end's best
epoch, which is what ``train_model`` keeps).

    .venv/bin/python benchmarks/finetune_speed.py /tmp/sets/patches /tmp/sets/digits --epochs 5 --img-size 96
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from edgetl.workstation.backbones import get_backbone
from edgetl.workstation.export.common import progress_bar
from edgetl.workstation.fast_trunk import frozen_runner
from edgetl.workstation.loops import LoopIO, Placement, train_end_to_end
from edgetl.workstation.model import Head, TransferModel, build_trunk, set_trainable
from edgetl.workstation.options import TrainConfig
from edgetl.workstation.prefix import ImageStore, Views, finetune_cached, prefix_activations, split_trunk
from edgetl.workstation.prepare import ImageDataset, eval_transform, prepare_data, seed_everything, train_transform
from edgetl.workstation.weights import resolve_weights


class EpochClock:
    """Process CPU seconds per epoch (an ``on_epoch_end`` hook): less sensitive than wall time to other
    processes on a shared machine."""

    def __init__(self):
        self.cpu: list[float] = []
        self.last = time.process_time()

    def __call__(self, epoch, state):
        now = time.process_time()
        self.cpu.append(now - self.last)
        self.last = now

    def median(self) -> float:
        return round(statistics.median(self.cpu), 3)


def end_to_end(prepared, cfg: TrainConfig) -> dict:
    """Today's ``--strategy fine-tune``: train_model's end-to-end branch (as in git HEAD), called directly
    so that the benchmark does not depend on how train_model routes strategies."""
    spec = get_backbone(cfg.backbone)
    pp = spec.preprocessing(cfg.img_size)
    state_dict, _ = resolve_weights(spec, cfg.weights)
    seed_everything(cfg.seed)
    trunk = build_trunk(spec, state_dict)
    head = Head(spec.feature_dim, len(prepared.labels), dropout=cfg.dropout)
    model = TransferModel(trunk, head)
    set_trainable(trunk, cfg.unfreeze)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    train_tf = train_transform(pp, hflip=cfg.hflip) if cfg.augment else eval_transform(pp)
    train_set = ImageDataset(prepared.train, train_tf)
    val_set = ImageDataset(prepared.val, eval_transform(pp))
    clock = EpochClock()
    io = LoopIO(progress=progress_bar(False), history=[], on_epoch_end=clock)
    t0 = time.perf_counter()
    clock.last = time.process_time()
    best = train_end_to_end(
        model, train_set, val_set, cfg, criterion=criterion, io=io, where=Placement(torch.device("cpu"))
    )
    seconds = [h["seconds"] for h in io.history]
    return {
        "arm": "end-to-end",
        "total_s": round(time.perf_counter() - t0, 2),
        "once_s": 0.0,
        "epoch_s": round(statistics.median(seconds), 3),
        "epoch_cpu_s": clock.median(),
        "val_top1_last": io.history[-1]["val_top1"],
        "val_top1_best": io.history[best - 1]["val_top1"],
    }


def fresh_split(spec, state_dict, cfg):
    seed_everything(cfg.seed)
    trunk = build_trunk(spec, state_dict)
    set_trainable(trunk, cfg.unfreeze)
    split = split_trunk(trunk, cfg.unfreeze)
    if split is None:
        raise SystemExit(f"{spec.name} cannot be split at unfreeze {cfg.unfreeze}")
    return trunk, split


def probe_head(split, acts, y, num_classes, dropout) -> tuple[Head, float]:
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    split.suffix.eval()
    with torch.inference_mode():
        feats = torch.cat(
            [split.suffix(torch.from_numpy(acts[i : i + 256, 0].astype(np.float32))) for i in range(0, len(acts), 256)]
        ).numpy()
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(feats, y.numpy())
    head = Head(feats.shape[1], num_classes, dropout=dropout)
    with torch.no_grad():
        head.fc.weight.copy_(torch.from_numpy(clf.coef_).float())
        head.fc.bias.copy_(torch.from_numpy(clf.intercept_).float())
    return head, time.perf_counter() - t0


def cached_arms(prepared, cfg: TrainConfig, ks: list[int], heads: list[str]) -> list[dict]:
    spec = get_backbone(cfg.backbone)
    pp = spec.preprocessing(cfg.img_size)
    state_dict, _ = resolve_weights(spec, cfg.weights)
    ytr = torch.tensor([s.label for s in prepared.train])
    yval = torch.tensor([s.label for s in prepared.val])
    n_classes = len(prepared.labels)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    t0 = time.perf_counter()
    store_tr, store_val = ImageStore(prepared.train, pp), ImageStore(prepared.val, pp)
    decode_s = time.perf_counter() - t0
    _, split = fresh_split(spec, state_dict, cfg)
    example = torch.stack([Views(1).transform(pp, 0, i)(store_tr.get(i)) for i in range(min(8, len(store_tr)))])
    t0 = time.perf_counter()
    runner = frozen_runner(split.prefix, example, "cpu")
    runner_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    acts_val = prefix_activations(runner, store_val, Views(1), pp, batch_size=cfg.batch_size)
    val_pass_s = time.perf_counter() - t0
    rows = []
    for k in ks:
        t0 = time.perf_counter()
        acts_tr = prefix_activations(runner, store_tr, Views(k, hflip=cfg.hflip, seed=cfg.seed), pp)
        pass_s = time.perf_counter() - t0
        for head_kind in heads:
            _, split_k = fresh_split(spec, state_dict, cfg)
            probe_s = 0.0
            if head_kind == "probe":
                head, probe_s = probe_head(split_k, acts_tr, ytr, n_classes, cfg.dropout)
            else:
                head = Head(spec.feature_dim, n_classes, dropout=cfg.dropout)
            clock = EpochClock()
            io = LoopIO(progress=progress_bar(False), history=[], on_epoch_end=clock)
            t0 = time.perf_counter()
            clock.last = time.process_time()
            finetune_cached(
                split_k, head, acts_tr, ytr, acts_val, yval, cfg, criterion=criterion, io=io, device=torch.device("cpu")
            )
            train_s = time.perf_counter() - t0
            once = decode_s + runner_s + val_pass_s + pass_s + probe_s
            rows.append(
                {
                    "arm": f"cached K={k} head={head_kind}",
                    "total_s": round(once + train_s, 2),
                    "once_s": round(once, 2),
                    "decode_s": round(decode_s, 2),
                    "runner_build_s": round(runner_s, 2),
                    "prefix_pass_s": round(pass_s + val_pass_s, 2),
                    "probe_fit_s": round(probe_s, 2),
                    "epoch_s": round(statistics.median(h["seconds"] for h in io.history), 3),
                    "epoch_cpu_s": clock.median(),
                    "val_top1_last": io.history[-1]["val_top1"],
                    "val_top1_best": max(h["val_top1"] for h in io.history),
                    "activation_mib": round(acts_tr.nbytes / 2**20, 1),
                }
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("datasets", nargs="+", help="folders with train/ and val/ image folders")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--img-size", type=int, default=96)
    ap.add_argument("--backbone", default="mobilenet_v2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--views", default="1,4", help="comma-separated K values")
    ap.add_argument("--heads", default="zero,probe", help="head starts, in this order: zero, probe")
    ap.add_argument("--no-end-to-end", action="store_true", help="skip the end-to-end arm (speed-ups then unset)")
    ap.add_argument("--threads", type=int, default=None, help="torch (and ONNX Runtime) threads; default torch's")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.stdout.reconfigure(line_buffering=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(
        backbone=args.backbone,
        strategy="fine-tune",
        img_size=args.img_size,
        epochs=args.epochs,
        seed=args.seed,
        device="cpu",
    )
    report = {"config": cfg.to_dict(), "threads": torch.get_num_threads(), "datasets": {}}
    for data in args.datasets:
        root = Path(data)
        prepared = prepare_data(root / "train", cfg, val_dir=root / "val")
        rows = [] if args.no_end_to_end else [end_to_end(prepared, cfg)]
        rows += cached_arms(prepared, cfg, [int(k) for k in args.views.split(",")], args.heads.split(","))
        base = rows[0]["epoch_s"] if not args.no_end_to_end else None
        for r in rows:
            r["speedup_per_epoch"] = round(base / r["epoch_s"], 1) if base and r["epoch_s"] else float("nan")
            cpu = rows[0]["epoch_cpu_s"] if base else None
            r["speedup_per_epoch_cpu"] = round(cpu / r["epoch_cpu_s"], 1) if cpu and r["epoch_cpu_s"] else float("nan")
        report["datasets"][str(root)] = {"train": len(prepared.train), "val": len(prepared.val), "rows": rows}
        if not args.json:
            print(f"\n{root}: {len(prepared.train)} train / {len(prepared.val)} val, {args.epochs} epochs")
            cols = ("once s", "epoch s", "x/epoch", "cpu s", "x/cpu", "total s", "top1 last", "top1 best")
            print(f"{'arm':28} " + " ".join(f"{c:>9}" for c in cols))
            for r in rows:
                print(
                    f"{r['arm']:28} {r['once_s']:9.2f} {r['epoch_s']:9.3f} {r['speedup_per_epoch']:9.1f} "
                    f"{r['epoch_cpu_s']:9.3f} {r['speedup_per_epoch_cpu']:9.1f} "
                    f"{r['total_s']:9.2f} {r['val_top1_last']:9.4f} {r['val_top1_best']:9.4f}"
                )
    if args.json:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
