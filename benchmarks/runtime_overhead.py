"""edgetl's runtime (preprocessed input -> logits, trunk and head as two sessions) vs a bare ONNX
Runtime session on one merged graph. docs/design.md's bar: edgetl <= 1.10x the bare session's latency.

Both arms run the same fp32 weights with the same session options (ORT_ENABLE_ALL, CPU provider,
the same intra-op threads) on the same preprocessed input, in one process, interleaved: rounds of
``--block`` calls of each arm, the order alternating, so that machine drift hits both alike. The
merged graph is built here from the bundle's own trunk and head files with ``onnx.compose`` (the
head's names prefixed), and checked to give the same logits.

    .venv/bin/python benchmarks/runtime_overhead.py                     # builds a MobileNetV2 bundle first
    .venv/bin/python benchmarks/runtime_overhead.py --bundle bundles/digits --threads 1,2 --json

Without ``--bundle`` the script makes one the way a user would (about a minute on 2 cores):
``edgetl data digits``, ``edgetl finetune --img-size 96``, ``edgetl export --precision fp32``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def build_bundle(work: Path, img_size: int) -> Path:
    """A real MobileNetV2 bundle through the CLI, as a user makes one (no shell)."""
    bundle = work / "bundle"
    if (bundle / "manifest.json").is_file():
        return bundle
    edgetl = [sys.executable, "-m", "edgetl"]
    for args in (
        ["data", "digits", str(work / "digits")],
        ["finetune", str(work / "digits"), "--out", str(work / "run"), "--img-size", str(img_size)],
        ["export", str(work / "run"), "--out", str(bundle), "--precision", "fp32"],
    ):
        print("$ edgetl " + " ".join(args), file=sys.stderr)
        subprocess.run(edgetl + args, check=True, stdout=subprocess.DEVNULL)
    return bundle


def merged_onnx(trunk_path: Path, head_path: Path, out_path: Path) -> Path:
    """trunk + head as one ONNX graph: image -> logits."""
    import onnx
    from onnx import compose

    trunk, head = onnx.load(str(trunk_path)), onnx.load(str(head_path))
    head = compose.add_prefix(head, "head/")
    head.ir_version = trunk.ir_version
    merged = compose.merge_models(trunk, head, io_map=[(trunk.graph.output[0].name, head.graph.input[0].name)])
    onnx.checker.check_model(merged)
    onnx.save(merged, str(out_path))
    return out_path


def interleaved(arms: dict, *, rounds: int, block: int, warmup: int) -> dict[str, list[float]]:
    """Per arm, the timed samples (ms); each block starts with one untimed call after the switch."""
    for fn in arms.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in arms}
    names = list(arms)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            fn = arms[name]
            fn()
            for _ in range(block):
                t0 = time.perf_counter_ns()
                fn()
                samples[name].append((time.perf_counter_ns() - t0) / 1e6)
    return samples


def measure(
    bundle: Path, merged: Path, *, threads: int, batch_size: int, repeats: int, rounds: int, block: int, warmup: int
) -> dict:
    import onnxruntime as ort

    from edgetl.device.bench import bench_input
    from edgetl.device.bundle_loading import open_bundle

    predictor = open_bundle(bundle).load(precision="fp32", threads=threads)
    x = bench_input(predictor, batch_size)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(merged), sess_options=options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    head = predictor.head_names[0]
    diff = float(np.abs(session.run(None, {name: x})[0] - predictor.logits(x)[head]).max())
    arms = {"edgetl": lambda: predictor.logits(x), "bare_merged": lambda: session.run(None, {name: x})}
    per_repeat = []
    for _ in range(repeats):
        s = interleaved(arms, rounds=rounds, block=block, warmup=warmup)
        per_repeat.append({k: float(np.median(v)) for k, v in s.items()})
    ratios = [r["edgetl"] / r["bare_merged"] for r in per_repeat]
    return {
        "threads": threads,
        "batch_size": batch_size,
        "max_abs_diff": diff,
        "edgetl_p50_ms": float(np.median([r["edgetl"] for r in per_repeat])),
        "bare_p50_ms": float(np.median([r["bare_merged"] for r in per_repeat])),
        "ratio_median": float(np.median(ratios)),
        "ratios": ratios,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="An exported bundle (default: build one in --work).")
    parser.add_argument("--work", type=Path, help="Folder for the built bundle and merged graph (default: temporary).")
    parser.add_argument("--img-size", type=int, default=96)
    parser.add_argument("--threads", default="1,2", help="Comma list of intra-op threads.")
    parser.add_argument("--batch-size", default="1", help="Comma list of batch sizes.")
    parser.add_argument(
        "--repeats", type=int, default=5, help="Independent interleaved measurements; the median ratio counts."
    )
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        bundle = args.bundle or build_bundle(work, args.img_size)
        manifest = json.loads((bundle / "manifest.json").read_text())
        variant = manifest["variants"]["onnx-fp32"]
        head_rel = variant["heads"][manifest.get("default_head") or next(iter(variant["heads"]))]
        merged = merged_onnx(bundle / variant["trunk"], bundle / head_rel, work / "merged.fp32.onnx")
        rows = [
            measure(
                bundle,
                merged,
                threads=int(t),
                batch_size=int(b),
                repeats=args.repeats,
                rounds=args.rounds,
                block=args.block,
                warmup=args.warmup,
            )
            for t in args.threads.split(",")
            for b in args.batch_size.split(",")
        ]
    from edgetl.core.envinfo import environment

    doc = {
        "bundle": str(bundle),
        "backbone": manifest["backbone"]["name"],
        "input_size": manifest["preprocessing"]["input_size"],
        "bar": 1.10,
        "rows": rows,
        "passed": all(r["ratio_median"] <= 1.10 for r in rows),
        "env": environment(),
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(
        f"{doc['backbone']} at {doc['input_size']} px, fp32, ONNX Runtime CPU; "
        f"{args.repeats} x {args.rounds} rounds of {args.block} calls per arm"
    )
    print(f"{'threads':>7} {'batch':>5} {'edgetl p50 ms':>14} {'bare p50 ms':>12} {'ratio':>6}  per repeat")
    for r in rows:
        print(
            f"{r['threads']:>7} {r['batch_size']:>5} {r['edgetl_p50_ms']:>14.3f} {r['bare_p50_ms']:>12.3f} "
            f"{r['ratio_median']:>6.3f}  " + " ".join(f"{x:.3f}" for x in r["ratios"])
        )
    print(f"bar: edgetl <= 1.10x the bare merged session: {'met' if doc['passed'] else 'NOT met'}")


if __name__ == "__main__":
    main()
