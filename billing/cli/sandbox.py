"""``billing sandbox``: run the fake Klik & Pay gateway until SIGINT or SIGTERM."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Annotated

import typer

from billing import defaults
from billing.cli import params
from billing.errors import ConfigError, InvalidInput

#: The longest latency the sandbox adds to a call: a minute, past every client's timeout.
MAX_LATENCY_MS = 60_000


def _accounts(values: list[str]) -> dict[str, str]:
    accounts: dict[str, str] = {}
    for number, value in enumerate(values, start=1):
        merchant_id, sep, key = value.partition("=")
        if not sep or not merchant_id.strip() or not key:
            # The value holds a private key: say which option is wrong, not what it held.
            raise InvalidInput(f"--account #{number}: expected MERCHANT_ID=PRIVATE_KEY")
        accounts[merchant_id.strip()] = key
    return accounts


def register(app: typer.Typer) -> None:
    """Add ``billing sandbox`` to the billing app."""

    @app.command("sandbox")
    def sandbox(
        port: Annotated[
            int,
            params.option("--port", params.ANY_PORT, help="Port to listen on (0: any free port)."),
        ] = defaults.SANDBOX_PORT,
        host: Annotated[
            str, params.option("--host", params.TEXT, help="Address to listen on.")
        ] = defaults.BIND_HOST,
        account: Annotated[
            list[str] | None,
            params.option(
                "--account",
                params.TEXT,
                help="Merchant account MERCHANT_ID=PRIVATE_KEY (repeatable). Without any, the"
                " demo accounts 1234567 (EUR) and 7654321 (USD) are created.",
            ),
        ] = None,
        latency_ms: Annotated[
            float,
            params.option(
                "--latency-ms",
                params.number(0, MAX_LATENCY_MS, "MS"),
                help="Latency added to every script call (ms).",
            ),
        ] = 0.0,
        allow_public: Annotated[
            bool,
            typer.Option(
                "--allow-public", help="Allow a non-loopback --host (it has no authentication)."
            ),
        ] = False,
    ) -> None:
        """Run the stateful Klik & Pay sandbox (scripts at the root, control API /_sandbox/)."""
        from billing.sandbox import DEMO_ACCOUNTS, Sandbox

        accounts = _accounts(account or []) or dict(DEMO_ACCOUNTS)
        server = Sandbox(
            host, port, accounts=accounts, latency=latency_ms / 1000, allow_public=allow_public
        )
        try:
            server.start()
        except OSError as exc:
            raise ConfigError(f"sandbox: cannot listen on {host}:{port}: {exc.strerror}") from None

        stop = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stop.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            typer.echo(f"sandbox listening on {server.url}")
            typer.echo(f"merchant accounts: {', '.join(sorted(accounts))}")
            while not stop.wait(0.2):
                pass
        finally:
            server.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        typer.echo("sandbox stopped")
