"""The one-statement claim and approval (``billing.charging.hotpath``) write exactly what the
general path writes, in every case hypothesis can put together (issue 15).

Each example plays one scenario twice on PostgreSQL from an empty database, once with the
hot path and once without, and compares every row of charges, attempts, ledger, events,
deliveries and subscriptions (times as minutes from the scenario's clock, event IDs by
their order). The scenarios mix what the hot path must notice and hand over to the
general path: a deferred plan, an amount other than asked (or unreadable), a TX another
charge holds, an earlier late approval on the charge, a first attempt declined (the
subscription past due), webhook endpoints with filters, and a person or the sweep acting
between the claim and the answer (pause, a new card, a new price, the stuck sweep, a
resolve that makes the answer late).

Both hot statements run as driver SQL (``billing.charging.driversql``): their parameters
are converted and the claim's row is read without SQLAlchemy's result machinery, so the
scenarios also carry what a conversion could get wrong (a non-ASCII reference, e-mail and
gateway message, which land in the JSON payload, the ledger's JSON details and text
columns; an amount override with cents; absent optional values), the JSON columns are
compared as the text PostgreSQL keeps (a ``json`` column keeps it verbatim), and the claim
each path returns is compared value by value with its type and time zone.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from sqlalchemy import event, text

from billing import changes, ops, subscriptions
from billing.charging.calls import Claim
from billing.db import get_engine, session_scope
from billing.events import clear_endpoint_cache
from billing.models import ChargeState, WebhookEndpointRecord, utcnow
from billing.outcomes import Approved, Declined
from tests.fixtures.db import truncate_all

TABLES = {
    "subscriptions": "id",
    "charges": "id",
    "attempts": "id",
    "ledger": "id",
    "events": "id",
    "event_deliveries": "event_id, endpoint",
}
#: JSON columns, also compared as the text PostgreSQL keeps (``json`` keeps it verbatim).
AS_TEXT = {"ledger": "details", "events": "payload"}
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_ISO = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:[+-]\d\d:\d\d|Z)?")

BETWEEN = ("nothing", "pause", "new_card", "new_price", "stuck", "stuck_then_resolved")


@dataclass(frozen=True)
class Scenario:
    plan: str
    amount: str  # "asked", "other", "unreadable", "absent"
    tx_reused: bool
    late_flag: bool
    declined_first: bool
    endpoints: tuple[tuple[str, ...], ...]
    between: str
    #: The subscription's reference (in the event's payload and the ledger row).
    ref: str = "shop-1"
    email: str | None = None
    amount_override: str | None = None
    #: What the gateway said with the approval (the charge's and the ledger's message).
    message: str = ""


scenarios = st.builds(
    Scenario,
    plan=st.sampled_from(["monthly", "deferred"]),
    amount=st.sampled_from(["asked", "asked", "other", "unreadable", "unreadable_euro", "absent"]),
    tx_reused=st.booleans(),
    late_flag=st.booleans(),
    declined_first=st.booleans(),
    endpoints=st.lists(
        st.sampled_from([(), ("charge.*",), ("subscription.*",), ("charge.approved",)]),
        max_size=2,
    ).map(tuple),
    between=st.sampled_from(BETWEEN),
    ref=st.sampled_from(["shop-1", "boutique-é-東京"]),
    email=st.sampled_from([None, "zoé@exemple.fr"]),
    amount_override=st.sampled_from([None, "1234.56"]),
    message=st.sampled_from(["", 'Paiement accepté ✓ "ok"']),
)


class Statements:
    """Counts the statements sent to the database while it is on."""

    def __init__(self, url: str) -> None:
        self.count = 0
        self.on = False
        event.listen(get_engine(url), "before_cursor_execute", self._seen)

    def _seen(self, *args: Any) -> None:
        if self.on:
            self.count += 1


def _approval(scenario: Scenario, asked: Decimal, tx: str) -> Approved:
    said = scenario.message
    match scenario.amount:
        case "asked":
            return Approved(tx=tx, amount=asked, amount_text=f"{asked:.2f}", message=said)
        case "other":
            return Approved(tx=tx, amount=asked + 1, amount_text=f"{asked + 1:.2f}", message=said)
        case "unreadable":
            return Approved(tx=tx, amount=None, amount_text="1E+30", message=said)
        case "unreadable_euro":
            return Approved(tx=tx, amount=None, amount_text="12,00 €", message=said)
    return Approved(tx=tx, message=said)


def _play(
    h: Any, url: str, aliases: list[str], scenario: Scenario, clock: datetime
) -> tuple[int, Claim]:
    """The scenario on an empty database; the statements the final record sent, and the
    claim it recorded."""
    with session_scope(url) as session:
        for number, filters in enumerate(scenario.endpoints):
            session.add(
                WebhookEndpointRecord(
                    name=f"shop-{number}", url="https://shop.example/hook",
                    events=list(filters), first_seen_at=clock - timedelta(days=1),
                )
            )  # fmt: skip
    clear_endpoint_cache()
    due = clock - timedelta(minutes=1)
    if scenario.tx_reused:  # another subscription's charge holds the TX the answer names
        h.subscribe("other", aliases[1], plan="strict", next_charge_at=due)
        h.engine.sweep_plan("strict", now=clock)
        (other,) = h.take_sent()
        h.engine.calls.record(
            _claimed(h, other, clock), Approved(tx="71000001", amount=Decimal("9.99")), now=clock
        )
    extra: dict[str, Any] = {"email": scenario.email}
    if scenario.amount_override is not None:
        extra["amount_override"] = Decimal(scenario.amount_override)
    h.subscribe(scenario.ref, aliases[0], plan=scenario.plan, next_charge_at=due, **extra)
    h.engine.sweep_plan(scenario.plan, now=clock)
    (charge_id,) = h.take_sent()
    if scenario.late_flag:
        with get_engine(url).begin() as conn:
            conn.execute(text("UPDATE charges SET review = 'late_approval' WHERE id = :id"),
                         {"id": charge_id})  # fmt: skip
    claim = _claimed(h, charge_id, clock)
    if scenario.declined_first:
        soft = Declined(code="51", message="insufficient funds", soft=True)
        h.engine.calls.record(claim, soft, now=clock)
        later = clock + timedelta(hours=1)
        h.engine.dispatch_due(later)
        h.take_sent()
        claim = _claimed(h, charge_id, later)
    at = claim.charge.claimed_at or clock
    _between(h, url, scenario.ref, scenario.between, charge_id, aliases[2], at)
    tx = "71000001" if scenario.tx_reused else "71000002"
    statements = Statements(url)
    statements.on = True
    h.engine.calls.record(claim, _approval(scenario, claim.charge.amount, tx), now=at)
    statements.on = False
    return statements.count, claim


def _claimed(h: Any, charge_id: int, now: datetime) -> Claim:
    claim = h.engine.calls.claim(charge_id, now)
    assert isinstance(claim, Claim), claim
    return claim


def _between(
    h: Any, url: str, ref: str, what: str, charge_id: int, alias: str, now: datetime
) -> None:
    with session_scope(url) as session:
        match what:
            case "pause":
                subscriptions.pause(session, ref, now=now, by="alice")
            case "new_card":
                changes.update_subscription(
                    session, h.plans, ref, by="alice", reason="new card", alias=alias,
                    now=now,
                )  # fmt: skip
            case "new_price":
                changes.update_subscription(
                    session, h.plans, ref, by="alice", reason="price", amount="31.00",
                    now=now,
                )  # fmt: skip
    if what.startswith("stuck"):
        assert h.engine.mark_stuck(now + timedelta(hours=1)) == 1
    if what == "stuck_then_resolved":
        with session_scope(url) as session:
            ops.resolve(
                session, charge_id, approved=True, tx="71000009", by="alice", reason="found",
                plans=h.plans, now=now,
            )  # fmt: skip


def _snapshot(url: str, clock: datetime) -> dict[str, list[dict[str, Any]]]:
    """Every row of the tables the record writes, with times and event IDs made
    comparable between two runs."""
    events: dict[str, str] = {}

    def plain(value: Any) -> Any:
        if isinstance(value, datetime):
            return f"t{round((value - clock).total_seconds() / 600)}"
        if isinstance(value, uuid.UUID):
            value = str(value)
        if isinstance(value, dict | list):
            value = json.dumps(value, sort_keys=True, default=str)
        if isinstance(value, str):
            value = _UUID.sub(lambda m: events.setdefault(m[0], f"event-{len(events)}"), value)
            value = _ISO.sub(lambda m: plain(datetime.fromisoformat(m[0])), value)
        return value

    def query(table: str, order: str) -> str:
        column = AS_TEXT.get(table)
        extra = f", {column}::text AS {column}_text" if column else ""
        return f"SELECT *{extra} FROM {table} ORDER BY {order}"

    with get_engine(url).connect() as conn:
        return {
            table: [
                {key: plain(value) for key, value in row._mapping.items()}
                for row in conn.execute(text(query(table, order)))
            ]
            for table, order in TABLES.items()
        }


def _typed(claim: Claim, clock: datetime) -> list[tuple[str, str]]:
    """The claim's charge and subscription, each value with its type (its ``repr``; a time
    with its zone, as minutes from the scenario's clock), and its attempt."""

    def shown(value: Any) -> str:
        if isinstance(value, datetime):
            return f"{value.tzinfo!r} t{round((value - clock).total_seconds() / 600)}"
        return repr(value)

    rows = (("charge", claim.charge), ("subscription", claim.subscription))
    return [
        (f"{what}.{field.name}", shown(getattr(row, field.name)))
        for what, row in rows
        for field in dataclasses.fields(row)
    ] + [("attempt", repr(claim.attempt_id))]


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(scenario=scenarios)
def test_the_hot_path_writes_what_the_general_path_writes(
    pg_url: str, gateway: Any, make_harness: Any, scenario: Scenario
) -> None:
    # An earlier late approval ends the ladder: a declined charge is not tried again.
    # An earlier late approval ends the ladder, and the deferred plan has none: a declined
    # charge is not tried again.
    assume(not scenario.declined_first or (scenario.plan, scenario.late_flag) == ("monthly", False))
    aliases = gateway.seed_aliases("1234567", 3)
    clock = utcnow().replace(microsecond=0)
    runs = []
    for at_once in (True, False):
        truncate_all(pg_url)
        h = make_harness(pg_url)
        h.engine.calls.at_once = at_once
        statements, claim = _play(h, pg_url, aliases, scenario, clock)
        runs.append((statements, _typed(claim, clock), _snapshot(pg_url, clock)))
    (fast, hot_claim, hot), (_, general_claim, general) = runs
    assert hot_claim == general_claim
    for table in TABLES:
        assert hot[table] == general[table], table
    # The common case really took the one-statement record (the general one takes ~10).
    common = (
        scenario.between in ("nothing", "stuck")
        and not scenario.declined_first
        and scenario.amount != "unreadable"
    )
    if common:
        assert fast <= 2, fast


def test_sqlite_always_takes_the_general_path(sqlite_url: str, make_harness: Any) -> None:
    assert make_harness(sqlite_url).engine.calls.at_once is False


@pytest.mark.parametrize("plan", ["monthly", "deferred"])
def test_the_approval_locks_the_charge_before_the_subscription(
    pg_url: str, gateway: Any, make_harness: Any, plan: str
) -> None:
    """The lock order of everywhere (charge, then subscription): the subscription's update
    is filtered by a one-time check over the charge's move (an InitPlan), so the charge row
    is locked first and two records never wait on each other the other way round."""
    seen: list[tuple[str, Any]] = []

    def keep(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        if statement.startswith("WITH moved AS"):
            seen.append((statement, parameters))

    event.listen(get_engine(pg_url), "before_cursor_execute", keep)
    try:
        scenario = Scenario(plan, "asked", False, False, False, (), "nothing")
        h = make_harness(pg_url)
        _play(h, pg_url, gateway.seed_aliases("1234567", 3), scenario, utcnow())
    finally:
        event.remove(get_engine(pg_url), "before_cursor_execute", keep)
    ((statement, parameters),) = seen
    with get_engine(pg_url).connect() as conn:
        explained = conn.exec_driver_sql("EXPLAIN " + statement, parameters)
        plan_text = "\n".join(row[0] for row in explained)
    advanced = plan_text.split("CTE advanced", 1)[1].split("CTE written", 1)[0]
    assert "InitPlan" in advanced and "One-Time Filter" in advanced, plan_text


# --- a person's change that held the charge's lock while the claim waited -------------


def _wait_until_a_statement_waits_on_a_lock(url: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    with get_engine(url).connect() as conn:
        while time.monotonic() < deadline:
            waiting = conn.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
            ).scalar_one()
            conn.commit()
            if waiting:
                return
            time.sleep(0.05)
    raise AssertionError("the claim never waited on the lock")


def _claim_behind(h: Any, url: str, charge_id: int, change: Any) -> Any:
    """The claim of ``charge_id`` started while ``change`` holds the charge's lock (every
    change of a subscription locks its open charges first), going on once it commits."""
    out: dict[str, Any] = {}
    with session_scope(url) as session:
        change(session)
        worker = threading.Thread(
            target=lambda: out.setdefault("claim", h.engine.calls.claim(charge_id)),
            name="claimer",
        )
        worker.start()
        _wait_until_a_statement_waits_on_a_lock(url)
    worker.join(20)
    assert not worker.is_alive()
    return out["claim"]


@pytest.mark.parametrize("at_once", [True, False])
def test_a_pause_committed_while_the_claim_waited_sends_nothing(
    pg_url: str, gateway: Any, make_harness: Any, at_once: bool
) -> None:
    """Found by the attack review: the one-statement claim judged the subscription as its
    snapshot had it (active), charged the card, and the approval was booked for a paused
    subscription."""
    h = make_harness(pg_url)
    h.engine.calls.at_once = at_once
    (alias,) = gateway.seed_aliases("1234567", 1)
    sub_id = h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    (charge_id,) = h.take_sent()

    claimed = _claim_behind(
        h, pg_url, charge_id, lambda s: subscriptions.pause(s, "shop-1", by="alice")
    )
    assert h.sub(sub_id).status == "paused"
    assert not isinstance(claimed, Claim), claimed
    assert h.charge(sub_id).state == ChargeState.PENDING
    assert h.engine.charge(charge_id).status != "done"
    assert gateway.calls(alias=alias, script="duplicate") == []


@pytest.mark.parametrize("at_once", [True, False])
def test_a_new_card_committed_while_the_claim_waited_is_the_card_charged(
    pg_url: str, gateway: Any, make_harness: Any, at_once: bool
) -> None:
    h = make_harness(pg_url)
    h.engine.calls.at_once = at_once
    old, new = gateway.seed_aliases("1234567", 2)
    h.subscribe("shop-1", old)
    h.engine.sweep_plan("monthly")
    (charge_id,) = h.take_sent()

    claimed = _claim_behind(
        h, pg_url, charge_id,
        lambda s: changes.update_subscription(
            s, h.plans, "shop-1", by="alice", reason="new card", alias=new
        ),
    )  # fmt: skip
    assert isinstance(claimed, Claim), claimed
    assert claimed.subscription.alias == new


def test_psycopg_keeps_the_hot_statements_parsed(pg_url: str, gateway: Any, make_harness: Any):
    """psycopg parses a query into PostgreSQL's ``$n`` form once and keeps it, if the query
    is within its limits of length and parameters; the approval is beyond its defaults
    (4,096 characters, 50 parameters), so ``billing.db`` raises them."""
    from psycopg import _queries

    seen: list[tuple[str, int]] = []

    def keep(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        if statement.startswith(("WITH locked", "WITH moved")):
            seen.append((statement, len(parameters)))

    event.listen(get_engine(pg_url), "before_cursor_execute", keep)
    try:
        scenario = Scenario("deferred", "other", False, False, False, (), "nothing")
        _play(make_harness(pg_url), pg_url, gateway.seed_aliases("1234567", 3), scenario, utcnow())
    finally:
        event.remove(get_engine(pg_url), "before_cursor_execute", keep)
    assert len(seen) == 2
    assert max(len(statement) for statement, _ in seen) > 4096
    assert max(count for _, count in seen) > 50
    for statement, count in seen:  # the test psycopg applies before it caches a query
        assert len(statement) <= _queries.MAX_CACHED_STATEMENT_LENGTH
        assert count <= _queries.MAX_CACHED_STATEMENT_PARAMS


# --- driver SQL: the same text and values as SQLAlchemy sends ---------------------------


def _sample(bind_type: Any) -> Any:
    """A value of the parameter's type that a conversion could get wrong."""
    from sqlalchemy import JSON, DateTime, Integer, Numeric, String
    from sqlalchemy.dialects.postgresql import ARRAY

    if isinstance(bind_type, ARRAY):
        return ["é", "b"]
    if isinstance(bind_type, JSON):
        return {"ref": "boutique-é-東京", "amount": "12.30", "none": None}
    if isinstance(bind_type, DateTime) or getattr(bind_type, "impl", None).__class__ is DateTime:
        return datetime(2026, 1, 31, 23, 30, tzinfo=UTC_PLUS_2)
    if isinstance(bind_type, Numeric):
        return Decimal("1234.50")
    if isinstance(bind_type, String):
        return "zoé"
    if isinstance(bind_type, Integer):
        return 999_999
    return 999_999  # untyped: an ID


UTC_PLUS_2 = timezone(timedelta(hours=2))


def _sent(url: str, run: Any) -> list[tuple[str, dict[str, Any]]]:
    """What ``run(conn)`` sent to the driver (statement, parameters; a ``Json`` as what
    makes its bytes: its value and its ``dumps``), in a transaction rolled back."""
    from psycopg.types.json import Json

    seen: list[tuple[str, dict[str, Any]]] = []

    def keep(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        shown = {
            name: (type(value), value.obj, value.dumps) if isinstance(value, Json) else value
            for name, value in parameters.items()
        }
        seen.append((statement, shown))

    engine = get_engine(url)
    event.listen(engine, "before_cursor_execute", keep)
    try:
        with engine.connect() as conn, conn.begin() as transaction:
            run(conn)
            transaction.rollback()
    finally:
        event.remove(engine, "before_cursor_execute", keep)
    return seen


@pytest.mark.parametrize(
    "which", ["claim", "approve", "approve_deferred", "approve_mismatch", "approve_both"]
)
def test_the_driver_gets_the_text_and_values_sqlalchemy_gives_it(pg_url: str, which: str):
    from billing.charging import driversql, hotpath

    if which == "claim":
        statement = hotpath.claim_statement()
    else:
        statement = hotpath.approve_statement(
            which in ("approve_deferred", "approve_both"),
            which in ("approve_mismatch", "approve_both"),
        )
    compiled = statement.compile(dialect=get_engine(pg_url).dialect)
    values = {
        name: None if name.endswith(("_code", "_message", "_reason")) else _sample(bind.type)
        for bind, name in compiled.bind_names.items()
        if bind.required
    }

    by_sqlalchemy = _sent(pg_url, lambda conn: conn.execute(statement, values).all())
    as_driver_sql = _sent(
        pg_url,
        lambda conn: driversql.DriverStatement(statement, conn.dialect).first(conn, values),
    )
    assert as_driver_sql == by_sqlalchemy
    assert len(by_sqlalchemy) == 1


def test_a_failed_driver_statement_is_sqlalchemys_error_and_the_next_one_runs(pg_url: str):
    """A driver error comes out as SQLAlchemy's (what the callers' retry branches read),
    and the kept cursor, which SQLAlchemy closes on an error, is made again."""
    from sqlalchemy import literal_column, select
    from sqlalchemy.exc import DBAPIError

    from billing.charging import driversql

    failing = driversql.DriverStatement(select(literal_column("1 / 0")), get_engine(pg_url).dialect)
    fine = driversql.DriverStatement(select(literal_column("2")), get_engine(pg_url).dialect)
    with get_engine(pg_url).connect() as conn:
        assert fine.first(conn, {}) == (2,)
        kept = conn.connection.info[driversql._CURSOR]
        assert fine.first(conn, {}) == (2,)
        assert conn.connection.info[driversql._CURSOR] is kept
        with pytest.raises(DBAPIError, match="division by zero") as raised:
            failing.first(conn, {})
        assert not raised.value.connection_invalidated
        conn.rollback()
        assert fine.first(conn, {}) == (2,)
        assert conn.connection.info[driversql._CURSOR] is not kept


def test_a_statement_sqlalchemy_rewrites_at_each_run_is_refused(pg_url: str):
    from sqlalchemy import bindparam, select

    from billing.charging import driversql
    from billing.models import Charge

    expanding = select(Charge.id).where(Charge.id.in_(bindparam("ids", expanding=True)))
    with pytest.raises(ValueError, match="rewritten"):
        driversql.DriverStatement(expanding, get_engine(pg_url).dialect)


def test_a_driver_write_on_a_connection_with_no_transaction_begun_is_committed(pg_url: str):
    """``_cursor_execute`` alone skips SQLAlchemy's autobegin: psycopg opened a transaction
    SQLAlchemy did not know, ``commit()`` did nothing and the pool rolled the write back — a
    claim that seems made while its charge stays queued for another worker (review
    finding; no caller does so today)."""
    from sqlalchemy import Column, Integer, MetaData, Table, insert, select

    from billing.charging import driversql

    table = Table(f"t_{uuid.uuid4().hex[:8]}", MetaData(), Column("n", Integer))
    engine = get_engine(pg_url)
    with engine.begin() as conn:
        table.create(conn)
    written = insert(table).values(n=7).returning(table.c.n).cte("written")
    write = driversql.DriverStatement(select(written.c.n), engine.dialect)
    with engine.connect() as conn:
        assert write.first(conn, {}) == (7,)
        assert conn.in_transaction()
        conn.commit()
    with engine.connect() as conn:
        assert conn.execute(select(table.c.n)).scalars().all() == [7]
        table.drop(conn)
        conn.commit()
