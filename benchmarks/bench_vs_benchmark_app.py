"""`edgetl bench` vs OpenVINO's `benchmark_app` on the same IR, threads, streams and batch size.
docs/design.md's bar: median latencies within 10%.

The IR is the bundle's OpenVINO merged graph (trunk + head in one IR, ``export --model-format openvino
--merged``), so both tools run exactly one compiled model: ``edgetl bench --runtime openvino
--merged`` loads it through edgetl's runtime from the bundle, ``benchmark_app -m`` reads the same
``.xml``. A bundle without OpenVINO files gets them here: the script copies it and converts the
ONNX trunk, head and their merge (``onnx.compose``) with ``openvino.convert_model`` (fp32 weights),
adding an ``openvino-fp32`` variant to the copy's manifest.

Settings, identical on both sides: CPU device, ``-nthreads``/``--threads`` N, ``-nstreams``/``--streams``
1, no performance hint (benchmark_app ``-hint none``; edgetl sets only threads and streams), fp32
inference precision (``-infer_precision f32``; edgetl pins the variant's), f32 input (``-ip f32``:
by default benchmark_app feeds a 3-channel input as u8 through an added conversion, ~8% faster
here, which is not what the IR or edgetl runs), synchronous calls (``-api sync``), the same number
of timed iterations, the dynamic-batch model fed batch B (``-data_shape``), fixed input data
(``-inference_only true``), and with fewer threads than cores both processes restricted to the same
CPUs. Both run as fresh processes, alternating tool order each round. The
bar compares medians: the median over rounds of edgetl's p50 against the median over rounds of
benchmark_app's median (``ratio``); the median of the per-round ratios is reported beside it.

    .venv/bin/python benchmarks/bench_vs_benchmark_app.py                 # builds a MobileNetV2 bundle first
    .venv/bin/python benchmarks/bench_vs_benchmark_app.py --bundle bundles/digits --threads 1,2 --json

What differs, by construction: benchmark_app reports OpenVINO's own per-request latency (inside
``infer``), edgetl times the Python call around it (input check, infer, output copy): edgetl's
number includes tens of microseconds more, which is what an application sees.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime_overhead import build_bundle, merged_onnx


def ensure_openvino_merged(bundle: Path, work: Path) -> Path:
    """The bundle if it has openvino-fp32 with a merged graph, else a copy with them added."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    ov = manifest["variants"].get("openvino-fp32")
    if ov and ov.get("merged"):
        return bundle
    import openvino as ov_lib

    from edgetl.core.atomic import write_json_atomic
    from edgetl.core.bundle import file_record

    copy = work / "bundle-openvino"
    if copy.exists():
        shutil.rmtree(copy)
    shutil.copytree(bundle, copy)
    onnx_var = manifest["variants"]["onnx-fp32"]
    head = manifest.get("default_head") or next(iter(onnx_var["heads"]))
    merged_src = merged_onnx(copy / onnx_var["trunk"], copy / onnx_var["heads"][head], work / "merged.fp32.onnx")
    files = manifest["files"]

    def convert(src: Path, rel: str, role: str, head_name: str | None, io_from: tuple[str, str]) -> str:
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        ov_lib.save_model(ov_lib.convert_model(str(src)), str(copy / rel), compress_to_fp16=False)
        files[rel] = file_record(
            copy,
            rel,
            fmt="openvino",
            precision="fp32",
            role=role,
            head=head_name,
            inputs=files[io_from[0]]["inputs"],
            outputs=files[io_from[1]]["outputs"],
            derived_from=str(src.name),
            extra_files=(rel[:-4] + ".bin",),
        )
        return rel

    trunk_rel, head_rel = onnx_var["trunk"], onnx_var["heads"][head]
    manifest["variants"]["openvino-fp32"] = {
        "format": "openvino",
        "precision": "fp32",
        "inference_precision": "f32",
        "trunk": convert(copy / trunk_rel, "openvino/trunk.fp32.xml", "trunk", None, (trunk_rel, trunk_rel)),
        "heads": {head: convert(copy / head_rel, f"openvino/head.{head}.xml", "head", head, (head_rel, head_rel))},
        "merged": {
            head: convert(merged_src, f"openvino/merged.{head}.fp32.xml", "merged", head, (trunk_rel, head_rel))
        },
    }
    write_json_atomic(copy / "manifest.json", manifest)
    return copy


def same_cpus(threads: int):
    """Both tools' processes on the same ``threads`` CPUs (Linux): OpenVINO pins its threads to
    cores it picks per process, and on a shared machine one process landing on the busy core and
    the next on the idle one is noise that has nothing to do with the tool."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if threads >= len(cpus):
        return None
    chosen = set(cpus[-threads:])
    return lambda: os.sched_setaffinity(0, chosen)


def run_benchmark_app(xml: Path, *, threads: int, streams: int, batch: int, size: int, iterations: int) -> float:
    # The console script the openvino wheel installs; its module has no __main__ guard for `-m`.
    script = Path(sys.executable).with_name("benchmark_app")
    tool = (
        [str(script)]
        if script.exists()
        else [
            sys.executable,
            "-c",
            "import sys; from openvino.tools.benchmark.main import main; sys.argv[0] = 'benchmark_app'; main()",
        ]
    )
    cmd = [
        *tool,
        "-m",
        str(xml),
        "-d",
        "CPU",
        "-hint",
        "none",
        "-nthreads",
        str(threads),
        "-nstreams",
        str(streams),
        "-api",
        "sync",
        "-niter",
        str(iterations),
        "-data_shape",
        f"[{batch},3,{size},{size}]",
        "-infer_precision",
        "f32",
        "-inference_only",
        "true",
        # benchmark_app treats a 3-channel 4-D input as an image and feeds u8 through an added
        # convert unless told otherwise; edgetl feeds the IR's own f32 input.
        "-ip",
        "f32",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, preexec_fn=same_cpus(threads))
    if proc.returncode != 0:
        raise SystemExit(f"benchmark_app failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    # "[ INFO ]    Median:        2.41 ms" in the Latency section (the first Median line).
    match = re.search(r"Median:\s+([0-9.]+)\s*ms", proc.stdout + proc.stderr)
    if not match:
        raise SystemExit(f"no median latency in benchmark_app output:\n{proc.stdout[-2000:]}")
    return float(match.group(1))


def run_edgetl(bundle: Path, *, threads: int, streams: int, batch: int, iterations: int, merged: bool) -> float:
    cmd = [
        sys.executable,
        "-m",
        "edgetl",
        "bench",
        str(bundle),
        "--runtime",
        "openvino",
        "--precision",
        "fp32",
        "--ov-device",
        "CPU",
        "--threads",
        str(threads),
        "--streams",
        str(streams),
        "--batch-size",
        str(batch),
        "--iterations",
        str(iterations),
        "--warmup",
        "10",
        "--no-cold-start",
        "--json",
    ]
    if merged:
        cmd.append("--merged")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, preexec_fn=same_cpus(threads))
    if proc.returncode != 0:
        raise SystemExit(f"edgetl bench failed:\n{proc.stderr[-2000:]}")
    return float(json.loads(proc.stdout)["latency_ms"]["p50"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, help="An exported bundle (default: build one in --work).")
    parser.add_argument("--work", type=Path, help="Folder for built files (default: temporary).")
    parser.add_argument("--img-size", type=int, default=96)
    parser.add_argument("--threads", default="1,2", help="Comma list.")
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=200, help="Timed iterations per run, both tools.")
    parser.add_argument("--rounds", type=int, default=9, help="Alternating runs of each tool.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        bundle = ensure_openvino_merged(args.bundle or build_bundle(work, args.img_size), work)
        manifest = json.loads((bundle / "manifest.json").read_text())
        variant = manifest["variants"]["openvino-fp32"]
        head = manifest.get("default_head") or next(iter(variant["merged"]))
        xml = bundle / variant["merged"][head]
        size = manifest["preprocessing"]["input_size"]
        rows = []
        for t in (int(x) for x in args.threads.split(",")):
            rounds = []
            for r in range(args.rounds):
                settings = {
                    "threads": t,
                    "streams": args.streams,
                    "batch": args.batch_size,
                    "iterations": args.iterations,
                }
                order = ("benchmark_app", "edgetl") if r % 2 == 0 else ("edgetl", "benchmark_app")
                got = {}
                for tool in order:
                    if tool == "benchmark_app":
                        got[tool] = run_benchmark_app(xml, size=size, **settings)
                    else:
                        got[tool] = run_edgetl(bundle, merged=True, **settings)
                got["edgetl_trunk_plus_head"] = run_edgetl(bundle, merged=False, **settings)
                got["ratio"] = got["edgetl"] / got["benchmark_app"]
                rounds.append(got)
                print(
                    f"threads {t} round {r + 1}: benchmark_app {got['benchmark_app']:.3f} ms, edgetl "
                    f"{got['edgetl']:.3f} ms (ratio {got['ratio']:.3f}); edgetl trunk+head "
                    f"{got['edgetl_trunk_plus_head']:.3f} ms",
                    file=sys.stderr,
                )
            app = float(np.median([g["benchmark_app"] for g in rounds]))
            ours = float(np.median([g["edgetl"] for g in rounds]))
            ratio = ours / app
            rows.append(
                {
                    "threads": t,
                    "streams": args.streams,
                    "batch_size": args.batch_size,
                    "benchmark_app_median_ms": app,
                    "edgetl_p50_ms": ours,
                    "edgetl_trunk_plus_head_p50_ms": float(np.median([g["edgetl_trunk_plus_head"] for g in rounds])),
                    "ratio": ratio,
                    "ratio_per_round_median": float(np.median([g["ratio"] for g in rounds])),
                    "rounds": rounds,
                    "within_10pct": abs(ratio - 1.0) <= 0.10,
                }
            )
    import openvino as ov_lib

    from edgetl.core.envinfo import environment

    doc = {
        "ir": str(xml.relative_to(bundle)),
        "input_size": size,
        "openvino": ov_lib.__version__,
        "iterations": args.iterations,
        "rows": rows,
        "passed": all(r["within_10pct"] for r in rows),
        "env": environment(),
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(
        f"same IR ({doc['ir']}), CPU, streams {args.streams}, batch {args.batch_size}, {args.iterations} "
        f"iterations per run, {args.rounds} rounds, OpenVINO {doc['openvino']}"
    )
    print(
        f"{'threads':>7} {'benchmark_app ms':>17} {'edgetl ms':>10} {'ratio':>6} {'per-round':>10} "
        f"{'edgetl trunk+head ms':>21}"
    )
    for r in rows:
        print(
            f"{r['threads']:>7} {r['benchmark_app_median_ms']:>17.3f} {r['edgetl_p50_ms']:>10.3f} "
            f"{r['ratio']:>6.3f} {r['ratio_per_round_median']:>10.3f} {r['edgetl_trunk_plus_head_p50_ms']:>21.3f}"
        )
    print(f"bar: medians within 10%: {'met' if doc['passed'] else 'NOT met'}")


if __name__ == "__main__":
    main()
