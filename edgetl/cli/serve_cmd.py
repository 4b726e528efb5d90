"""`edgetl serve`: an inference service for one bundle (see edgetl.device.serve; extra edgetl[serve])."""

from __future__ import annotations

from typing import Any

import click

from edgetl.cli._common import common_options, handle_errors
from edgetl.cli._output import emit_json, emit_table, envelope, format_option, resolve_format
from edgetl.cli._runtime_options import (
    ov_device_option,
    precision_option,
    profile_option,
    provider_option,
    runtime_option,
    threads_option,
)
from edgetl.device.limits import MAX_BATCH_SIZE

SERVE_COLUMNS = ("url", "bundle", "version", "variant", "runtime", "precision", "heads", "tls", "auth", "check")
MIN_TOKEN_CHARS = 16


@click.command()
@click.argument("bundle", type=click.Path())
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. Anything but loopback needs --token-file (or --insecure).",
)
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="TCP port (0: any free port)."
)
@runtime_option
@precision_option
@threads_option
@provider_option
@ov_device_option
@profile_option
@click.option(
    "--max-batch",
    type=click.IntRange(1, MAX_BATCH_SIZE),
    default=1,
    show_default=True,
    help="Requests one inference call may take together (micro-batching).",
)
@click.option(
    "--max-wait-ms",
    type=click.FloatRange(0, 10_000),
    default=2.0,
    show_default=True,
    help="How long a batch waits for more requests once it has one (with --max-batch > 1).",
)
@click.option(
    "--queue-size",
    type=click.IntRange(1, 100_000),
    default=16,
    show_default=True,
    help="Requests waiting for the model at most; beyond, 503 with Retry-After at once.",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(0, 3600, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds a request may wait for its result (queue + inference); then 504.",
)
@click.option(
    "--header-timeout",
    "header_timeout_s",
    type=click.FloatRange(0, 3600, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds a connection may take to send a request's headers (from opening, or from its last "
    "answer); then it is closed, so clients that stall cannot hold the connections. The body must "
    "arrive within --timeout (408).",
)
@click.option(
    "--http",
    "http_parser_choice",
    type=click.Choice(["auto", "httptools", "h11"]),
    default="auto",
    show_default=True,
    help="HTTP parser: httptools (C, part of the serve extra; about 0.3 ms less per request), h11 (pure "
    "Python), or auto: httptools when it is installed.",
)
@click.option(
    "--max-body-mb",
    type=click.FloatRange(0, 1024, min_open=True),
    default=10.0,
    show_default=True,
    help="Largest request body in MB (10^6 bytes); larger: 413.",
)
@click.option(
    "--max-connections",
    type=click.IntRange(1, 100_000),
    default=64,
    show_default=True,
    help="Requests answered at once; beyond, 503 with Retry-After (memory: about this x --max-body-mb).",
)
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False),
    default=None,
    metavar="PATH",
    help="File holding the bearer token (>= 16 characters) that /v1/* and /metrics require.",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="Serve on a non-loopback --host without a token (anyone on the network can use it).",
)
@click.option("--tls-cert", type=click.Path(dir_okay=False), default=None, metavar="PEM", help="TLS certificate.")
@click.option("--tls-key", type=click.Path(dir_okay=False), default=None, metavar="PEM", help="TLS private key.")
@click.option(
    "--watch-interval",
    type=click.FloatRange(0, 86_400),
    default=2.0,
    show_default=True,
    help="Seconds between checks of the bundle folder for a new bundle (0: off; SIGHUP reloads anyway).",
)
@click.option(
    "--check", is_flag=True, help="Load, verify and warm up the bundle, print the ready document, and exit 0."
)
@format_option
@common_options
@handle_errors
def serve(
    bundle: str,
    host: str,
    port: int,
    runtime: str | None,
    precision: str | None,
    threads: int | None,
    provider: str | None,
    ov_device: str | None,
    device_profile: str | None,
    max_batch: int,
    max_wait_ms: float,
    queue_size: int,
    timeout_s: float,
    header_timeout_s: float,
    http_parser_choice: str,
    max_body_mb: float,
    max_connections: int,
    token_file: str | None,
    insecure: bool,
    tls_cert: str | None,
    tls_key: str | None,
    watch_interval: float,
    check: bool,
    output_format: str | None,
    as_json: bool,
) -> None:
    """Serve a bundle over HTTP: POST /v1/predict classifies an image, GET / is a page to drop an
    image or use the camera, /v1/health, /v1/model and /metrics (Prometheus) watch it.

    The bundle is verified, loaded and warmed up before the server listens. One inference worker
    runs the model; requests wait in a bounded queue (a full queue is 503 with Retry-After) and,
    with --max-batch > 1, share inference calls. When `edgetl deploy` replaces the bundle folder,
    the new bundle is verified, warmed up and swapped in without dropping a request; a bad one is
    refused and the old one keeps serving (see /v1/health). SIGTERM finishes the requests in flight
    and exits 0; SIGHUP reloads the bundle. Needs the serve extra: pip install 'edgetl[serve]'.

    Only loopback by default: on another --host every /v1/* and /metrics request needs the
    token of --token-file (Authorization: Bearer TOKEN), unless --insecure. Prints one line (or,
    with --json, the ready document) on stdout once it listens; logs go to stderr.

    \b
    Example:
      edgetl serve bundles/digits
      curl -s --data-binary @img.png http://127.0.0.1:8000/v1/predict
      openssl rand -hex 32 > ~/.edgetl-token
      edgetl serve bundles/digits --host 0.0.0.0 --token-file ~/.edgetl-token --max-batch 8
      edgetl serve bundles/digits --check --json
    """
    fmt = resolve_format(output_format, as_json)
    from edgetl.device.serve.server import ServerSettings, is_loopback

    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("give both --tls-cert and --tls-key, or neither")
    loopback = is_loopback(host)
    if not loopback and token_file is None and not insecure:
        raise click.UsageError(
            f"--host {host} lets other machines in: give --token-file PATH (a secret of >= {MIN_TOKEN_CHARS} "
            "characters, e.g. from `openssl rand -hex 32`), or --insecure to serve without one"
        )
    token = _read_token(token_file) if token_file is not None else None
    web = _import_web()
    from edgetl.device.serve.server import http_parser

    parser = http_parser(http_parser_choice)
    from edgetl.device.bundle_loading import LoadOptions
    from edgetl.device.serve.engine import Engine, EngineSettings

    given = LoadOptions(runtime=runtime, precision=precision, threads=threads, provider=provider, device=ov_device)
    from edgetl.cli.predict_cmd import with_profile

    options, _ = with_profile(device_profile, given)
    engine = Engine(
        EngineSettings(
            bundle=_bundle_path(bundle),
            load_options=options,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            queue_size=queue_size,
            watch_interval=watch_interval,
        )
    )
    engine.start()
    try:
        app = web.create_app(
            web.AppSettings(
                engine=engine,
                token=token,
                max_body_bytes=int(max_body_mb * 1_000_000),
                timeout_s=timeout_s,
                max_in_flight=max_connections,
            )
        )
        settings = ServerSettings(
            host=host,
            port=port,
            tls_cert=tls_cert,
            tls_key=tls_key,
            max_connections=max_connections,
            graceful_s=timeout_s + 5.0,
            access_log=_verbose(),
            header_timeout_s=header_timeout_s,
            http=parser,
        )

        def ready(actual_port: int) -> None:
            record = _ready_record(engine, settings, actual_port, bundle, token is not None, check)
            _print_ready(fmt, record, bundle)

        if check:
            ready(port)
            return
        if not loopback and token is None:
            click.secho(
                f"WARNING: serving on {host} WITHOUT a token (--insecure): anyone who can reach this machine "
                "can use the model. Give --token-file PATH instead.",
                err=True,
                fg="red",
                bold=True,
            )
        from edgetl.device.serve.server import serve as run_server

        code = run_server(app, settings, on_ready=ready, on_reload=engine.request_reload)
    finally:
        engine.stop()
    if code:
        raise SystemExit(code)


def _import_web():
    from edgetl.core.errors import BackendError

    try:
        _import_multipart()
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401

        from edgetl.device.serve import app
    except ImportError as exc:
        raise BackendError(
            f"edgetl serve needs the serve extra ({exc.name} is not installed): pip install 'edgetl[serve]'"
        ) from None
    return app


def _import_multipart() -> None:
    """python-multipart (Starlette's form parser): ``python_multipart`` since 0.0.13, ``multipart`` before."""
    try:
        import python_multipart  # noqa: F401
    except ImportError:
        import multipart  # noqa: F401


def _bundle_path(bundle: str):
    from pathlib import Path

    from edgetl.core.errors import BundleError

    path = Path(bundle)
    if not path.is_dir():
        raise BundleError(f"{bundle} is not a bundle folder; give the folder `edgetl export` wrote")
    return path.resolve()


def _read_token(path: str) -> str:
    from edgetl.core.errors import ConfigError

    try:
        token = open(path, encoding="utf-8").read().strip()  # noqa: SIM115 (read once)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--token-file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ConfigError(
            f"--token-file {path} must hold one token of at least {MIN_TOKEN_CHARS} characters without spaces "
            f"(it holds {len(token)}); make one with `openssl rand -hex 32 > {path}`"
        )
    return token


def _verbose() -> bool:
    import logging

    return logging.getLogger("edgetl").getEffectiveLevel() <= logging.DEBUG


def _ready_record(engine, settings, port: int, bundle: str, auth: bool, check: bool) -> dict[str, Any]:
    slot = engine.slot
    predictor = slot.predictor
    return {
        "url": settings.url(port),
        "bundle": bundle,
        "version": slot.version,
        "variant": predictor.variant,
        "runtime": predictor.runtime,
        "precision": predictor.precision,
        "heads": list(predictor.head_names),
        "default_head": predictor.bundle.default_head,
        "max_batch": engine.settings.max_batch,
        "queue_size": engine.settings.queue_size,
        "tls": settings.tls_cert is not None,
        "auth": "token" if auth else "none",
        "http": settings.http,
        "check": check,
    }


def _print_ready(fmt: str, record: dict[str, Any], bundle: str) -> None:
    from edgetl.cli._output import clean

    if fmt == "json":
        emit_json(envelope("serve", [record], bundle=bundle))
    elif fmt == "tsv":
        row = {**record, "heads": ",".join(record["heads"])}
        emit_table("tsv", SERVE_COLUMNS, [[row[c] for c in SERVE_COLUMNS]])
    elif record["check"]:
        click.echo(
            f"ready: {clean(bundle)} ({record['variant']}, version {record['version']}) can serve on {record['url']}"
        )
    else:
        click.echo(f"serving {clean(bundle)} ({record['variant']}) on {record['url']}")


COMMANDS = [serve]
