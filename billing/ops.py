"""The failed-charge queue: what waits for a person, and what a person can do about it.

A charge lands here (state ``failed`` or ``unknown``) when the engine will not touch it
again by itself; ``charge.reason`` says why. A charge whatever its state also lands here
when it carries a review flag (``charge.review``): the gateway said money moved that the
books do not hold (a late approval, a possible double charge, another amount than asked).
A person then does one of these things:

- *retry*: send it again. For an ``unknown`` charge the card may already have been
  charged, so a retry is refused until the person says they checked the Klik & Pay back
  office and it was not (``confirm_not_charged``).
- *resolve*: record what the back office shows: approved (with its TX, and the
  subscription moves on to its next period exactly as after an approval) or declined.
- *discard*: give up on that period; the subscription moves on to the next one.
- *review*: say a flagged charge was reconciled (refunded in the back office, say): the
  flag goes, the ledger keeps who did it and why.

Each action runs in the caller's transaction: it reads the charge under its row's lock
(``FOR UPDATE`` on PostgreSQL, the database's write lock on SQLite), decides, and makes its
move through ``billing.charging.lifecycle`` on condition that the charge is still in the
state and on the attempt it read; a move that finds it changed refuses with a clear error
and writes nothing. A failed validation or release is retried by running that call again,
never by authorizing the card anew.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, or_, select
from sqlalchemy.orm import Session

from billing import dunning, ledger, widths
from billing.charging import lifecycle, settlement
from billing.charging.housekeeping import attempt_id_of
from billing.charging.lifecycle import Lost
from billing.charging.rows import ChargeRow, SubRow, load_charge, load_subscription
from billing.db import checked_id
from billing.errors import InvalidInput, NotFound, StateError
from billing.events import charge_event, subscription_event
from billing.models import Attempt, Charge, LedgerEntry, Subscription, utcnow
from billing.money import format_amount
from billing.plans import PlanSet
from billing.redact import mask_alias
from billing.reports import entry_dict
from billing.vocabulary import (
    ATTENTION_STATES,
    LATE_FLAGS,
    QUEUE_REASONS,
    SETTLEMENT_FAILED,
    SETTLEMENT_UNKNOWN,
    STATUS_EVENTS,
    Call,
    ChargeState,
    EventType,
    FailureReason,
    LedgerOutcome,
    Operation,
    SubscriptionStatus,
)

#: Why a charge can be in the queue: its failure reasons and its review flags.
REASONS = QUEUE_REASONS


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
    #: Why a person must look at it whatever its state (``billing.vocabulary.Review``).
    review: str | None = None

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
            "review": self.review,
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
    def of(cls, sub: Subscription | SubRow) -> SubscriptionView:
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
                "review": c.review,
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


#: A charge is in the failed-charge queue: waiting for a person, or flagged for one.
IN_QUEUE = or_(Charge.state.in_(ATTENTION_STATES), Charge.review.is_not(None))


def list_failed(
    session: Session,
    *,
    plan: str | None = None,
    reason: str | None = None,
    state: str | None = None,
    older_than: timedelta | None = None,
    now: datetime | None = None,
) -> list[FailedCharge]:
    """The queue, oldest first: charges in ``failed`` or ``unknown``, and flagged ones.

    ``reason`` matches a failure reason or a review flag.
    """
    now = now or utcnow()
    query = (
        select(Charge, Subscription.external_ref)
        .join(Subscription, Subscription.id == Charge.subscription_id)
        .where(IN_QUEUE)
        .order_by(Charge.updated_at, Charge.id)
    )
    if plan is not None:
        query = query.where(Charge.plan == plan)
    if reason is not None:
        query = query.where(or_(Charge.reason == reason, Charge.review.like(f"%{reason}%")))
    if state is not None:
        query = query.where(Charge.state == state)
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
            review=charge.review,
        )
        for charge, ref in session.execute(query)
    ]


def charge_story(session: Session, charge_id: int) -> ChargeStory:
    """One charge with its subscription (alias masked), attempts and ledger rows, in order."""
    charge = session.get(Charge, checked_id(charge_id, "charge"), populate_existing=True)
    if charge is None:
        raise NotFound(f"charge {charge_id} does not exist")
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


@dataclass(frozen=True)
class Handled:
    """A charge after a person's action, and its subscription."""

    charge: ChargeRow
    subscription: SubRow


def retry(
    session: Session,
    charge_id: int,
    *,
    by: str,
    confirm_not_charged: bool = False,
    attempt: int | None = None,
    reason: str | None = None,
    now: datetime | None = None,
) -> Handled:
    """Put a queued charge back in line to be sent now, bypassing the velocity guard.

    ``attempt`` is the attempt the person checked in the back office: if the charge has
    made another attempt since, the retry is refused (that one was not checked).

    A failed validation or release is run again (the charge goes back to ``authorized``,
    the engine sweep sends the call), never a new ``duplicate.pl``. The caller dispatches
    a retried charge after commit (or leaves it to the engine sweep).
    """
    now = now or utcnow()
    charge = load_charge(session, charge_id, lock=True)
    _require_attention(charge, "retried")
    _refuse_settlement_unknown(charge, "retried")
    _refuse_late_approval(charge, "retried")
    if charge.state == ChargeState.UNKNOWN and not confirm_not_charged:
        raise StateError(
            f"charge {charge_id} has an unknown outcome: check the Klik & Pay back office, "
            "then pass --confirm-not-charged"
        )
    if attempt is not None and attempt != charge.attempts:
        raise StateError(
            f"charge {charge_id} is at attempt {charge.attempts}, not the attempt {attempt} "
            "that was checked: check the latest attempt in the back office first"
        )
    sub = load_subscription(session, charge.subscription_id, lock=True)
    why = f"retry requested (was {charge.state}: {charge.reason or 'no reason recorded'})"
    if charge.state == ChargeState.UNKNOWN:
        why += "; the person checked the back office: the card was not charged"
    if reason and reason.strip():
        why += f"; {reason.strip()}"
    details: dict[str, Any] = {
        "previous_state": charge.state,
        "previous_reason": charge.reason,
        "confirm_not_charged": confirm_not_charged,
    }
    if charge.reason in SETTLEMENT_FAILED:
        call = FailureReason(charge.reason).call
        moved = _move_from(
            session, charge, "retry", ChargeState.AUTHORIZED, now,
            {"reason": None, "next_attempt_at": now},
        )  # fmt: skip
        details["call"] = call.value
        why = f"{call} requested again ({charge.reason}); the authorization is not renewed"
    else:
        if sub.status == SubscriptionStatus.CANCELLED:
            raise StateError(
                f"charge {charge_id}: subscription {sub.external_ref} is cancelled; "
                "discard the charge instead"
            )
        moved = _move_from(
            session, charge, "retry", ChargeState.PENDING, now,
            {"next_attempt_at": now, "manual": True, "reason": None, "declines": 0},
            where=[lifecycle.not_late_flagged()],
        )  # fmt: skip
        details["call"] = Call.CHARGE.value
        back = lifecycle.move_subscription(
            session, sub.id, "retried", to=SubscriptionStatus.PAST_DUE, now=now
        )
        sub = _told(session, back, sub)
    ledger.append(
        session, outcome=LedgerOutcome.RETRY_REQUESTED, operation=Operation.PERSON, actor=by,
        subscription=sub, charge=moved, reason=why, details=details,
    )  # fmt: skip
    return Handled(moved, sub)


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
) -> Handled:
    """Record what the Klik & Pay back office shows for a queued charge.

    Approved: the charge is paid (or authorized, for a deferred plan, then validated by the
    engine after the plan's ``capture_after``) under ``tx``, and the subscription moves on
    to its next period as after any approval. A subscription the failure had suspended
    comes back, since what suspended it turned out to be paid.
    Declined: final; the subscription takes the plan's after-ladder status.
    A lost validation or cancellation answer is settled by ``settlement.resolve_unknown``:
    the charge already has its TX, and its period was paid long ago.
    """
    now = now or utcnow()
    tx = tx.strip() if tx is not None else None
    if tx is not None and len(tx) > widths.TX:
        raise InvalidInput(f"charge {charge_id}: --tx is longer than {widths.TX} characters")
    charge = load_charge(session, charge_id, lock=True)
    _require_attention(charge, "resolved")
    why = reason.strip() if reason and reason.strip() else None
    if charge.reason in SETTLEMENT_UNKNOWN:
        if tx:
            raise InvalidInput(
                f"charge {charge_id}: a lost {_kind(charge)} answer is resolved without --tx "
                f"(the charge keeps its TX {charge.tx})"
            )
        moved = settlement.resolve_unknown(session, charge_id, approved=approved, by=by, reason=why)
        return Handled(moved, load_subscription(session, charge.subscription_id))
    if approved and not tx:
        raise InvalidInput(
            f"charge {charge_id}: --approved needs --tx, the Klik & Pay transaction number "
            "shown in the back office"
        )
    if not approved and tx:
        raise InvalidInput(f"charge {charge_id}: --tx goes with --approved, not --declined")
    if not approved:
        _refuse_late_approval(charge, "resolved as declined")
    if charge.reason in SETTLEMENT_FAILED:
        raise StateError(
            f"charge {charge_id}: its {_kind(charge)} call failed while the card's "
            f"authorization is held; `billing failed retry {charge_id}` runs that call again"
        )
    plan = plans.plan(charge.plan)
    sub = load_subscription(session, charge.subscription_id, lock=True)
    details = {"previous_state": charge.state, "previous_reason": charge.reason}
    attempt_id = attempt_id_of(session, charge)
    if not approved:
        moved = _move_from(
            session, charge, "resolve", ChargeState.DECLINED, now,
            {"next_attempt_at": None},
        )  # fmt: skip
        ledger.append(
            session, outcome=LedgerOutcome.RESOLVED_DECLINED, operation=Operation.PERSON,
            actor=by, subscription=sub, charge=moved, reason=why, details=details,
            attempt_id=attempt_id,
        )  # fmt: skip
        after: lifecycle.SubMove | Lost = Lost(None, "resolved_declined")
        if sub.status != SubscriptionStatus.CANCELLED:
            after = lifecycle.move_subscription(
                session, sub.id, "resolved_declined", to=dunning.status_after_failure(plan),
                now=now,
            )  # fmt: skip
        # The shop's charge event names the subscription as it is after the whole change.
        final = after.after if isinstance(after, lifecycle.SubMove) else sub
        charge_event(
            session, EventType.CHARGE_RESOLVED, moved, final, reason=why, by=by,
            resolution="declined",
        )  # fmt: skip
        return Handled(moved, _told(session, after, sub))
    if charge.deferred:
        to, outcome = ChargeState.AUTHORIZED, LedgerOutcome.RESOLVED_AUTHORIZED
        values: dict[str, Any] = {
            "authorized_amount": charge.amount,
            "next_attempt_at": now + plan.capture_after,  # the engine sweep validates then
        }
    else:
        to, outcome = ChargeState.APPROVED, LedgerOutcome.RESOLVED_APPROVED
        values = {"collected_amount": charge.amount, "next_attempt_at": None}
    moved = _move_from(session, charge, "resolve", to, now, values | {"tx": tx, "reason": None})
    ledger.append(
        session, outcome=outcome, operation=Operation.PERSON, actor=by, subscription=sub,
        charge=moved, amount=charge.amount, tx=tx, reason=why, details=details,
        attempt_id=attempt_id,
    )  # fmt: skip
    revive = sub.status == SubscriptionStatus.SUSPENDED and not _other_waiting(session, charge)
    advanced = lifecycle.advance_subscription(
        session, sub.id, plan, charge.period, now, revive=revive
    )
    charge_event(
        session, EventType.CHARGE_RESOLVED, moved, advanced.after, amount=charge.amount,
        reason=why, by=by, resolution=outcome.removeprefix("resolved_"),
    )  # fmt: skip
    return Handled(moved, _told(session, advanced, sub))


def discard(
    session: Session,
    charge_id: int,
    *,
    by: str,
    reason: str,
    plans: PlanSet,
    now: datetime | None = None,
) -> Handled:
    """Give up on a queued charge's period: never charged; the subscription moves past it."""
    now = now or utcnow()
    if not reason or not reason.strip():
        raise InvalidInput(f"charge {charge_id}: --reason is required to discard a charge")
    charge = load_charge(session, charge_id, lock=True)
    _require_attention(charge, "discarded")
    _refuse_settlement_unknown(charge, "discarded")
    _refuse_late_approval(charge, "discarded")
    if charge.reason in SETTLEMENT_FAILED:
        raise StateError(
            f"charge {charge_id}: its {_kind(charge)} call failed while the card's "
            f"authorization is held; `billing failed retry {charge_id}` runs that call again"
        )
    plan = plans.plan(charge.plan)
    sub = load_subscription(session, charge.subscription_id, lock=True)
    details = {"previous_state": charge.state, "previous_reason": charge.reason}
    moved = _move_from(
        session, charge, "discard", ChargeState.DISCARDED, now, {"next_attempt_at": None}
    )
    ledger.append(
        session, outcome=LedgerOutcome.DISCARDED, operation=Operation.PERSON, actor=by,
        subscription=sub, charge=moved, reason=reason.strip(), details=details,
    )  # fmt: skip
    charge_event(session, EventType.CHARGE_DISCARDED, moved, sub, reason=reason.strip(), by=by)
    if sub.next_period == charge.period:
        sub = lifecycle.pass_period(session, sub.id, plan, charge.period, now)
    return Handled(moved, sub)


def review(
    session: Session,
    charge_id: int,
    *,
    by: str,
    reason: str,
    now: datetime | None = None,
) -> Handled:
    """A person reconciled a flagged charge (a late approval, a possible double charge, an
    amount other than asked): the flag goes, the ledger says who and why."""
    now = now or utcnow()
    if not reason or not reason.strip():
        raise InvalidInput(f"charge {charge_id}: --reason is required: say what was done")
    charge = load_charge(session, charge_id, lock=True)
    if not charge.review:
        raise StateError(f"charge {charge_id} is not flagged for review")
    moved = lifecycle.clear_review(session, charge_id, charge.review, now=now)
    if isinstance(moved, Lost):
        raise StateError(f"charge {charge_id} changed meanwhile: look at it again")
    sub = load_subscription(session, charge.subscription_id, lock=True)
    ledger.append(
        session, outcome=LedgerOutcome.REVIEWED, operation=Operation.PERSON, actor=by,
        subscription=sub, charge=moved, reason=reason.strip(),
        details={"review": [str(flag) for flag in lifecycle.flags_of(charge.review)]},
    )  # fmt: skip
    return Handled(moved, sub)


# --- helpers --------------------------------------------------------------------------


def _same(column: Any, value: Any) -> ColumnElement[bool]:
    same: ColumnElement[bool] = column.is_(None) if value is None else column == value
    return same


def _move_from(
    session: Session,
    charge: ChargeRow,
    event: str,
    to: ChargeState,
    now: datetime,
    values: dict[str, Any],
    *,
    where: Sequence[ColumnElement[bool]] = (),
) -> ChargeRow:
    """Move the charge a person decided about, on condition it is still as they saw it
    (state, reason, attempt and review flags)."""
    moved = lifecycle.move(
        session, charge.id, event, to=to, now=now, attempt=charge.attempts,
        where=[
            Charge.state == charge.state,
            _same(Charge.reason, charge.reason),
            _same(Charge.review, charge.review),
            *where,
        ],
        values=values,
    )  # fmt: skip
    if isinstance(moved, Lost):
        raise StateError(
            f"charge {charge.id} changed while this was decided (it was {charge.state}): "
            f"look at it again with `billing failed show {charge.id}`"
        )
    return moved


def _told(session: Session, moved: lifecycle.SubMove | Lost, sub: SubRow) -> SubRow:
    """The subscription after a status move, with the shop's event when it changed."""
    if isinstance(moved, Lost):
        return sub
    if moved.changed:
        type_ = STATUS_EVENTS.get(SubscriptionStatus(moved.after.status))
        if type_ is not None:
            subscription_event(session, type_, moved.after, previous=moved.before)
    return moved.after


def _require_attention(charge: ChargeRow, action: str) -> None:
    if charge.state not in ATTENTION_STATES:
        wanted = " or ".join(s.value for s in ATTENTION_STATES)
        raise StateError(
            f"charge {charge.id} is {charge.state}; only {wanted} charges can be {action}"
        )


def _kind(charge: ChargeRow) -> str:
    return FailureReason(charge.reason).call.value if charge.reason else "charge"


def _refuse_settlement_unknown(charge: ChargeRow, action: str) -> None:
    """A lost validation or cancellation answer is not a charge to send again or give up:
    the card was charged already; only the back office can say what the call did."""
    if charge.reason in SETTLEMENT_UNKNOWN:
        raise StateError(
            f"charge {charge.id} waits on a lost {_kind(charge)} answer and cannot be {action}: "
            f"check the Klik & Pay back office, then `billing failed resolve {charge.id}` "
            "with --approved or --declined"
        )


def _refuse_late_approval(charge: ChargeRow, action: str) -> None:
    """An earlier attempt was approved late: the card was charged for this period, so the
    charge is never sent again, given up or taken as declined; it is resolved approved."""
    late = set(lifecycle.flags_of(charge.review)) & set(LATE_FLAGS)
    if charge.reason == FailureReason.LATE_APPROVAL or late:
        raise StateError(
            f"charge {charge.id} cannot be {action}: an earlier attempt was approved late, so "
            "the card was charged; find its TX in the ledger (`billing failed show "
            f"{charge.id}`), confirm it in the back office, then `billing failed resolve "
            f"{charge.id} --approved --tx TX`"
        )


def _other_waiting(session: Session, charge: ChargeRow) -> bool:
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
    "IN_QUEUE",
    "REASONS",
    "ChargeStory",
    "FailedCharge",
    "Handled",
    "SubscriptionView",
    "charge_story",
    "discard",
    "list_failed",
    "resolve",
    "retry",
    "review",
]
