"""ONNX Runtime int8 remedies that keep the int8 chain whole: top-1 drop and speed-up over fp32 of each.

For one run (``--run PATH``, e.g. a digits MobileNetV2 fine-tune, or ``--fitted-head SIZE``: the
ImageNet trunk with a linear head fitted on its features, the fixture of
``benchmarks/int8_speed_accuracy.py``), the trunk is quantized with each remedy of
:class:`edgetl.workstation.export.formats.onnx_quantize.OrtQuantizer` on its own (no search): ONNX
Runtime per-tensor and per-channel, NNCF's ONNX backend (fast and full bias correction, per-tensor
and per-channel weights), cross-layer equalization + ONNX Runtime per-tensor / per-channel, each
with int8 and uint8 activations. Each is scored like the export scores int8 (validation top-1 of
the int8 trunk with the fp32 head, drop against fp32 in pp), inspected in ONNX Runtime's optimized
graph (how many convolutions and adds run as QLinearConv / QLinearAdd, how many stay float), scored
again without ONNX Runtime's QDQ fusion (``reference``: the QDQ graph's own arithmetic, which a CPU
with int8 dot products or an ARM device computes; on an x86 CPU without VNNI the fused U8S8 kernels
saturate their 16-bit sums and can lose far more), and timed through the device runtime (batch 1,
1 and 2 threads, every model interleaved with fp32 as ``edgetl bench`` does, ``--repeats`` times;
the figure is the median of fp32 p50 / int8 p50).

    .venv/bin/python benchmarks/onnx_int8_remedies.py --run /tmp/exp/run96
    .venv/bin/python benchmarks/onnx_int8_remedies.py --fitted-head 96

Writes benchmarks/results/onnx_int8_remedies.json (``--out``) and prints a table. Timings on a
shared machine are noisy: read the ratios (each measured side by side), not absolute latencies.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "onnx_int8_remedies.json"


def remedies():
    from edgetl.workstation.export.formats.onnx_quantize import QuantConfig

    out = {}
    for act in ("int8", "uint8"):
        sfx = "" if act == "int8" else " u8"
        out[f"ort per-tensor{sfx}"] = QuantConfig("minmax", False, activation_type=act)
        out[f"ort per-channel{sfx}"] = QuantConfig("minmax", True, activation_type=act)
        for pc in (False, True):
            for bc in ("fast", "full"):
                gran = "per-channel" if pc else "per-tensor"
                out[f"nncf {gran} {bc} bc{sfx}"] = QuantConfig(
                    "mean-minmax", pc, quantizer="nncf", bias_correction=bc, activation_type=act
                )
        out[f"eq + ort per-tensor{sfx}"] = QuantConfig("minmax", False, equalize=True, activation_type=act)
        out[f"eq + ort per-channel{sfx}"] = QuantConfig("minmax", True, equalize=True, activation_type=act)
        out[f"eq + nncf per-channel fast bc{sfx}"] = QuantConfig(
            "mean-minmax", True, quantizer="nncf", bias_correction="fast", equalize=True, activation_type=act
        )
    return out


def optimized_ops(path: Path) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime runs (all optimizations, CPU): int8 kernels vs float ones."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        so.log_severity_level = 3
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    return {
        "int8_conv": ops["QLinearConv"],
        "float_conv": ops["Conv"] + ops["FusedConv"],
        "int8_add": ops["QLinearAdd"],
        "float_add": ops["Add"],
        "quantize_dequantize": ops["QuantizeLinear"] + ops["DequantizeLinear"],
        "transpose": ops["Transpose"],
    }


def run_search(trunk, x_calib, x_val, evaluate, fp32_top1, work: Path, max_drop: float) -> dict:
    """The export's ONNX int8 search as it is (default remedies, timed attempts): what it ships."""
    from edgetl.workstation.export import speed
    from edgetl.workstation.export.formats.onnx_quantize import OrtQuantizer
    from edgetl.workstation.export.int8 import search_int8

    quantizer = OrtQuantizer(trunk, x_calib, evaluate, workdir=work)
    t0 = time.perf_counter()
    timer = speed.attempt_timer(quantizer.runner, x_val[: speed.BATCH_SIZE])
    result = search_int8(quantizer, work / "int8.onnx", baseline_top1=fp32_top1, max_drop=max_drop, timer=timer)
    record = result.manifest_record([])
    return {
        "max_drop": max_drop,
        "seconds": round(time.perf_counter() - t0, 1),
        "chosen": result.chosen.config.describe(),
        "chosen_top1_drop_pp": round(result.chosen.top1_drop_pp, 3),
        "chosen_speed": result.chosen.speed.to_dict() if result.chosen.speed is not None else None,
        "attempts": [
            {"config": a.config.describe(), "top1_drop_pp": round(a.top1_drop_pp, 3), "seconds": round(a.seconds, 1)}
            for a in result.attempts
        ],
        "record": {k: v for k, v in record.items() if k not in ("attempts", "sensitivity")},
    }


def fitted_head_run(work: Path, size: int) -> Path:
    sys.path.insert(0, str(ROOT))
    from benchmarks.int8_speed_accuracy import make_run
    from edgetl.workstation.data import write_digits

    digits = Path(write_digits(work / "digits")["path"])
    return make_run("fitted-head", work, digits, size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=None, help="a finished run to quantize")
    parser.add_argument("--fitted-head", type=int, default=None, metavar="SIZE", help="make the fitted-head run")
    parser.add_argument("--calib-size", type=int, default=200)
    parser.add_argument("--only", default=None, help="comma-separated remedy names (default: all; none: '')")
    parser.add_argument("--search", action="store_true", help="also run the export's search (timed) and record it")
    parser.add_argument("--max-drop", type=float, default=1.0, help="the search's bar in pp (default 1.0)")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--iterations", type=int, default=200, help="timed calls per model per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if (args.run is None) == (args.fitted_head is None):
        parser.error("give one of --run and --fitted-head")

    import torch

    from edgetl.core import envinfo
    from edgetl.device.backends import backend
    from edgetl.device.bench import timing
    from edgetl.workstation.export.common import batches, load_arrays, ort_model
    from edgetl.workstation.export.formats.onnx import export_onnx
    from edgetl.workstation.export.formats.onnx_quantize import OrtQuantizer
    from edgetl.workstation.export.int8 import select_calibration
    from edgetl.workstation.run import load_run

    threads = [int(t) for t in args.threads.split(",")]
    with tempfile.TemporaryDirectory(prefix="edgetl-onnx-remedies-") as tmp:
        work = Path(tmp)
        run_path = args.run or fitted_head_run(work, args.fitted_head)
        run = load_run(run_path)
        model = run.build_model()
        s = run.preprocessing.input_size
        trunk, head = work / "trunk.onnx", work / "head.onnx"
        export_onnx(model.trunk, torch.zeros(2, 3, s, s), trunk, input_name="image", output_name="features")
        export_onnx(model.head, torch.zeros(2, run.spec.feature_dim), head, input_name="features", output_name="logits")
        x_val, y_val = load_arrays(run.val_samples, run.preprocessing)
        x_calib, _ = load_arrays(select_calibration(run.train_samples, args.calib_size), run.preprocessing)
        head_model = ort_model(head)

        def evaluate(path: Path) -> float:
            t = ort_model(path)
            pred = np.concatenate([head_model(t(b)).argmax(1) for b in batches(x_val)])
            return float((pred == y_val).mean())

        def reference(path: Path) -> float:
            """Top-1 with the QDQ graph computed as written (basic optimizations: no QLinear fusion)."""
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            pred = np.concatenate([head_model(session.run(None, {"image": b})[0]).argmax(1) for b in batches(x_val)])
            return float((pred == y_val).mean())

        fp32_top1 = evaluate(trunk)
        quantizer = OrtQuantizer(trunk, x_calib, evaluate, workdir=work / "q")
        rows = []
        chosen = remedies()
        if args.only is not None:
            chosen = {k: chosen[k] for k in args.only.split(",") if k}
        for name, config in chosen.items():
            t0 = time.perf_counter()
            done = quantizer.quantize(config, max_drop=1.0)
            if done is None:
                print(f"{name}: cannot run here", file=sys.stderr)
                continue
            path, floats = done
            top1, ref = evaluate(path), reference(path)
            rows.append(
                {
                    "remedy": name,
                    "config": config.to_dict(),
                    "val_top1": top1,
                    "top1_drop_pp": round((fp32_top1 - top1) * 100, 3),
                    "reference_top1_drop_pp": round((fp32_top1 - ref) * 100, 3),
                    "float_layers": len(floats),
                    "seconds": round(time.perf_counter() - t0, 1),
                    "ort_graph": optimized_ops(path),
                    "path": path,
                }
            )
            print(f"{name}: drop {rows[-1]['top1_drop_pp']:.2f} pp, {rows[-1]['ort_graph']}", file=sys.stderr)
        # Timing: every model and fp32 interleaved, per thread count and repeat.
        load = backend("onnxruntime").loader
        x = x_val[:1]
        ratios: dict[str, dict[int, list[float]]] = {r["remedy"]: {t: [] for t in threads} for r in rows}
        fp32_ms: dict[int, list[float]] = {t: [] for t in threads}
        for _ in range(args.repeats):
            for t in threads:
                runners = [load(trunk, threads=t)] + [load(r["path"], threads=t) for r in rows]
                fns = [lambda f=f: f(x) for f in runners]
                p50s, _ = timing.interleaved_p50(fns, warmup=20, iterations=args.iterations)
                fp32_ms[t].append(p50s[0])
                for r, q in zip(rows, p50s[1:], strict=True):
                    ratios[r["remedy"]][t].append(p50s[0] / q)
        for r in rows:
            r.pop("path")
            r["speedup_by_threads"] = {str(t): round(statistics.median(v), 3) for t, v in ratios[r["remedy"]].items()}
            r["speedup_repeats"] = {str(t): [round(v, 3) for v in vs] for t, vs in ratios[r["remedy"]].items()}
        eq = quantizer.equalization.get("fp32")
        search = None
        if args.search:
            search = run_search(trunk, x_calib, x_val, evaluate, fp32_top1, work / "search", args.max_drop)
        doc = {
            "benchmark": "onnx_int8_remedies",
            "run": str(run_path) if args.run else f"fitted-head digits MobileNetV2 at {args.fitted_head} px",
            "img_size": s,
            "n_val": len(y_val),
            "calibration_size": len(x_calib),
            "fp32_val_top1": fp32_top1,
            "fp32_p50_ms": {str(t): round(statistics.median(v), 3) for t, v in fp32_ms.items()},
            "threads": threads,
            "iterations": args.iterations,
            "repeats": args.repeats,
            "equalization": eq.to_dict() if eq is not None else None,
            "machine": envinfo.environment(),
            "int8_dot_product": envinfo.int8_dot_product(),
            "rows": rows,
            "search": search,
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"fp32 top-1 {fp32_top1:.4f} on {len(y_val)} images; machine {doc['machine'].get('cpu')}")
    speed_head = " ".join(f"{f'x @{t}t':>7}" for t in threads)
    print(f"{'remedy':<34} {'drop pp':>8} {'ref pp':>7} {speed_head}  int8/float conv, add")
    for r in rows:
        g = r["ort_graph"]
        speeds = " ".join(f"{r['speedup_by_threads'][str(t)]:>6.2f}x" for t in threads)
        print(
            f"{r['remedy']:<34} {r['top1_drop_pp']:>8.2f} {r['reference_top1_drop_pp']:>7.2f} {speeds}  "
            f"{g['int8_conv']}/{g['float_conv']}, {g['int8_add']}/{g['float_add']}"
        )
    if search is not None:
        print(
            f"search: shipped {search['chosen']} ({search['chosen_top1_drop_pp']:.2f} pp) after "
            f"{len(search['attempts'])} attempt(s) in {search['seconds']:.0f} s; "
            + (f"{search['chosen_speed']['speedup_vs_fp32']:.2f}x fp32" if search["chosen_speed"] else "untimed")
        )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
