"""``billing demo``: the sandbox, a worker and beat as real processes, sample subscriptions,
and what ops would see, in under a minute."""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    workdir: Path = typer.Option(Path(".demo"), help="Folder for the database, logs and files."),
    timeout: float = typer.Option(45.0, help="Seconds to wait for every charge to settle."),
) -> None:
    """Run the whole product once against the sandbox and show the outcome."""
    from billing.demo import run_demo

    raise typer.Exit(run_demo(workdir.resolve(), timeout=timeout))


def register(app: typer.Typer) -> None:
    app.command()(demo)
