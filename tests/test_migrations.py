"""Migrations run up and down on both databases; the ledger refuses updates on PostgreSQL."""

from __future__ import annotations

from decimal import Decimal

import pytest
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import DBAPIError

from billing import migrate
from billing.db import get_engine


def test_upgrade_downgrade_upgrade(db_url: str) -> None:
    assert migrate.current(db_url) is not None
    migrate.downgrade(db_url, "base")
    assert migrate.current(db_url) is None
    assert "charges" not in inspect(get_engine(db_url)).get_table_names()
    migrate.upgrade(db_url)
    tables = set(inspect(get_engine(db_url)).get_table_names())
    assert {"subscriptions", "charges", "attempts", "ledger", "plan_versions"} <= tables


def test_postgres_trigger_refuses_ledger_update_and_delete(pg_url: str) -> None:
    engine = get_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO ledger (at, outcome, operation, amount, currency, merchant_id, actor)"
                " VALUES (now(), 'approved', 'duplicate', 29.90, 'EUR', '1234567', 'test')"
            )
        )
    for statement in ("UPDATE ledger SET amount = 0", "DELETE FROM ledger"):
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(text(statement))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT amount FROM ledger")).scalar_one() == Decimal("29.90")


def test_the_orm_refuses_to_update_or_delete_a_ledger_row(db_url: str) -> None:
    """The application-level guard, for SQLite too (which has no trigger)."""
    from billing import ledger
    from billing.db import session_scope
    from billing.errors import StateError
    from billing.models import LedgerEntry

    with session_scope(db_url) as session:
        ledger.append(
            session, outcome="approved", operation="duplicate", actor="test",
            amount=Decimal("29.90"), currency="EUR", merchant_id="1234567",
        )  # fmt: skip
    with pytest.raises(StateError, match="append-only"), session_scope(db_url) as session:
        session.scalars(select(LedgerEntry)).one().amount = Decimal("0.00")
    with pytest.raises(StateError, match="append-only"), session_scope(db_url) as session:
        session.delete(session.scalars(select(LedgerEntry)).one())
    with session_scope(db_url) as session:
        assert session.scalars(select(LedgerEntry.amount)).one() == Decimal("29.90")
