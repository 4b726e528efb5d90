"""Does `edgetl probe` rank backbones the way fine-tuning them would, in a fraction of the time?

On the digits (seed 0, 20% validation, the split of `edgetl finetune`), for each candidate:

* probe: `probe_samples` on the **training** images only (5-fold linear probe and LogME on frozen
  features, degenerate features ranked last), on a cold feature cache, so its time includes the
  trunk pass;
* feature extraction: a head on the frozen trunk (the probe's cached training features are reused),
  scored on the validation images;
* fine-tune: the last `--unfreeze` blocks + head for `--epochs` epochs, scored on the validation images;
* capped probe: the probe again on at most `--capped-probe` training images per class (own cold cache).

Reports Spearman's rank correlation between the probe score and each validation top-1, and the
time of the probe against the fine-tune. Run in one process so machine noise hits every arm:

    .venv/bin/python benchmarks/probe_vs_finetune.py --img-size 96

Writes benchmarks/results/probe_vs_finetune.json (``--out``) and prints a table (``--json``: the document).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import sys
import tempfile
from pathlib import Path

import torch

from edgetl.core.errors import EdgetlError
from edgetl.core.imagefolder import class_counts
from edgetl.workstation.data import write_digits
from edgetl.workstation.options import TrainConfig
from edgetl.workstation.prepare import prepare_data, subsample_per_class
from edgetl.workstation.probe import ProbeOptions, parse_candidates, probe_samples
from edgetl.workstation.train import train_model

DEFAULT_CANDIDATES = "mobilenet_v2,mobilenet_v2:none,mobilenet_v3_small:none,mobilenet_v3_large:none,resnet18:none"
RESULTS = Path(__file__).resolve().parent / "results" / "probe_vs_finetune.json"


def spearman(a: list[float], b: list[float]) -> float | None:
    from scipy.stats import spearmanr

    if len(a) < 3:
        return None
    rho = spearmanr(a, b).statistic
    return None if rho != rho else round(float(rho), 4)  # NaN when one side is constant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", default=DEFAULT_CANDIDATES, help="as `edgetl probe --backbones`")
    parser.add_argument("--img-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=3, help="fine-tune epochs")
    parser.add_argument("--unfreeze", type=int, default=3)
    parser.add_argument("--fe-epochs", type=int, default=30, help="feature-extraction epochs")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument(
        "--capped-probe",
        type=int,
        default=50,
        metavar="N",
        help="also probe on at most N training images per class (its own cold cache); 0: skip",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        candidates = parse_candidates(args.candidates)
    except EdgetlError as exc:
        parser.error(str(exc))
    base = TrainConfig(img_size=args.img_size, seed=args.seed, val_split=0.2, device="cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "digits"
        write_digits(data)
        cache = Path(tmp) / "cache"  # cold: the probe's time includes its trunk pass
        prepared = prepare_data(data, base)
        options = ProbeOptions(img_size=args.img_size, folds=args.folds, seed=args.seed, device="cpu", progress=False)
        probe = probe_samples(
            prepared.train, prepared.labels, candidates, options=dataclasses.replace(options, cache_dir=cache)
        )
        print(
            f"probe ranking: {', '.join(r.candidate for r in probe.rows)} ({probe.seconds:.1f}s)",
            file=sys.stderr,
            flush=True,
        )
        capped = {}
        if args.capped_probe:
            few = subsample_per_class(prepared.train, args.capped_probe, args.seed)
            capped_options = dataclasses.replace(options, cache_dir=Path(tmp) / "cache-capped")
            result = probe_samples(few, prepared.labels, candidates, options=capped_options)
            capped = {r.candidate: (rank, r) for rank, r in enumerate(result.rows, 1)}
            print(
                f"capped probe ({len(few)} images) ranking: {', '.join(r.candidate for r in result.rows)} "
                f"({result.seconds:.1f}s)",
                file=sys.stderr,
                flush=True,
            )
        for rank, p in enumerate(probe.rows, 1):
            fe = train_model(
                prepared,
                TrainConfig(
                    **{
                        **base.to_dict(),
                        "backbone": p.backbone,
                        "weights": p.weights,
                        "strategy": "feature-extraction",
                        "epochs": args.fe_epochs,
                    }
                ),
                progress=False,
                cache_dir=cache,
            )
            ft = train_model(
                prepared,
                TrainConfig(
                    **{
                        **base.to_dict(),
                        "backbone": p.backbone,
                        "weights": p.weights,
                        "strategy": "fine-tune",
                        "unfreeze": args.unfreeze,
                        "epochs": args.epochs,
                        "patience": args.epochs,
                    }
                ),
                progress=False,
                cache_dir=cache,
            )
            row = {
                "candidate": p.candidate,
                "backbone": p.backbone,
                "weights": p.weights,
                "pretrained": p.pretrained,
                "probe_rank": rank,
                "probe_linear_top1": p.linear_top1,
                "probe_linear_top1_std": p.linear_top1_std,
                "probe_logme": p.logme,
                "probe_feature_std": p.feature_std,
                "probe_degenerate": p.degenerate,
                "probe_seconds": p.seconds,
                "probe_feature_seconds": p.feature_seconds,
                "probe_score_seconds": p.score_seconds,
                "probe_feature_cache": p.feature_cache,
                "fe_val_top1": round(fe.metrics["val_top1"], 4),
                "fe_seconds": round(fe.train_seconds, 2),
                "fe_feature_cache": fe.feature_cache,
                "ft_val_top1": round(ft.metrics["val_top1"], 4),
                "ft_seconds": round(ft.train_seconds, 2),
            }
            row["probe_over_ft_time"] = round(row["probe_seconds"] / row["ft_seconds"], 3)
            if capped:
                c_rank, c = capped[p.candidate]
                row.update(
                    {
                        "capped_rank": c_rank,
                        "capped_linear_top1": c.linear_top1,
                        "capped_logme": c.logme,
                        "capped_degenerate": c.degenerate,
                        "capped_seconds": c.seconds,
                    }
                )
            rows.append(row)
            print(
                f"{p.candidate}: probe {p.linear_top1:.4f} (LogME {p.logme:.3f}) in {p.seconds:.1f}s; "
                f"FE {row['fe_val_top1']:.4f}; fine-tune {row['ft_val_top1']:.4f} in {row['ft_seconds']:.1f}s",
                file=sys.stderr,
                flush=True,
            )
    col = {k: [r[k] for r in rows] for k in rows[0]}
    probe_total, ft_total = sum(col["probe_seconds"]), sum(col["ft_seconds"])
    doc = {
        "benchmark": "probe_vs_finetune",
        "data": "scikit-learn digits (1,797 8x8 images, 10 classes), seed split 80/20; probe on the training part",
        "img_size": args.img_size,
        "seed": args.seed,
        "folds": args.folds,
        "fine_tune": {"unfreeze": args.unfreeze, "epochs": args.epochs},
        "feature_extraction": {"epochs": args.fe_epochs},
        "train_images": len(prepared.train),
        "val_images": len(prepared.val),
        "rows": rows,
        "spearman": {
            # the probe's ranking as it reports it: degenerate features last, then by linear-probe top-1
            "probe_rank_vs_ft": spearman([-r for r in col["probe_rank"]], col["ft_val_top1"]),
            "probe_rank_vs_fe": spearman([-r for r in col["probe_rank"]], col["fe_val_top1"]),
            "probe_linear_vs_ft": spearman(col["probe_linear_top1"], col["ft_val_top1"]),
            "probe_linear_vs_fe": spearman(col["probe_linear_top1"], col["fe_val_top1"]),
            "probe_logme_vs_ft": spearman(col["probe_logme"], col["ft_val_top1"]),
            "probe_logme_vs_fe": spearman(col["probe_logme"], col["fe_val_top1"]),
        },
        "probe_ranking": [r["candidate"] for r in rows],
        "ft_ranking": [r["candidate"] for r in sorted(rows, key=lambda r: -r["ft_val_top1"])],
        "seconds": {
            "probe_total": round(probe_total, 1),
            "ft_total": round(ft_total, 1),
            "probe_over_ft": round(probe_total / ft_total, 3),
        },
        "capped_probe": None
        if not args.capped_probe
        else {
            "samples_per_class": args.capped_probe,
            "images": sum(min(args.capped_probe, n) for n in class_counts(prepared.train, len(prepared.labels))),
            "ranking": [r["candidate"] for r in sorted(rows, key=lambda r: r["capped_rank"])],
            "spearman_rank_vs_ft": spearman([-r for r in col["capped_rank"]], col["ft_val_top1"]),
            "spearman_rank_vs_fe": spearman([-r for r in col["capped_rank"]], col["fe_val_top1"]),
            "seconds_total": round(sum(col["capped_seconds"]), 1),
            "over_ft": round(sum(col["capped_seconds"]) / ft_total, 3),
        },
        "env": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "device": "cpu",
        },
    }
    try:
        from edgetl.core.envinfo import cpu_model

        doc["env"]["cpu"] = cpu_model()
    except Exception:  # envinfo is optional context, not the measurement
        pass
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(
        f"{'#':>2} {'candidate':26} {'probe':>7} {'LogME':>7} {'degen.':>6} {'FE top-1':>9} {'FT top-1':>9} "
        f"{'probe s':>8} {'FT s':>7}"
    )
    for r in rows:
        print(
            f"{r['probe_rank']:2d} {r['candidate']:26} {r['probe_linear_top1']:7.4f} {r['probe_logme']:7.3f} "
            f"{'yes' if r['probe_degenerate'] else 'no':>6} {r['fe_val_top1']:9.4f} {r['ft_val_top1']:9.4f} "
            f"{r['probe_seconds']:8.1f} {r['ft_seconds']:7.1f}"
        )
    s = doc["spearman"]
    print(
        f"Spearman, probe ranking vs fine-tune {s['probe_rank_vs_ft']}, vs feature extraction {s['probe_rank_vs_fe']} "
        f"(linear score alone: {s['probe_linear_vs_ft']}, {s['probe_linear_vs_fe']}; LogME: {s['probe_logme_vs_ft']}, "
        f"{s['probe_logme_vs_fe']}); probe time / fine-tune time {doc['seconds']['probe_over_ft']}"
    )
    if doc["capped_probe"]:
        c = doc["capped_probe"]
        print(
            f"capped probe ({c['samples_per_class']} per class, {c['images']} images): Spearman vs fine-tune "
            f"{c['spearman_rank_vs_ft']}, vs feature extraction {c['spearman_rank_vs_fe']}; time / fine-tune time "
            f"{c['over_ft']}"
        )
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
