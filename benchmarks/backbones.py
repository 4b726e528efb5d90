"""MobileNetV2 against EfficientNet-Lite0 (or any backbones): top-1, int8 drop per runtime, latency.

For each ``--img-size`` and each ``--backbones`` entry, on the scikit-learn digits (seed 0, 20%
validation):

1. feature extraction (``edgetl finetune DATA --strategy feature-extraction --backbone B --img-size S
   --seed 0``): validation top-1 and ``train_seconds`` from its ``--json`` (features computed, not
   read from an earlier run's cache: the script gives edgetl its own ``EDGETL_CACHE``);
2. fine-tune, what the README does for MobileNetV2 (``--strategy fine-tune --unfreeze 3 --epochs 3``):
   validation top-1 and ``train_seconds``;
3. ``edgetl export`` of the fine-tuned run, ``--model-format onnx,openvino,litert --precision
   fp32,int8`` (every variant checked as usual: fp32 parity with PyTorch, int8 within --max-drop after
   the remedies, quantization-aware fine-tuning when post-training int8 misses the bar): each
   variant's validation top-1 and int8 drop in points (ONNX Runtime, OpenVINO, LiteRT). When the
   export fails for a format, the error text is recorded and the export is repeated without that
   format, which then goes into a second, fp32-only bundle, so its fp32 latency is still measured;
4. latency: ``edgetl bench --all`` timing (batch 1, at 1 and 2 threads) of every variant of every
   backbone's bundles, interleaved: repeat r runs backbone A's bundles, then B's, then the next
   repeat. The figure is the median p50 over repeats; each backbone's ratio to the first backbone
   (``efficientnet_lite0 / mobilenet_v2``) for the same runtime, precision and threads is the median
   of the per-repeat ratios.

    .venv/bin/python benchmarks/backbones.py --img-size 96,224
    .venv/bin/python benchmarks/backbones.py --img-size 96 --keep /tmp/bb-keep   # reuse runs, bundles

Reduced settings, for a slow machine, are recorded with each image size (``sizes``): ``--ft-epochs N``
(fewer fine-tune epochs; 0: no fine-tune, the feature-extraction run is exported instead),
``--export-args '--qat-epochs 0'`` (no quantization-aware fine-tuning), ``--iterations``, ``--repeats``.

Writes benchmarks/results/backbones.json (``--out``; rows of image sizes not measured in this
invocation are kept from the file already there) and prints Markdown tables. These are x86 numbers
from the machine in ``machine``: without int8 dot-product instructions (``int8_dot_product``) int8
speed is not representative of a device that has them (or of a Raspberry Pi's ARM cores).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "backbones.json"
FORMATS = "onnx,openvino,litert"
log = logging.getLogger("backbones")


def edgetl(work: Path, *args: str) -> tuple[dict, float]:
    """Run ``edgetl ARGS --json``; its document (an error document on failure) and wall seconds."""
    env = dict(os.environ, EDGETL_CACHE=str(work / "feature-cache"))
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "edgetl", *args, "--json"], capture_output=True, text=True, env=env, cwd=ROOT
    )
    wall = time.perf_counter() - t0
    try:
        doc = json.loads(out.stdout)
    except json.JSONDecodeError:
        doc = {"error": {"type": "NoJSON", "message": out.stderr.strip()[-2000:], "exit_code": out.returncode}}
    if out.returncode != 0 and "error" not in doc:
        doc["error"] = {"type": "ExitCode", "message": out.stderr.strip()[-2000:], "exit_code": out.returncode}
    return doc, wall


def cached(work: Path, name: str, *args: str) -> dict:
    """``edgetl ARGS`` once: its document and wall seconds are kept in WORK/NAME.json for --keep."""
    path = work / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    doc, wall = edgetl(work, *args)
    kept = {"doc": doc, "wall_s": round(wall, 1)}
    path.write_text(json.dumps(kept, indent=1) + "\n")
    return kept


def finetune(work: Path, digits: Path, backbone: str, size: int, tag: str, extra: list[str]) -> dict:
    name = f"{backbone}-{size}-{tag}"
    kept = cached(
        work,
        name,
        "finetune",
        str(digits),
        "--out",
        str(work / name),
        "--backbone",
        backbone,
        "--img-size",
        str(size),
        "--seed",
        "0",
        "--no-progress",
        *extra,
    )
    doc = kept["doc"]
    if "error" in doc:
        raise SystemExit(f"edgetl finetune {name} failed: {doc['error']['message']}")
    run = doc["results"][0]
    return {
        "run": str(work / name),
        "val_top1": run["val_top1"],
        "train_s": round(run["train_seconds"], 1),
        "best_epoch": run.get("best_epoch"),
        "epochs_run": run.get("epochs_run"),
        "feature_cache": (run.get("feature_cache") or {}).get("status"),
        "wall_s": kept["wall_s"],
    }


def failing_format(message: str, formats: list[str]) -> str | None:
    """The format of the variant an export error names (``variant litert-int8 loses ...``)."""
    m = re.search(r"variant (\S+)", message)
    if m:
        for fmt in formats:
            if m.group(1).startswith(fmt):
                return fmt
    return None


def export(work: Path, run: str, prefix: str, extra: list[str]) -> dict:
    """Export ``FORMATS`` fp32+int8; on a failed format, again without it, plus an fp32-only bundle of it."""
    formats = FORMATS.split(",")

    def export_to(name: str, fmts: list[str], precisions: str) -> dict:
        out = str(work / name)
        return cached(work, name, "export", run, "--out", out, "--model-format", ",".join(fmts), "--precision",
                      precisions, "--no-progress", *extra)  # fmt: skip

    attempts: list[dict] = []
    failed: list[str] = []
    variants: list[dict] = []
    seconds = 0.0
    k = 0
    while formats:
        name = f"{prefix}-bundle" + (f"-{k}" if k else "")
        kept = export_to(name, formats, "fp32,int8")
        seconds += kept["wall_s"]
        doc = kept["doc"]
        attempt = {"bundle": name, "formats": list(formats), "precisions": ["fp32", "int8"], "export_s": kept["wall_s"]}
        attempts.append(attempt)
        if "error" not in doc:
            variants = doc["results"]
            break
        attempt["error"] = doc["error"]["message"]
        fmt = failing_format(doc["error"]["message"], formats)
        log.warning("%s: export failed (%s): %s", name, fmt, doc["error"]["message"])
        if fmt is None:
            raise SystemExit(f"edgetl export {name} failed, and not for one format: {doc['error']['message']}")
        formats.remove(fmt)
        failed.append(fmt)
        k += 1
    bundles = [str(work / attempts[-1]["bundle"])] if variants else []
    if failed:  # their fp32, so that latency is still measured
        name = f"{prefix}-bundle-fp32"
        kept = export_to(name, failed, "fp32")
        seconds += kept["wall_s"]
        attempts.append({"bundle": name, "formats": failed, "precisions": ["fp32"], "export_s": kept["wall_s"]})
        if "error" in kept["doc"]:
            attempts[-1]["error"] = kept["doc"]["error"]["message"]
        else:
            variants += kept["doc"]["results"]
            bundles.append(str(work / name))
    from edgetl.core.bundle import read_manifest

    for path in bundles:  # how int8 got there: post-training (which attempt) or quantization-aware
        manifest_vars = read_manifest(path)["variants"]
        for var in variants:
            q = (manifest_vars.get(var["name"]) or {}).get("quantization") or {}
            if q and var["name"] in manifest_vars:
                var["int8_source"] = q.get("source")
                var["int8_attempts"] = len(q.get("attempts") or []) or None
    return {
        "variants": variants,
        "bundles": bundles,
        "attempts": attempts,
        "failed_int8": failed,
        "export_s": round(seconds, 1),
    }


def measure(bundles: dict[str, list[str]], threads: list[int], iterations: int, repeats: int) -> dict:
    """Per (backbone, runtime-precision, threads): the p50 of each repeat, all bundles interleaved."""
    from edgetl.device.bench import run_bench

    out: dict[tuple[str, str, int], list[float]] = {}
    for _ in range(repeats):
        for backbone, paths in bundles.items():
            for path in paths:
                report = run_bench(
                    path, all_variants=True, threads=threads, iterations=iterations, cold_start_runs=False
                )
                if report.skipped:
                    raise SystemExit(f"bench --all skipped variants of {path}: {report.skipped}")
                for r in report.results:
                    out.setdefault((backbone, f"{r.runtime}-{r.precision}", r.threads), []).append(r.latency_ms["p50"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--img-size", default="96,224", help="comma-separated input sizes (default 96,224)")
    parser.add_argument("--backbones", default="mobilenet_v2,efficientnet_lite0", help="the first is the reference")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--iterations", type=int, default=100, help="timed calls per configuration per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--ft-epochs",
        type=int,
        default=3,
        help="fine-tune epochs (3 as in the README; fewer is a reduced setting; 0: no fine-tune, export the "
        "feature-extraction run)",
    )
    parser.add_argument(
        "--export-args", default="", help="extra edgetl export options, e.g. '--qat-epochs 0' (recorded)"
    )
    parser.add_argument("--note", default=None, help="a note stored with this invocation's image sizes")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep", type=Path, default=None, help="keep the data, runs and bundles in this folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    from edgetl.core import envinfo
    from edgetl.core.formats import runtime_of

    sizes = [int(s) for s in args.img_size.split(",")]
    backbones = args.backbones.split(",")
    threads = [int(t) for t in args.threads.split(",")]
    export_extra = args.export_args.split()
    ref = backbones[0]
    settings = {
        "iterations": args.iterations,
        "repeats": args.repeats,
        "threads": threads,
        "ft_epochs": args.ft_epochs,
        "export_args": export_extra,
        "note": args.note,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": envinfo.environment(),
        "int8_dot_product": envinfo.int8_dot_product(),
    }
    doc: dict = {
        "benchmark": "backbones",
        "data": "scikit-learn digits (1,797 8x8 images, 10 classes), seed 0, 20% validation",
        "backbones": backbones,
        "reference": ref,
        "feature_extraction": "edgetl finetune DATA --backbone B --img-size S --seed 0",
        "fine_tune": "edgetl finetune DATA --backbone B --img-size S --seed 0 "
        "--strategy fine-tune --unfreeze 3 --epochs 3",
        "export": f"edgetl export FT_RUN --model-format {FORMATS} --precision fp32,int8",
        "formats": FORMATS.split(","),
        "batch_size": 1,
        "latency": "median over repeats of p50; ratio_vs_reference: median over repeats of per-repeat p50 ratios",
        "caveat": "x86 numbers; int8 speed is representative only with int8 dot-product instructions "
        "(int8_dot_product)",
        "sizes": {},
        "runs": [],
        "rows": [],
    }
    if args.out.is_file():  # keep the image sizes this invocation does not measure
        old = json.loads(args.out.read_text())
        if old.get("benchmark") == "backbones":
            doc["sizes"] = {k: v for k, v in old.get("sizes", {}).items() if int(k) not in sizes}
            doc["runs"] = [r for r in old.get("runs", []) if r["img_size"] not in sizes]
            doc["rows"] = [r for r in old.get("rows", []) if r["img_size"] not in sizes]

    with tempfile.TemporaryDirectory(prefix="edgetl-backbones-") as tmp:
        work = Path(tmp) if args.keep is None else args.keep
        work.mkdir(parents=True, exist_ok=True)
        digits = work / "digits"
        if not digits.is_dir():
            d, _ = edgetl(work, "data", "digits", "--out", str(digits))
            if "error" in d:
                raise SystemExit(f"edgetl data digits failed: {d['error']['message']}")
        for size in sizes:
            t_size = time.perf_counter()
            bundles: dict[str, list[str]] = {}
            exports: dict[str, dict] = {}
            for backbone in backbones:
                fe = finetune(work, digits, backbone, size, "fe", ["--strategy", "feature-extraction"])
                if args.ft_epochs > 0:
                    ft_tag = "ft" if args.ft_epochs == 3 else f"ft-e{args.ft_epochs}"
                    ft_args = ["--strategy", "fine-tune", "--unfreeze", "3", "--epochs", str(args.ft_epochs)]
                    ft = finetune(work, digits, backbone, size, ft_tag, ft_args)
                    exported = ft
                    prefix = f"{backbone}-{size}" + ("" if ft_tag == "ft" else f"-{ft_tag}")
                else:  # reduced setting: no fine-tune; the feature-extraction run is exported instead
                    ft = {"val_top1": None, "train_s": None, "best_epoch": None}
                    exported = fe
                    prefix = f"{backbone}-{size}-fe"
                if export_extra:  # bundles of other export options are kept apart
                    prefix += "-" + re.sub(r"[^a-z0-9]+", "", "".join(export_extra))
                ex = export(work, exported["run"], prefix, export_extra)
                exports[backbone] = ex
                bundles[backbone] = ex["bundles"]
                doc["runs"].append(
                    {
                        "img_size": size,
                        "backbone": backbone,
                        "fe_val_top1": fe["val_top1"],
                        "fe_train_s": fe["train_s"],
                        "fe_feature_cache": fe["feature_cache"],
                        "ft_val_top1": ft["val_top1"],
                        "ft_train_s": ft["train_s"],
                        "ft_epochs": args.ft_epochs,
                        "ft_best_epoch": ft["best_epoch"],
                        "exported_run": "fine-tune" if args.ft_epochs > 0 else "feature-extraction",
                        "export_s": ex["export_s"],
                        "export_attempts": ex["attempts"],
                        "int8_failed_formats": ex["failed_int8"],
                    }
                )
            t_bench = time.perf_counter()
            timings = measure(bundles, threads, args.iterations, args.repeats)
            bench_s = time.perf_counter() - t_bench
            for backbone in backbones:
                for var in exports[backbone]["variants"]:
                    runtime = var.get("runtime") or runtime_of(var["format"])
                    row = {
                        "img_size": size,
                        "backbone": backbone,
                        "variant": var["name"],
                        "runtime": runtime,
                        "precision": var["precision"],
                        "val_top1": var.get("val_top1"),
                        "top1_drop_pp": var.get("top1_drop_pp"),
                        "model_mb": round(var["bytes"] / 1e6, 2) if var.get("bytes") else None,
                        "int8_source": var.get("int8_source"),
                        "int8_attempts": var.get("int8_attempts"),
                        "int8_speedup_vs_fp32_at_export": var.get("speedup_vs_fp32"),
                    }
                    for t in threads:
                        mine = timings.get((backbone, f"{runtime}-{var['precision']}", t))
                        theirs = timings.get((ref, f"{runtime}-{var['precision']}", t))
                        row[f"p50_ms_{t}t"] = round(statistics.median(mine), 3) if mine else None
                        ratio = None
                        if mine and theirs and backbone != ref:
                            ratio = round(statistics.median(a / b for a, b in zip(mine, theirs, strict=True)), 3)
                        row[f"vs_{ref}_{t}t"] = ratio
                    doc["rows"].append(row)
            doc["sizes"][str(size)] = {
                **settings,
                "bench_s": round(bench_s, 1),
                "total_s": round(time.perf_counter() - t_size, 1),
            }
            doc["sizes"] = dict(sorted(doc["sizes"].items(), key=lambda kv: int(kv[0])))
            doc["runs"].sort(
                key=lambda r: (r["img_size"], backbones.index(r["backbone"]) if r["backbone"] in backbones else 99)
            )
            doc["rows"].sort(
                key=lambda r: (r["img_size"], backbones.index(r["backbone"]) if r["backbone"] in backbones else 99)
            )
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(doc, indent=2) + "\n")  # after each size: a partial result survives

    cols = [
        "img_size",
        "backbone",
        "fe_val_top1",
        "fe_train_s",
        "ft_val_top1",
        "ft_train_s",
        "export_s",
        "int8_failed_formats",
    ]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for run in doc["runs"]:
        print("| " + " | ".join("" if run[c] is None else str(run[c]) for c in cols) + " |")
    print()
    cols = ["img_size", "backbone", "variant", "val_top1", "top1_drop_pp", "model_mb"]
    cols += [f"{k}_{t}t" for t in threads for k in ("p50_ms", f"vs_{ref}")]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for row in doc["rows"]:
        print("| " + " | ".join("" if row.get(c) is None else str(row[c]) for c in cols) + " |")
    for run in doc["runs"]:
        for a in run["export_attempts"]:
            if a.get("error"):
                formats = ",".join(a["formats"])
                print(f"\n{run['backbone']} {run['img_size']} px, export {a['bundle']} ({formats}): {a['error']}")


if __name__ == "__main__":
    main()
