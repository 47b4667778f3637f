"""Looking at subscriptions and changing their state by hand: pause, resume, cancel.

What each change means for money:
- *Pause* stops charging: the engine only dispatches charges of ``active`` and ``past_due``
  subscriptions, so charge rows of a paused subscription (a pending retry, say) stay as
  they are and are simply not sent until it is resumed.
- *Resume* starts again from the first period due after the resume date; every period
  that fell due while paused is written to the ledger as ``skipped``, and its charge row,
  if one was waiting, becomes ``skipped`` too: it is never sent. A resume while one of the
  subscription's charges is in flight is refused (its answer decides that period).
- *Cancel* is final: charges not yet sent are discarded. Releasing a pending deferred
  authorization is the engine's job.

Each change is a move of ``billing.charging.lifecycle``, written with its ledger row
(who and why) and the shop's event in one transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from billing import ledger
from billing.charging import lifecycle
from billing.charging.lifecycle import Lost, SubMove
from billing.charging.rows import ChargeRow, SubRow, load_subscription
from billing.db import MAX_ID
from billing.errors import InvalidInput, NotFound, StateError
from billing.events import charge_event, subscription_event
from billing.models import Charge, Subscription
from billing.plans import PlanSet
from billing.vocabulary import (
    STATUS_EVENTS,
    SUBSCRIPTION_CANCELLED,
    ChargeState,
    EventType,
    LedgerOutcome,
    Operation,
    SubscriptionStatus,
)

log = logging.getLogger(__name__)

#: Statuses a subscription can be paused from (the ones the engine charges).
PAUSABLE = (SubscriptionStatus.ACTIVE, SubscriptionStatus.PAST_DUE)


def list_subscriptions(
    session: Session,
    *,
    plan: str | None = None,
    status: str | None = None,
    limit: int = 100,
) -> list[Subscription]:
    """Subscriptions in creation order, optionally of one plan and/or one status."""
    query = select(Subscription).order_by(Subscription.id).limit(limit)
    if plan is not None:
        query = query.where(Subscription.plan == plan)
    if status is not None:
        try:
            SubscriptionStatus(status)
        except ValueError:
            known = ", ".join(s.value for s in SubscriptionStatus)
            raise InvalidInput(f'status "{status}" is not one of: {known}') from None
        query = query.where(Subscription.status == status)
    return list(session.scalars(query))


def get_subscription(session: Session, ref_or_id: str, *, for_update: bool = False) -> Subscription:
    """The subscription with this external reference or, failing that, this numeric id.

    ``for_update`` locks its row (PostgreSQL) so a state change does not interleave with
    the engine's work on the same subscription.
    """
    query = select(Subscription).where(Subscription.external_ref == ref_or_id)
    if for_update:
        query = query.with_for_update()
    found = session.scalars(query).one_or_none()
    if found is None and ref_or_id.isascii() and ref_or_id.isdigit() and int(ref_or_id) <= MAX_ID:
        found = session.get(Subscription, int(ref_or_id), with_for_update=for_update)
    if found is None:
        raise NotFound(f'no subscription with reference or id "{ref_or_id}"')
    return found


def _require(sub: SubRow, allowed: Sequence[SubscriptionStatus], action: str) -> None:
    if sub.status not in allowed:
        wanted = " or ".join(s.value for s in allowed)
        raise StateError(
            f"subscription {sub.external_ref} is {sub.status}; "
            f"only {wanted} subscriptions can be {action}"
        )


def _locked(session: Session, ref: str) -> SubRow:
    """The subscription, its open charges locked first, then itself (the lock order)."""
    found = get_subscription(session, ref)
    lifecycle.lock_open_charges(session, found.id)
    return load_subscription(session, found.id, lock=True)


def _moved(
    session: Session,
    moved: SubMove | Lost,
    sub: SubRow,
    action: str,
    *,
    charges_first: Sequence[tuple[EventType, ChargeRow, str]] = (),
) -> SubRow:
    """The subscription after its move, with the shop's events: its charges' first (with
    the subscription as it is after the change), then its own."""
    if isinstance(moved, Lost):
        raise StateError(f"subscription {sub.external_ref} changed meanwhile; it was not {action}")
    for type_of_charge, charge, why in charges_first:
        charge_event(session, type_of_charge, charge, moved.after, reason=why)
    type_ = STATUS_EVENTS.get(SubscriptionStatus(moved.after.status))
    if moved.changed and type_ is not None:
        subscription_event(session, type_, moved.after, previous=moved.before)
    return moved.after


def _why(reason: str | None, otherwise: str) -> str:
    """The reason a person typed, or what the change itself says."""
    return reason.strip() if reason and reason.strip() else otherwise


def _row(session: Session, sub: SubRow, outcome: LedgerOutcome, by: str, reason: str) -> None:
    ledger.append(
        session, outcome=outcome, operation=Operation.PERSON, actor=by, subscription=sub,
        reason=reason,
    )  # fmt: skip


def pause(
    session: Session,
    ref: str,
    *,
    now: datetime | None = None,
    by: str,
    reason: str | None = None,
) -> SubRow:
    """Stop charging an active or past-due subscription until it is resumed."""
    now = now or datetime.now(UTC)
    sub = _locked(session, ref)
    _require(sub, PAUSABLE, "paused")
    moved = lifecycle.move_subscription(
        session, sub.id, "pause", to=SubscriptionStatus.PAUSED, now=now,
        values={"paused_at": now},
    )  # fmt: skip
    after = _moved(session, moved, sub, "paused")
    _row(session, after, LedgerOutcome.SUBSCRIPTION_PAUSED, by, _why(reason, "paused"))
    log.info("subscription %s paused by %s", sub.external_ref, by)
    return after


def resume(
    session: Session,
    ref: str,
    plans: PlanSet,
    *,
    now: datetime | None = None,
    by: str,
    reason: str | None = None,
) -> SubRow:
    """Make a paused subscription active again from the first period due after ``now``.

    Each period due while it was paused gets a ``skipped`` ledger row (amount 0) saying
    so, and a charge row waiting for such a period is skipped too: it is never sent.
    """
    now = now or datetime.now(UTC)
    sub = _locked(session, ref)
    _require(sub, (SubscriptionStatus.PAUSED,), "resumed")
    in_flight = session.scalar(
        select(
            exists().where(Charge.subscription_id == sub.id, Charge.state == ChargeState.IN_FLIGHT)
        )
    )
    if in_flight:
        raise StateError(
            f"subscription {sub.external_ref} has a charge in flight (sent before the pause);"
            " its answer decides that period: resume again in a minute"
        )
    plan = plans.plan(sub.plan)
    schedule = lifecycle.schedule_of(sub, plan)
    first = schedule.first_after(now)
    # Never step back to a period the engine already took on.
    next_period = max(first, sub.next_period)
    since = f"from {sub.paused_at.isoformat()} " if sub.paused_at else ""
    paused = f"paused {since}to {now.isoformat()}"
    skipped = range(sub.next_period, next_period)
    written_off: list[ChargeRow] = []
    if skipped:
        written_off = lifecycle.move_many(
            session, "skip", to=ChargeState.SKIPPED, now=now,
            where=[Charge.subscription_id == sub.id, Charge.period.in_(list(skipped))],
            values={"next_attempt_at": None, "reason": "paused"},
        )  # fmt: skip
    waiting = set(
        session.scalars(
            select(Charge.period).where(
                Charge.subscription_id == sub.id,
                Charge.period.in_(list(skipped)),
                Charge.state != ChargeState.SKIPPED,
            )
        )
    )
    merchant_id = plans.account_for(plan).merchant_id
    for period in skipped:
        if period in waiting:  # its charge waits for a person: they decide that period
            continue
        ledger.append(
            session, outcome=LedgerOutcome.SKIPPED, operation=Operation.ENGINE, actor=by,
            subscription=sub, period=period, currency=plan.currency, merchant_id=merchant_id,
            reason=paused,
        )  # fmt: skip
    moved = lifecycle.move_subscription(
        session, sub.id, "resume", to=SubscriptionStatus.ACTIVE, now=now,
        values={
            "next_period": next_period,
            "next_charge_at": schedule.due(next_period),
            "paused_at": None,
        },
    )  # fmt: skip
    after = _moved(
        session,
        moved,
        sub,
        "resumed",
        charges_first=[(EventType.CHARGE_SKIPPED, charge, paused) for charge in written_off],
    )
    _row(session, after, LedgerOutcome.SUBSCRIPTION_RESUMED, by, _why(reason, paused))
    log.info(
        "subscription %s resumed by %s at period %d (%d skipped)",
        sub.external_ref, by, next_period, len(skipped),
    )  # fmt: skip
    return after


def cancel(
    session: Session,
    ref: str,
    *,
    now: datetime | None = None,
    by: str,
    reason: str | None = None,
) -> SubRow:
    """End a subscription for good: nothing is charged for it any more.

    Its charges not yet sent are discarded; one in flight ends as its answer says.
    """
    now = now or datetime.now(UTC)
    sub = _locked(session, ref)
    if sub.status == SubscriptionStatus.CANCELLED:
        raise StateError(f"subscription {sub.external_ref} is already cancelled")
    why = _why(reason, "cancelled by a person")
    moved = lifecycle.move_subscription(
        session, sub.id, "cancel", to=SubscriptionStatus.CANCELLED, now=now
    )
    if isinstance(moved, Lost):
        raise StateError(f"subscription {sub.external_ref} changed meanwhile; it was not cancelled")
    discarded = lifecycle.move_many(
        session, "discard", to=ChargeState.DISCARDED, now=now,
        where=[
            Charge.subscription_id == sub.id,
            Charge.state.in_([ChargeState.PENDING, ChargeState.QUEUED]),
        ],
        values={"next_attempt_at": None, "reason": SUBSCRIPTION_CANCELLED},
    )  # fmt: skip
    for charge in discarded:
        message = "subscription cancelled before the charge was sent"
        ledger.append(
            session, outcome=LedgerOutcome.DISCARDED, operation=Operation.PERSON, actor=by,
            subscription=moved.after, charge=charge, reason=message,
        )  # fmt: skip
        charge_event(
            session, EventType.CHARGE_DISCARDED, charge, moved.after, reason=message, by=by
        )
    after = _moved(session, moved, sub, "cancelled")
    _row(session, after, LedgerOutcome.SUBSCRIPTION_CANCELLED, by, why)
    log.info("subscription %s cancelled by %s: %s", sub.external_ref, by, why)
    return after
