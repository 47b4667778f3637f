"""``billing demo``: the sandbox, a worker and beat as real processes, sample subscriptions,
and what ops would see, in under a minute. ``--serve`` then keeps them running with the web
console (``make console``)."""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    workdir: Path = typer.Option(Path(".demo"), help="Folder for the database, logs and files."),
    timeout: float = typer.Option(45.0, help="Seconds to wait for every charge to settle."),
    serve: bool = typer.Option(
        False, "--serve", help="Then keep everything running with the web console, until Ctrl-C."
    ),
    console_port: int = typer.Option(
        8080, "--console-port", min=1, max=65535, help="The console's port with --serve."
    ),
) -> None:
    """Run the whole product once against the sandbox and show the outcome."""
    from billing.demo import run_demo

    raise typer.Exit(
        run_demo(workdir.resolve(), timeout=timeout, serve=serve, console_port=console_port)
    )


def register(app: typer.Typer) -> None:
    app.command()(demo)
