"""``billing demo``: the sandbox, a worker and beat as real processes, sample subscriptions,
and what ops would see, in under a minute. ``--serve`` then keeps them running with the web
console (``make console``).

The demo empties its folder first, so it refuses one that holds anything but a previous
demo (recognised by its ``billing.db``): ``--workdir ~`` must not empty a home folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from billing.cli import params
from billing.errors import InvalidInput

#: The longest wait for the charges to settle: an hour is far past a demo that works.
MAX_TIMEOUT_SECONDS = 3600
#: What a folder left by an earlier demo holds.
_DEMO_MARK = "billing.db"


def _workdir(path: Path) -> Path:
    folder = path.resolve()
    if folder.is_dir() and any(folder.iterdir()) and not (folder / _DEMO_MARK).is_file():
        raise InvalidInput(
            f"--workdir: {folder} holds files that are not a demo's, and the demo empties its "
            "folder first; give a new or empty folder"
        )
    if folder.exists() and not folder.is_dir():
        raise InvalidInput(f"--workdir: {folder} is not a folder")
    return folder


def demo(
    workdir: Annotated[
        Path, typer.Option(help="Folder for the database, logs and files (emptied first).")
    ] = Path(".demo"),
    timeout: Annotated[
        float,
        params.option(
            "--timeout",
            params.number(1, MAX_TIMEOUT_SECONDS, "SECONDS"),
            help="Seconds to wait for every charge to settle.",
        ),
    ] = 45.0,
    serve: Annotated[
        bool,
        typer.Option(
            "--serve", help="Then keep everything running with the web console, until Ctrl-C."
        ),
    ] = False,
    console_port: Annotated[
        int,
        params.option(
            "--console-port",
            params.count(1, 65535, "PORT"),
            help="The console's port with --serve.",
        ),
    ] = 8080,
) -> None:
    """Run the whole product once against the sandbox and show the outcome."""
    from billing.demo import run_demo

    raise typer.Exit(
        run_demo(_workdir(workdir), timeout=timeout, serve=serve, console_port=console_port)
    )


def register(app: typer.Typer) -> None:
    app.command()(demo)
