"""Peak memory of `edgetl predict` on big images: bounded by the model, not by the files.

predict reduces each image to the model's resize size as soon as it is decoded, so a batch holds
small images plus at most one full-size decoded one. This script writes ``--images`` PNGs of
``--size`` x ``--size`` pixels (a smooth gradient: the files stay small, the decoded images do
not), runs `edgetl predict` on them in a fresh process at the default batch size and at
``--batch-size 1`` on a tiny bundle (tests/bundle_factory.py), and reads each child's peak RSS
(``os.wait4``). The bar: peak at the default batch <= 1.5x the peak at batch 1.

``--old`` also measures the previous behaviour (each image kept full size until the batch is
preprocessed: ``load_image(path)`` without the model's preprocessing), for a before/after.

    .venv/bin/python benchmarks/predict_memory.py --old     # ~1 minute on 2 cores, ~3.5 GB peak (old)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The previous behaviour, for --old: images decoded full size and held until the batch is preprocessed.
_OLD = (
    "import edgetl.device.images as m, edgetl.core.preprocess as p;"
    "m.load_image = lambda path, pp=None: p.load_image(path);"
    "from edgetl.cli import main; main()"
)


def make_images(folder: Path, count: int, size: int) -> int:
    """``count`` copies of one ``size`` x ``size`` RGB gradient PNG; returns the file size in bytes."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    ramp = Image.linear_gradient("L").resize((size, size), Image.Resampling.BILINEAR)
    img = Image.merge("RGB", (ramp, ramp.transpose(Image.Transpose.ROTATE_90), ramp.rotate(180)))
    first = folder / "img000.png"
    img.save(first, compress_level=6)
    for i in range(1, count):
        shutil.copyfile(first, folder / f"img{i:03d}.png")
    return first.stat().st_size


def peak_mb(argv: list[str]) -> tuple[float, float]:
    """Run ``argv``; its peak RSS in MB (ru_maxrss of this one child) and its wall time in seconds."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} ... failed ({proc.returncode}): {err.strip()[-500:]}")
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return usage.ru_maxrss * scale / 1e6, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--size", type=int, default=8000, help="Side of each square image, in pixels.")
    ap.add_argument("--old", action="store_true", help="Also measure the previous behaviour (before/after).")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/predict_memory.json"))
    args = ap.parse_args()

    from tests.bundle_factory import build_bundle

    with tempfile.TemporaryDirectory() as work:
        work_dir = Path(work)
        bundle = build_bundle(work_dir / "bundle", precisions=("fp32",))
        file_bytes = make_images(work_dir / "imgs", args.images, args.size)
        cmd = ["predict", str(bundle), str(work_dir / "imgs"), "--json"]
        arms = {"new": [sys.executable, "-m", "edgetl"]}
        if args.old:
            arms["old"] = [sys.executable, "-c", _OLD]
        result: dict = {
            "images": args.images,
            "pixels": f"{args.size}x{args.size}",
            "file_kb": round(file_bytes / 1e3, 1),
            "decoded_mb_each": round(args.size * args.size * 3 / 1e6, 1),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        }
        for name, prefix in arms.items():
            default_mb, default_s = peak_mb([*prefix, *cmd])  # default --batch-size (32): all images in one batch
            one_mb, one_s = peak_mb([*prefix, *cmd, "--batch-size", "1"])
            result[name] = {
                "peak_mb_default_batch": round(default_mb, 1),
                "peak_mb_batch_1": round(one_mb, 1),
                "ratio": round(default_mb / one_mb, 2),
                "seconds": [round(default_s, 1), round(one_s, 1)],
            }
    result["bar"] = "new ratio <= 1.5"
    result["passes"] = result["new"]["ratio"] <= 1.5
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
