"""`edgetl serve` under load: throughput and latency at 1, 4 and 16 clients against `edgetl bench`.

Starts the real server (``python -m edgetl serve``, Uvicorn on a loopback port) on one bundle,
then drives it from this process with N client threads, each holding one keep-alive HTTP
connection and posting a real PNG (raw bytes) in a loop for ``--seconds``. Per concurrency it
records throughput (answers per second), the client-side round trip p50/p99, the server's own
split (decode, preprocess, queue, inference) and the status codes. Then it runs past saturation
(``--overload`` clients against ``--queue-size``) to measure the 503 rate: every request must get
an answer (200 or 503), none may hang. ``edgetl bench`` on the same bundle, threads and batch 1
gives the runtime's own latency; the bar is the service's p50 at one client <= 1.3x bench's p50
(the service adds decoding, preprocessing, HTTP and the queue hand-off). Beside it the document
gives the ratio against bench's p50 plus this image's own decoding and preprocessing
(``image_work_ms``, timed here on the server's CPUs): what the service adds beyond the work any
client of the model must do.

The server's peak RSS is its VmHWM (``/proc/PID/status``) after all runs, and after the
overload run.

Bundle: ``--bundle PATH``, or (default) a MobileNetV2 bundle made here from scikit-learn's digits
(feature extraction at ``--img-size``, exported to ONNX fp32), kept under ``--work``.

Client and server share the machine's cores (2 here): on a device the client is elsewhere, so
these figures are a floor. Timings are noisy: one run, medians and ratios side by side.

    .venv/bin/python benchmarks/serve_load.py --out benchmarks/results/serve_load.json   # ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EDGETL = [sys.executable, "-m", "edgetl"]


# --pin-client: the CPUs the server and bench run on (the client gets the rest); None: not pinned.
SERVER_CPUS: set[int] | None = None


def _pinned() -> None:
    if SERVER_CPUS is not None:
        os.sched_setaffinity(0, SERVER_CPUS)


def run_json(args: list[str]) -> dict:
    proc = subprocess.run(
        [*EDGETL, *args, "--json", "--no-progress"], capture_output=True, text=True, cwd=ROOT, preexec_fn=_pinned
    )
    if proc.returncode != 0:
        raise SystemExit(f"edgetl {' '.join(args)} failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout)


def make_bundle(work: Path, img_size: int) -> Path:
    """A real MobileNetV2 digits bundle (feature extraction, ONNX fp32), made once and reused."""
    bundle = work / f"bundle-{img_size}"
    if (bundle / "manifest.json").is_file():
        return bundle
    data, run = work / "digits", work / f"run-{img_size}"
    if not data.exists():
        run_json(["data", "digits", "--out", str(data)])
    if not (run / "config.json").is_file():
        run_json(["finetune", str(data), "--out", str(run), "--strategy", "feature-extraction",
                  "--img-size", str(img_size), "--seed", "0"])  # fmt: skip
    run_json(["export", str(run), "--out", str(bundle), "--model-format", "onnx", "--precision", "fp32"])
    return bundle


def sample_png(work: Path) -> bytes:
    """One digit image of the data set as PNG bytes (what a client would upload)."""
    images = sorted((work / "digits").rglob("*.png"))
    if images:
        return images[0].read_bytes()
    from PIL import Image

    buf = io.BytesIO()
    Image.linear_gradient("L").convert("RGB").resize((96, 96)).save(buf, format="PNG")
    return buf.getvalue()


def image_work_ms(bundle: Path, body: bytes, runs: int = 200) -> float:
    """Median ms to decode and preprocess ``body`` as the server does (edgetl.core.preprocess, on the
    server's CPUs): the part of one request that bench's p50 leaves out, for this very image."""
    from edgetl.core.bundle import read_manifest
    from edgetl.core.preprocess import Preprocessing, load_image, preprocess_batch

    pp = Preprocessing.from_dict(read_manifest(bundle)["preprocessing"])
    mine = os.sched_getaffinity(0)
    if SERVER_CPUS is not None:
        os.sched_setaffinity(0, SERVER_CPUS)
    try:
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            preprocess_batch([load_image(io.BytesIO(body), pp, gray_ok=True)], pp)
            times.append((time.perf_counter() - t0) * 1000)
    finally:
        os.sched_setaffinity(0, mine)
    return statistics.median(times[runs // 10 :])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, bundle: Path, threads: int, queue_size: int, max_batch: int, max_wait_ms: float) -> None:
        self.port = free_port()
        argv = [*EDGETL, "serve", str(bundle), "--port", str(self.port), "--threads", str(threads),
                "--queue-size", str(queue_size), "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms),
                "--max-connections", "256"]  # fmt: skip
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_pinned
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"edgetl serve exited: {self.proc.stderr.read().decode(errors='replace')[-2000:]}")
            try:
                status, _ = request(self.port, "GET", "/v1/health")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit("edgetl serve did not become ready in 120 s")

    def peak_rss_mb(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
        except OSError:
            return None
        return None

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def request(port: int, method: str, path: str, body: bytes | None = None, conn=None):
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/octet-stream"} if body else {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, data
    finally:
        if own:
            conn.close()


def load(port: int, clients: int, seconds: float, body: bytes) -> dict:
    """``clients`` threads post ``body`` for ``seconds``; every answer and its round trip recorded."""
    results: list[list[tuple[int, float, dict | None]]] = [[] for _ in range(clients)]
    errors: list[str] = []
    start_at = time.monotonic() + 0.5
    stop_at = start_at + seconds

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.monotonic() < start_at:
            time.sleep(0.001)
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            try:
                status, data = request(port, "POST", "/v1/predict?top_k=1", body, conn)
            except (OSError, http.client.HTTPException) as exc:  # a dropped connection: counted, reopened
                errors.append(type(exc).__name__)
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                continue
            ms = (time.perf_counter() - t0) * 1000
            split = json.loads(data).get("latency_ms") if status == 200 else None
            results[i].append((status, ms, split))
            if status == 503:
                time.sleep(0.01)  # a real client honours Retry-After; a short pause keeps the pressure on
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [r for rs in results for r in rs]
    ok = [ms for status, ms, _ in flat if status == 200]
    splits = [s for status, _, s in flat if status == 200 and s]
    codes: dict[str, int] = {}
    for status, _, _ in flat:
        codes[str(status)] = codes.get(str(status), 0) + 1
    row = {
        "clients": clients,
        "seconds": seconds,
        "answers": len(flat),
        "status": codes,
        "connection_errors": len(errors),
        "throughput_rps": round(len(ok) / seconds, 1),
        "rate_503": round(codes.get("503", 0) / len(flat), 3) if flat else None,
    }
    if ok:
        q = statistics.quantiles(ok, n=100) if len(ok) >= 2 else [ok[0]] * 99
        row["round_trip_ms"] = {"p50": round(statistics.median(ok), 2), "p99": round(q[98], 2)}
        row["server_ms_p50"] = {k: round(statistics.median(s[k] for s in splits), 2) for k in splits[0]}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=None, help="Bundle to serve (default: make a MobileNetV2 one).")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgetl-serve-load"), help="Where the made bundle lives.")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2, help="Inference threads (server and bench).")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--seconds", type=float, default=15.0, help="Per concurrency (and in all for the rounds).")
    ap.add_argument("--rounds", type=int, default=5, help="bench / one-client rounds, alternated.")
    ap.add_argument("--queue-size", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=1)
    ap.add_argument("--max-wait-ms", type=float, default=2.0)
    ap.add_argument("--overload", type=int, default=64, help="Clients for the saturation run (queue 4).")
    ap.add_argument(
        "--pin-client",
        type=int,
        default=None,
        metavar="CPU",
        help="Run the client threads on this CPU only and the server and bench on the others (a client "
        "on another machine, as near as one machine gets); default: everything shares every CPU.",
    )
    ap.add_argument(
        "--image",
        type=Path,
        default=None,
        help="The image every client posts (default: the first digit of the data set, an 8x8 grayscale PNG).",
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    global SERVER_CPUS
    if args.pin_client is not None:
        others = os.sched_getaffinity(0) - {args.pin_client}
        if args.pin_client not in os.sched_getaffinity(0) or not others:
            raise SystemExit(f"--pin-client {args.pin_client}: needs that CPU and at least one other")
        SERVER_CPUS = others
        os.sched_setaffinity(0, {args.pin_client})

    args.work.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle or make_bundle(args.work, args.img_size)
    body = args.image.read_bytes() if args.image else sample_png(args.work)

    def bench_once(iterations: int) -> dict:
        return run_json(["bench", str(bundle), "--threads", str(args.threads), "--batch-size", "1",
                         "--warmup", "10", "--iterations", str(iterations)])["results"][0]  # fmt: skip

    server = Server(bundle, args.threads, args.queue_size, args.max_batch, args.max_wait_ms)
    try:
        # One client against bench, side by side: rounds alternate (the server idles while bench runs).
        bench_p50s, one_p50s, bench_pre = [], [], []
        for _ in range(args.rounds):
            b = bench_once(200)
            bench_p50s.append(b["latency_ms"]["p50"])
            bench_pre.append(b["preprocess_ms"])
            one_p50s.append(load(server.port, 1, args.seconds / args.rounds, body)["round_trip_ms"]["p50"])
        bench_p50 = statistics.median(bench_p50s)
        paired = [round(o / b, 2) for o, b in zip(one_p50s, bench_p50s, strict=True)]
        print(f"bench p50 per round {bench_p50s}; one client p50 {one_p50s}; ratios {paired}", file=sys.stderr)
        rows = []
        for n in (int(c) for c in args.clients.split(",")):
            row = load(server.port, n, args.seconds, body)
            if "round_trip_ms" in row:
                row["p50_vs_bench"] = round(row["round_trip_ms"]["p50"] / bench_p50, 2)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
        peak = server.peak_rss_mb()
    finally:
        rc = server.stop()

    overload_server = Server(bundle, args.threads, 4, args.max_batch, args.max_wait_ms)
    try:
        over = load(overload_server.port, args.overload, args.seconds, body)
        over["queue_size"] = 4
        over["peak_rss_mb"] = overload_server.peak_rss_mb()
        print(json.dumps(over), file=sys.stderr)
    finally:
        over_rc = overload_server.stop()

    ratio = statistics.median(paired)
    image_ms = image_work_ms(bundle, body)
    doc = {
        "benchmark": "serve_load",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "bundle": str(bundle),
        "img_size": args.img_size,
        "image": {"path": str(args.image) if args.image else "first digit of the data set", "bytes": len(body)},
        "threads": args.threads,
        "pinning": None
        if SERVER_CPUS is None
        else {"client_cpu": args.pin_client, "server_and_bench_cpus": sorted(SERVER_CPUS)},
        "max_batch": args.max_batch,
        "queue_size": args.queue_size,
        "bench": {"p50_ms_per_round": bench_p50s, "p50_ms": bench_p50, "preprocess_ms": statistics.median(bench_pre)},
        "image_work_ms": round(image_ms, 3),
        "one_client_p50_ms_per_round": one_p50s,
        "one_client_vs_bench_per_round": paired,
        "rows": rows,
        "peak_rss_mb": peak,
        "overload": over,
        "exit_codes_on_sigterm": [rc, over_rc],
        "bar": {
            "p50_one_client_vs_bench": ratio,
            "p50_one_client_vs_bench_plus_preprocess": round(
                statistics.median(one_p50s) / (bench_p50 + statistics.median(bench_pre)), 2
            ),
            # bench times the model on a ready tensor; the service also decodes and preprocesses the
            # request's image: the ratio against bench's p50 plus that work, for this same image.
            "p50_one_client_vs_bench_plus_image_work": round(statistics.median(one_p50s) / (bench_p50 + image_ms), 2),
            "max": 1.3,
            "met": ratio <= 1.3,
            "every_overload_request_answered": over["connection_errors"] == 0,
        },
    }
    text = json.dumps(doc, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
