"""The four runtimes side by side: ONNX Runtime, OpenVINO, LiteRT (XNNPACK) and NCNN, fp32 and int8.

For MobileNetV2 fine-tuned on the scikit-learn digits (seed 0, 20% validation; ``edgetl finetune
--strategy fine-tune --unfreeze 3 --epochs 3``, what the README does) at each ``--img-size``:

1. ``edgetl export --model-format onnx,openvino,litert,ncnn --precision fp32,int8`` (every variant
   checked as usual: fp32 parity with PyTorch, int8 within --max-drop, quantization-aware
   fine-tuning when a format's post-training int8 misses the bar, as by default);
2. ``edgetl bench``'s timing of every variant (``--all``), batch 1, at 1 and 2 threads, all
   configurations interleaved in one process, ``--repeats`` times; the figure is the median p50
   over repeats, and each variant's speed-up over ONNX Runtime fp32 is the median of the per-repeat
   ratios (measured side by side).

The validation top-1 of each variant comes from the export's checks (manifest).

    .venv/bin/python benchmarks/pi_runtimes.py --img-size 96,224

Writes benchmarks/results/pi_runtimes.json (``--out``) and prints a Markdown table. These are x86
numbers: the ratios between runtimes on a Raspberry Pi differ (XNNPACK and NCNN are tuned for ARM
NEON, OpenVINO's int8 for x86 VNNI/AMX): measure on the Pi with ``edgetl bench BUNDLE --all``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "pi_runtimes.json"
FORMATS = "onnx,openvino,litert,ncnn"
log = logging.getLogger("pi_runtimes")


def edgetl(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "edgetl", *args, "--json"], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def make_run(work: Path, digits: Path, img_size: int) -> Path:
    run = work / f"run-{img_size}"
    if not (run / "config.json").is_file():  # kept from an earlier --keep run
        edgetl(
            "finetune",
            str(digits),
            "--out",
            str(run),
            "--img-size",
            str(img_size),
            "--strategy",
            "fine-tune",
            "--unfreeze",
            "3",
            "--epochs",
            "3",
            "--seed",
            "0",
            "--no-progress",
        )
    return run


def measure(bundle: Path, threads: list[int], iterations: int, repeats: int) -> dict[tuple[str, int], dict]:
    """Per (variant, threads): the p50 of each repeat and its ratio to ONNX Runtime fp32's p50."""
    from edgetl.device.bench import run_bench

    out: dict[tuple[str, int], dict] = {}
    for _ in range(repeats):
        report = run_bench(bundle, all_variants=True, threads=threads, iterations=iterations, cold_start_runs=False)
        if report.skipped:
            raise SystemExit(f"bench --all skipped variants: {report.skipped}")
        p50 = {(f"{r.runtime}-{r.precision}", r.threads): r.latency_ms["p50"] for r in report.results}
        for (variant, t), ms in p50.items():
            row = out.setdefault((variant, t), {"p50_ms": [], "vs_onnxruntime_fp32": []})
            row["p50_ms"].append(ms)
            row["vs_onnxruntime_fp32"].append(p50[("onnxruntime-fp32", t)] / ms)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", default="96,224", help="comma-separated input sizes (default 96,224)")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--iterations", type=int, default=200, help="timed calls per configuration per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep", type=Path, default=None, help="keep the data, runs and bundles in this folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    from edgetl.core import envinfo
    from edgetl.core.bundle import read_manifest
    from edgetl.core.formats import runtime_of

    sizes = [int(s) for s in args.img_size.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    doc: dict = {
        "benchmark": "pi_runtimes",
        "data": "scikit-learn digits (1,797 8x8 images, 10 classes), seed 0, 20% validation",
        "backbone": "mobilenet_v2",
        "formats": FORMATS.split(","),
        "threads": threads,
        "iterations": args.iterations,
        "repeats": args.repeats,
        "batch_size": 1,
        "machine": envinfo.environment(),
        "int8_dot_product": envinfo.int8_dot_product(),
        "caveat": "x86 ratios are not Raspberry Pi ratios; measure on the Pi with edgetl bench BUNDLE --all",
        "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="edgetl-pi-runtimes-") as tmp:
        work = Path(tmp) if args.keep is None else args.keep
        work.mkdir(parents=True, exist_ok=True)
        digits = work / "digits"
        if not digits.is_dir():
            edgetl("data", "digits", "--out", str(digits))
        for size in sizes:
            run = make_run(work, digits, size)
            bundle = work / f"bundle-{size}"
            t0 = time.perf_counter()
            if not (bundle / "manifest.json").is_file():
                edgetl(
                    "export",
                    str(run),
                    "--out",
                    str(bundle),
                    "--model-format",
                    FORMATS,
                    "--precision",
                    "fp32,int8",
                    "--no-progress",
                )
            export_s = time.perf_counter() - t0
            manifest = read_manifest(bundle)
            timings = measure(bundle, threads, args.iterations, args.repeats)
            for name, var in manifest["variants"].items():
                metrics = var.get("metrics") or {}
                row = {
                    "img_size": size,
                    "variant": name,
                    "val_top1": metrics.get("val_top1"),
                    "top1_drop_pp": metrics.get("top1_drop_pp"),
                    "max_abs_diff_vs_pytorch": metrics.get("max_abs_diff") if var["precision"] == "fp32" else None,
                    "model_mb": round(metrics["bytes"] / 1e6, 2) if metrics.get("bytes") else None,
                    "export_s_all_variants": round(export_s, 1),
                    "int8_source": ((var.get("quantization") or {}).get("source")),
                    "int8_attempts": len((var.get("quantization") or {}).get("attempts") or []) or None,
                }
                runtime = runtime_of(var["format"])
                for t in threads:
                    m = timings[(f"{runtime}-{var['precision']}", t)]
                    row[f"p50_ms_{t}t"] = round(statistics.median(m["p50_ms"]), 3)
                    row[f"vs_onnxruntime_fp32_{t}t"] = round(statistics.median(m["vs_onnxruntime_fp32"]), 3)
                doc["rows"].append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    cols = ["img_size", "variant", "val_top1", "top1_drop_pp", "model_mb"]
    cols += [f"{k}_{t}t" for t in threads for k in ("p50_ms", "vs_onnxruntime_fp32")]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in doc["rows"]:
        print("| " + " | ".join("" if row[c] is None else str(row[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
