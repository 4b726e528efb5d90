"""What `edgetl deploy` and bench-over-SSH cost, against a real OpenSSH server on loopback.

Loopback has no network to speak of, so these are edgetl's own costs on the two ends: packing and
checksumming, one ssh session of copy, verify-and-unpack on the "device", and for a remote bench
the extra ssh sessions and process starts (`edgetl --version`, `doctor`, `bench`). The remote
bench's p50 must equal the local one (the same process does the timing on the device): local and
remote runs alternate, and the ratio of medians is reported.

    .venv/bin/python benchmarks/deploy_overhead.py --bundle bundles/digits
    .venv/bin/python benchmarks/deploy_overhead.py --bundle bundles/digits --rounds 5 --json

Needs openssh-server (`make system-deps`). Results: benchmarks/results/deploy_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.sshd import ALIAS, LoopbackSSHD, require_sshd


def edgetl(*args: str) -> tuple[dict, float]:
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "edgetl", *args, "--json"], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if out.returncode != 0:
        sys.exit(out.stderr)
    doc = json.loads(out.stdout)
    if "schema" in doc:  # the JSON envelope: deploy and a one-configuration bench hold one record
        doc = doc["results"][0]
    return doc, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    require_sshd()
    with tempfile.TemporaryDirectory() as tmp:
        server = LoopbackSSHD(Path(tmp) / "sshd").start()
        try:
            ssh = ["--ssh-config", str(server.config), "--remote-edgetl", f"{sys.executable} -m edgetl"]
            dest = f"{ALIAS}:{Path(tmp) / 'device' / 'bundle'}"
            deploys = [edgetl("deploy", a.bundle, dest, *ssh)[0] for _ in range(a.rounds)]
            bench = [
                "--precision",
                "fp32",
                "--threads",
                "1",
                "--warmup",
                "10",
                "--iterations",
                str(a.iterations),
                "--no-cold-start",
            ]
            local, remote = [], []
            for _ in range(a.rounds):
                local.append(edgetl("bench", str(Path(tmp) / "device" / "bundle"), *bench))
                remote.append(edgetl("bench", dest, *bench, *ssh))
        finally:
            server.stop()
    med = statistics.median
    doc = {
        "bundle": a.bundle,
        "archive_mb": round(deploys[0]["archive_bytes"] / 1e6, 2),
        "rounds": a.rounds,
        "deploy_seconds": [d["seconds"] for d in deploys],
        "copy_seconds": [d["copy_seconds"] for d in deploys],
        "copy_mb_per_s": [d["copy_mb_per_s"] for d in deploys],
        "unpack_seconds": [d["unpack_seconds"] for d in deploys],
        "bench_p50_ms_local": [r["latency_ms"]["p50"] for r, _ in local],
        "bench_p50_ms_remote": [r["latency_ms"]["p50"] for r, _ in remote],
        "bench_wall_s_local": [round(w, 2) for _, w in local],
        "bench_wall_s_remote": [round(w, 2) for _, w in remote],
    }
    doc["remote_over_local_p50"] = round(med(doc["bench_p50_ms_remote"]) / med(doc["bench_p50_ms_local"]), 3)
    doc["remote_extra_wall_s"] = round(med(doc["bench_wall_s_remote"]) - med(doc["bench_wall_s_local"]), 2)
    doc["env"] = local[0][0]["env"]
    if a.json:
        print(json.dumps(doc, indent=2))
        return
    print(
        f"deploy of {doc['archive_mb']} MB: median {med(doc['deploy_seconds']):.2f} s (copy "
        f"{med(doc['copy_seconds']):.2f} s at {med(doc['copy_mb_per_s']):.1f} MB/s, verify + unpack "
        f"{med(doc['unpack_seconds']):.2f} s)"
    )
    print(
        f"bench p50 remote / local: {doc['remote_over_local_p50']:.3f}; remote adds "
        f"{doc['remote_extra_wall_s']:.2f} s of wall time (ssh sessions, version, doctor)"
    )


if __name__ == "__main__":
    main()
