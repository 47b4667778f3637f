"""``billing web``: the web console, served by uvicorn.

It listens on 127.0.0.1 unless told otherwise and refuses an address reachable from other
machines without ``--allow-public`` (as ``billing metrics`` does): the console shows what
customers paid and lets people move money. Behind a TLS-terminating proxy, pass
``--proxy-headers`` so the console knows the request came over HTTPS (Secure cookies) and
from which address (the sign-in rate limit counts per address).
"""

from __future__ import annotations

import signal
from typing import Annotated

import typer
from rich.console import Console
from sqlalchemy import select

from billing.accounts import Operator
from billing.cli import params
from billing.cli.metrics import is_loopback
from billing.db import session_scope
from billing.errors import InvalidInput
from billing.settings import get_settings
from billing.web.config import DEFAULT_HOST, DEFAULT_PORT, load_console_settings

err = Console(stderr=True, highlight=False, soft_wrap=True)


def web(
    host: Annotated[
        str, params.option("--host", params.TEXT, help="Address to listen on.")
    ] = DEFAULT_HOST,
    port: Annotated[
        int,
        params.option(
            "--port", params.count(0, 65535, "PORT"), help="Port to listen on (0: any free)."
        ),
    ] = DEFAULT_PORT,
    allow_public: Annotated[
        bool, typer.Option("--allow-public", help="Allow listening on a non-loopback address.")
    ] = False,
    proxy_headers: Annotated[
        bool,
        typer.Option(
            "--proxy-headers",
            help="Trust X-Forwarded-Proto/For from the proxy at --forwarded-allow-ips.",
        ),
    ] = False,
    forwarded_allow_ips: Annotated[
        str, typer.Option("--forwarded-allow-ips", help="Proxies whose headers are trusted.")
    ] = "127.0.0.1",
) -> None:
    """Serve the web console: the failed-charge queue and operations in a browser."""
    if not allow_public and not is_loopback(host):
        raise InvalidInput(
            f"--host: {host} can be reached from other machines; pass --allow-public if "
            "that is intended (the console shows billing data and moves money)"
        )
    serve(host, port, proxy_headers=proxy_headers, forwarded_allow_ips=forwarded_allow_ips)


def serve(
    host: str,
    port: int,
    *,
    proxy_headers: bool = False,
    forwarded_allow_ips: str = "127.0.0.1",
) -> None:
    """Run the console until Ctrl-C or SIGTERM; prints its URL once it listens."""
    import uvicorn

    from billing.web.app import create_app

    settings = get_settings()
    console_settings = load_console_settings()
    # Fail now, in one line ("run billing db upgrade"), rather than at the first sign-in.
    with session_scope(settings.database_url) as session:
        session.execute(select(Operator.id).limit(1))
    app = create_app(settings, console_settings)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        proxy_headers=proxy_headers,
        forwarded_allow_ips=forwarded_allow_ips,
        server_header=False,
        date_header=False,
        log_config=None,  # the project's logging (configured by the CLI), not uvicorn's
        access_log=False,
        lifespan="off",
    )
    server = uvicorn.Server(config)

    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again with the
    # handlers it found: these make that a clean exit (0) instead of death by signal, and
    # stop the server if the signal comes before uvicorn took the signals over.
    def stop(_signum: int, _frame: object) -> None:
        server.should_exit = True

    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, stop)
    try:
        server.run()
    except OSError as exc:
        raise InvalidInput(f"--port: cannot listen on {host}:{port}: {exc.strerror}") from None
    if not server.started:
        raise InvalidInput(f"--port: cannot listen on {host}:{port}")


def register(app: typer.Typer) -> None:
    """Add ``billing web`` to the billing app."""
    app.command()(web)
