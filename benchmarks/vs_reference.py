"""edgetl's defaults against the hand-written baseline (benchmarks/reference_script.py), on every
offline data set this machine can write (benchmarks/datasets.py), same splits, one run each.

Arms, each a fresh process timed from start to exit (interpreter start and imports included for
all of them), edgetl on a cold feature cache (its own empty EDGETL_CACHE):

* ``script probe``      reference_script.py --mode probe
* ``edgetl default``    edgetl finetune TRAIN --val-dir VAL --out RUN --img-size S  (nothing else)
* ``script fine-tune``  reference_script.py --mode finetune
* ``edgetl fine-tune``  edgetl finetune ... --strategy fine-tune

The arms of one set run back to back in this order, so machine noise hits them alike; S is the
script's input size (--size, default 96) for every arm.

    .venv/bin/python benchmarks/vs_reference.py [--sets patches,faces] [--size 96] [--data /tmp/sets]

Writes benchmarks/results/vs_reference.json (``--out``) and prints a table (``--json``: the document).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import datasets  # noqa: E402  (benchmarks/datasets.py)

RESULTS = HERE / "results" / "vs_reference.json"
PY = sys.executable
EDGETL = [PY, "-m", "edgetl"]


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return seconds, proc.stdout


def script_arm(mode: str, train: Path, val: Path, size: int, env) -> dict:
    seconds, out = _timed(
        [PY, str(HERE / "reference_script.py"), str(train), str(val), "--mode", mode, "--size", str(size)], env
    )
    doc = json.loads(out.strip().splitlines()[-1])
    return {"val_top1": doc["val_top1"], "seconds": round(seconds, 2)}


def edgetl_arm(extra: list[str], train: Path, val: Path, size: int, env, work: Path, name: str) -> dict:
    run = work / name
    cmd = [
        *EDGETL,
        "finetune",
        str(train),
        "--val-dir",
        str(val),
        "--out",
        str(run),
        "--img-size",
        str(size),
        "--json",
        "--no-progress",
        *extra,
    ]
    seconds, out = _timed(cmd, env)
    rec = json.loads(out)["results"][0]
    return {
        "val_top1": round(rec["val_top1"], 4),
        "seconds": round(seconds, 2),
        "strategy": rec["strategy"],
        "crop": (rec.get("crop") or {}).get("chosen"),
        "head": (rec.get("head_search") or {}).get("chosen"),
        "why": (rec.get("strategy_choice") or {}).get("why"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default=",".join(datasets.available()))
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--data", default=None, help="a folder of sets written by datasets.py (else a temporary one)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="vs-ref-") as tmp:
        work = Path(tmp)
        data = Path(args.data) if args.data else work / "sets"
        for name in args.sets.split(","):
            root = data / name
            if not root.exists():
                datasets.write_set(name, root)
            train, val = root / "train", root / "val"
            env = {**os.environ, "EDGETL_CACHE": str(work / f"cache-{name}")}
            arms = {
                "script probe": script_arm("probe", train, val, args.size, env),
                "edgetl default": edgetl_arm([], train, val, args.size, env, work, f"{name}-default"),
                "script fine-tune": script_arm("finetune", train, val, args.size, env),
                "edgetl fine-tune": edgetl_arm(
                    ["--strategy", "fine-tune"], train, val, args.size, env, work, f"{name}-ft"
                ),
            }
            n_train = sum(1 for _ in train.rglob("*.png"))
            n_val = sum(1 for _ in val.rglob("*.png"))
            row = {"set": name, "train_images": n_train, "val_images": n_val, "arms": arms}
            row["default_minus_probe_pp"] = round(
                100 * (arms["edgetl default"]["val_top1"] - arms["script probe"]["val_top1"]), 2
            )
            row["default_time_ratio"] = round(arms["edgetl default"]["seconds"] / arms["script probe"]["seconds"], 2)
            row["finetune_minus_script_pp"] = round(
                100 * (arms["edgetl fine-tune"]["val_top1"] - arms["script fine-tune"]["val_top1"]), 2
            )
            row["finetune_time_ratio"] = round(
                arms["edgetl fine-tune"]["seconds"] / arms["script fine-tune"]["seconds"], 2
            )
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    doc = {
        "benchmark": "vs_reference",
        "size": args.size,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(f"{'set':10} {'arm':17} {'top-1':>7} {'seconds':>8}  notes")
    for row in rows:
        for arm, r in row["arms"].items():
            notes = " ".join(f"{k}={r[k]}" for k in ("strategy", "crop") if r.get(k))
            print(f"{row['set']:10} {arm:17} {r['val_top1']:7.4f} {r['seconds']:8.1f}  {notes}")
        print(
            f"{'':10} default - probe {row['default_minus_probe_pp']:+.2f} pp, {row['default_time_ratio']:.2f}x time; "
            f"fine-tune - script {row['finetune_minus_script_pp']:+.2f} pp at {row['finetune_time_ratio']:.2f}x time"
        )


if __name__ == "__main__":
    main()
