"""Ledger listings, exports and the money report, on PostgreSQL and SQLite."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy.orm import Session

from billing import ledger, reports
from billing.db import session_scope
from billing.errors import InvalidInput, NotFound
from billing.models import Charge, ChargeState, LedgerEntry
from tests.test_ops import add_charge, add_subscription

T0 = datetime(2025, 2, 1, tzinfo=UTC)


def book(
    session: Session, charge: Charge, outcome: str, amount: str, at: datetime, **extra: object
) -> LedgerEntry:
    entry_id = ledger.append(
        session,
        outcome=outcome,
        operation="duplicate",
        actor="test",
        charge=charge,
        amount=Decimal(amount),
        at=at,
        **extra,  # type: ignore[arg-type]
    )
    return session.get_one(LedgerEntry, entry_id)


def test_report_sums_to_the_cent(db_url: str) -> None:
    """Thirty 0.10 and thirty 0.20 make 9.00 exactly, where float sums drift."""
    with session_scope(db_url) as session:
        sub = add_subscription(session, "r-cents", next_period=0)
        small = add_charge(session, sub, state=ChargeState.APPROVED, amount="0.10", period=0)
        other = add_charge(session, sub, state=ChargeState.APPROVED, amount="0.20", period=1)
        for i in range(30):
            book(session, small, "approved", "0.10", T0 + timedelta(minutes=i))
            book(session, other, "resolved_approved", "0.20", T0 + timedelta(minutes=i))
        book(session, small, "validated", "29.90", T0 + timedelta(days=1))
        book(session, small, "refunded", "5.05", T0 + timedelta(days=2))
        book(session, small, "resolved_validated", "1.00", T0 + timedelta(days=2))
        book(session, small, "resolved_refunded", "0.50", T0 + timedelta(days=2))
        book(session, small, "authorized", "120.00", T0 + timedelta(days=3))
        book(session, small, "resolved_authorized", "0.01", T0 + timedelta(days=3))
        # Outside the period: not counted.
        book(session, small, "approved", "1000.00", T0 - timedelta(seconds=1))
        book(session, small, "approved", "1000.00", T0 + timedelta(days=28))
        # Moves no money, and says so: never counted.
        book(session, small, "retry_requested", "0.00", T0)

    with session_scope(db_url) as session:
        [line] = reports.report(session, since=T0, until=T0 + timedelta(days=28))
    assert (line.plan, line.currency) == ("monthly", "EUR")
    assert line.collected == Decimal("39.90")  # 3.00 + 6.00 + 29.90 + 1.00
    assert line.collected_count == 62
    assert line.authorized == Decimal("120.01")
    assert line.refunded == Decimal("5.55")
    assert line.as_dict()["collected"] == "39.90"
    assert all(isinstance(v, Decimal) for v in (line.collected, line.refunded, line.authorized))


def test_report_declined_dunning_and_unknown(db_url: str) -> None:
    with session_scope(db_url) as session:
        eur = add_subscription(session, "r-eur")
        declined = add_charge(session, eur, state=ChargeState.PENDING, declines=2, amount="29.90")
        book(session, declined, "declined", "0.00", T0 + timedelta(hours=1))
        book(session, declined, "declined", "0.00", T0 + timedelta(hours=2))
        usd = add_subscription(session, "r-usd", plan="weekly-all")
        add_charge(session, usd, state=ChargeState.UNKNOWN, amount="4.99")
        usd2 = add_subscription(session, "r-usd2", plan="weekly-all")
        add_charge(session, usd2, state=ChargeState.UNKNOWN, amount="4.99")
        usd3 = add_subscription(session, "r-usd3", plan="weekly-all")
        add_charge(session, usd3, state=ChargeState.PENDING, declines=0)  # first try: not dunning

    with session_scope(db_url) as session:
        lines = reports.report(session, since=T0, until=T0 + timedelta(days=1))
    by_plan = {line.plan: line for line in lines}
    assert set(by_plan) == {"monthly", "weekly-all"}
    monthly, weekly = by_plan["monthly"], by_plan["weekly-all"]
    assert (monthly.declined_count, monthly.declined_amount) == (2, Decimal("59.80"))
    assert monthly.in_dunning == 1
    assert monthly.collected == Decimal("0.00")
    assert (weekly.currency, weekly.unknown_count, weekly.unknown_amount) == (
        "USD",
        2,
        Decimal("9.98"),
    )
    assert weekly.in_dunning == 0


def test_report_refuses_an_empty_period(sqlite_url: str) -> None:
    with session_scope(sqlite_url) as session, pytest.raises(InvalidInput, match="empty"):
        reports.report(session, since=T0, until=T0)


def _ledger(url: str) -> list[int]:
    ids = []
    with session_scope(url) as session:
        a = add_subscription(session, "ref-a")
        b = add_subscription(session, "ref-b", plan="strict")
        ca = add_charge(session, a, state=ChargeState.APPROVED)
        cb = add_charge(session, b, state=ChargeState.FAILED)
        ids.append(book(session, ca, "approved", "29.90", T0, tx="TX1", code="00").id)
        ids.append(
            book(
                session,
                cb,
                "declined",
                "0.00",
                T0 + timedelta(days=1),
                code="05",
                details={"soft": False},
            ).id
        )
        ids.append(book(session, ca, "refunded", "10.00", T0 + timedelta(days=2)).id)
    return ids


def test_ledger_rows_filters(db_url: str) -> None:
    first, second, third = _ledger(db_url)
    with session_scope(db_url) as session:

        def ids(**filters: object) -> list[int]:
            return [e.id for e in reports.ledger_rows(session, **filters)]  # type: ignore[arg-type]

        assert ids() == [first, second, third]
        assert ids(subscription="ref-a") == [first, third]
        assert ids(plan="strict") == [second]
        assert ids(outcome="refunded") == [third]
        assert ids(since=T0 + timedelta(days=1)) == [second, third]
        assert ids(until=T0 + timedelta(days=1)) == [first]
        assert ids(last=2) == [second, third]
        assert ids(subscription="ref-a", last=1) == [third]
        assert reports.count_ledger_rows(session, subscription="ref-a") == 2
        with pytest.raises(NotFound, match='no subscription with reference "nope"'):
            reports.ledger_rows(session, subscription="nope")
        with pytest.raises(InvalidInput, match='outcome "aproved" is not one of'):
            reports.ledger_rows(session, outcome="aproved")


def test_export_csv_and_jsonl_parse_back(db_url: str) -> None:
    _ledger(db_url)
    with session_scope(db_url) as session:
        text = io.StringIO()
        assert reports.export(reports.ledger_rows(session), "csv", text) == 3
        lines = io.StringIO()
        seen: list[int] = []
        count = reports.export(reports.ledger_rows(session), "jsonl", lines, progress=seen.append)
    assert count == 3 and sum(seen) == 3

    rows = list(csv.DictReader(io.StringIO(text.getvalue())))
    assert list(rows[0]) == list(reports.COLUMNS)
    assert [r["amount"] for r in rows] == ["29.90", "0.00", "10.00"]
    assert [r["outcome"] for r in rows] == ["approved", "declined", "refunded"]
    assert datetime.fromisoformat(rows[1]["at"]) == T0 + timedelta(days=1)
    assert datetime.fromisoformat(rows[1]["at"]).utcoffset() == timedelta(0)
    assert json.loads(rows[1]["details"]) == {"soft": False}
    assert rows[0]["tx"] == "TX1" and rows[0]["alias_masked"] == "ab12…78"
    assert rows[2]["tx"] == ""

    parsed = [json.loads(line) for line in lines.getvalue().splitlines()]
    assert [p["amount"] for p in parsed] == ["29.90", "0.00", "10.00"]
    assert datetime.fromisoformat(parsed[0]["at"]) == T0
    assert parsed[1]["details"] == {"soft": False}
    assert parsed[0]["period"] == 1 and parsed[2]["tx"] is None


def test_export_refuses_an_unknown_format(sqlite_url: str) -> None:
    with pytest.raises(InvalidInput, match='"xml" is not one of: csv, jsonl'):
        reports.export([], "xml", io.StringIO())


def _exported_with(url: str, hostile: str) -> str:
    """The ledger's CSV with one row whose reference and message are ``hostile``."""
    with session_scope(url) as session:
        sub = add_subscription(session, hostile)
        charge = add_charge(session, sub, state=ChargeState.FAILED)
        book(session, charge, "declined", "0.00", T0, code="05", message=hostile)
        text = io.StringIO()
        reports.export(reports.ledger_rows(session), "csv", text)
    return text.getvalue()


@pytest.mark.parametrize("hostile", ['=HYPERLINK("http://x")', "+1+1", "-2+3", "@SUM(A1)", "\t=1"])
def test_a_cell_that_starts_like_a_formula_is_exported_as_text(
    sqlite_url: str, hostile: str
) -> None:
    """A gateway's message or a shop's reference is whatever they sent: a spreadsheet must
    show it, never run it. Amounts stay numbers (a refund's ``-10.00`` is not text)."""
    (row,) = csv.DictReader(io.StringIO(_exported_with(sqlite_url, hostile)))
    assert row["message"] == row["external_ref"]
    assert row["message"].startswith("'") and row["message"].replace("'", "") == hostile
    assert reports.spreadsheet_text("-10.00") == "-10.00"
    assert reports.spreadsheet_text("-") == "'-"


@pytest.mark.parametrize(
    ("cell", "safe"),
    [(" =1+1", "' =1+1"), ("\u00a0=1+1", "'\u00a0=1+1"), ("\u200b=1", "'\u200b=1"),
     ("\uff1d1+1", "'\uff1d1+1"), ("-\u0661\u0662", "'-\u0661\u0662"),
     ("x;=cmd|' /C calc'!A0", "x;'=cmd|' /C calc'!A0"), ("a, +1", "a,' +1"),
     ("x\n=cmd", "x\n'=cmd"), ("ok;fine", "ok;fine"), ("-10.00", "-10.00"),
     ("{\"soft\": false}", "{\"soft\": false}")],
)  # fmt: skip
def test_no_part_of_a_cell_runs_however_a_spreadsheet_trims_or_splits_it(
    cell: str, safe: str
) -> None:
    assert reports.spreadsheet_text(cell) == safe


def test_a_cell_split_at_a_semicolon_holds_no_formula(sqlite_url: str) -> None:
    """French Excel opens a .csv split at ``;``: every part must be text there too."""
    hostile = "x;=1+1;@SUM(A1);-2+3"
    for row in csv.reader(io.StringIO(_exported_with(sqlite_url, hostile)), delimiter=";"):
        for cell in row:
            assert not cell.lstrip('"').startswith(("=", "+", "-", "@")), (cell, row)
