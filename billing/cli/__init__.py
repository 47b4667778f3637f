"""The ``billing`` command. Each area of the product registers its commands from its own
module in this package, so a newcomer finds ``billing plans check`` in ``cli/plans.py``.

Errors the user can fix (``BillingError``) end in one red line on stderr and the error's
exit status (2 for bad input), never a traceback. Values are read by ``billing.cli.params``,
one strict reader per kind of value, before a command touches anything.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape
from sqlalchemy.exc import DBAPIError

from billing.durations import printable
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
        users,
        web,
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
        users,
        web,
    ):
        module.register(app)


_register()


def _database_problem(exc: DBAPIError) -> str:
    """One line for a database error: the common cause named, the driver's first line else."""
    first = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
    if "no such table" in first or ("relation" in first and "does not exist" in first):
        return f"the database has no billing tables yet ({first}): run `billing db upgrade`"
    return f"database error: {first}"


def _printable_streams() -> None:
    """Let stdout and stderr write whatever a command echoes. A command-line byte that is not
    UTF-8 becomes a lone surrogate a path may echo; under a UTF-8 locale other than C.UTF-8,
    stdout refuses it ("strict"), and rich then keeps the line it could not write and fails
    every later print. Such a stream writes escapes instead; "surrogateescape" (the C locale)
    already writes the original byte back and is left alone."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if callable(reconfigure) and getattr(stream, "errors", None) == "strict":
            reconfigure(errors="backslashreplace")


def _say(problem: str) -> None:
    """The one error line: what is not printable in it (a control character, a surrogate, a
    line separator echoed from a value) is written as its escape."""
    err_console.print(f"[red]error:[/red] {escape(printable(problem))}", soft_wrap=True)


def main() -> None:
    """Console-script entry point."""
    from billing.logs import configure_logging
    from billing.settings import get_settings

    _printable_streams()
    try:
        configure_logging(get_settings())
        # With standalone_mode=False click returns a typer.Exit code instead of raising it.
        code = app(standalone_mode=False)
    except BillingError as exc:
        _say(str(exc))
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except DBAPIError as exc:
        _say(_database_problem(exc))
        sys.exit(1)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(1)
    except Exception as exc:
        # Usage errors arrive here with standalone_mode=False. Typer may bundle its own copy
        # of click, so they are recognised by shape rather than by class; they are said in
        # one line, like every other error.
        message = getattr(exc, "format_message", None)
        exit_code = getattr(exc, "exit_code", None)
        if callable(message) and isinstance(exit_code, int):
            _say(message())
            sys.exit(exit_code)
        raise
    if isinstance(code, int) and code:
        sys.exit(code)
