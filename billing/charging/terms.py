"""Plans and prices from a coming period: stored by a change, applied by the sweep.

A subscription's terms are its plan and its price (the plan's own, or an override). A
change of terms never touches a charge that exists: the current period keeps its amount
(no proration). It is stored as a ``subscription_changes`` row holding the whole terms
from ``effective_at`` on, and the sweep applies it to the first charge due at or after
that instant, moving the subscription to the new terms in the same transaction. A new
interval re-anchors the subscription there: the new plan's periods count from the due date
of its first charge (``subscriptions.anchor_period``), the earlier ones keep their numbers.

Why a lock: a change decides its first period from the charges that exist, and the sweep's
set-based insert reads the old terms in its own snapshot. On PostgreSQL every sweep insert
holds :data:`TERMS_LOCK` shared and a change holds it exclusively while it decides, so a
change never misses an insert under way, nor an insert a change just committed. SQLite
has one writer at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, exists, insert, select, text, update
from sqlalchemy.orm import Session

from billing import ledger
from billing.charging import lifecycle
from billing.charging.lifecycle import Lost
from billing.charging.rows import SubRow, load_subscription
from billing.errors import InvalidInput, StateError
from billing.events import emit, iso
from billing.models import Charge, SubscriptionChange
from billing.money import format_amount
from billing.plans import Plan, PlanSet
from billing.vocabulary import EventType, LedgerOutcome, Operation

log = logging.getLogger("billing.engine")

#: Key of the PostgreSQL advisory lock between the sweep's inserts (shared: sweeps never
#: wait for each other) and a change of terms (exclusive, for the few milliseconds it takes
#: to decide from which period it applies).
TERMS_LOCK = 0x4B50_0002
#: How far ahead a change may be scheduled (default: 5 years); further is a typo.
MAX_AHEAD = timedelta(days=5 * 366)
#: A new price may be at most this many times its plan's own (default 10): more is most
#: likely an amount written in cents ("2990" for 29.90), which would charge a customer
#: a hundred times their price. A price that high belongs in a plan of its own.
MAX_PRICE_FACTOR = 10


def price_problem(amount: Decimal, plan: Plan) -> str | None:
    """Why ``amount`` is refused as a price on ``plan``, or None."""
    if amount <= MAX_PRICE_FACTOR * plan.amount:
        return None
    return (
        f"amount {format_amount(amount)} is more than {MAX_PRICE_FACTOR} times the price of "
        f"plan {plan.name} ({format_amount(plan.amount)} {plan.currency}): was it written in "
        "cents? (a price that high needs a plan of its own)"
    )


def hold_terms(session: Session, *, exclusive: bool = False) -> None:
    """Take :data:`TERMS_LOCK` for the transaction (PostgreSQL; SQLite has one writer)."""
    if session.get_bind().dialect.name != "postgresql":
        return
    function = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
    session.connection().execute(text(f"SELECT {function}(:key)"), {"key": TERMS_LOCK})


def pending_change(sub_id: Any, *, due_by: Any | None = None) -> ColumnElement[bool]:
    """The subscription has a change not applied yet (taking effect by ``due_by``)."""
    conditions = [
        SubscriptionChange.subscription_id == sub_id,
        SubscriptionChange.applied_at.is_(None),
    ]
    if due_by is not None:
        conditions.append(SubscriptionChange.effective_at <= due_by)
    return exists().where(*conditions)


@dataclass(frozen=True)
class Terms:
    """What a subscription is charged: a plan, at its own price or at ``amount_override``."""

    plan: Plan
    amount_override: Decimal | None

    @property
    def amount(self) -> Decimal:
        return self.amount_override if self.amount_override is not None else self.plan.amount

    def same_as(self, other: Terms) -> bool:
        return self.plan.name == other.plan.name and self.amount == other.amount


@dataclass(frozen=True)
class Scheduled:
    """A change of terms, and where it is expected to start (``change_id`` 0: not stored)."""

    change_id: int
    kind: EventType
    previous: Terms
    terms: Terms
    effective_at: datetime
    first_period: int
    first_due_at: datetime
    re_anchored: bool

    def facts(self) -> dict[str, Any]:
        """What the ledger row and the shop's event say of it."""
        return {
            "previous_plan": self.previous.plan.name,
            "plan": self.terms.plan.name,
            "previous_amount": format_amount(self.previous.amount),
            "amount": format_amount(self.terms.amount),
            "currency": self.terms.plan.currency,
            "effective_at": iso(self.effective_at),
            "first_period": self.first_period,
            "first_due_at": iso(self.first_due_at),
            "re_anchored": self.re_anchored,
            "every": str(self.terms.plan.every),
        }


# --------------------------------------------------------------------------- deciding


def plan_of(plans: PlanSet, sub: SubRow) -> Plan:
    """The subscription's plan, refused when it left the plans file."""
    plan = plans.plans.get(sub.plan)
    if plan is None:
        raise StateError(
            f"subscription {sub.external_ref}: its plan {sub.plan!r} is not in the plans file; "
            "add it back before changing the subscription's plan or price"
        )
    return plan


def terms_at(session: Session, plans: PlanSet, sub: SubRow, moment: datetime) -> Terms:
    """The terms the subscription will be on at ``moment``: its own, or those of the last
    change scheduled to take effect by then (as the sweep picks it)."""
    last = session.scalars(  # ORM objects: through the session
        select(SubscriptionChange)
        .where(
            SubscriptionChange.subscription_id == sub.id,
            SubscriptionChange.applied_at.is_(None),
            SubscriptionChange.effective_at <= moment,
        )
        .order_by(SubscriptionChange.effective_at.desc(), SubscriptionChange.id.desc())
        .limit(1)
    ).one_or_none()
    if last is not None and last.plan in plans.plans:
        return Terms(plans.plans[last.plan], last.amount_override)
    return Terms(plan_of(plans, sub), sub.amount_override)


def effective_at(given: date | datetime | None, plan: Plan, now: datetime) -> datetime | None:
    """``effective_from`` as an instant (a day starts at midnight in ``plan``'s time zone;
    today counts from its first period due), refused in the past or absurdly far ahead;
    None for "from the next period"."""
    if given is None:
        return None
    if isinstance(given, datetime):
        moment = given.astimezone(UTC)
    else:
        moment = datetime.combine(given, time(0), tzinfo=plan.timezone).astimezone(UTC)
        if given == now.astimezone(plan.timezone).date():
            return moment
    if moment < now:
        raise InvalidInput(
            f"effective_from {given.isoformat()} is in the past: a change counts from now on "
            "(leave it out for the next period)"
        )
    if moment > now + MAX_AHEAD:
        raise InvalidInput(
            f"effective_from {given.isoformat()} is more than {MAX_AHEAD.days // 366} years "
            "ahead: is it a typo?"
        )
    return moment


def to_schedule(
    session: Session,
    plans: PlanSet,
    sub: SubRow,
    *,
    plan: str | None,
    amount: Decimal | None,
    starting: date | datetime | None,
    now: datetime,
) -> Scheduled | None:
    """The change of terms asked (not stored yet), or None when the subscription is already
    on those terms from then. Call with :data:`TERMS_LOCK` held exclusively."""
    current = plan_of(plans, sub)
    target = plans.plans[plan] if plan is not None else None
    moment = effective_at(starting, target or current, now)
    schedule = lifecycle.schedule_of(sub, current)
    after = now if moment is None else moment - timedelta.resolution
    first = max(sub.next_period, schedule.first_after(after))
    while session.connection().scalar(  # a period whose charge exists keeps it
        select(exists().where(Charge.subscription_id == sub.id, Charge.period == first))
    ):
        first += 1
    first_due = schedule.due(first)
    moment = moment or first_due
    previous = terms_at(session, plans, sub, moment)
    new = Terms(target or previous.plan, amount)
    problem = price_problem(amount, new.plan) if amount is not None else None
    if problem:
        raise InvalidInput(problem)
    if new.plan.currency != current.currency:
        raise StateError(
            f"plan {new.plan.name!r} is in {new.plan.currency} and subscription "
            f"{sub.external_ref} in {current.currency}: a change of currency is refused (Klik "
            "& Pay has one merchant ID per currency); cancel this subscription, import another"
        )
    if new.same_as(previous):
        return None
    kind = (
        EventType.SUBSCRIPTION_PLAN_CHANGED
        if new.plan.name != previous.plan.name
        else EventType.SUBSCRIPTION_PRICE_CHANGED
    )
    re_anchored = new.plan.every != previous.plan.every
    return Scheduled(0, kind, previous, new, moment, first, first_due, re_anchored)


def store(
    session: Session, plans: PlanSet, sub: SubRow, change: Scheduled, *, by: str, reason: str
) -> Scheduled:
    """Store the change for the sweep, with its ledger row and the shop's event."""
    change_id = (
        session.connection()
        .execute(
            insert(SubscriptionChange)
            .values(
                subscription_id=sub.id,
                plan=change.terms.plan.name,
                amount_override=change.terms.amount_override,
                effective_at=change.effective_at,
                created_by=by,
                reason=reason,
            )
            .returning(SubscriptionChange.id)
        )
        .scalar_one()
    )
    stored = replace(change, change_id=change_id)
    outcome = (
        LedgerOutcome.SUBSCRIPTION_PLAN_CHANGED
        if change.kind == EventType.SUBSCRIPTION_PLAN_CHANGED
        else LedgerOutcome.SUBSCRIPTION_PRICE_CHANGED
    )
    plan = change.terms.plan
    ledger.append(
        session, outcome=outcome, operation=Operation.PERSON, actor=by, subscription=sub,
        period=change.first_period, currency=plan.currency,
        merchant_id=plans.account_for(plan).merchant_id, reason=reason,
        details={**stored.facts(), "change_id": change_id},
    )  # fmt: skip
    emit(
        session, change.kind, subscription=sub, data={**stored.facts(), "by": by, "reason": reason}
    )
    return stored


# --------------------------------------------------------------------------- applying


def apply_due(
    session: Session,
    plans: PlanSet,
    plan: Plan,
    sub_id: int,
    *,
    period: int,
    due_at: datetime,
    now: datetime,
) -> Terms | None:
    """The terms of the charge the sweep creates for ``period`` (due at ``due_at``): the
    last change taking effect by then, applied to the subscription in this transaction.
    None when nothing is to be created now: another sweep applied it first, or its plan
    left the plans file (logged; the charge is created once the plan is back)."""
    before = load_subscription(session, sub_id)
    changes = list(
        session.scalars(  # ORM objects: through the session
            select(SubscriptionChange)
            .where(
                SubscriptionChange.subscription_id == sub_id,
                SubscriptionChange.applied_at.is_(None),
                SubscriptionChange.effective_at <= due_at,
            )
            .order_by(SubscriptionChange.effective_at, SubscriptionChange.id)
        )
    )
    if not changes:
        return Terms(plan, before.amount_override)
    last = changes[-1]
    new = plans.plans.get(last.plan)
    if new is None:
        log.error(
            "subscription %s: its change to plan %s, which is not in the plans file, takes "
            "effect with period %d; no charge is created until the plan is back",
            before.external_ref, last.plan, period,
        )  # fmt: skip
        return None
    values: dict[str, Any] = {"plan": new.name, "amount_override": last.amount_override}
    if new.every != plan.every:  # re-anchored: the new interval counts from this period
        values |= {"anchor_at": due_at, "anchor_period": period}
    if isinstance(lifecycle.rewrite_subscription(session, before, values, now=now), Lost):
        return None
    session.connection().execute(
        update(SubscriptionChange)
        .where(
            SubscriptionChange.id.in_([change.id for change in changes]),
            SubscriptionChange.applied_at.is_(None),
        )
        .values(applied_at=now, applied_period=period)
    )
    terms = Terms(new, last.amount_override)
    log.info(
        "subscription %s: period %d on plan %s at %s (scheduled change applied)",
        before.external_ref, period, new.name, format_amount(terms.amount),
    )  # fmt: skip
    return terms


__all__ = [
    "MAX_AHEAD",
    "MAX_PRICE_FACTOR",
    "TERMS_LOCK",
    "Scheduled",
    "Terms",
    "apply_due",
    "effective_at",
    "hold_terms",
    "pending_change",
    "plan_of",
    "price_problem",
    "store",
    "terms_at",
    "to_schedule",
]
