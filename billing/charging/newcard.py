"""What a new card does to a subscription's charges: one try with it, at once.

A customer whose card was declined gives the shop a new one; waiting for the next step of
the retry ladder (days) or for a person to notice the failed queue would lose the sale.
So when a new alias is stored (``billing.changes``) for a subscription on the ladder
(``past_due``) or suspended by declines:

- a charge waiting for its next ladder step is sent now instead (``pending -> pending``,
  due now): a decline then continues the ladder from where it was;
- a charge the declines put in the failed queue (a hard decline, or the ladder spent) is
  re-opened for **one** try (``failed -> pending``, the ladder's position set to its end,
  so any decline puts it back in the queue), and a suspended subscription goes back to
  ``past_due`` so that it may be charged.

Never an ``unknown`` charge (the card may have been charged: a person checks first), nor
one with a ``late_approval`` reason or a review flag: those still wait for a person. A
charge in flight keeps its attempt, made with the old card: its answer is recorded as
usual, and when it is a decline the worker gives the new card its try at once
(:func:`try_again`, called by ``billing.charging.calls``). Every move is the lifecycle's
``new_card`` transition, guarded by the state, reason, review and attempt it read.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from billing.charging import lifecycle
from billing.charging.lifecycle import Lost, SubMove
from billing.charging.rows import CHARGE_COLUMNS, ChargeRow, SubRow, load_subscription
from billing.events import subscription_event
from billing.models import Charge, Subscription
from billing.plans import Plan, PlanSet
from billing.vocabulary import (
    OPEN_STATES,
    STATUS_EVENTS,
    ChargeState,
    FailureReason,
    SubscriptionStatus,
)

#: Reasons of a failed charge that a new card re-opens: the old card's declines.
REOPENED = (FailureReason.HARD_DECLINE, FailureReason.LADDER_EXHAUSTED)
#: Statuses in which a new card retries at once (on the ladder, or suspended by it).
RETRIED_IN = (SubscriptionStatus.PAST_DUE, SubscriptionStatus.SUSPENDED)


@dataclass(frozen=True)
class Retried:
    """A charge the new card tries at once: how (``now``: a ladder step brought forward,
    ``reopened``: out of the failed queue for one try), before and after."""

    how: str
    before: ChargeRow
    charge: ChargeRow

    def details(self) -> dict[str, Any]:
        """What the change's ledger row keeps of it."""
        before = self.before
        return {
            "charge_id": self.charge.id,
            "period": self.charge.period,
            "how": self.how,
            "previous_state": before.state,
            "previous_reason": before.reason,
            "previous_next_attempt_at": (
                before.next_attempt_at.isoformat() if before.next_attempt_at else None
            ),
            "previous_declines": before.declines,
        }


@dataclass(frozen=True)
class NewCard:
    """The subscription after a new card, the charge it retries (if any) and why not."""

    subscription: SubRow
    retried: Retried | None
    note: str | None
    moved: SubMove | None = None


def try_again(session: Session, charge: ChargeRow, plan: Plan | None, now: datetime) -> Any:
    """Give ``charge`` (as just read or moved, in this transaction) its try with the new
    card now: a waiting ladder step is brought forward, a declined charge re-opened for one
    try. Returns the moved ``ChargeRow`` or ``Lost`` (not such a charge, or it moved)."""
    guards = [
        Charge.state == charge.state,
        lifecycle.same(Charge.reason, charge.reason),
        Charge.review.is_(None),
    ]
    values: dict[str, Any] = {"next_attempt_at": now}
    if charge.review is not None:
        return Lost(charge.id, "new_card")
    if charge.state == ChargeState.FAILED and charge.reason in REOPENED:
        ladder = len(plan.retry_ladder) if plan is not None else charge.declines
        values |= {"reason": None, "declines": max(charge.declines, ladder)}
    elif charge.state != ChargeState.PENDING or charge.reason is not None:
        return Lost(charge.id, "new_card")
    return lifecycle.move(
        session, charge.id, "new_card", to=ChargeState.PENDING, now=now,
        attempt=charge.attempts, where=guards, values=values,
    )  # fmt: skip


def alias_changed(session: Session, sub_id: int, alias: str) -> bool:
    """Whether the subscription's alias is no longer ``alias`` (read under its lock, after
    the charge's: the lock order), i.e. a new card came while the call was made."""
    current = session.connection().scalar(
        select(Subscription.alias).where(Subscription.id == sub_id).with_for_update()
    )
    return current is not None and current != alias


def _charges(session: Session, sub_id: int) -> list[ChargeRow]:
    """The subscription's charges that are open or wait for a person, latest period first."""
    rows = session.connection().execute(
        select(*CHARGE_COLUMNS)
        .where(
            Charge.subscription_id == sub_id,
            Charge.state.in_([*OPEN_STATES, ChargeState.FAILED, ChargeState.UNKNOWN]),
        )
        .order_by(Charge.period.desc(), Charge.id.desc())
    )
    return [ChargeRow.of(row) for row in rows]


def _waits_for_a_person(charge: ChargeRow) -> str | None:
    if charge.state == ChargeState.UNKNOWN:
        return "its outcome is unknown (the card may have been charged)"
    if charge.reason == FailureReason.LATE_APPROVAL or charge.review is not None:
        return f"it is flagged ({charge.review or charge.reason}): the card was charged late"
    return None


def retry_with_new_card(session: Session, plans: PlanSet, sub: SubRow, *, now: datetime) -> NewCard:
    """After the alias of ``sub`` was replaced (its charges locked first, in this
    transaction): the try the new card gets, and the subscription's status move."""
    charges = _charges(session, sub.id)
    open_ = [c for c in charges if c.state in OPEN_STATES]
    if sub.status == SubscriptionStatus.PAUSED:
        note = "the subscription is paused: it is charged with the new card once resumed"
        return NewCard(sub, None, note)
    for charge in open_:
        if charge.state == ChargeState.IN_FLIGHT:
            note = (
                f"charge {charge.id} is in flight with the previous card: its answer stands, "
                "and if it is a decline the new card is tried at once"
            )
            return NewCard(sub, None, note)
        if charge.state == ChargeState.QUEUED:
            return NewCard(sub, None, f"charge {charge.id} is being sent: with the new card")
    if sub.status not in RETRIED_IN:
        return NewCard(sub, None, None)
    if not charges:
        return NewCard(sub, None, None)
    charge = open_[0] if open_ else charges[0]  # the open charge, else the latest waiting
    why = _waits_for_a_person(charge)
    if why is not None:
        return NewCard(sub, None, f"charge {charge.id} is not retried: {why}; a person decides")
    if charge.state == ChargeState.PENDING:
        if charge.next_attempt_at is not None and charge.next_attempt_at <= now:
            return NewCard(sub, None, f"charge {charge.id} is due now: it goes with the new card")
        return _retried(session, plans, sub, charge, "now", now)
    if charge.reason not in REOPENED:
        return NewCard(
            sub, None, f"charge {charge.id} is not retried: it failed for {charge.reason}"
        )
    return _retried(session, plans, sub, charge, "reopened", now)


def _retried(
    session: Session, plans: PlanSet, sub: SubRow, charge: ChargeRow, how: str, now: datetime
) -> NewCard:
    moved = try_again(session, charge, plans.plans.get(charge.plan), now)
    if isinstance(moved, Lost):  # the rows are locked: it cannot have moved
        return NewCard(sub, None, f"charge {charge.id} changed meanwhile: not retried")
    status: SubMove | None = None
    if sub.status == SubscriptionStatus.SUSPENDED:
        back = lifecycle.move_subscription(
            session, sub.id, "new_card", to=SubscriptionStatus.PAST_DUE, now=now
        )
        status = back if isinstance(back, SubMove) else None
    after = status.after if status is not None else load_subscription(session, sub.id)
    word = "tried with it now" if how == "now" else "re-opened for one try with it now"
    note = f"charge {charge.id} (period {charge.period}) {word}"
    return NewCard(after, Retried(how, charge, moved), note, status)


def tell_status(session: Session, outcome: NewCard) -> None:
    """The shop's event of the subscription's status move (after the change's own)."""
    moved = outcome.moved
    if moved is not None and moved.changed:
        type_ = STATUS_EVENTS.get(SubscriptionStatus(moved.after.status))
        if type_ is not None:
            subscription_event(session, type_, moved.after, previous=moved.before)


__all__ = ["REOPENED", "NewCard", "Retried", "alias_changed", "retry_with_new_card", "try_again"]
