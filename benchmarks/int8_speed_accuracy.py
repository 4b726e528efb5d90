"""int8 that is fast, not only small: every int8 variant's top-1 drop and speed-up over its fp32.

For MobileNetV2 on the scikit-learn digits (seed 0, 20% validation) at each ``--img-size``:

1. a run: ``fine-tune`` (``edgetl finetune --strategy fine-tune --unfreeze 3 --epochs 3``, what
   the README does) or ``fitted-head`` (the ImageNet trunk with a linear head fitted on its
   features, tests/run_factory.py: the case where int8 is hardest), or ``--run PATH``;
2. ``edgetl export`` with the default profile (ONNX Runtime and OpenVINO, fp32 and int8): the
   int8 search times every passing attempt and keeps the fastest, and records each int8
   variant's speed-up measured at export;
3. ``edgetl bench``'s timing (batch 1, every variant interleaved, no cold start) at 1 and 2
   threads, ``--repeats`` times; the figure is the median over repeats of fp32 p50 / int8 p50;
4. the trunk's feature SQNR against fp32 (from the export) and a second head (odd/even, trained on
   the bundle's trunk, added with ``export --add-to --partial``): its top-1 drop on each int8 trunk.

From the manifest it also reports the search "before and after" latency-aware selection: the
attempt the old search would have shipped (the first that passed) against the one shipped (the
fastest that passed), with both speed-ups as timed during the search.

    .venv/bin/python benchmarks/int8_speed_accuracy.py --img-size 96
    .venv/bin/python benchmarks/int8_speed_accuracy.py --img-size 96,224 --run-kind fitted-head

Writes benchmarks/results/int8_speed_accuracy.json (``--out``) and prints a table. Timings on a
shared machine are noisy: read the ratios (each measured side by side), not absolute latencies.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "int8_speed_accuracy.json"
log = logging.getLogger("int8_speed_accuracy")


def make_run(kind: str, work: Path, digits: Path, img_size: int) -> Path:
    run = work / f"run-{kind}-{img_size}"
    if (run / "config.json").is_file():  # kept from an earlier --keep run
        return run
    if kind == "fine-tune":
        args = [sys.executable, "-m", "edgetl", "finetune", str(digits), "--out", str(run), "--img-size", str(img_size)]
        args += ["--strategy", "fine-tune", "--unfreeze", "3", "--epochs", "3", "--seed", "0", "--no-progress", "-q"]
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
        return run
    # The real-weights fixture of the slow export test: ImageNet trunk, linear head fitted on its features.
    sys.path.insert(0, str(ROOT))
    from edgetl.workstation.backbones import get_backbone
    from edgetl.workstation.weights import resolve_weights
    from tests.run_factory import make_run as fitted_head_run

    state, source = resolve_weights(get_backbone("mobilenet_v2"), "imagenet")
    return fitted_head_run(
        run,
        digits,
        backbone="mobilenet_v2",
        img_size=img_size,
        trunk_state=state,
        weights=source.to_dict(),
        val_fraction=0.2,
    )


def search_record(q: dict) -> dict:
    """The search in brief: what it shipped, and what the first passing attempt (the old choice) was."""
    attempts = q["attempts"]
    passing = [i for i, a in enumerate(attempts) if a["passed"]]
    chosen = q["chosen_attempt"]

    def brief(i: int | None) -> dict | None:
        if i is None:
            return None
        a = attempts[i]
        return {
            "attempt": i + 1,
            "settings": {k: v for k, v in a.items() if k not in ("speed", "val_top1", "top1_drop_pp", "passed")},
            "float_layers": len(a["excluded_nodes"]),
            "top1_drop_pp": a["top1_drop_pp"],
            "search_speedup": (a.get("speed") or {}).get("speedup_vs_fp32"),
        }

    return {
        "attempts": len(attempts),
        "passing": len(passing),
        "chosen": brief(chosen),
        "first_passing": brief(passing[0] if passing else None),
    }


def second_head(bundle: Path, digits: Path | None, work: Path) -> dict[str, float | None] | None:
    """Goal 3 of the issue: a second head (odd/even on the same digits, feature extraction on the
    bundle's own trunk) added with ``export --add-to``; its top-1 drop on each int8 variant against
    the same format's fp32. None without the digits (``--run``)."""
    if digits is None:
        return None
    parity = work / "parity"
    if not parity.is_dir():
        for d in range(10):
            dest = parity / ("even" if d % 2 == 0 else "odd")
            dest.mkdir(parents=True, exist_ok=True)
            for p in sorted((digits / str(d)).glob("*.png")):
                shutil.copyfile(p, dest / p.name)
    run = work / f"run-parity-{bundle.name}"
    if run.exists():
        shutil.rmtree(run)
    edgetl = [sys.executable, "-m", "edgetl"]
    subprocess.run(
        [
            *edgetl,
            "finetune",
            str(parity),
            "--out",
            str(run),
            "--trunk-from",
            str(bundle),
            "--epochs",
            "10",
            "--seed",
            "0",
            "--no-progress",
            "-q",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    # --max-drop 100: measure every variant's drop instead of leaving the head out of those over the bar;
    # --force: a kept bundle (--keep) may have the head from an earlier run.
    add = [*edgetl, "export", str(run), "--add-to", str(bundle), "--head", "parity"]
    add += ["--max-drop", "100", "--force", "--json"]
    doc = json.loads(subprocess.run([*add, "--no-progress"], check=True, capture_output=True, text=True).stdout)
    drops: dict[str, float | None] = {
        r["name"]: r["top1_drop_pp"] for r in doc["results"] if r["name"].endswith("-int8")
    }
    for name, why in (doc.get("left_out") or {}).items():
        drops.setdefault(name, None)
        log.warning("second head left out of %s: %s", name, why)
    return drops


def measure(bundle: Path, threads: list[int], iterations: int, repeats: int) -> dict[str, dict[int, list[float]]]:
    """Per int8 variant and thread count, fp32 p50 / int8 p50 of each repeat (all variants interleaved)."""
    from edgetl.device.bench import run_bench

    ratios: dict[str, dict[int, list[float]]] = {}
    for _ in range(repeats):
        report = run_bench(bundle, all_variants=True, threads=threads, iterations=iterations, cold_start_runs=False)
        p50 = {(r.variant, r.threads): r.latency_ms["p50"] for r in report.results}
        for (variant, t), ms in p50.items():
            if variant.endswith("-int8"):
                fp32 = p50[(variant.replace("-int8", "-fp32"), t)]
                ratios.setdefault(variant, {}).setdefault(t, []).append(fp32 / ms)
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", default="96", help="comma-separated input sizes (default 96)")
    parser.add_argument("--run-kind", choices=("fine-tune", "fitted-head"), default="fine-tune")
    parser.add_argument("--run", type=Path, default=None, help="an existing run to export instead (one --img-size)")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--iterations", type=int, default=300, help="timed calls per configuration per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--json", action="store_true", help="print the document instead of a table")
    parser.add_argument("--keep", type=Path, default=None, help="keep the data, runs and bundles in this folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    from edgetl.core import envinfo
    from edgetl.core.bundle import read_manifest
    from edgetl.workstation.data import write_digits
    from edgetl.workstation.export import export_bundle, resolve_options

    sizes = [int(s) for s in args.img_size.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    doc: dict = {
        "benchmark": "int8_speed_accuracy",
        "data": "scikit-learn digits (1,797 8x8 images, 10 classes), seed 0, 20% validation",
        "backbone": "mobilenet_v2",
        "run_kind": "given" if args.run else args.run_kind,
        "threads": threads,
        "iterations": args.iterations,
        "repeats": args.repeats,
        "batch_size": 1,
        "machine": envinfo.environment(),
        "int8_dot_product": envinfo.int8_dot_product(),
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="edgetl-int8-bench-") as tmp:
        work = Path(tmp) if args.keep is None else args.keep
        work.mkdir(parents=True, exist_ok=True)
        digits = None
        if args.run is None:
            digits = work / "digits"
            if not digits.is_dir():
                digits = Path(write_digits(digits)["path"])
        for size in sizes:
            t0 = time.perf_counter()
            reused = args.run is not None or (work / f"run-{args.run_kind}-{size}" / "config.json").is_file()
            run = args.run or make_run(args.run_kind, work, digits, size)
            run_s = None if reused else round(time.perf_counter() - t0, 1)
            t0 = time.perf_counter()
            bundle = work / f"bundle-{size}"
            if bundle.exists():
                shutil.rmtree(bundle)
            exported = export_bundle(run, bundle, resolve_options("default"), progress=False)
            export_s = time.perf_counter() - t0
            manifest = read_manifest(bundle)
            ratios = measure(bundle, threads, args.iterations, args.repeats)
            parity = second_head(bundle, digits, work)
            for name, var in manifest["variants"].items():
                if var["precision"] != "int8":
                    continue
                fp32 = exported["variants"][name.replace("-int8", "-fp32")]
                int8 = exported["variants"][name]
                doc["rows"].append(
                    {
                        "img_size": size,
                        "variant": name,
                        "fp32_val_top1": fp32["val_top1"],
                        "int8_val_top1": int8["val_top1"],
                        "top1_drop_pp": int8["top1_drop_pp"],
                        "n": int8["n"],
                        "speedup_by_threads": {
                            str(t): round(statistics.median(v), 3) for t, v in sorted(ratios[name].items())
                        },
                        "speedup_repeats": {str(t): [round(x, 3) for x in v] for t, v in sorted(ratios[name].items())},
                        "export_speed": {
                            "speedup_vs_fp32": var["speed"]["speedup_vs_fp32"],
                            "by_threads": var["speed"]["by_threads"],
                            "checked": var["speed"]["checked"],
                        },
                        "features_sqnr_db": int8.get("features_sqnr_db"),
                        "second_head_drop_pp": None if parity is None else parity.get(name),
                        "search": search_record(var["quantization"]),
                        "run_seconds": run_s,  # null: an existing run (--run, or kept by --keep)
                        "export_seconds": round(export_s, 1),
                    }
                )
            if args.run:
                break
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(f"machine: {doc['machine']['cpu']}, int8 dot product: {doc['int8_dot_product'] or 'none'}")
    head = f"{'size':>4} {'variant':<14} {'drop pp':>8} " + " ".join(f"{f'x @{t}t':>8}" for t in threads)
    print(
        head
        + f" {'export x':>9} {'feat dB':>7} {'head2 pp':>8} {'shipped (x in search)':<34} first passing (x in search)"
    )
    for r in doc["rows"]:
        s = r["search"]

        def desc(b):
            if b is None:
                return "-"
            x = b["search_speedup"]
            return f"#{b['attempt']} {b['float_layers']} float, {b['top1_drop_pp']:.2f} pp, " + (
                f"{x:.2f}x" if x is not None else "untimed"
            )

        speeds = " ".join(f"{r['speedup_by_threads'][str(t)]:>7.2f}x" for t in threads)
        sqnr, head2 = r["features_sqnr_db"], r["second_head_drop_pp"]
        print(
            f"{r['img_size']:>4} {r['variant']:<14} {r['top1_drop_pp']:>8.2f} {speeds} "
            f"{r['export_speed']['speedup_vs_fp32']:>8.2f}x {'-' if sqnr is None else f'{sqnr:.1f}':>7} "
            f"{'-' if head2 is None else f'{head2:.2f}':>8} {desc(s['chosen']):<34} {desc(s['first_passing'])}"
        )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
