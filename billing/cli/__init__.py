"""The ``billing`` command. Each area of the product registers its commands from its own
module in this package, so a newcomer finds ``billing plans check`` in ``cli/plans.py``.

Errors the user can fix (``BillingError``) end in one red line on stderr and the error's
exit status (2 for bad input), never a traceback.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape

from billing.errors import BillingError

app = typer.Typer(
    name="billing",
    help="Klik & Pay subscription re-billing: worker, beat, sandbox and operations.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True, highlight=False)


def _register() -> None:
    from billing.cli import (
        db,
        deadletters,
        demo,
        events,
        failed,
        ledger,
        metrics,
        plans,
        processes,
        sandbox,
        settlement,
        subscriptions,
    )

    for module in (
        db,
        plans,
        subscriptions,
        sandbox,
        processes,
        settlement,
        failed,
        deadletters,
        events,
        ledger,
        metrics,
        demo,
    ):
        module.register(app)


_register()


def main() -> None:
    """Console-script entry point."""
    from billing.logs import configure_logging
    from billing.settings import get_settings

    try:
        configure_logging(get_settings())
        # With standalone_mode=False click returns a typer.Exit code instead of raising it.
        code = app(standalone_mode=False)
    except BillingError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(1)
    except Exception as exc:
        # Usage errors arrive here with standalone_mode=False. Typer may bundle its own copy
        # of click, so they are recognised by shape rather than by class.
        show = getattr(exc, "show", None)
        if callable(show) and isinstance(getattr(exc, "exit_code", None), int):
            show()
            sys.exit(exc.exit_code)  # type: ignore[attr-defined]
        raise
    if isinstance(code, int) and code:
        sys.exit(code)
