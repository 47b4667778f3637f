"""``billing db upgrade|downgrade|current``: schema migrations."""

from __future__ import annotations

import typer
from rich import print as rprint

from billing import migrate
from billing.settings import get_settings

db_app = typer.Typer(help="Database schema migrations (Alembic).", no_args_is_help=True)


@db_app.command()
def upgrade(revision: str = typer.Argument("head", help="Target revision.")) -> None:
    """Bring the database to REVISION (default: the newest)."""
    url = get_settings().database_url
    migrate.upgrade(url, revision)
    rprint(f"database at revision {migrate.current(url)}")


@db_app.command()
def downgrade(revision: str = typer.Argument(..., help="Target revision, or 'base'.")) -> None:
    """Take the database back to REVISION ('base' drops every table)."""
    url = get_settings().database_url
    migrate.downgrade(url, revision)
    rprint(f"database at revision {migrate.current(url) or 'base'}")


@db_app.command()
def current() -> None:
    """Print the database's revision."""
    rprint(migrate.current(get_settings().database_url) or "base (empty)")


def register(app: typer.Typer) -> None:
    app.add_typer(db_app, name="db")
