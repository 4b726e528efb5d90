"""Run the app under Uvicorn: the listening socket, TLS, signals, drain and exit code.

The socket is bound here (so a busy port is one line, and ``--port 0`` says the port it got), then
handed to ``uvicorn.Server.serve``. SIGTERM/SIGINT: Uvicorn stops accepting, lets the requests in
flight finish (up to ``graceful_s``), and returns; Uvicorn >= 0.29 then raises the captured signal
again, which lands in the Python handler installed here beforehand (it only records it), so the
process ends with exit code 0 after the workers have stopped. SIGHUP reloads the bundle.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any

from edgetl.core.errors import ConfigError, EdgetlError

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1); anything else reaches other machines."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# A connection must have sent a request's headers within this long of opening, or of its last
# answer; else it is closed. Uvicorn times out only idle keep-alive connections: a client that sends
# half a request line and waits (slowloris) held a connection slot for ever, and 64 of them, without
# any token, locked everyone out. The body has its own limit in the app (the request's --timeout).
HEADER_TIMEOUT_S = 10.0


# Connections Uvicorn keeps open at most (4 x --max-connections + 64), past which it answers 503 in
# plain text: the app answers JSON 503 with Retry-After at --max-connections requests in flight;
# this only backstops idle keep-alive connections and ones still sending their headers.
def connection_limit(max_connections: int) -> int:
    return 4 * max_connections + 64


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    tls_cert: str | None = None
    tls_key: str | None = None
    max_connections: int = 64
    graceful_s: float = 30.0
    access_log: bool = False
    header_timeout_s: float = HEADER_TIMEOUT_S
    http: str = "auto"  # the HTTP parser (HTTP_PARSERS)

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"

    def url(self, port: int | None = None) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port if port is None else port}"


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (IPv4 or IPv6), listening; a one-line error if it cannot."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(
            f"--host {host}: {exc.strerror}; give an address of this machine or a name it resolves"
        ) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(2048)
        sock.set_inheritable(True)
    except OSError as exc:
        sock.close()
        raise EdgetlError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port or stop what uses it"
        ) from None
    return sock


# The HTTP parsers Uvicorn can use: httptools (C, from the serve extra) or h11 (pure Python).
HTTP_PARSERS = ("auto", "httptools", "h11")

# Most bytes a request's line and headers may take (h11's own limit, its max_incomplete_event_size);
# beyond it the connection is answered (h11: its own 400; httptools: 431 from the protocol below) and
# closed. httptools keeps a header it has not seen the end of in memory, so the protocol counts.
MAX_HEAD_BYTES = 16 * 1024


def http_parser(choice: str = "auto") -> str:
    """The parser to use: ``auto`` is httptools when it is installed (it answers a request in about
    0.3 ms less on a 2-core x86 server), else h11; asking for httptools without it is one line."""
    if choice not in HTTP_PARSERS:
        raise ConfigError(f"--http {choice}: choose one of {', '.join(HTTP_PARSERS)}")
    if choice == "h11":
        return choice
    try:
        import httptools  # noqa: F401
    except ImportError:
        if choice == "httptools":
            raise ConfigError(
                "--http httptools: httptools is not installed; pip install 'edgetl[serve]' or give --http h11"
            ) from None
        return "h11"
    return "httptools"


_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
)


def guarded_protocol(parser: str, header_timeout_s: float, max_head_bytes: int = MAX_HEAD_BYTES) -> type:
    """Uvicorn's protocol for ``parser`` (``httptools`` or ``h11``) with a deadline on request
    headers (:data:`HEADER_TIMEOUT_S`): armed when the connection opens and whenever data arrives
    with no request under way, cleared when a request's headers are complete; at the deadline the
    connection is closed. With httptools, a request's line and headers are also bounded to
    ``max_head_bytes`` (431, then closed), as h11 bounds them itself."""
    if parser == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    else:
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class GuardedProtocol(Base):
        _deadline: asyncio.TimerHandle | None = None
        _head_open = False  # httptools: a request's line and headers are being parsed
        _head_bytes = 0  # ... and the bytes they took so far (at most one read short)

        def _arm(self) -> None:
            if self._deadline is None:
                self._deadline = self.loop.call_later(header_timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _in_request(self) -> bool:
            return self.cycle is not None and not self.cycle.response_complete

        def _expired(self) -> None:
            self._deadline = None
            if not self._in_request() and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            was_open = self._head_open
            super().data_received(data)
            if self._head_open and was_open:  # the whole read belongs to a head still unfinished
                self._head_bytes += len(data)
                if self._head_bytes > max_head_bytes and not self.transport.is_closing():
                    body = (
                        b'{"error":"the request line and headers are larger than %d bytes","status":431}'
                        % max_head_bytes
                    )
                    self.transport.write(_TOO_LARGE % (len(body), body))
                    self.transport.close()
                    return
            if self._in_request():
                self._disarm()
            else:  # part of a request's head, or the start of the next one on a kept-alive connection
                self._arm()

        # httptools' parser callbacks (h11 has none): where a head starts and ends.
        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_open, self._head_bytes = True, 0

        def on_headers_complete(self) -> None:
            self._head_open = False
            super().on_headers_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return GuardedProtocol


def _quiet_logging(access_log: bool) -> None:
    """Uvicorn's errors (and, with -v, its access log) on stderr through edgetl's handler."""
    edgetl = logging.getLogger("edgetl")
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers = list(edgetl.handlers) or [logging.StreamHandler()]
        logger.propagate = False
        logger.setLevel(logging.WARNING)
    if access_log:
        logging.getLogger("uvicorn.access").setLevel(logging.INFO)
    # python-multipart logs a malformed body as a bare warning line (Python's last-resort handler);
    # the client already gets a 400 saying so.
    for name in ("python_multipart", "multipart"):
        logging.getLogger(name).setLevel(logging.ERROR)


def serve(app: Any, settings: ServerSettings, *, on_ready: Callable[[int], None], on_reload: Callable[[], None]) -> int:
    """Serve ``app`` until SIGTERM/SIGINT; ``on_ready(port)`` once it accepts connections,
    ``on_reload()`` on SIGHUP. Returns the exit code (0 after a drain)."""
    import uvicorn

    _quiet_logging(settings.access_log)
    sock = listen(settings.host, settings.port)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=port,
        ssl_certfile=settings.tls_cert,
        ssl_keyfile=settings.tls_key,
        http=guarded_protocol(http_parser(settings.http), settings.header_timeout_s),
        limit_concurrency=connection_limit(settings.max_connections),
        timeout_graceful_shutdown=max(1, round(settings.graceful_s)),
        log_config=None,
        access_log=settings.access_log,
        lifespan="off",
        proxy_headers=False,
        server_header=False,
    )
    try:
        config.load()  # the TLS context: a bad certificate or key is one line here
    except (OSError, ValueError) as exc:
        sock.close()
        raise ConfigError(f"cannot use --tls-cert/--tls-key: {exc}; give a PEM certificate and its key") from None
    server = uvicorn.Server(config)
    received: list[int] = []

    def record(signum: int, frame: Any) -> None:  # what uvicorn re-raises after its shutdown
        received.append(signum)

    main_thread = threading.current_thread() is threading.main_thread()
    previous: dict[int, Any] = {}
    if main_thread:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, record)
        if hasattr(signal, "SIGHUP"):
            previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda signum, frame: on_reload())

    async def main() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if server.started:
            on_ready(port)
        await task

    try:
        # Uvicorn's event loop choice (uvloop when installed, else asyncio), as `uvicorn.run` makes it.
        with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
            runner.run(main())
    finally:
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        log.info("stopped on %s after finishing the requests in flight", signal.Signals(received[0]).name)
    return 0


__all__ = [
    "HTTP_PARSERS",
    "MAX_HEAD_BYTES",
    "ServerSettings",
    "guarded_protocol",
    "http_parser",
    "is_loopback",
    "listen",
    "serve",
]
