"""`edgetl serve` with real components: the real Uvicorn server in a subprocess on a loopback port,
real ONNX bundles (tests/bundle_factory.py), concurrent clients over HTTP (httpx), real signals.

A "slow" bundle has a trunk that also multiplies two 1024x1024 matrices (its result times zero is
added to the features, so predictions do not change): ~35 ms per inference call on one thread,
whatever the batch size, which lets a test hold the worker busy for a known while.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.core.atomic import replace_directory
from edgetl.device.runtime import open_bundle
from tests.bundle_factory import add_colour_stats, build_bundle, trunk_weight, write_colour_images
from tests.schemas import validate_document

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

REPO = Path(__file__).resolve().parents[1]
STARTUP_S = 60.0
TOKEN = "0123456789abcdef0123456789abcdef"
PAGE = REPO / "edgetl" / "device" / "serve" / "static" / "index.html"


# Bundles and images ------------------------------------------------------------------------------


def _slow_trunk(path: Path, *, size: int = 1024, matmuls: int = 1) -> None:
    """The factory's trunk plus ``matmuls`` (size x size) products whose sum, times zero, is added
    to the features (Expand of the image's mean: nothing a graph optimizer can fold away)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from tests.bundle_factory import FEATURE_DIM, INPUT_SIZE

    nodes = [
        helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["feat0"]),
        helper.make_node("ReduceMean", ["image"], ["m"], keepdims=0),
        helper.make_node("Expand", ["m", "shape"], ["big0"]),
    ]
    for i in range(matmuls):
        nodes.append(helper.make_node("MatMul", [f"big{i}", "B"], [f"big{i + 1}"]))
    nodes += [
        helper.make_node("ReduceSum", [f"big{matmuls}"], ["s"], keepdims=0),
        helper.make_node("Mul", ["s", "zero"], ["z"]),
        helper.make_node("Add", ["feat0", "z"], ["features"]),
    ]
    graph = helper.make_graph(
        nodes,
        "trunk",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, INPUT_SIZE, INPUT_SIZE])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", FEATURE_DIM])],
        initializer=[
            numpy_helper.from_array(trunk_weight(FEATURE_DIM), "W"),
            numpy_helper.from_array(np.array([size, size], dtype=np.int64), "shape"),
            numpy_helper.from_array(np.full((size, size), 1e-3, dtype=np.float32), "B"),
            numpy_helper.from_array(np.zeros((), dtype=np.float32), "zero"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def slow_bundle(root: Path, *, matmuls: int = 1) -> Path:
    """A colour bundle (fp32 only) whose trunk takes ~35 ms x ``matmuls`` per call."""
    from edgetl.core.bundle import read_manifest, write_manifest

    build_bundle(root, precisions=("fp32",))
    rel = "onnx/trunk.fp32.onnx"
    _slow_trunk(root / rel, matmuls=matmuls)
    manifest = read_manifest(root)
    data = (root / rel).read_bytes()
    manifest["files"][rel].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    write_manifest(root, manifest)
    return root


def version_of(bundle: Path) -> str:
    return hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()[:12]


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims ``width`` x ``height`` (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    images = write_colour_images(root / "images")
    out = {Path(p).stem: Path(p) for p in images}
    out["bundle"] = build_bundle(root / "bundle", heads=("colour", "brightness"))
    out["slow"] = slow_bundle(root / "slow")
    out["root"] = root
    return out


# The server --------------------------------------------------------------------------------------


class Server:
    """``python -m edgetl serve BUNDLE --port 0 ...`` in a subprocess; ``url`` once it printed its
    ready line (the port it got). Stops with SIGTERM and says the exit code."""

    def __init__(self, bundle: Path, *args: str, token: str | None = None) -> None:
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
        self.out = tempfile.NamedTemporaryFile("w+", suffix=".out", delete=False)  # noqa: SIM115
        argv = [sys.executable, "-m", "edgetl", "serve", str(bundle), "--port", "0", "--format", "table", *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
        self.proc = subprocess.Popen(argv, stdout=self.out, stderr=self.log, cwd=REPO, env=env)
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = self._wait_ready()

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            text = Path(self.out.name).read_text()
            if text.startswith("serving ") and text.endswith("\n"):
                return text.split()[-1]
            if self.proc.poll() is not None:
                raise AssertionError(f"edgetl serve exited {self.proc.returncode}: {self.stderr()}")
            time.sleep(0.05)
        self.proc.kill()
        raise AssertionError(f"edgetl serve did not start in {STARTUP_S} s: {self.stderr()}")

    def stderr(self) -> str:
        return Path(self.log.name).read_text()

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=30, **kwargs)

    def get(self, path: str, **kwargs) -> httpx.Response:
        with self.client() as c:
            return c.get(path, **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        with self.client() as c:
            return c.post(path, **kwargs)

    def metric(self, line_start: str) -> float:
        for line in self.get("/metrics").text.splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"edgetl serve did not stop within {timeout} s of SIGTERM: {self.stderr()}") from None
        finally:
            for f in (self.log, self.out):
                f.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.stop()


@pytest.fixture(scope="module")
def server(files):
    """The shared server: two heads, micro-batching, a 50 kB body limit."""
    s = Server(files["bundle"], "--max-batch", "4", "--max-wait-ms", "5", "--max-body-mb", "0.05")
    yield s
    assert s.stop() == 0, s.stderr()
    assert "Traceback" not in s.stderr(), s.stderr()


def _without_image(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "image"} for r in records]


# Predictions -------------------------------------------------------------------------------------


def test_predict_raw_and_multipart_give_predicts_records(server, files):
    raw = server.post("/v1/predict", content=files["red"].read_bytes(), headers={"Content-Type": "image/png"})
    assert raw.status_code == 200, raw.text
    body = raw.json()
    assert [r["label"] for r in body["records"]] == ["red"]
    assert body["records"][0]["image"] == "upload"
    assert body["model"] == {"version": version_of(files["bundle"]), "variant": "onnx-fp32"}
    assert body["batch"] >= 1
    assert set(body["latency_ms"]) == {"decode", "preprocess", "queue", "inference", "total"}
    assert all(v >= 0 for v in body["latency_ms"].values())
    # Exactly the records `edgetl predict --json` prints for the same image (the name aside).
    printed = CliRunner().invoke(main, ["predict", str(files["bundle"]), str(files["red"]), "--json"])
    assert printed.exit_code == 0, printed.output
    assert _without_image(body["records"]) == _without_image(json.loads(printed.stdout)["results"])

    with files["blue"].open("rb") as f:
        multi = server.post("/v1/predict", files={"image": ("blue.png", f, "image/png")})
    assert multi.status_code == 200, multi.text
    assert [(r["image"], r["label"]) for r in multi.json()["records"]] == [("blue.png", "blue")]


def test_a_head_with_statistics_answers_whether_the_image_is_unfamiliar(files):
    """The unfamiliar flag (docs/on-device.md) in serve's records, as predict prints it."""
    import io

    from PIL import Image

    bundle = add_colour_stats(build_bundle(files["root"] / "with-stats"), files["root"] / "stats-images")
    grey = io.BytesIO()
    Image.new("RGB", (40, 40), (128, 128, 128)).save(grey, format="PNG")
    with Server(bundle) as s:
        red = s.post("/v1/predict", content=files["red"].read_bytes()).json()["records"][0]
        odd = s.post("/v1/predict", content=grey.getvalue()).json()["records"][0]
    assert red["label"] == "red" and red["unfamiliar"] is False and red["unfamiliar_score"] <= 1
    assert odd["unfamiliar"] is True and odd["unfamiliar_score"] > 1


def test_head_and_top_k_from_query_or_form(server, files):
    data = files["green"].read_bytes()
    every = server.post("/v1/predict", params={"head": "all", "top_k": "2"}, content=data).json()["records"]
    assert [r["head"] for r in every] == ["colour", "brightness"]
    assert [len(r["top_k"]) for r in every] == [2, 2]
    assert every[0]["label"] == "green"
    one = server.post("/v1/predict", params={"head": "brightness", "top_k": "1"}, content=data).json()["records"]
    assert [(r["head"], len(r["top_k"])) for r in one] == [("brightness", 1)]
    form = server.post("/v1/predict", files={"image": ("g.png", data)}, data={"head": "all", "top_k": "1"})
    assert [(r["head"], len(r["top_k"])) for r in form.json()["records"]] == [("colour", 1), ("brightness", 1)]
    many = server.post("/v1/predict", params={"top_k": "50"}, content=data).json()["records"]
    assert len(many[0]["top_k"]) == 3  # at most the number of labels


def test_concurrent_requests_share_batches(server, files):
    data = files["red"].read_bytes()

    def one(_):
        with server.client() as c:
            return c.post("/v1/predict", content=data)

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(one, range(24)))
    assert [a.status_code for a in answers] == [200] * 24
    assert {a.json()["records"][0]["label"] for a in answers} == {"red"}
    assert max(a.json()["batch"] for a in answers) <= 4


# The worker decodes when idle ---------------------------------------------------------------------


def _engine(bundle: Path, **settings):
    from edgetl.device.bundle_loading import LoadOptions
    from edgetl.device.serve.engine import Engine, EngineSettings

    return Engine(
        EngineSettings(bundle=bundle, load_options=LoadOptions(threads=1), watch_interval=0, **settings)
    ).start()


def _undecoded(data: bytes, name: str, heads=("colour",)):
    import functools

    from edgetl.device.serve.app import _prepare
    from edgetl.device.serve.engine import Job

    return Job(x=None, prepare=functools.partial(_prepare, data, name), heads=heads, top_k=2, name=name)


def test_an_undecoded_job_is_decoded_by_the_worker_and_a_bad_one_fails_alone(files):
    """When the worker is idle the app hands it the image's bytes (one thread hop fewer): the
    records are those of an image decoded first, and a bad image in the same batch fails on its own."""
    from edgetl.core.errors import DataError
    from edgetl.device.serve.app import _prepare
    from edgetl.device.serve.engine import Job

    engine = _engine(files["bundle"], max_batch=3, max_wait_ms=500)
    try:
        slot = engine.slot
        assert slot.idle()
        red = files["red"].read_bytes()
        x, decode_ms, preprocess_ms = _prepare(red, "red.png", slot.predictor)
        decoded = Job(x=x, heads=("colour",), top_k=2, name="red.png", decode_ms=decode_ms, preprocess_ms=preprocess_ms)
        # One batch (the worker waits up to 500 ms for three): decoded, undecoded, and a bad image.
        jobs = [decoded, _undecoded(red, "red.png"), _undecoded(b"not an image", "junk.png")]
        futures = [engine.submit(job, slot) for job in jobs]
        first, second = (f.result(30) for f in futures[:2])
        with pytest.raises(DataError, match="junk.png"):
            futures[2].result(30)
        assert first["records"] == second["records"] and first["records"][0]["label"] == "red"
        assert first["batch"] == second["batch"] == 2  # the bad image left the batch
        assert second["decode_ms"] > 0 and second["preprocess_ms"] > 0
        assert first["decode_ms"] == decode_ms and first["preprocess_ms"] == preprocess_ms
        assert jobs[1].prepare is None and jobs[2].prepare is None  # the bytes are let go
    finally:
        engine.stop()


def test_the_worker_is_not_idle_while_a_batch_runs_or_a_job_waits(files):
    bundle = slow_bundle(files["root"] / "slow-idle", matmuls=4)
    engine = _engine(bundle, max_batch=1, queue_size=4)
    try:
        slot = engine.slot
        assert slot.idle()
        running = engine.submit(_undecoded(files["red"].read_bytes(), "red.png"), slot)
        deadline = time.monotonic() + 30
        while not running.running() and not running.done() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert not slot.idle()  # its batch runs (~140 ms)
        waiting = engine.submit(_undecoded(files["blue"].read_bytes(), "blue.png"), slot)
        assert not slot.idle()
        assert [f.result(30)["records"][0]["label"] for f in (running, waiting)] == ["red", "blue"]
        # Idle as soon as the last answer is out: a client's next request must find it so.
        assert slot.idle()
    finally:
        engine.stop()


def test_a_bad_image_while_the_worker_is_busy_is_422_too(files):
    """With the worker busy the app decodes in its thread pool: a bad image is still a 422, and the
    requests around it are answered."""
    bundle = slow_bundle(files["root"] / "slow-busy", matmuls=4)
    with Server(bundle, "--threads", "1") as s:
        red = files["red"].read_bytes()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            slow = [pool.submit(s.post, "/v1/predict", content=red) for _ in range(3)]
            time.sleep(0.05)
            bad = [s.post("/v1/predict", content=b"certainly not an image") for _ in range(3)]
            goods = [f.result() for f in slow]
    assert [a.status_code for a in goods] == [200] * 3
    assert [a.status_code for a in bad] == [422] * 3
    assert all("cannot read image" in a.json()["error"] for a in bad)
    assert s.proc.returncode == 0


# Bad requests ------------------------------------------------------------------------------------


def test_bad_requests_get_their_status_and_the_server_keeps_serving(server, files):
    red = files["red"].read_bytes()
    cases = [
        (400, {"params": {"head": "nope"}, "content": red}, "unknown head"),
        (400, {"params": {"top_k": "0"}, "content": red}, "top_k"),
        (400, {"params": {"top_k": "many"}, "content": red}, "top_k"),
        (400, {"files": {"picture": ("r.png", red)}}, "image"),
        (400, {"content": b""}, "no image"),
        (422, {"content": b"certainly not an image"}, "cannot read image"),
        (422, {"content": png_claiming(20_000, 20_000)}, "decompression bomb"),
        (422, {"content": png_claiming(8_000, 6_000)}, "more than 40,000,000"),  # a file predict would read
        (422, {"files": {"image": ("strip.png", png_claiming(10, 5000))}}, "strip.png"),
        (413, {"content": os.urandom(60_000)}, "--max-body-mb"),
    ]
    for status, kwargs, words in cases:
        answer = server.post("/v1/predict", **kwargs)
        assert answer.status_code == status, (kwargs.get("params"), answer.text)
        assert answer.headers["content-type"] == "application/json"
        doc = answer.json()
        assert doc["status"] == status and words in doc["error"] and "\n" not in doc["error"], doc

    def chunks():  # no Content-Length: counted as it streams
        for _ in range(20):
            yield os.urandom(5_000)

    streamed = server.post("/v1/predict", content=chunks())
    assert streamed.status_code == 413, streamed.text
    assert server.get("/no/such/path").json() == {"error": "Not Found", "status": 404}
    assert server.get("/v1/predict").status_code == 405
    assert server.get("/static/../manifest.json").status_code == 404
    ok = server.post("/v1/predict", content=red)
    assert ok.status_code == 200 and ok.json()["records"][0]["label"] == "red"


def test_security_headers_health_model_and_metrics(server, files):
    health = server.get("/v1/health")
    assert health.status_code == 200
    doc = health.json()
    assert doc["status"] == "ready" and doc["pending"] is None
    assert doc["model"]["version"] == version_of(files["bundle"]) and doc["model"]["variant"] == "onnx-fp32"
    for name, value in (
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        ("cache-control", "no-store"),
    ):
        assert health.headers[name] == value
    assert "default-src 'none'" in health.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in health.headers["content-security-policy"]

    model = server.get("/v1/model").json()
    assert model["heads"] == {
        "colour": {"labels": ["red", "green", "blue"]},
        "brightness": {"labels": ["dark", "bright"]},
    }
    assert model["default_head"] == "colour" and model["input_size"] == 32
    assert (model["variant"], model["runtime"], model["precision"]) == ("onnx-fp32", "onnxruntime", "fp32")
    assert (model["max_batch"], model["queue_size"]) == (4, 16)
    assert model["backbone"]["name"] == "tiny_onnx" and model["version"] == version_of(files["bundle"])

    server.post("/v1/predict", content=files["red"].read_bytes())
    server.post("/v1/predict", content=b"junk")
    text = server.get("/metrics").text
    assert server.metric('edgetl_requests_total{endpoint="/v1/predict",status="200"}') >= 1
    assert server.metric('edgetl_requests_total{endpoint="/v1/predict",status="422"}') >= 1
    version = version_of(files["bundle"])
    assert f'edgetl_model_info{{runtime="onnxruntime",variant="onnx-fp32",version="{version}"}} 1.0' in text
    for name in ("edgetl_request_seconds_bucket", "edgetl_inference_seconds_count", "edgetl_batch_size_count"):
        assert name in text
    assert "edgetl_queue_depth 0.0" in text

    if PAGE.is_file():
        page = server.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.headers["content-security-policy"] == health.headers["content-security-policy"]
        assert page.headers["x-content-type-options"] == "nosniff"


def test_json_answers_are_ascii():
    from edgetl.device.serve.app import AsciiJSONResponse

    body = AsciiJSONResponse({"label": "c\x9b31m\u202e\x1bx caf\u00e9"}).body
    assert body == b'{"label":"c\\u009b31m\\u202e\\u001bx caf\\u00e9"}'
    assert json.loads(body)["label"] == "c\x9b31m\u202e\x1bx caf\u00e9"


def _stalled(url: str, payload: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(payload)
    return sock


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closed the connection within ``seconds``, and what it sent before."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
        return True, received
    except TimeoutError:
        return False, received
    finally:
        sock.close()


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_clients_that_stall_cannot_hold_the_server(files, parser):
    """Slowloris: connections that never finish their headers are closed after --header-timeout, a
    body that stalls gets 408 after --timeout, and the server answers others all along (with either
    HTTP parser)."""
    args = ("--max-connections", "2", "--header-timeout", "1", "--timeout", "2", "--http", parser)
    with Server(files["bundle"], *args) as s:
        heads = [_stalled(s.url, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n") for _ in range(6)]
        started = time.monotonic()
        closed = [_closed_within(sock, 6.0) for sock in heads]
        assert all(done for done, _ in closed), closed
        assert time.monotonic() - started < 6.0
        body = _stalled(s.url, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"x" * 10)
        done, answer = _closed_within(body, 6.0)
        assert done and answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 2 s" in answer, answer
        ok = s.post("/v1/predict", content=files["red"].read_bytes())
        assert ok.status_code == 200 and ok.json()["records"][0]["label"] == "red"
    assert s.proc.returncode == 0, s.stderr()


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_headers_without_end_are_refused_at_16_kib(files, parser):
    """A request head that keeps growing (one endless header, sent in 1 KiB pieces well within
    --header-timeout) is refused once past 16 KiB and its connection closed; httptools, which keeps
    an unfinished header in memory, gets 431 from edgetl's guard, h11 its own 400. The server's
    memory stays flat and it answers others."""
    with Server(files["bundle"], "--http", parser) as s:
        sock = _stalled(s.url, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nX-Long: ")
        sent = 0
        try:
            while sent < 1024 * 1024:
                sock.sendall(b"a" * 1024)
                sent += 1024
                time.sleep(0.002)
        except OSError:  # the server closed the connection: the rest cannot be sent
            pass
        done, answer = _closed_within(sock, 10.0)
        assert done and sent < 256 * 1024, sent
        expected = b"HTTP/1.1 431 " if parser == "httptools" else b"HTTP/1.1 400 "
        assert answer.startswith(expected), answer[:200]
        if parser == "httptools":
            body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
            assert body == {"error": "the request line and headers are larger than 16384 bytes", "status": 431}
        ok = s.post("/v1/predict", content=files["red"].read_bytes())
        assert ok.status_code == 200 and ok.json()["records"][0]["label"] == "red"
        # a large head that ends is still served (16 KiB is the limit: 12 KiB of headers pass)
        big = s.post("/v1/predict", content=files["red"].read_bytes(), headers={"X-Note": "n" * 12 * 1024})
        assert big.status_code == 200
    assert s.proc.returncode == 0, s.stderr()


def test_past_max_connections_the_answer_is_json_503(files):
    with Server(files["slow"], "--max-connections", "2", "--queue-size", "64", "--threads", "1") as s:
        answers = _post_all(s, files["red"].read_bytes(), 12, 12)
        codes = [a.status_code for a in answers]
        assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
        for busy in (a for a in answers if a.status_code == 503):
            assert busy.headers["content-type"] == "application/json" and busy.headers["retry-after"] == "1"
            assert "--max-connections" in busy.json()["error"]
    assert s.proc.returncode == 0


# Under load --------------------------------------------------------------------------------------


def _post_all(server: Server, data: bytes, n: int, workers: int) -> list[httpx.Response]:
    def one(_):
        with server.client() as c:
            return c.post("/v1/predict", content=data)

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(n)))


def test_overload_every_request_gets_200_or_503_at_once(files):
    with Server(files["slow"], "--queue-size", "2", "--threads", "1", "--max-connections", "100") as s:
        started = time.monotonic()
        answers = _post_all(s, files["red"].read_bytes(), 40, 40)
        seconds = time.monotonic() - started
        codes = [a.status_code for a in answers]
        assert len(codes) == 40 and set(codes) <= {200, 503}, codes
        assert 200 in codes and 503 in codes, codes
        busy = next(a for a in answers if a.status_code == 503)
        assert busy.headers["retry-after"] == "1" and "queue is full" in busy.json()["error"]
        assert seconds < 20, seconds  # the refused ones were not held
        assert s.post("/v1/predict", content=files["red"].read_bytes()).status_code == 200
        assert s.metric('edgetl_requests_total{endpoint="/v1/predict",status="503"}') == codes.count(503)
    assert s.proc.returncode == 0


def _call_seconds(bundle: Path) -> float:
    """The median time of one inference of ``bundle`` on one thread, here (machines differ by 2x+)."""
    import statistics

    predictor = open_bundle(bundle).load(threads=1)
    x = np.zeros((1, 3, predictor.preprocessing.input_size, predictor.preprocessing.input_size), np.float32)
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        predictor.logits(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def test_timeout_is_504_and_skips_the_cancelled_jobs(files):
    # One inference at a time, the timeout three inferences long: of 8 at once, the last ones wait
    # past it, whatever this machine's speed (the slow trunk is ~70 ms here, ~30 ms on a fast AVX-512 CPU).
    bundle = slow_bundle(files["root"] / "slower", matmuls=2)
    timeout = max(0.1, 3 * _call_seconds(bundle))
    with Server(bundle, "--threads", "1", "--timeout", f"{timeout:.3f}") as s:
        answers = _post_all(s, files["red"].read_bytes(), 8, 8)
        codes = [a.status_code for a in answers]
        assert set(codes) <= {200, 504} and 504 in codes, codes
        late = next(a for a in answers if a.status_code == 504)
        assert "--timeout" in late.json()["error"]
        time.sleep(0.5)
        ran = s.metric("edgetl_inference_seconds_count")
        assert ran < 8, ran  # the jobs given up before their turn were skipped
        # One at a time, the model answers in time (a few tries: a loaded CI machine runs it slower).
        codes = [s.post("/v1/predict", content=files["red"].read_bytes()).status_code for _ in range(5)]
        assert 200 in codes and set(codes) <= {200, 504}, codes
    assert s.proc.returncode == 0


def test_sigterm_finishes_the_requests_in_flight_and_exits_0(files):
    s = Server(files["bundle"], "--max-batch", "8", "--max-wait-ms", "1500")
    data = files["red"].read_bytes()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(s.post, "/v1/predict", content=data) for _ in range(3)]
        time.sleep(0.6)  # the three are queued, the batch waits for more
        assert not any(f.done() for f in futures)
        code = s.stop()
        answers = [f.result(timeout=10) for f in futures]
    assert code == 0, s.stderr()
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert {a.json()["batch"] for a in answers} == {3}
    assert "Traceback" not in s.stderr()


# Security ----------------------------------------------------------------------------------------


def test_other_hosts_need_a_token(files, tmp_path):
    runner = CliRunner()
    refused = runner.invoke(main, ["serve", str(files["bundle"]), "--host", "0.0.0.0", "--check"])
    assert refused.exit_code == 2 and "--token-file" in refused.stderr, refused.output
    short = tmp_path / "short"
    short.write_text("abc\n")
    weak = runner.invoke(main, ["serve", str(files["bundle"]), "--host", "0.0.0.0", "--token-file", str(short)])
    assert weak.exit_code == 2 and "at least 16" in weak.stderr, weak.output
    half = runner.invoke(main, ["serve", str(files["bundle"]), "--tls-cert", str(short), "--check"])
    assert half.exit_code == 2 and "--tls-key" in half.stderr

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with Server(files["bundle"], "--host", "0.0.0.0", "--token-file", str(token_file)) as s:
        base = s.url.replace("0.0.0.0", "127.0.0.1")
        red = files["red"].read_bytes()
        with httpx.Client(base_url=base, timeout=30) as anonymous:
            for method, path in (("POST", "/v1/predict"), ("GET", "/v1/health"), ("GET", "/metrics")):
                answer = anonymous.request(method, path, content=red if method == "POST" else None)
                assert answer.status_code == 401, (path, answer.text)
                assert answer.headers["www-authenticate"] == "Bearer"
                assert answer.headers["x-content-type-options"] == "nosniff"
            wrong = anonymous.post("/v1/predict", content=red, headers={"Authorization": "Bearer " + "x" * 32})
            assert wrong.status_code == 401 and wrong.json()["error"] == "wrong token"
            if PAGE.is_file():
                assert anonymous.get("/").status_code == 200  # the page holds no secret
        with httpx.Client(base_url=base, timeout=30, headers={"Authorization": f"Bearer {TOKEN}"}) as user:
            answer = user.post("/v1/predict", content=red)
            assert answer.status_code == 200 and answer.json()["records"][0]["label"] == "red"
            assert user.get("/metrics").status_code == 200


def test_insecure_on_another_host_warns(files):
    with Server(files["bundle"], "--host", "0.0.0.0", "--insecure") as s:
        assert "WITHOUT a token" in s.stderr()
        with httpx.Client(base_url=s.url.replace("0.0.0.0", "127.0.0.1"), timeout=30) as c:
            assert c.get("/v1/health").status_code == 200


def _self_signed(folder: Path) -> tuple[Path, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_tls(files, tmp_path):
    pytest.importorskip("cryptography", reason="the cryptography package makes the test's certificate")
    import ssl

    cert, key = _self_signed(tmp_path)
    with Server(files["bundle"], "--tls-cert", str(cert), "--tls-key", str(key)) as s:
        assert s.url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(base_url=s.url, verify=context, timeout=30) as c:
            answer = c.post("/v1/predict", content=files["red"].read_bytes())
            assert answer.status_code == 200 and answer.json()["records"][0]["label"] == "red"
        with pytest.raises(httpx.HTTPError):
            httpx.get(s.url.replace("https", "http") + "/v1/health", timeout=5)
    assert s.proc.returncode == 0
    bad = CliRunner().invoke(main, ["serve", str(files["bundle"]), "--tls-cert", str(key), "--tls-key", str(key)])
    assert bad.exit_code == 2 and "--tls-cert" in bad.stderr and "Traceback" not in bad.output


# Hot swap ----------------------------------------------------------------------------------------


def _redeploy(new: Path, target: Path) -> None:
    """What `edgetl deploy` does on the device: a complete folder renamed over the served one."""
    staged = target.parent / f".{target.name}.new"
    shutil.copytree(new, staged)
    replace_directory(staged, target)


def _wait_for(condition, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_bundle_copied_in_file_by_file_is_served_once_complete(files, tmp_path):
    """A copy into the served folder (manifest first, the rest after) is refused while incomplete;
    the later files' changes trigger another reload, so the server does not stay on "refused"."""
    from edgetl.device.bundle_loading import LoadOptions
    from edgetl.device.serve.engine import Engine, EngineSettings

    served = tmp_path / "served"
    shutil.copytree(files["bundle"], served)
    other = build_bundle(tmp_path / "other", heads=("colour",), feature_dim=6)  # other trunk and head files
    engine = Engine(EngineSettings(bundle=served, load_options=LoadOptions(threads=1), watch_interval=0.05)).start()
    try:
        before = engine.slot.version
        shutil.copyfile(other / "manifest.json", served / "manifest.json")  # the rest not yet copied
        assert _wait_for(lambda: (engine.pending or {}).get("state") == "refused"), engine.pending
        assert engine.slot.version == before
        for path in sorted(other.rglob("*")):
            if path.is_file() and path.name != "manifest.json":
                (served / path.relative_to(other)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, served / path.relative_to(other))
        assert _wait_for(lambda: engine.slot.version == version_of(other) and engine.pending is None), engine.pending
    finally:
        engine.stop()


def test_hot_swap_under_load_drops_nothing_and_refuses_a_bad_bundle(files, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(files["bundle"], served)
    old_version = version_of(served)
    new = build_bundle(tmp_path / "new", heads=("colour",), precisions=("fp32",))
    new_version = version_of(new)
    assert new_version != old_version
    data = files["red"].read_bytes()
    with Server(served, "--watch-interval", "0.2", "--max-batch", "4", "--max-wait-ms", "2") as s:
        stop = threading.Event()
        answers: list[tuple[int, str | None]] = []

        def client() -> None:
            with s.client() as c:
                while not stop.is_set():
                    a = c.post("/v1/predict", content=data)
                    version = a.json().get("model", {}).get("version") if a.status_code == 200 else a.text
                    answers.append((a.status_code, version))

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(0.5)
            _redeploy(new, served)
            assert _wait_for(lambda: s.get("/v1/model").json()["version"] == new_version, 10), s.stderr()
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert answers and {code for code, _ in answers} == {200}, [a for a in answers if a[0] != 200][:3]
        assert {v for _, v in answers} == {old_version, new_version}
        assert s.get("/v1/health").json()["pending"] is None
        assert s.get("/v1/model").json()["heads"] == {"colour": {"labels": ["red", "green", "blue"]}}
        assert s.metric(f'edgetl_model_info{{runtime="onnxruntime",variant="onnx-fp32",version="{new_version}"}}') == 1
        assert s.metric(f'edgetl_model_info{{runtime="onnxruntime",variant="onnx-fp32",version="{old_version}"}}') == 0

        # A broken bundle (a model file that fails its checksum) is refused; the old one serves on.
        broken = tmp_path / "broken"
        build_bundle(broken, heads=("colour", "brightness"), precisions=("fp32",), default_head="brightness")
        with (broken / "onnx" / "head.colour.onnx").open("ab") as f:
            f.write(b"tampered")
        _redeploy(broken, served)
        assert _wait_for(lambda: (s.get("/v1/health").json()["pending"] or {}).get("state") == "refused", 10)
        health = s.get("/v1/health").json()
        assert health["model"]["version"] == new_version
        assert health["pending"]["version"] == version_of(served) and "sha256" in health["pending"]["reason"]
        answer = s.post("/v1/predict", content=data)
        assert answer.status_code == 200 and answer.json()["model"]["version"] == new_version

        # Put right again (SIGHUP reloads at once, whatever the watch interval).
        _redeploy(files["bundle"], served)
        s.proc.send_signal(signal.SIGHUP)
        assert _wait_for(lambda: s.get("/v1/health").json()["pending"] is None, 10), s.get("/v1/health").text
        assert s.get("/v1/model").json()["version"] == old_version
    assert s.proc.returncode == 0, s.stderr()


# The ready document ------------------------------------------------------------------------------


def test_check_json_validates_and_names_the_bundle(files):
    result = CliRunner().invoke(main, ["serve", str(files["bundle"]), "--check", "--json"])
    assert result.exit_code == 0, result.output
    doc = validate_document(result.stdout, "serve")
    record = doc["results"][0]
    assert record["version"] == version_of(files["bundle"]) and record["check"] is True
    assert record["heads"] == ["colour", "brightness"] and record["auth"] == "none" and record["tls"] is False
    assert record["http"] == "httptools"  # the serve extra's parser, chosen by --http auto
    h11 = CliRunner().invoke(main, ["serve", str(files["bundle"]), "--check", "--json", "--http", "h11"])
    assert h11.exit_code == 0 and validate_document(h11.stdout, "serve")["results"][0]["http"] == "h11"
    missing = CliRunner().invoke(main, ["serve", str(files["root"] / "nothing"), "--check"])
    assert missing.exit_code == 1 and missing.stderr.startswith("Error: ") and len(missing.stderr.splitlines()) == 1


def test_without_httptools_auto_is_h11_and_asking_for_it_is_one_line(monkeypatch):
    from edgetl.core.errors import ConfigError
    from edgetl.device.serve.server import http_parser

    assert http_parser("auto") == "httptools" and http_parser("h11") == "h11"
    monkeypatch.setitem(sys.modules, "httptools", None)  # as if it were not installed
    assert http_parser("auto") == "h11"
    with pytest.raises(
        ConfigError, match=r"httptools is not installed; pip install 'edgetl\[serve\]' or give --http h11"
    ):
        http_parser("httptools")
    with pytest.raises(ConfigError, match="choose one of auto, httptools, h11"):
        http_parser("picohttp")
