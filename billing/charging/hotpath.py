"""A charge's common path on PostgreSQL in one statement each: the claim, and an approval
that comes in time.

Why a second path beside ``billing.charging.calls``: there every write is its own
statement (the move, the subscription, the ledger row, the event, its deliveries), ten
round trips for one charge, each built anew. Here the claim is one statement (the move,
the checks that the charge may go out, the attempt row) and recording an approval is one
statement (the attempt, the move, the subscription's next period, the ledger row, the
event and its deliveries), each built once per process and run with new values.

Both are **shortcuts, never the definition**. Each is written for the common case only,
with its guards in SQL; when a guard does not hold (a paused subscription, a velocity
hold, an answer that is late, a subscription changed since the claim read it) the claim
writes nothing and the record's transaction is rolled back, and the caller takes the
general path, which handles every case. ``tests/test_hotpath.py`` checks that both paths
write the same rows.

The moves are the lifecycle's (their sources read from ``lifecycle.TRANSITIONS``, the
flags from its helpers), the rows are ``billing.ledger.row`` and ``billing.events.event_row``,
and the lock order is the one of everywhere: the charge first (its move), then the
subscription (its update waits for the move: ``EXISTS`` over the move's result, a one-time
filter PostgreSQL evaluates before it scans).

Both run as driver SQL (``billing.charging.driversql``): compiled by SQLAlchemy once per
process into the text it would send, run on the caller's connection and in its transaction
with each parameter converted as SQLAlchemy converts it, and the claim's row read by
position into ``ChargeRow`` and ``SubRow``, without SQLAlchemy's execution context and
result metadata, which cost more CPU than the rest of the two statements' work here.

SQLite has no data-modifying ``WITH``: it always takes the general path.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    Connection,
    DateTime,
    Select,
    String,
    Table,
    any_,
    bindparam,
    case,
    exists,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY

from billing import ledger, widths
from billing.charging import driversql, lifecycle
from billing.charging.rows import CHARGE_COLUMNS, CHARGE_FIELDS, SUB_FIELDS, ChargeRow, SubRow
from billing.events import data_of_charge, event_row
from billing.models import (
    Attempt,
    Charge,
    Event,
    EventDelivery,
    EventStatus,
    LedgerEntry,
    Subscription,
)
from billing.vocabulary import (
    CHARGEABLE,
    ChargeState,
    EventType,
    Operation,
    Review,
    SubscriptionStatus,
)

C = cast(Table, Charge.__table__)
S = cast(Table, Subscription.__table__)
A = cast(Table, Attempt.__table__)
L = cast(Table, LedgerEntry.__table__)
E = cast(Table, Event.__table__)
D = cast(Table, EventDelivery.__table__)

#: What a constant written into a statement may look like (``_one_of``).
_CONSTANT = re.compile(r"[a-z_]+")
#: The columns of a subscription returned beside a charge's, under this prefix.
SUB_PREFIX = "s_"
_TIME = DateTime(timezone=True)


def _one_of(column: Any, values: Sequence[str]) -> Any:
    """``column IN ('a', 'b')`` with the values written into the statement: they are our
    own constants (states, statuses). ``column.in_(a_list)`` would be an expanding
    parameter, which makes SQLAlchemy rewrite the whole statement's text at every run
    (its post-compile step); a bound array would be inspected by psycopg at every run."""
    for value in values:
        if not _CONSTANT.fullmatch(value):
            raise ValueError(f"not a constant that may be written into SQL: {value!r}")
    return column.in_([literal_column(f"'{value}'", String) for value in values])


def _values(names: Sequence[str], table: Any, prefix: str) -> list[Any]:
    """One typed parameter per column: ``prefix`` + name, typed as the column."""
    return [bindparam(prefix + name, type_=table.c[name].type) for name in names]


# --- the claim ----------------------------------------------------------------------


@dataclass(frozen=True)
class Claimed:
    """The charge after its claim, its subscription as the claim read it, its attempt."""

    charge: ChargeRow
    subscription: SubRow
    attempt_id: int


@functools.cache
def claim_statement() -> Select[Any]:
    """``queued -> in_flight`` for a charge that may go out, and its attempt row.

    May go out: its subscription is chargeable, the velocity guard lets it (a manual
    charge is exempt), its plan and its currency's account are in the plans file.

    The charge is locked first (``locked``), then its subscription is read ``FOR KEY
    SHARE`` (``sub``): a locking read returns the row's latest committed version, not the
    statement's snapshot, so a pause or a new card that held the charge's lock while this
    statement waited for it (every change of a subscription locks its open charges first)
    is what the guards and the call see. A plain join would judge the subscription as it
    was when the statement began.
    """
    claim = lifecycle.TRANSITIONS["claim"]
    sources = [state.value for state in claim.sources]
    locked = (
        select(C.c.id, C.c.subscription_id)
        .where(C.c.id == bindparam("p_charge_id"), _one_of(C.c.state, sources))
        .with_for_update()
        .cte("locked")
    )
    sub = (
        select(S)
        .where(S.c.id == select(locked.c.subscription_id).scalar_subquery())
        .with_for_update(read=True, key_share=True)
        .cte("sub")
    )
    moved = (
        update(C)
        .where(
            C.c.id == select(locked.c.id).scalar_subquery(),
            _one_of(C.c.state, sources),
            sub.c.id == C.c.subscription_id,
            _one_of(sub.c.status, [status.value for status in CHARGEABLE]),
            or_(
                C.c.manual,
                sub.c.last_charged_at.is_(None),
                sub.c.last_charged_at <= bindparam("p_gap_start", type_=_TIME),
            ),
            # ``= ANY(array)``, not an expanding ``IN``: see ``_one_of``.
            C.c.plan == any_(bindparam("p_plans", type_=ARRAY(String))),
            C.c.currency == any_(bindparam("p_currencies", type_=ARRAY(String))),
        )
        .values(
            state=claim.targets[0].value,
            claimed_at=bindparam("p_now", type_=_TIME),
            attempts=C.c.attempts + 1,
            updated_at=bindparam("p_now", type_=_TIME),
        )
        .returning(*CHARGE_COLUMNS, *(sub.c[name].label(SUB_PREFIX + name) for name in SUB_FIELDS))
        .cte("claimed")
    )
    attempt = (
        insert(A)
        .from_select(
            ["charge_id", "number", "operation", "amount", "worker", "started_at"],
            select(
                moved.c.id,
                moved.c.attempts,
                literal(Operation.DUPLICATE.value, String),
                moved.c.amount,
                bindparam("p_worker", type_=String),
                bindparam("p_now", type_=_TIME),
            ),
        )
        .returning(A.c.id)
        .cte("attempt")
    )
    statement = select(moved, attempt.c.id.label("attempt_id")).select_from(
        moved.join(attempt, true())
    )
    returned = tuple(column.key for column in statement.selected_columns)
    if returned != _CLAIM_COLUMNS:  # ``claim`` reads the row by position
        raise ValueError(f"the claim returns {returned}, not {_CLAIM_COLUMNS}")
    return statement


def claim(
    conn: Connection,
    charge_id: int,
    *,
    now: datetime,
    gap_start: datetime,
    plans: Sequence[str],
    currencies: Sequence[str],
    worker: str,
) -> Claimed | None:
    """Claim the charge in one statement; ``None`` if it was not claimed (it is not queued,
    or must not go out: the general claim then says why, and holds it)."""
    if not plans or not currencies:
        return None
    row = driversql.compiled(conn.dialect, claim_statement).first(
        conn,
        {
            "p_charge_id": charge_id,
            "p_now": now,
            "p_gap_start": gap_start,
            "p_plans": list(plans),
            "p_currencies": list(currencies),
            "p_worker": widths.fit(worker, widths.ACTOR),
        },
    )
    if row is None:
        return None
    # By position: the statement returns the charge's columns, the subscription's, the
    # attempt's ID, in that order (``claim_statement``; checked by ``_CLAIM_COLUMNS``).
    subscription = SubRow(*row[_CHARGE_END:_SUB_END])
    return Claimed(ChargeRow(*row[:_CHARGE_END]), subscription, int(row[_SUB_END]))


_CHARGE_END = len(CHARGE_FIELDS)
_SUB_END = _CHARGE_END + len(SUB_FIELDS)
#: What ``claim_statement`` returns, column by column, as ``claim`` reads it.
_CLAIM_COLUMNS = (*CHARGE_FIELDS, *(SUB_PREFIX + name for name in SUB_FIELDS), "attempt_id")


# --- an approval in time ------------------------------------------------------------


@dataclass(frozen=True)
class Approval:
    """What an on-time approval writes, worked out before the statement runs.

    ``charge`` and ``subscription`` are the rows as the statement will leave them (the
    event's payload is built from them); ``seen`` is the subscription as the claim read it,
    which the statement requires it still to be.
    """

    charge: ChargeRow
    number: int
    attempt_id: int
    seen: SubRow
    subscription: SubRow
    event: EventType
    kind: str
    code: str | None
    mismatch: bool
    next_due: datetime
    ledger_row: Mapping[str, Any]

    @property
    def deferred(self) -> bool:
        return self.charge.state == ChargeState.AUTHORIZED


@functools.cache
def approve_statement(deferred: bool, mismatch: bool) -> Select[Any]:
    """The whole record of an approval whose attempt is current, for a subscription that
    is ``active`` and as the claim read it (plan, reference, anchor); nothing otherwise.

    ``deferred``: the charge is authorized (validated later); ``mismatch``: the gateway
    named another amount than asked (the charge is flagged).
    """
    answer = lifecycle.TRANSITIONS["answer"]
    to = ChargeState.AUTHORIZED if deferred else ChargeState.APPROVED
    # The flags the database sets from the row, as the general path does (see calls.py).
    review: Any = lifecycle.upgraded_late_approval()
    if mismatch:
        review = lifecycle.add_flag(Review.AMOUNT_MISMATCH, review)
    other = C.alias("other")
    held_elsewhere = exists().where(
        other.c.tx == bindparam("p_tx", type_=C.c.tx.type), other.c.id != C.c.id
    )
    review = case((held_elsewhere, lifecycle.add_flag(Review.TX_REUSED, review)), else_=review)
    amount = bindparam("p_amount", type_=C.c.amount.type)
    money = {"authorized_amount": amount} if deferred else {"collected_amount": amount}
    moved = (
        update(C)
        .where(
            C.c.id == bindparam("p_charge_id"),
            _one_of(C.c.state, [state.value for state in answer.sources]),
            C.c.attempts == bindparam("p_number"),
            lifecycle.CURRENT,
        )
        .values(
            state=to.value,
            tx=bindparam("p_tx", type_=C.c.tx.type),
            reason=None,
            review=review,
            last_code=bindparam("p_last_code", type_=C.c.last_code.type),
            last_message=bindparam("p_last_message", type_=C.c.last_message.type),
            next_attempt_at=bindparam("p_next_attempt_at", type_=_TIME),
            updated_at=bindparam("p_now", type_=_TIME),
            **money,
        )
        .returning(C.c.id)
        .cte("moved")
    )
    now = bindparam("p_now", type_=_TIME)
    was_moved = exists(select(moved.c.id))
    finished = (
        update(A)
        .where(A.c.id == bindparam("p_attempt_id"), was_moved)
        .values(
            finished_at=now,
            outcome=bindparam("p_kind", type_=A.c.outcome.type),
            code=bindparam("p_code", type_=A.c.code.type),
        )
        .cte("finished")
    )
    period = bindparam("p_period", type_=S.c.next_period.type)
    due_now = S.c.next_period == period
    advanced = (
        update(S)
        .where(
            S.c.id == bindparam("p_sub_id"),
            S.c.status == SubscriptionStatus.ACTIVE.value,
            S.c.plan == bindparam("p_sub_plan", type_=S.c.plan.type),
            S.c.external_ref == bindparam("p_sub_ref", type_=S.c.external_ref.type),
            S.c.anchor_at == bindparam("p_anchor_at", type_=_TIME),
            S.c.anchor_period == bindparam("p_anchor_period", type_=S.c.anchor_period.type),
            was_moved,
        )
        .values(
            last_charged_at=now,
            updated_at=now,
            next_period=case((due_now, period + 1), else_=S.c.next_period),
            next_charge_at=case(
                (due_now, bindparam("p_next_due", type_=_TIME)), else_=S.c.next_charge_at
            ),
        )
        .returning(S.c.id)
        .cte("advanced")
    )
    was_advanced = exists(select(advanced.c.id))
    written = (
        insert(L)
        .from_select(
            list(ledger.COLUMNS), select(*_values(ledger.COLUMNS, L, "l_")).where(was_advanced)
        )
        .cte("written")
    )
    event_columns = sorted(_EVENT_COLUMNS)
    told = (
        insert(E)
        .from_select(event_columns, select(*_values(event_columns, E, "e_")).where(was_advanced))
        .returning(E.c.id)
        .cte("told")
    )
    deliveries = (
        insert(D)
        .from_select(
            ["event_id", "endpoint", "subscription_id", "status", "next_attempt_at", "attempts"],
            select(
                told.c.id,
                func.unnest(bindparam("p_endpoints", type_=ARRAY(String))),
                bindparam("p_sub_id"),
                literal(EventStatus.PENDING.value, String),
                now,
                literal(0),
            ),
        )
        .cte("delivered")
    )
    # Only whether it was written comes back: the caller built the rows it writes
    # (``Approval``), and some forty columns of charge and subscription read back, each
    # described and converted by the driver, cost more CPU than the rest of the result.
    return (
        select(moved.c.id)
        .select_from(moved.join(advanced, true()))
        .add_cte(finished, written, deliveries)
    )


#: The ``events`` columns ``billing.events.event_row`` fills.
_EVENT_COLUMNS = (
    "event_id",
    "type",
    "subscription_id",
    "external_ref",
    "charge_id",
    "payload",
    "created_at",
    "status",
    "next_attempt_at",
    "attempts",
)


def approve(
    conn: Connection,
    approval: Approval,
    *,
    endpoints: Sequence[tuple[str, tuple[str, ...]]],
    now: datetime,
) -> bool:
    """Record the approval in ``conn``'s transaction in one statement: ``True`` once written
    (the rows are ``approval``'s), ``False`` when a guard did not hold (then nothing but the
    charge's move may have been written: the caller rolls back, takes the general path)."""
    charge, seen = approval.charge, approval.seen
    event = event_row(
        approval.event,
        subscription=approval.subscription,
        charge=charge,
        data=data_of_charge(charge.amount),
        endpoints=endpoints,
        at=now,
    )
    values = {
        "p_charge_id": charge.id,
        "p_number": approval.number,
        "p_attempt_id": approval.attempt_id,
        "p_kind": approval.kind,
        "p_code": approval.code,
        "p_tx": charge.tx,
        "p_amount": charge.amount,
        "p_last_code": charge.last_code,
        "p_last_message": charge.last_message,
        "p_next_attempt_at": charge.next_attempt_at,
        "p_now": now,
        "p_sub_id": seen.id,
        "p_sub_plan": seen.plan,
        "p_sub_ref": seen.external_ref,
        "p_anchor_at": seen.anchor_at,
        "p_anchor_period": seen.anchor_period,
        "p_period": charge.period,
        "p_next_due": approval.next_due,
        "p_endpoints": list(event.endpoints),
        **{"l_" + name: approval.ledger_row[name] for name in ledger.COLUMNS},
        **{"e_" + name: event.columns[name] for name in _EVENT_COLUMNS},
    }
    statement = driversql.compiled(
        conn.dialect, approve_statement, approval.deferred, approval.mismatch
    )
    return statement.first(conn, values) is not None


__all__ = [
    "Approval",
    "Claimed",
    "approve",
    "approve_statement",
    "claim",
    "claim_statement",
]
