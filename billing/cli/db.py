"""``billing db upgrade|downgrade|current``: schema migrations."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated

import typer
from alembic.script.revision import RevisionError
from alembic.util.exc import CommandError
from rich import print as rprint

from billing import migrate
from billing.cli import params
from billing.durations import quote
from billing.errors import InvalidInput
from billing.settings import get_settings

db_app = typer.Typer(help="Database schema migrations (Alembic).", no_args_is_help=True)


#: What alembic reads as a revision: an ID or head/heads/base, maybe on a branch ("ID@head"),
#: maybe relative ("head-1", "+2"). Anything else makes alembic assert, not explain.
_REVISION = re.compile(r"(?:[0-9A-Za-z_]+@)?[0-9A-Za-z_]+(?:[+-][0-9]+)?|[+-][0-9]+")


def _migrate(step: Callable[[str, str], None], url: str, revision: str) -> None:
    """Run ``step``; a revision alembic cannot find or use is one line, not a traceback."""
    if not _REVISION.fullmatch(revision):
        raise InvalidInput(
            f"revision {quote(revision)} is not a revision (an ID, head, base, or head-1)"
        )
    try:
        step(url, revision)
    except (CommandError, RevisionError) as exc:
        raise InvalidInput(f"revision {quote(revision)}: {exc}") from None
    except AssertionError:
        # alembic 1.20 asserts while planning a relative step past either end ("head+1",
        # "base-1"), before any migration runs (ours hold no assert).
        raise InvalidInput(
            f"revision {quote(revision)}: steps past the first or the last revision"
        ) from None


@db_app.command()
def upgrade(
    revision: Annotated[
        str, params.argument("revision", params.TEXT, help="Target revision.")
    ] = "head",
) -> None:
    """Bring the database to REVISION (default: the newest)."""
    url = get_settings().database_url
    _migrate(migrate.upgrade, url, revision)
    rprint(f"database at revision {migrate.current(url)}")


@db_app.command()
def downgrade(
    revision: Annotated[
        str, params.argument("revision", params.TEXT, help="Target revision, or 'base'.")
    ],
) -> None:
    """Take the database back to REVISION ('base' drops every table)."""
    url = get_settings().database_url
    _migrate(migrate.downgrade, url, revision)
    rprint(f"database at revision {migrate.current(url) or 'base'}")


@db_app.command()
def current() -> None:
    """Print the database's revision."""
    rprint(migrate.current(get_settings().database_url) or "base (empty)")


def register(app: typer.Typer) -> None:
    app.add_typer(db_app, name="db")
