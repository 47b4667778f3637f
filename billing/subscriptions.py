"""Looking at subscriptions and changing their state by hand: pause, resume, cancel.

What each change means for money:
- *Pause* stops charging: the engine only dispatches charges of ``active`` and ``past_due``
  subscriptions, so charge rows of a paused subscription (a pending retry, say) stay as
  they are and are simply not sent until it is resumed.
- *Resume* starts again from the first period due after the resume date; every period
  that fell due while paused is written to the ledger as ``skipped`` and never charged.
- *Cancel* is final. Releasing a pending deferred authorization is the engine's job.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from billing import dates, ledger
from billing.db import MAX_ID
from billing.errors import InvalidInput, NotFound, StateError
from billing.models import Subscription, SubscriptionStatus
from billing.plans import PlanSet

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


def _require(sub: Subscription, allowed: Sequence[SubscriptionStatus], action: str) -> None:
    if sub.status not in allowed:
        wanted = " or ".join(s.value for s in allowed)
        raise StateError(
            f"subscription {sub.external_ref} is {sub.status}; "
            f"only {wanted} subscriptions can be {action}"
        )


def pause(session: Session, ref: str, *, now: datetime | None = None, by: str) -> Subscription:
    """Stop charging an active or past-due subscription until it is resumed."""
    now = now or datetime.now(UTC)
    sub = get_subscription(session, ref, for_update=True)
    _require(sub, PAUSABLE, "paused")
    sub.status = SubscriptionStatus.PAUSED.value
    sub.paused_at = now
    sub.updated_at = now
    session.flush()
    log.info("subscription %s paused by %s", sub.external_ref, by)
    return sub


def resume(
    session: Session,
    ref: str,
    plans: PlanSet,
    *,
    now: datetime | None = None,
    by: str,
) -> Subscription:
    """Make a paused subscription active again from the first period due after ``now``.

    Each period due while it was paused gets a ``skipped`` ledger row (amount 0) saying
    so, so that the ledger explains why those periods have no charge.
    """
    now = now or datetime.now(UTC)
    sub = get_subscription(session, ref, for_update=True)
    _require(sub, (SubscriptionStatus.PAUSED,), "resumed")
    plan = plans.plan(sub.plan)
    first = dates.first_period_after(sub.anchor_at, plan.every, plan.timezone, now)
    # Never step back to a period the engine already took on.
    next_period = max(first, sub.next_period)
    since = f"from {sub.paused_at.isoformat()} " if sub.paused_at else ""
    reason = f"paused {since}to {now.isoformat()}"
    merchant_id = plans.account_for(plan).merchant_id
    skipped = range(sub.next_period, next_period)
    for period in skipped:
        ledger.append(
            session,
            outcome="skipped",
            operation="engine",
            actor=by,
            subscription=sub,
            period=period,
            currency=plan.currency,
            merchant_id=merchant_id,
            reason=reason,
        )
    sub.next_period = next_period
    sub.next_charge_at = dates.due_at(sub.anchor_at, plan.every, next_period, plan.timezone)
    sub.status = SubscriptionStatus.ACTIVE.value
    sub.paused_at = None
    sub.updated_at = now
    session.flush()
    log.info(
        "subscription %s resumed by %s at period %d (%d skipped)",
        sub.external_ref,
        by,
        next_period,
        len(skipped),
    )
    return sub


def cancel(
    session: Session,
    ref: str,
    *,
    now: datetime | None = None,
    by: str,
    reason: str | None = None,
) -> Subscription:
    """End a subscription for good: nothing is charged for it any more."""
    now = now or datetime.now(UTC)
    sub = get_subscription(session, ref, for_update=True)
    if sub.status == SubscriptionStatus.CANCELLED:
        raise StateError(f"subscription {sub.external_ref} is already cancelled")
    sub.status = SubscriptionStatus.CANCELLED.value
    sub.updated_at = now
    session.flush()
    log.info("subscription %s cancelled by %s: %s", sub.external_ref, by, reason or "no reason")
    return sub
