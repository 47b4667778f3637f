"""The failed-charge queue: what waits for a person, and what a person can do about it.

A charge lands here (state ``failed`` or ``unknown``) when the engine will not touch it
again by itself; ``charge.reason`` says why. A person then does one of three things:

- *retry*: send it again. For an ``unknown`` charge the card may already have been
  charged, so a retry is refused until the person says they checked the Klik & Pay back
  office and it was not (``confirm_not_charged``).
- *resolve*: record what the back office shows: approved (with its TX, and the
  subscription moves on to its next period exactly as after an approval) or declined.
- *discard*: give up on that period; the subscription moves on to the next one.

Each action runs in the caller's transaction, locks the charge row first (so the engine
cannot change it halfway), and writes a ledger row saying who did it and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from billing import dates, dunning, ledger, settlement
from billing.db import checked_id
from billing.engine import advance_subscription
from billing.errors import InvalidInput, NotFound, StateError
from billing.metrics import QUEUE_REASONS
from billing.models import (
    ATTENTION_STATES,
    Attempt,
    Charge,
    ChargeState,
    LedgerEntry,
    Subscription,
    SubscriptionStatus,
    utcnow,
)
from billing.money import format_amount
from billing.plans import PlanSet
from billing.redact import mask_alias
from billing.reports import entry_dict

#: Why a charge can be in the queue (``charge.reason``), as the engine writes it.
REASONS = QUEUE_REASONS

#: Width of ``charges.tx``.
_TX_WIDTH = 64


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


@dataclass(frozen=True)
class FailedCharge:
    """One row of the failed-charge queue."""

    charge_id: int
    external_ref: str
    plan: str
    amount: Decimal
    currency: str
    attempts: int
    last_code: str | None
    last_message: str | None
    #: Time since the charge last changed (it entered the queue then, or a person touched it).
    age: timedelta
    reason: str | None
    state: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "charge_id": self.charge_id,
            "external_ref": self.external_ref,
            "plan": self.plan,
            "amount": format_amount(self.amount),
            "currency": self.currency,
            "attempts": self.attempts,
            "last_code": self.last_code,
            "last_message": self.last_message,
            "age_seconds": int(self.age.total_seconds()),
            "reason": self.reason,
            "state": self.state,
        }


@dataclass(frozen=True)
class SubscriptionView:
    """A subscription as the queue shows it: the alias is masked here, once."""

    id: int
    external_ref: str
    plan: str
    status: str
    alias: str
    next_period: int
    next_charge_at: datetime
    last_charged_at: datetime | None

    @classmethod
    def of(cls, sub: Subscription) -> SubscriptionView:
        return cls(
            id=sub.id,
            external_ref=sub.external_ref,
            plan=sub.plan,
            status=sub.status,
            alias=mask_alias(sub.alias),
            next_period=sub.next_period,
            next_charge_at=sub.next_charge_at,
            last_charged_at=sub.last_charged_at,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "external_ref": self.external_ref,
            "plan": self.plan,
            "status": self.status,
            "alias": self.alias,
            "next_period": self.next_period,
            "next_charge_at": _iso(self.next_charge_at),
            "last_charged_at": _iso(self.last_charged_at),
        }


@dataclass(frozen=True)
class ChargeStory:
    """Everything known about one charge: itself, its subscription, its calls, its ledger."""

    charge: Charge
    subscription: SubscriptionView
    attempts: list[Attempt]
    ledger: list[LedgerEntry]

    def as_dict(self) -> dict[str, Any]:
        c = self.charge
        money = (c.authorized_amount, c.collected_amount, c.refunded_amount)
        authorized, collected, refunded = (
            format_amount(m) if m is not None else None for m in money
        )
        return {
            "charge": {
                "id": c.id,
                "period": c.period,
                "due_at": _iso(c.due_at),
                "plan": c.plan,
                "plan_version": c.plan_version,
                "amount": format_amount(c.amount),
                "currency": c.currency,
                "merchant_id": c.merchant_id,
                "deferred": c.deferred,
                "manual": c.manual,
                "state": c.state,
                "reason": c.reason,
                "attempts": c.attempts,
                "declines": c.declines,
                "next_attempt_at": _iso(c.next_attempt_at),
                "tx": c.tx,
                "last_code": c.last_code,
                "last_message": c.last_message,
                "authorized_amount": authorized,
                "collected_amount": collected,
                "refunded_amount": refunded,
                "created_at": _iso(c.created_at),
                "updated_at": _iso(c.updated_at),
            },
            "subscription": self.subscription.as_dict(),
            "attempts": [
                {
                    "id": a.id,
                    "number": a.number,
                    "operation": a.operation,
                    "amount": format_amount(a.amount),
                    "worker": a.worker,
                    "started_at": _iso(a.started_at),
                    "finished_at": _iso(a.finished_at),
                    "outcome": a.outcome,
                    "code": a.code,
                }
                for a in self.attempts
            ],
            "ledger": [entry_dict(e) for e in self.ledger],
        }


# --- reading --------------------------------------------------------------------------


def list_failed(
    session: Session,
    *,
    plan: str | None = None,
    reason: str | None = None,
    older_than: timedelta | None = None,
    now: datetime | None = None,
) -> list[FailedCharge]:
    """The queue, oldest first: charges in ``failed`` or ``unknown``."""
    now = now or utcnow()
    query = (
        select(Charge, Subscription.external_ref)
        .join(Subscription, Subscription.id == Charge.subscription_id)
        .where(Charge.state.in_(ATTENTION_STATES))
        .order_by(Charge.updated_at, Charge.id)
    )
    if plan is not None:
        query = query.where(Charge.plan == plan)
    if reason is not None:
        query = query.where(Charge.reason == reason)
    if older_than is not None:
        query = query.where(Charge.updated_at <= now - older_than)
    return [
        FailedCharge(
            charge_id=charge.id,
            external_ref=ref,
            plan=charge.plan,
            amount=charge.amount,
            currency=charge.currency,
            attempts=charge.attempts,
            last_code=charge.last_code,
            last_message=charge.last_message,
            age=max(now - charge.updated_at, timedelta(0)),
            reason=charge.reason,
            state=charge.state,
        )
        for charge, ref in session.execute(query)
    ]


def charge_story(session: Session, charge_id: int) -> ChargeStory:
    """One charge with its subscription (alias masked), attempts and ledger rows, in order."""
    charge = _get(session, charge_id, lock=False)
    attempts = session.scalars(
        select(Attempt).where(Attempt.charge_id == charge_id).order_by(Attempt.id)
    )
    entries = session.scalars(
        select(LedgerEntry).where(LedgerEntry.charge_id == charge_id).order_by(LedgerEntry.id)
    )
    return ChargeStory(
        charge=charge,
        subscription=SubscriptionView.of(charge.subscription),
        attempts=list(attempts),
        ledger=list(entries),
    )


# --- actions --------------------------------------------------------------------------


def retry(
    session: Session,
    charge_id: int,
    *,
    by: str,
    confirm_not_charged: bool = False,
    reason: str | None = None,
    now: datetime | None = None,
) -> Charge:
    """Put a queued charge back in line to be sent now, bypassing the velocity guard.

    The caller dispatches it after commit (or leaves it to the engine sweep).
    """
    now = now or utcnow()
    charge = _get(session, charge_id)
    _require_attention(charge, "retried")
    _refuse_settlement(charge, "retried")
    if charge.state == ChargeState.UNKNOWN and not confirm_not_charged:
        raise StateError(
            f"charge {charge_id} has an unknown outcome: check the Klik & Pay back office, "
            "then pass --confirm-not-charged"
        )
    sub = charge.subscription
    if sub.status == SubscriptionStatus.CANCELLED:
        raise StateError(
            f"charge {charge_id}: subscription {sub.external_ref} is cancelled; "
            "discard the charge instead"
        )
    previous = (charge.state, charge.reason)
    charge.state = ChargeState.PENDING
    charge.next_attempt_at = now
    charge.manual = True
    charge.reason = None
    charge.declines = 0
    charge.updated_at = now
    if sub.status in (SubscriptionStatus.SUSPENDED, SubscriptionStatus.PAST_DUE):
        sub.status = SubscriptionStatus.PAST_DUE
        sub.updated_at = now
    why = f"retry requested (was {previous[0]}: {previous[1] or 'no reason recorded'})"
    if previous[0] == ChargeState.UNKNOWN:
        why += "; the person checked the back office: the card was not charged"
    if reason:
        why += f"; {reason.strip()}"
    ledger.append(
        session,
        outcome="retry_requested",
        operation="person",
        actor=by,
        charge=charge,
        reason=why,
        details={
            "previous_state": str(previous[0]),
            "previous_reason": previous[1],
            "confirm_not_charged": confirm_not_charged,
        },
    )
    return charge


def resolve(
    session: Session,
    charge_id: int,
    *,
    approved: bool,
    tx: str | None,
    by: str,
    reason: str | None,
    plans: PlanSet,
    now: datetime | None = None,
) -> Charge:
    """Record what the Klik & Pay back office shows for a queued charge.

    Approved: the charge is paid (or authorized, for a deferred plan, then validated by the
    engine after the plan's ``capture_after``) under ``tx``, and the subscription moves on
    to its next period as after any approval. A subscription the failure had suspended
    comes back, since what suspended it turned out to be paid.
    Declined: final; the subscription takes the plan's after-ladder status.
    A lost validation or cancellation answer is settled by ``billing.settlement`` instead:
    the charge already has its TX, and its period was paid long ago.
    """
    now = now or utcnow()
    tx = tx.strip() if tx is not None else None
    if tx is not None and len(tx) > _TX_WIDTH:
        raise InvalidInput(f"charge {charge_id}: --tx is longer than {_TX_WIDTH} characters")
    charge = _get(session, charge_id)
    _require_attention(charge, "resolved")
    why = reason.strip() if reason and reason.strip() else None
    if charge.reason in settlement.UNKNOWN_REASONS:
        if tx:
            raise InvalidInput(
                f"charge {charge_id}: a lost {_kind(charge)} answer is resolved without --tx "
                f"(the charge keeps its TX {charge.tx})"
            )
        settlement.resolve_unknown(session, charge, approved=approved, by=by, reason=why)
        return charge
    if approved and not tx:
        raise InvalidInput(
            f"charge {charge_id}: --approved needs --tx, the Klik & Pay transaction number "
            "shown in the back office"
        )
    if not approved and tx:
        raise InvalidInput(f"charge {charge_id}: --tx goes with --approved, not --declined")
    plan = plans.plan(charge.plan)
    sub = charge.subscription
    details = {"previous_state": str(charge.state), "previous_reason": charge.reason}
    charge.next_attempt_at = None
    charge.updated_at = now
    if approved:
        charge.tx = tx
        charge.reason = None
        if charge.deferred:
            charge.state = ChargeState.AUTHORIZED
            charge.authorized_amount = charge.amount
            charge.next_attempt_at = now + plan.capture_after  # the engine sweep validates then
            outcome = "resolved_authorized"
        else:
            charge.state = ChargeState.APPROVED
            charge.collected_amount = charge.amount
            outcome = "resolved_approved"
        ledger.append(
            session, outcome=outcome, operation="person", actor=by, charge=charge,
            amount=charge.amount, tx=tx, reason=why, details=details,
        )  # fmt: skip
        if sub.status == SubscriptionStatus.SUSPENDED and not _other_waiting(session, charge):
            sub.status = SubscriptionStatus.PAST_DUE
        advance_subscription(sub, plan, charge.period, now)
    else:
        charge.state = ChargeState.DECLINED
        ledger.append(
            session, outcome="resolved_declined", operation="person", actor=by, charge=charge,
            reason=why, details=details,
        )  # fmt: skip
        if sub.status != SubscriptionStatus.CANCELLED:
            sub.status = dunning.status_after_failure(plan)
            sub.updated_at = now
    return charge


def discard(
    session: Session,
    charge_id: int,
    *,
    by: str,
    reason: str,
    plans: PlanSet,
    now: datetime | None = None,
) -> Charge:
    """Give up on a queued charge's period: never charged; the subscription moves past it."""
    now = now or utcnow()
    if not reason or not reason.strip():
        raise InvalidInput(f"charge {charge_id}: --reason is required to discard a charge")
    charge = _get(session, charge_id)
    _require_attention(charge, "discarded")
    _refuse_settlement(charge, "discarded")
    plan = plans.plan(charge.plan)
    sub = charge.subscription
    details = {"previous_state": str(charge.state), "previous_reason": charge.reason}
    charge.state = ChargeState.DISCARDED
    charge.next_attempt_at = None
    charge.updated_at = now
    ledger.append(
        session, outcome="discarded", operation="person", actor=by, charge=charge,
        reason=reason.strip(), details=details,
    )  # fmt: skip
    if sub.next_period == charge.period:
        sub.next_period = charge.period + 1
        sub.next_charge_at = dates.due_at(sub.anchor_at, plan.every, sub.next_period, plan.timezone)
        sub.updated_at = now
    return charge


# --- helpers --------------------------------------------------------------------------


def _get(session: Session, charge_id: int, *, lock: bool = True) -> Charge:
    charge = session.get(
        Charge, checked_id(charge_id, "charge"), with_for_update=lock, populate_existing=True
    )
    if charge is None:
        raise NotFound(f"charge {charge_id} does not exist")
    return charge


def _require_attention(charge: Charge, action: str) -> None:
    if charge.state not in ATTENTION_STATES:
        wanted = " or ".join(s.value for s in ATTENTION_STATES)
        raise StateError(
            f"charge {charge.id} is {charge.state}; only {wanted} charges can be {action}"
        )


def _kind(charge: Charge) -> str:
    return (charge.reason or "").removesuffix("_unknown")


def _refuse_settlement(charge: Charge, action: str) -> None:
    """A lost validation or cancellation answer is not a charge to send again or give up:
    the card was charged already; only the back office can say what the call did."""
    if charge.reason in settlement.UNKNOWN_REASONS:
        raise StateError(
            f"charge {charge.id} waits on a lost {_kind(charge)} answer and cannot be {action}: "
            f"check the Klik & Pay back office, then `billing failed resolve {charge.id}` "
            "with --approved or --declined"
        )


def _other_waiting(session: Session, charge: Charge) -> bool:
    """Whether another charge of the same subscription still waits for a person."""
    found = session.scalar(
        select(Charge.id)
        .where(
            Charge.subscription_id == charge.subscription_id,
            Charge.id != charge.id,
            Charge.state.in_(ATTENTION_STATES),
        )
        .limit(1)
    )
    return found is not None


__all__ = [
    "REASONS",
    "ChargeStory",
    "FailedCharge",
    "SubscriptionView",
    "charge_story",
    "discard",
    "list_failed",
    "resolve",
    "retry",
]
