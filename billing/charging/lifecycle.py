"""The one owner of a charge's state and a subscription's status.

Why one module: the promise (a period is charged at most once; every outcome is known or
flagged) is a property of the moves between states. When those moves were written in the
engine, the settlement code and the operator's commands, each decided from a state it had
read earlier in Python, and a late answer or a person's retry could slip in between. Here
every move is listed in a table, and every move is **one conditional statement**::

    UPDATE charges SET state = :to, ... WHERE id = :id AND state IN (:from) [AND attempts = :n]
    RETURNING *

so the database, not an earlier read, decides. A move that finds the row elsewhere returns
``Lost`` and writes nothing; the caller then writes nothing else either (no ledger row, no
event). On SQLite every write transaction holds the database's lock from its start
(``BEGIN IMMEDIATE``, see ``billing.db``), on PostgreSQL the row's lock is taken by the
UPDATE itself, so the same statement means the same thing on both.

Answers belong to attempts: ``charges.attempts`` numbers every gateway call of a charge and
the current attempt is the one numbered so. A move made on an answer names its attempt
(``attempt=n``); an answer whose attempt is no longer current loses every such move and is
recorded as the evidence it is (``billing.charging.calls``).

Rows are locked in one order everywhere, charges before their subscription, so that two
transactions never wait for each other in a circle on PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, not_, or_, select, update
from sqlalchemy.orm import Session

from billing import dates
from billing.charging.rows import (
    CHARGE_COLUMNS,
    SUB_COLUMNS,
    ChargeRow,
    SubRow,
    load_subscription,
)
from billing.models import Charge, Subscription
from billing.plans import Plan
from billing.vocabulary import (
    CHARGEABLE,
    LATE_FLAGS,
    OPEN_STATES,
    ChargeState,
    FailureReason,
    Review,
    SubscriptionStatus,
)

S = ChargeState
#: The charges table's columns: the flag expressions below serve ORM and Core statements.
CHARGES = Charge.__table__.c


@dataclass(frozen=True)
class Transition:
    """One allowed move of a charge: from any of ``sources`` to one of ``targets``."""

    event: str
    sources: tuple[ChargeState, ...]
    targets: tuple[ChargeState, ...]
    why: str


#: Every move a charge can make. Nothing else writes ``charges.state``.
TRANSITIONS: dict[str, Transition] = {
    t.event: t
    for t in (
        Transition("dispatch", (S.PENDING,), (S.QUEUED,), "a due charge's message is sent"),
        Transition(
            "unsent", (S.QUEUED,), (S.PENDING,),
            "its dispatch's send failed (the broker is down): due again, for the next dispatch",
        ),
        Transition(
            "claim", (S.QUEUED,), (S.IN_FLIGHT,),
            "a worker takes it; the attempt is committed before the call",
        ),
        Transition(
            "hold", (S.IN_FLIGHT,), (S.PENDING, S.FAILED, S.DISCARDED),
            "claimed but not sent: subscription not chargeable, velocity guard, unknown plan",
        ),
        Transition(
            "answer", (S.IN_FLIGHT, S.UNKNOWN),
            (S.APPROVED, S.AUTHORIZED, S.PENDING, S.QUEUED, S.FAILED, S.UNKNOWN),
            "the current attempt's answer (also once the stuck sweep called it unknown)",
        ),
        Transition("stuck", (S.IN_FLIGHT,), (S.UNKNOWN,), "in flight longer than a call lasts"),
        Transition(
            "late_approval", (S.PENDING, S.QUEUED), (S.FAILED,),
            "an earlier attempt was approved while a retry waited: the retry stops",
        ),
        Transition(
            "poison", (S.QUEUED,), (S.FAILED,),
            "its message was dead-lettered (it killed its worker past the delivery limit) "
            "before the charge was claimed: nothing was sent",
        ),
        Transition(
            "settle", (S.AUTHORIZED, S.APPROVED), (S.AUTHORIZED, S.APPROVED),
            "a validation, release or refund call is claimed",
        ),
        Transition(
            "settled", (S.AUTHORIZED, S.APPROVED, S.UNKNOWN),
            (S.APPROVED, S.AUTHORIZED, S.CANCELLED, S.FAILED, S.UNKNOWN),
            "a settlement call's answer (also once the stuck sweep called it unknown)",
        ),
        Transition(
            "settle_stuck", (S.AUTHORIZED, S.APPROVED), (S.UNKNOWN,),
            "a settlement call in flight longer than a call lasts",
        ),
        Transition(
            "retry", (S.FAILED, S.UNKNOWN), (S.PENDING, S.AUTHORIZED),
            "a person sends it again (a failed settlement call: runs that call again)",
        ),
        Transition(
            "resolve", (S.FAILED, S.UNKNOWN), (S.APPROVED, S.AUTHORIZED, S.DECLINED),
            "a person records what the Klik & Pay back office shows",
        ),
        Transition(
            "resolve_settlement", (S.UNKNOWN,), (S.APPROVED, S.AUTHORIZED, S.CANCELLED),
            "a person records what a settlement call whose answer was lost did",
        ),
        Transition(
            "discard", (S.FAILED, S.UNKNOWN, S.PENDING, S.QUEUED), (S.DISCARDED,),
            "given up: by a person, or its subscription was cancelled before it was sent",
        ),
        Transition(
            "skip", (S.PENDING, S.QUEUED), (S.SKIPPED,),
            "its period was written off (the subscription resumed after a pause)",
        ),
        Transition(
            "new_card", (S.PENDING, S.FAILED), (S.PENDING,),
            "a new card: a retry waiting on the ladder is sent now, or a declined charge is "
            "re-opened for one try (``billing.changes``)",
        ),
    )
}  # fmt: skip

#: The charge's attempt is still the current one: in flight, or given up on by the stuck
#: sweep while its worker still waited (its answer then is still *the* answer).
CURRENT = or_(
    CHARGES.state == ChargeState.IN_FLIGHT,
    and_(
        CHARGES.state == ChargeState.UNKNOWN,
        CHARGES.reason == FailureReason.STUCK_IN_FLIGHT,
    ),
)

#: The state is left as it is (a settlement call claimed, a partial refund).
KEEP = "keep"


@dataclass(frozen=True)
class Lost:
    """The row was not where the move expected it (it had moved): nothing was written."""

    charge_id: int | None
    event: str


def either(condition: ColumnElement[bool], then: ChargeState, otherwise: ChargeState) -> Any:
    """A target the database picks: ``then`` where ``condition`` holds, else ``otherwise``."""
    return case((condition, then.value), else_=otherwise.value)


def either_value(condition: ColumnElement[bool], then: Any, otherwise: Any) -> Any:
    """A column's new value the database picks from the row: ``then`` where ``condition``
    holds, else ``otherwise`` (a value or a column)."""
    return case((condition, then), else_=otherwise)


def _target(transition: Transition, to: ChargeState | str | Any) -> Any:
    if to == KEEP:
        return None
    if isinstance(to, ChargeState):
        if to not in transition.targets:
            raise ValueError(f"{transition.event} cannot lead to {to}")
        return to.value
    return to  # an ``either`` expression, its branches checked by the caller's tests


def _statement(
    event: str,
    to: ChargeState | str | Any,
    now: datetime,
    where: Sequence[ColumnElement[bool]],
    values: Mapping[str, Any] | None,
) -> Any:
    transition = TRANSITIONS[event]
    changes = dict(values or {})
    if "state" in changes:
        raise ValueError("the state is the move's target, not one of its values")
    target = _target(transition, to)
    if target is not None:
        changes["state"] = target
    changes["updated_at"] = now
    return (
        update(Charge)
        .where(Charge.state.in_([s.value for s in transition.sources]), *where)
        .values(**changes)
        .returning(*CHARGE_COLUMNS)
    )


def move(
    session: Session,
    charge_id: int,
    event: str,
    *,
    to: ChargeState | str | Any,
    now: datetime,
    attempt: int | None = None,
    where: Sequence[ColumnElement[bool]] = (),
    values: Mapping[str, Any] | None = None,
) -> ChargeRow | Lost:
    """Move one charge by ``event`` to ``to``, if it is in one of the event's source states,
    on attempt ``attempt`` (when given) and matching ``where``; ``Lost`` otherwise."""
    conditions = [Charge.id == charge_id, *where]
    if attempt is not None:
        conditions.append(Charge.attempts == attempt)
    row = session.connection().execute(_statement(event, to, now, conditions, values)).one_or_none()
    return ChargeRow.of(row) if row is not None else Lost(charge_id, event)


def move_many(
    session: Session,
    event: str,
    *,
    to: ChargeState | str | Any,
    now: datetime,
    where: Sequence[ColumnElement[bool]],
    values: Mapping[str, Any] | None = None,
) -> list[ChargeRow]:
    """Move every charge matching ``where`` (in a source state of ``event``); returns them."""
    rows = session.connection().execute(_statement(event, to, now, where, values)).all()
    return sorted((ChargeRow.of(row) for row in rows), key=lambda charge: charge.id)


# --- review flags ---------------------------------------------------------------------
# ``charges.review`` holds a set of ``Review`` values, comma-separated. No flag name is a
# part of another, so a flag is found with LIKE; adding one never removes another.


def has_flag(review: Review) -> ColumnElement[bool]:
    """The charge carries ``review``."""
    return CHARGES.review.like(f"%{review.value}%")


def late_flagged() -> ColumnElement[bool]:
    """An attempt the books do not hold charged the card for this period."""
    return or_(*(has_flag(r) for r in LATE_FLAGS))


#: No earlier attempt was approved late: another try may be scheduled.
def not_late_flagged() -> ColumnElement[bool]:
    return or_(CHARGES.review.is_(None), not_(late_flagged()))


def add_flag(review: Review, base: Any = None) -> Any:
    """``base`` (the row's flags by default) with ``review`` added, as SQL on the row."""
    base = CHARGES.review if base is None else base
    return case(
        (base.is_(None), review.value),
        (base.like(f"%{review.value}%"), base),
        else_=base + "," + review.value,
    )


def upgraded_late_approval() -> Any:
    """The row's flags with a late approval turned into a possible double charge: the
    period was then approved again."""
    return func.replace(
        CHARGES.review, Review.LATE_APPROVAL.value, Review.POSSIBLE_DOUBLE_CHARGE.value
    )


def flags_of(review: str | None) -> tuple[Review, ...]:
    """The flags a ``charges.review`` value holds."""
    return tuple(Review(part) for part in (review or "").split(",") if part)


def flag(
    session: Session,
    charge_id: int,
    review: Any,
    *,
    now: datetime,
    where: Sequence[ColumnElement[bool]] = (),
) -> ChargeRow | Lost:
    """Set the charge's review flags (an SQL expression of the row, see :func:`add_flag`),
    whatever its state (or only while the row meets ``where``): a person must look at it.
    The state does not change."""
    row = (
        session.connection()
        .execute(
            update(Charge)
            .where(Charge.id == charge_id, *where)
            .values(review=review, updated_at=now)
            .returning(*CHARGE_COLUMNS)
        )
        .one_or_none()
    )
    return ChargeRow.of(row) if row is not None else Lost(charge_id, "flag")


def clear_review(
    session: Session, charge_id: int, review: str, *, now: datetime
) -> ChargeRow | Lost:
    """A person reconciled the charge: the flags ``review`` (as they saw them) go; a flag
    added meanwhile makes this lose, so the person sees it first."""
    row = (
        session.connection()
        .execute(
            update(Charge)
            .where(Charge.id == charge_id, Charge.review == review)
            .values(review=None, updated_at=now)
            .returning(*CHARGE_COLUMNS)
        )
        .one_or_none()
    )
    return ChargeRow.of(row) if row is not None else Lost(charge_id, "review")


# --- subscriptions ----------------------------------------------------------------------

St = SubscriptionStatus


@dataclass(frozen=True)
class SubTransition:
    """One allowed move of a subscription's status."""

    event: str
    sources: tuple[SubscriptionStatus, ...]
    targets: tuple[SubscriptionStatus, ...]
    why: str


#: Every move a subscription's status can make. Nothing else writes it.
SUB_TRANSITIONS: dict[str, SubTransition] = {
    t.event: t
    for t in (
        SubTransition(
            "paid", (St.ACTIVE, St.PAST_DUE, St.SUSPENDED), (St.ACTIVE,),
            "a period was paid or authorized (suspended: only when a person found the charge "
            "that suspended it paid after all)",
        ),
        SubTransition("declined", (St.ACTIVE,), (St.PAST_DUE,), "a decline: on the ladder"),
        SubTransition(
            "failed", (St.ACTIVE, St.PAST_DUE), (St.SUSPENDED, St.CANCELLED),
            "a charge failed for good (hard decline, ladder spent)",
        ),
        SubTransition(
            "retried", (St.SUSPENDED, St.PAST_DUE), (St.PAST_DUE,),
            "a person retries its failed charge",
        ),
        SubTransition(
            "resolved_declined", (St.ACTIVE, St.PAST_DUE, St.SUSPENDED, St.PAUSED),
            (St.SUSPENDED, St.CANCELLED),
            "a person found its charge declined",
        ),
        SubTransition("pause", (St.ACTIVE, St.PAST_DUE), (St.PAUSED,), "a person pauses it"),
        SubTransition("resume", (St.PAUSED,), (St.ACTIVE,), "a person resumes it"),
        SubTransition(
            "cancel", (St.ACTIVE, St.PAST_DUE, St.SUSPENDED, St.PAUSED), (St.CANCELLED,),
            "a person cancels it",
        ),
        SubTransition(
            "new_card", (St.SUSPENDED, St.PAST_DUE), (St.PAST_DUE,),
            "a new card re-opens the declined charge that suspended it, for one try",
        ),
    )
}  # fmt: skip


@dataclass(frozen=True)
class SubMove:
    """A subscription after a move, and the status it had before."""

    before: str
    after: SubRow

    @property
    def changed(self) -> bool:
        return self.before != self.after.status


def move_subscription(
    session: Session,
    sub_id: int,
    event: str,
    *,
    to: SubscriptionStatus,
    now: datetime,
    values: Mapping[str, Any] | None = None,
) -> SubMove | Lost:
    """Move a subscription's status by ``event``, if it is in one of the event's sources.

    Reads the status under the row's lock, then writes on condition that it is still that
    status: the previous status is known (the shop's event names it) and the database
    decides.
    """
    transition = SUB_TRANSITIONS[event]
    if to not in transition.targets:
        raise ValueError(f"{event} cannot lead to {to}")
    current = load_subscription(session, sub_id, lock=True)
    if current.status not in transition.sources:
        return Lost(None, event)
    row = (
        session.connection()
        .execute(
            update(Subscription)
            .where(Subscription.id == sub_id, Subscription.status == current.status)
            .values(status=to.value, updated_at=now, **dict(values or {}))
            .returning(*SUB_COLUMNS)
        )
        .one_or_none()
    )
    if row is None:
        return Lost(None, event)
    return SubMove(current.status, SubRow.of(row))


def rewrite_subscription(
    session: Session, before: SubRow, values: Mapping[str, Any], *, now: datetime
) -> SubRow | Lost:
    """Write columns that are not the status (alias, plan, amount, anchor) on condition that
    each still holds the value ``before`` has: the values it replaces, not a later write."""
    if "status" in values:
        raise ValueError("the status moves by move_subscription, not by a rewrite")
    guards = [
        same(Subscription.__table__.c[name], getattr(before, name)) for name in sorted(values)
    ]
    row = (
        session.connection()
        .execute(
            update(Subscription)
            .where(Subscription.id == before.id, *guards)
            .values(**values, updated_at=now)
            .returning(*SUB_COLUMNS)
        )
        .one_or_none()
    )
    return SubRow.of(row) if row is not None else Lost(None, "rewrite")


def same(column: Any, value: Any) -> ColumnElement[bool]:
    """``column`` holds ``value`` (``IS NULL`` for None)."""
    holds: ColumnElement[bool] = column.is_(None) if value is None else column == value
    return holds


def schedule_of(sub: Any, plan: Plan) -> dates.Schedule:
    """The due dates of a subscription (a ``SubRow`` or a row with its anchor columns) on
    ``plan``."""
    return dates.Schedule(sub.anchor_at, sub.anchor_period, plan.every, plan.timezone)


def advance_subscription(
    session: Session, sub_id: int, plan: Plan, period: int, now: datetime, *, revive: bool = False
) -> SubMove:
    """After ``period`` is paid (or authorized): on to the next period, back to ``active``
    if it was chargeable (or suspended, with ``revive``: what suspended it was paid), and
    remember when it was last charged (the velocity guard)."""
    current = load_subscription(session, sub_id, lock=True)
    changes: dict[str, Any] = {"last_charged_at": now, "updated_at": now}
    if current.next_period == period:
        changes["next_period"] = period + 1
        changes["next_charge_at"] = schedule_of(current, plan).due(period + 1)
    if current.status in CHARGEABLE or (revive and current.status == St.SUSPENDED):
        changes["status"] = SUB_TRANSITIONS["paid"].targets[0].value
    row = (
        session.connection()
        .execute(
            update(Subscription)
            .where(
                Subscription.id == sub_id,
                Subscription.status == current.status,
                Subscription.next_period == current.next_period,
            )
            .values(**changes)
            .returning(*SUB_COLUMNS)
        )
        .one()
    )  # the row is locked: it cannot have moved since it was read
    return SubMove(current.status, SubRow.of(row))


def pass_period(session: Session, sub_id: int, plan: Plan, period: int, now: datetime) -> SubRow:
    """A period given up (its charge discarded): the subscription moves on to the next one.
    Its status does not change."""
    current = load_subscription(session, sub_id, lock=True)
    if current.next_period != period:
        return current
    row = (
        session.connection()
        .execute(
            update(Subscription)
            .where(Subscription.id == sub_id, Subscription.next_period == period)
            .values(
                next_period=period + 1,
                next_charge_at=schedule_of(current, plan).due(period + 1),
                updated_at=now,
            )
            .returning(*SUB_COLUMNS)
        )
        .one()
    )
    return SubRow.of(row)


def lock_open_charges(
    session: Session, sub_id: int, states: Sequence[ChargeState] = OPEN_STATES
) -> None:
    """Lock a subscription's open charges (or its charges in ``states``) before the
    subscription itself (the lock order)."""
    session.connection().execute(
        select(Charge.id)
        .where(Charge.subscription_id == sub_id, Charge.state.in_([s.value for s in states]))
        .order_by(Charge.id)
        .with_for_update()
    )


__all__ = [
    "CURRENT",
    "KEEP",
    "SUB_TRANSITIONS",
    "TRANSITIONS",
    "Lost",
    "SubMove",
    "Transition",
    "add_flag",
    "advance_subscription",
    "clear_review",
    "either",
    "either_value",
    "flag",
    "flags_of",
    "has_flag",
    "late_flagged",
    "lock_open_charges",
    "move",
    "move_many",
    "move_subscription",
    "not_late_flagged",
    "pass_period",
    "rewrite_subscription",
    "same",
    "schedule_of",
    "upgraded_late_approval",
]
