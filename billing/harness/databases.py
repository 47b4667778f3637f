"""Fresh databases at the head migration, for one run only, and dropping them afterwards.

A run that creates its own PostgreSQL database (``<prefix>_<random>``) never meets another
run's rows, however many run at once on one server, and its ``pg_stat_database`` counters
are its own (the bench reads them). The schema comes from the migrations, exactly as
``billing db upgrade`` makes it, never from ``create_all``: what is tested is what ships.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import psycopg
from sqlalchemy.engine import make_url

from billing import migrate
from billing.db import dispose_all
from billing.harness.base import HarnessError

#: The server a run's database is created on unless told otherwise (trust auth on loopback).
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def plain_url(url: str) -> str:
    """``url`` as psycopg takes it (without SQLAlchemy's ``+psycopg`` driver suffix)."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _shown(url: str) -> str:
    """``url`` fit for an error message: a password in it is masked."""
    return make_url(url).render_as_string(hide_password=True)


def _new_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


@dataclass
class PostgresDatabase:
    """``<prefix>_<random>`` on the server of ``admin_url``; ``create()`` makes it."""

    admin_url: str = DEFAULT_ADMIN_URL
    prefix: str = "run"
    name: str = ""
    created: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.name = self.name or _new_name(self.prefix)

    @property
    def url(self) -> str:
        return f"{self.admin_url.rsplit('/', 1)[0]}/{self.name}"

    def create(self) -> str:
        """Create the database, bring it to the head revision and return its URL.

        The engines the migration used are disposed of: a closed connection has flushed its
        statistics counters, so whoever reads them next starts from a clean baseline.
        """
        try:
            with psycopg.connect(self.admin_url, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{self.name}"')
        except psycopg.Error as exc:
            raise HarnessError(
                f"cannot create database {self.name} via {_shown(self.admin_url)}: {exc}"
            ) from None
        self.created = True
        migrate.upgrade(self.url)
        dispose_all()
        return self.url

    def drop(self) -> None:
        """Drop the database, whoever is still connected (``WITH (FORCE)``)."""
        dispose_all()
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        self.created = False

    def __enter__(self) -> PostgresDatabase:
        try:
            self.create()
        except BaseException:
            if self.created:  # the migration failed: leave nothing behind
                self.drop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.created:
            self.drop()


def sqlite_database(path: Path) -> str:
    """A SQLite file at ``path`` brought to the head revision; its URL."""
    url = f"sqlite:///{path}"
    migrate.upgrade(url)
    return url
