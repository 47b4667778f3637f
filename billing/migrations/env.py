"""Alembic environment: runs against the URL the caller puts in the config."""

from __future__ import annotations

from alembic import context
from sqlalchemy import pool

from billing.db import get_engine, is_sqlite
from billing.models import Base

config = context.config
url = config.get_main_option("sqlalchemy.url") or ""

connection = config.attributes.get("connection")


def run(connection_: object) -> None:
    context.configure(
        connection=connection_,  # type: ignore[arg-type]
        target_metadata=Base.metadata,
        render_as_batch=is_sqlite(url),  # SQLite alters tables by copying them
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if connection is not None:
    run(connection)
else:
    engine = get_engine(url)
    with engine.connect() as conn:
        run(conn)
        conn.commit()
    del pool
