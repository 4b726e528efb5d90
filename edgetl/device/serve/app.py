"""The HTTP side of `edgetl serve`: a Starlette app over an :class:`~edgetl.device.serve.engine.Engine`.

Routes: ``POST /v1/predict``, ``GET /v1/health``, ``GET /v1/model``, ``GET /metrics`` and the page
(``/``, ``/static/page.js``, ``/static/page.css``: a fixed table of three files, never a path from
the client). Every response carries the security headers (:data:`SECURITY_HEADERS`); errors are
``{"error": "<one line>", "status": <int>}``. Pure ASGI middlewares, outermost first: security
headers, metrics (status and time per endpoint), the bearer token, the body limit (413).

Decoding and preprocessing never run on the event loop: when the model's worker is idle it decodes
the image itself (one thread hand-off fewer: what a lone client waits for), otherwise Starlette's
thread pool decodes it while the worker runs the model. Inference runs on the engine's worker
thread, awaited with the request's timeout (504, the job cancelled).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import io
import json
import time
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edgetl.core.errors import DataError
from edgetl.core.preprocess import load_image
from edgetl.device import limits
from edgetl.device.bundle_loading import ALL_HEADS
from edgetl.device.serve.engine import Engine, Job, NotReady, QueueFull, one_line

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "media-src 'self' blob: mediastream:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
SECURITY_HEADERS = (
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
)
# The page: URL path -> (file in static/, media type). Nothing else is ever read from disk.
PAGE_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/page.js": ("page.js", "text/javascript; charset=utf-8"),
    "/static/page.css": ("page.css", "text/css; charset=utf-8"),
}
ENDPOINTS = ("/v1/predict", "/v1/health", "/v1/model", "/metrics", *PAGE_FILES)
MAX_NAME = 255  # an upload's file name, as records show it
BUSY = "the server is busy (its queue is full); retry shortly"


# An upload is decoded only up to this many pixels (a 493 kB PNG can claim 13000 x 13000: 507 MB
# decoded, where predict's file limit allows 178M pixels), and at most DECODE_SLOTS uploads are
# decoded at once beside the worker's own: decoded images never take more than a few times
# MAX_UPLOAD_PIXELS x 3 bytes, whatever the clients send.
MAX_UPLOAD_PIXELS = 40_000_000
DECODE_SLOTS = 2


@dataclasses.dataclass
class AppSettings:
    """What the app needs: the started engine, the token (None: no auth), the limits."""

    engine: Engine
    token: str | None = None
    max_body_bytes: int = 10 * 1024 * 1024
    timeout_s: float = 10.0
    max_in_flight: int = 64  # requests being answered at once; past it, 503 at once (--max-connections)
    max_pixels: int = MAX_UPLOAD_PIXELS
    decode_slots: int = DECODE_SLOTS


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped (``\\u009b``): a label or file name from user data
    then reaches a terminal running curl as text, never as a control character."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return AsciiJSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


# Middlewares (pure ASGI) ------------------------------------------------------------------------


async def _send_error(send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": message, "status": status}, ensure_ascii=True).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class SecurityHeaders:
    """Adds :data:`SECURITY_HEADERS` to every HTTP response."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in names]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)


class Metrics:
    """Counts each response by endpoint and status and times it (Prometheus)."""

    def __init__(self, app, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        started = time.perf_counter()
        status = {"code": 500}

        async def record(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            self.metrics.requests.labels(endpoint=endpoint, status=str(status["code"])).inc()
            self.metrics.request_seconds.labels(endpoint=endpoint).observe(time.perf_counter() - started)


class BearerToken:
    """With a token configured, ``/v1/*`` and ``/metrics`` need ``Authorization: Bearer <token>``
    (compared in constant time); the page's three files do not (they hold no secrets)."""

    def __init__(self, app, token: str | None) -> None:
        self.app = app
        self.token = token.encode() if token else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.token is not None:
            path = scope.get("path", "")
            if path.startswith("/v1/") or path == "/metrics":
                given = b""
                for key, value in scope.get("headers", []):
                    if key.lower() == b"authorization":
                        given = value
                        break
                scheme, _, credential = given.partition(b" ")
                ok = scheme.lower() == b"bearer" and hmac.compare_digest(credential.strip(), self.token)
                if not ok:
                    message = "wrong token" if given else "this server needs a token: send Authorization: Bearer TOKEN"
                    await _send_error(send, 401, message, {"WWW-Authenticate": "Bearer"})
                    return
        await self.app(scope, receive, send)


class InFlightLimit:
    """At most ``limit`` requests answered at once: past it, 503 with Retry-After at once, as JSON,
    before the body is read (Uvicorn's own connection limit answers in plain text; it is set
    higher and only bounds idle connections)."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.open = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.open >= self.limit:
            message = f"the server is answering {self.limit} requests (its --max-connections); retry shortly"
            await _send_error(send, 503, message, {"Retry-After": "1"})
            return
        self.open += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.open -= 1


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """413 when a request body is larger than the limit: at once from Content-Length, and by
    counting the bytes as they stream in (a chunked upload has no Content-Length)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def message(self) -> str:
        return f"the request body is larger than {self.max_bytes:,} bytes (the server's --max-body-mb)"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", []):
            if key.lower() == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_error(send, 400, "Content-Length is not a number")
                    return
                if declared > self.max_bytes:
                    await _send_error(send, 413, self.message(), {"Connection": "close"})
                    return
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.message())
            return message

        await self.app(scope, counted, send)


# Metrics ----------------------------------------------------------------------------------------


class ServeMetrics:
    """The app's Prometheus metrics, in a registry of its own (never the global one)."""

    def __init__(self, engine: Engine) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "edgetl_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=self.registry
        )
        self.request_seconds = Histogram(
            "edgetl_request_seconds", "HTTP request time by endpoint", ["endpoint"], registry=self.registry
        )
        self.inference_seconds = Histogram(
            "edgetl_inference_seconds",
            "Time of one inference call (a batch)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "edgetl_batch_size",
            "Requests per inference call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
            registry=self.registry,
        )
        self.queue_depth = Gauge("edgetl_queue_depth", "Jobs waiting for the model", registry=self.registry)
        self.queue_depth.set_function(engine.depth)
        self.model_info = Gauge(
            "edgetl_model_info", "The serving model (1)", ["version", "variant", "runtime"], registry=self.registry
        )
        self._serving: tuple[str, str, str] | None = None
        if engine.ready:
            self.set_model(engine.slot)

    def set_model(self, slot) -> None:
        labels = (slot.version, slot.variant, slot.predictor.runtime)
        if self._serving is not None and self._serving != labels:
            self.model_info.remove(*self._serving)
        self.model_info.labels(*labels).set(1)
        self._serving = labels

    def on_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference_seconds.observe(seconds)

    def text(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# Requests ---------------------------------------------------------------------------------------


class _Upload(io.BytesIO):
    """Uploaded bytes that name themselves in load_image's messages ("cannot read image NAME: ...")."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self._label = name

    def __str__(self) -> str:
        return self._label

    __repr__ = __str__


def _prepare(data: bytes, name: str, predictor, max_pixels: int = MAX_UPLOAD_PIXELS) -> tuple[Any, float, float]:
    """Decode (with predict's guards, and at most ``max_pixels``) and preprocess one image:
    ((1, 3, S, S), decode ms, preprocess ms)."""
    t0 = time.perf_counter()
    image = load_image(_Upload(data, name), predictor.preprocessing, max_pixels=max_pixels, gray_ok=True)
    t1 = time.perf_counter()
    x = predictor.preprocess([image])
    return x, (t1 - t0) * 1000.0, (time.perf_counter() - t1) * 1000.0


def _heads(predictor, value: str | None) -> tuple[str, ...]:
    """The heads a request asks for: a name, ``all``, or (None) the bundle's default head (every
    head when the bundle has several and no default)."""
    loaded = predictor.head_names
    if value is None or value == "":
        default = predictor.bundle.default_head
        return (default,) if default in loaded else loaded
    if value == ALL_HEADS:
        return loaded
    if value not in loaded:
        raise ValueError(f"unknown head {value!r}; this model has: {', '.join(loaded)} (or all)")
    return (value,)


def _top_k(value: str | None) -> int:
    if value is None or value == "":
        return 5
    try:
        k = int(value)
    except ValueError:
        raise ValueError(f"top_k must be an integer >= 1, not {value[:40]!r}") from None
    problem = limits.problem("top_k", k)
    if problem:
        raise ValueError(problem)
    return k


def _ms(value: float) -> float:
    return round(value, 3)


def create_app(settings: AppSettings) -> Starlette:
    """The Starlette app for a started :class:`Engine` (see the module's docstring)."""
    engine = settings.engine
    metrics = ServeMetrics(engine)
    decoding = asyncio.Semaphore(settings.decode_slots)
    engine.stats.on_batch = metrics.on_batch
    engine.on_swap = lambda old, new: metrics.set_model(new)

    async def predict(request: Request) -> Response:
        started = time.perf_counter()
        try:
            slot = engine.slot
        except NotReady:
            return error(503, "the model is not loaded yet", {"Retry-After": "1"})
        params = {"head": request.query_params.get("head"), "top_k": request.query_params.get("top_k")}
        content_type = request.headers.get("content-type", "")
        name = "upload"
        try:
            # The body must arrive within the request's time: a client that stalls mid-body would
            # otherwise hold its slot for ever.
            async with asyncio.timeout(settings.timeout_s):
                if content_type.lower().startswith("multipart/form-data"):
                    try:
                        form = await request.form(max_files=1, max_fields=4)
                    except HTTPException as exc:
                        return error(400, f"bad multipart body: {exc.detail}")
                    try:
                        upload = form.get("image")
                        if not isinstance(upload, UploadFile):
                            return error(400, "the multipart body needs a file field named image")
                        for key in ("head", "top_k"):
                            value = form.get(key)
                            if isinstance(value, str):
                                params[key] = value
                        data = await upload.read()
                        name = (upload.filename or "upload")[:MAX_NAME]
                    finally:
                        await form.close()
                else:
                    data = await request.body()
        except TimeoutError:
            return error(
                408, f"the request body did not arrive within {settings.timeout_s:g} s", {"Connection": "close"}
            )
        if not data:
            return error(400, "the request has no image: send the image's bytes, or multipart with a file field image")
        predictor = slot.predictor
        try:
            heads = _heads(predictor, params["head"])
            top_k = _top_k(params["top_k"])
        except ValueError as exc:
            return error(400, str(exc))
        if slot.queue.full():  # refused before the decoding work, not after it
            return error(503, BUSY, {"Retry-After": "1"})
        prepare = functools.partial(_prepare, data, name, max_pixels=settings.max_pixels)
        del data
        if slot.idle():  # the worker would start it at once: it decodes it too (one hand-off fewer)
            job = Job(x=None, prepare=prepare, heads=heads, top_k=top_k, name=name)
        else:  # decode here, in the thread pool, while the worker runs the model
            try:
                async with decoding:  # a few at a time: decoded images are the big memory
                    x, decode_ms, preprocess_ms = await run_in_threadpool(prepare, predictor)
            except DataError as exc:
                return error(422, one_line(exc))
            job = Job(x=x, heads=heads, top_k=top_k, name=name, decode_ms=decode_ms, preprocess_ms=preprocess_ms)
        del prepare
        try:
            future = engine.submit(job, slot)
        except QueueFull:
            return error(503, BUSY, {"Retry-After": "1"})
        except NotReady:
            return error(503, "the model is not loaded", {"Retry-After": "1"})
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(future), settings.timeout_s)
        except TimeoutError:
            job.cancel()
            return error(504, f"no result within {settings.timeout_s:g} s (the server's --timeout); retry later")
        except NotReady as exc:  # prepared for a model swapped out since, and the new one differs
            return error(503, str(exc), {"Retry-After": "1"})
        except DataError as exc:  # decoded by the worker: a bad image
            return error(422, one_line(exc))
        except Exception as exc:  # the runtime failed on this batch: the server keeps serving
            return error(500, f"inference failed: {one_line(exc)}")
        return AsciiJSONResponse(
            {
                "records": result["records"],
                "latency_ms": {
                    "decode": _ms(result["decode_ms"]),
                    "preprocess": _ms(result["preprocess_ms"]),
                    "queue": _ms(result["queue_ms"]),
                    "inference": _ms(result["inference_ms"]),
                    "total": _ms((time.perf_counter() - started) * 1000.0),
                },
                "batch": result["batch"],
                "model": result["model"],
            }
        )

    async def health(request: Request) -> Response:
        if not engine.ready:
            return AsciiJSONResponse({"status": "starting"}, status_code=503)
        slot = engine.slot
        return AsciiJSONResponse(
            {
                "status": "ready",
                "model": {"version": slot.version, "variant": slot.variant, "loaded_at": slot.loaded_at},
                "pending": engine.pending,
            }
        )

    async def model(request: Request) -> Response:
        try:
            slot = engine.slot
        except NotReady:
            return error(503, "the model is not loaded yet", {"Retry-After": "1"})
        return AsciiJSONResponse(model_summary(engine, slot))

    async def metrics_text(request: Request) -> Response:
        body, media_type = metrics.text()
        return Response(body, media_type=media_type)

    async def page(request: Request) -> Response:
        filename, media_type = PAGE_FILES[request.url.path]
        try:
            body = resources.files("edgetl.device.serve").joinpath("static", filename).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return error(404, f"the page is not installed ({filename} is missing); reinstall edgetl[serve]")
        return Response(body, media_type=media_type)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error(exc.status_code, str(exc.detail), dict(exc.headers or {}))

    async def too_large(request: Request, exc: Exception) -> Response:
        return error(413, str(exc), {"Connection": "close"})

    async def crashed(request: Request, exc: Exception) -> Response:
        return error(500, f"internal error: {one_line(exc)}")

    routes = [
        Route("/v1/predict", predict, methods=["POST"]),
        Route("/v1/health", health, methods=["GET"]),
        Route("/v1/model", model, methods=["GET"]),
        Route("/metrics", metrics_text, methods=["GET"]),
        *(Route(path, page, methods=["GET"]) for path in PAGE_FILES),
    ]
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(SecurityHeaders),
            Middleware(Metrics, metrics=metrics),
            Middleware(BearerToken, token=settings.token),
            Middleware(InFlightLimit, limit=settings.max_in_flight),
            Middleware(BodyLimit, max_bytes=settings.max_body_bytes),
        ],
        exception_handlers={HTTPException: http_error, BodyTooLarge: too_large, Exception: crashed},
    )
    app.state.metrics = metrics
    app.state.engine = engine
    return app


def model_summary(engine: Engine, slot) -> dict[str, Any]:
    """``GET /v1/model``: the serving bundle's manifest, summarised."""
    predictor = slot.predictor
    manifest = predictor.bundle.manifest
    return {
        "version": slot.version,
        "bundle": str(slot.path),
        "backbone": manifest.get("backbone", {}),
        "input_size": predictor.preprocessing.input_size,
        "heads": {h: {"labels": list(predictor.labels[h])} for h in predictor.head_names},
        "default_head": predictor.bundle.default_head,
        "variant": predictor.variant,
        "runtime": predictor.runtime,
        "precision": predictor.precision,
        "max_batch": engine.settings.max_batch,
        "queue_size": engine.settings.queue_size,
        "loaded_at": slot.loaded_at,
    }


__all__ = ["CSP", "PAGE_FILES", "SECURITY_HEADERS", "AppSettings", "ServeMetrics", "create_app", "model_summary"]
