"""``billing metrics``: the Prometheus endpoint.

It serves two things at ``/metrics``:

- the workers' counters and histograms (``billing_charges_total``,
  ``billing_gateway_call_seconds``). Workers live in other processes, so they must all be
  started with ``PROMETHEUS_MULTIPROC_DIR`` set to one directory, and this command with
  the same value: the endpoint sums the files each process writes there. Empty that
  directory before starting the workers. Without the variable, only this process's own
  registry is served (useful for a quick look, not for production);
- gauges read from the database at every scrape: ``billing_failed_queue_depth{reason}``
  and ``billing_oldest_unknown_charge_age_seconds``, so the queue is watched even when no
  worker runs.

It listens on 127.0.0.1 unless told otherwise, and refuses an address reachable from other
machines without ``--allow-public``: the numbers say how much a merchant bills.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from typing import Annotated

import typer
from rich.console import Console

from billing.cli import params
from billing.durations import quote
from billing.errors import InvalidInput
from billing.logs import configure_logging
from billing.metrics import build_registry
from billing.settings import get_settings

err = Console(stderr=True, highlight=False, soft_wrap=True)


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback address."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):  # UnicodeError: a label past 63 characters (IDNA)
        raise InvalidInput(
            f"--host: {quote(host)} is neither an IP address nor a known host name"
        ) from None
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def metrics(
    host: Annotated[
        str | None,
        params.option(
            "--host", params.TEXT, help="Address to listen on (default: BILLING_METRICS_HOST)."
        ),
    ] = None,
    port: Annotated[
        int | None,
        params.option(
            "--port", params.PORT, help="Port to listen on (default: BILLING_METRICS_PORT)."
        ),
    ] = None,
    allow_public: Annotated[
        bool,
        typer.Option("--allow-public", help="Allow listening on a non-loopback address."),
    ] = False,
) -> None:
    """Serve Prometheus metrics: worker counters and the failed-charge queue.

    Workers must be started with the same PROMETHEUS_MULTIPROC_DIR as this command, or their
    counters are not seen here. The queue gauges are read from the database at each scrape.
    """
    settings = get_settings()
    configure_logging(settings)
    host = host or settings.metrics_host
    port = port or settings.metrics_port
    if not allow_public and not is_loopback(host):
        raise InvalidInput(
            f"--host: {host} can be reached from other machines; pass --allow-public if "
            "that is intended (the metrics reveal billing volumes)"
        )
    registry = build_registry(settings.database_url)
    from prometheus_client import start_http_server

    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise InvalidInput(f"--port: cannot listen on {host}:{port}: {exc.strerror}") from None
    shown = f"[{host}]" if ":" in host else host
    err.print(f"serving metrics on http://{shown}:{port}/metrics", markup=False)
    try:
        _wait(thread)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()


def _wait(thread: threading.Thread) -> None:
    # join() with a timeout keeps Ctrl-C responsive.
    while thread.is_alive():
        thread.join(timeout=1.0)


def register(app: typer.Typer) -> None:
    """Add ``billing metrics`` to the billing app."""
    app.command()(metrics)
