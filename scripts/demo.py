"""The offline demo: digits -> feature extraction and fine-tune -> export -> predict -> bench.

Runs the real ``edgetl`` commands (with --json) so that what it shows is what a user gets, then
prints one results table. Usage: ``python scripts/demo.py --out demo`` (``make demo``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path


def edgetl(*args: str) -> dict:
    cmd = [str(Path(sys.executable).with_name("edgetl")), *args, "--json"]
    print("$ " + " ".join(["edgetl", *args]), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        sys.exit(f"demo step failed: {' '.join(cmd)}")
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo")
    args = parser.parse_args()
    root = Path(args.out)
    if root.exists():
        shutil.rmtree(root)
    t0 = time.perf_counter()
    data = edgetl("data", "digits", "--out", str(root / "digits"))["results"][0]
    common = ["--img-size", "96", "--seed", "0", "--val-split", "0.2", "--no-progress"]
    fe = edgetl(
        "finetune",
        data["path"],
        "--out",
        str(root / "runs/feature-extraction"),
        "--strategy",
        "feature-extraction",
        *common,
    )
    fe = fe["results"][0]
    ft = edgetl(
        "finetune",
        data["path"],
        "--out",
        str(root / "runs/fine-tune"),
        "--strategy",
        "fine-tune",
        "--unfreeze",
        "3",
        *common,
    )["results"][0]
    exported = edgetl("export", ft["run_dir"], "--out", str(root / "bundles/digits"))
    sample = sorted((root / "digits" / "7").glob("*.png"))[0]
    pred = edgetl("predict", exported["bundle"], str(sample), "--top-k", "3")
    bench = edgetl("bench", exported["bundle"], "--iterations", "200")
    total = time.perf_counter() - t0

    from rich.console import Console
    from rich.table import Table

    console = Console(width=110)
    t = Table(title="edgetl demo: scikit-learn digits, MobileNetV2 (ImageNet), 96x96, seed 0, 20% validation")
    t.add_column("step")
    t.add_column("result")
    t.add_row("data", f"{data['images']} images, {len(data['classes'])} classes")
    t.add_row("feature extraction, searched head", f"val top-1 {fe['val_top1']:.4f} in {fe['train_seconds']:.0f}s")
    t.add_row(
        f"fine-tune, last 3 blocks, {ft['epochs']} epochs",
        f"val top-1 {ft['val_top1']:.4f} in {ft['train_seconds']:.0f}s",
    )
    for v in exported["results"]:
        diff = v.get("max_abs_diff")
        t.add_row(
            f"export {v['name']}",
            f"val top-1 {v['val_top1']:.4f}, agreement {v['top1_agreement']:.4f}"
            + (f", max |diff| {diff:.1e}" if diff is not None else "")
            + f", {v['bytes'] / 1e6:.2f} MB",
        )
    p = pred["results"][0]
    t.add_row("predict", f"{sample.parent.name}/{sample.name} -> {p['label']} ({p['score']:.3f})")
    for r in bench["results"]:
        lat = r["latency_ms"]
        t.add_row(
            f"bench {r['runtime']} {r['precision']} (batch {r['batch_size']})",
            f"p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms, {r['throughput_ips']:.0f} img/s",
        )
    t.add_row("total demo time", f"{total:.0f}s")
    console.print(t)


if __name__ == "__main__":
    main()
