"""Deferred charges and money going back: validation (``validedifferee.pl``), and
cancellation (``cancel_transaction.pl``) that releases an authorization or refunds a
collected charge.

These calls move money like a charge does, so they follow the charge's rules: the private
key is read before anything is claimed; the call is claimed by one conditional statement
(``charges.operation`` set, the attempt numbered, and the amount checked against what is
left *in the same statement*, so two refunds at once can never exceed what was collected);
the attempt row is committed before the call; the outcome and its ledger row are written
together on the attempt's number; a lost answer sends the charge to the failed-charge queue,
never retried by itself; an answer that comes after a person settled the lost one is
evidence only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import exists, func, insert, select, update
from sqlalchemy.orm import Session

from billing import ledger, metrics, widths
from billing.charging import lifecycle
from billing.charging.context import Context, recorded_surely
from billing.charging.lifecycle import KEEP, Lost
from billing.charging.rows import ChargeRow, SubRow, load_charge, load_subscription
from billing.db import session_scope
from billing.errors import ConfigError, InvalidInput, StateError
from billing.events import charge_event
from billing.models import Attempt, Charge, LedgerEntry, Subscription, utcnow
from billing.money import parse_amount
from billing.outcomes import Approved, Declined, NotSent, Outcome, Unknown
from billing.vocabulary import (
    APPROVED_OUTCOME,
    AUTHORIZED,
    COLLECTED,
    OPERATION_OF,
    REFUNDED,
    SETTLEMENT_UNKNOWN,
    Call,
    ChargeState,
    EventType,
    FailureReason,
    LedgerOutcome,
    Review,
    SubscriptionStatus,
)

log = logging.getLogger("billing.settlement")

ZERO = Decimal("0.00")

#: The shop's event when each kind of call is approved.
APPROVED_EVENT = {
    Call.VALIDATE: EventType.CHARGE_VALIDATED,
    Call.RELEASE: EventType.CHARGE_CANCELLED,
    Call.REFUND: EventType.CHARGE_REFUNDED,
}
#: The state each kind of call starts from (and returns to when nothing moved).
START_STATE = {
    Call.VALIDATE: ChargeState.AUTHORIZED,
    Call.RELEASE: ChargeState.AUTHORIZED,
    Call.REFUND: ChargeState.APPROVED,
}


@dataclass(frozen=True)
class SettlementResult:
    """What one validation or cancellation did."""

    charge_id: int
    kind: Call | None
    outcome: str  # approved, declined, not_sent, unknown, not_claimed, late
    amount: Decimal
    message: str = ""
    retry_in: float | None = None


@dataclass(frozen=True)
class SettlementClaim:
    """A settlement call claimed: what the call and its record need."""

    charge: ChargeRow
    subscription: SubRow
    kind: Call
    amount: Decimal
    attempt_id: int
    actor: str
    reason: str | None
    automatic: bool
    private_key: str = field(repr=False)

    @property
    def number(self) -> int:
        return self.charge.attempts


def _d(value: Decimal | None) -> Decimal:
    return value if value is not None else ZERO


def amounts(charge: Any) -> dict[str, str]:
    """The charge's money, for the ledger's before/after details."""
    return {
        "authorized": str(_d(charge.authorized_amount)),
        "collected": str(_d(charge.collected_amount)),
        "refunded": str(_d(charge.refunded_amount)),
        "released": str(_d(charge.released_amount)),
    }


def remaining(charge: Any, kind: Call) -> Decimal:
    """What a call of ``kind`` may still move on ``charge``."""
    if kind == Call.REFUND:
        return _d(charge.collected_amount) - _d(charge.refunded_amount)
    return _d(charge.authorized_amount) - _d(charge.released_amount)


def _left_in_sql(kind: Call) -> Any:
    """:func:`remaining`, computed by the database on the row it is about to change."""
    if kind == Call.REFUND:
        return func.coalesce(Charge.collected_amount, 0) - func.coalesce(Charge.refunded_amount, 0)
    return func.coalesce(Charge.authorized_amount, 0) - func.coalesce(Charge.released_amount, 0)


def kind_of_cancel(charge: Any) -> Call:
    """A cancellation releases an authorization, or refunds what was collected."""
    if charge.state == ChargeState.AUTHORIZED:
        return Call.RELEASE
    if charge.state == ChargeState.APPROVED:
        return Call.REFUND
    raise StateError(
        f"charge {charge.id} is {charge.state}: only an authorized charge can be released "
        "and only an approved one refunded"
    )


def approved_move(kind: Call, amount: Decimal, now: datetime) -> tuple[Any, dict[str, Any]]:
    """The target and values of an approved call of ``kind`` for ``amount``, as SQL on the
    row: the database moves the money columns, never a value read earlier."""
    if kind == Call.VALIDATE:
        # Collected what was asked; the rest of the authorization is released.
        return ChargeState.APPROVED, {
            "collected_amount": amount,
            "released_amount": func.coalesce(Charge.authorized_amount, 0) - amount,
            "next_attempt_at": None,
        }
    if kind == Call.RELEASE:
        left_after = _left_in_sql(kind) - amount
        return lifecycle.either(left_after <= 0, ChargeState.CANCELLED, ChargeState.AUTHORIZED), {
            "released_amount": func.coalesce(Charge.released_amount, 0) + amount,
            "next_attempt_at": lifecycle.either_value(
                left_after <= 0, None, Charge.next_attempt_at
            ),
        }
    return KEEP, {"refunded_amount": func.coalesce(Charge.refunded_amount, 0) + amount}


class Settlement:
    """Validation and cancellation, using the engine's settings, client and plans."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    # ---------------------------------------------------------------- commands

    def capture(
        self,
        charge_id: int,
        *,
        amount: Decimal | str | None = None,
        actor: str | None = None,
        reason: str | None = None,
        retries: int = 0,
        automatic: bool = False,
    ) -> SettlementResult:
        """Validate (part of) an authorized charge; the rest of the authorization is released."""
        return self._run(
            charge_id, Call.VALIDATE, amount, actor, reason, retries=retries, automatic=automatic
        )

    def cancel(
        self,
        charge_id: int,
        *,
        reason: str,
        amount: Decimal | str | None = None,
        actor: str | None = None,
        again: bool = False,
        retries: int = 0,
    ) -> SettlementResult:
        """Release an authorization or refund a collected charge, whole or in part."""
        if not reason or not reason.strip():
            raise InvalidInput("a cancellation needs a reason (--reason)")
        return self._run(charge_id, None, amount, actor, reason, retries=retries, again=again)

    # ------------------------------------------------------------ engine sweep

    def dispatch_due_captures(self, now: datetime) -> list[int]:
        """Authorized charges whose ``capture_after`` has passed, leased for one task each.

        The lease (``next_attempt_at`` moved ahead) keeps the next sweeps from sending the
        same capture again while its message is on its way; the claim does the rest.
        """
        lease = now + timedelta(seconds=self.ctx.settings.requeue_after_seconds)
        with session_scope(self.ctx.url) as session:
            due = (
                select(Charge.id)
                .join(Subscription, Subscription.id == Charge.subscription_id)
                .where(
                    Charge.state == ChargeState.AUTHORIZED,
                    Charge.operation.is_(None),
                    Charge.next_attempt_at <= now,
                    Subscription.status != SubscriptionStatus.CANCELLED,
                )
                .limit(self.ctx.settings.max_in_flight)
            )
            ids = list(
                session.connection().scalars(
                    update(Charge)
                    .where(Charge.id.in_(due.scalar_subquery()), Charge.operation.is_(None))
                    .values(next_attempt_at=lease)
                    .returning(Charge.id)
                )
            )
        return sorted(ids)

    def release_cancelled(self, now: datetime, limit: int = 50) -> int:
        """Cancel, never validate, what is still authorized for cancelled subscriptions."""
        with session_scope(self.ctx.url) as session:
            ids = list(
                session.connection().scalars(
                    select(Charge.id)
                    .join(Subscription, Subscription.id == Charge.subscription_id)
                    .where(
                        Charge.state == ChargeState.AUTHORIZED,
                        Charge.operation.is_(None),
                        Subscription.status == SubscriptionStatus.CANCELLED,
                    )
                    .limit(limit)
                )
            )
        for charge_id in ids:
            # A not-sent release is simply tried again by the next engine sweep.
            self._run(
                charge_id, Call.RELEASE, None, self.ctx.actor,
                "subscription cancelled while its deferred charge was still authorized",
                automatic=True,
            )  # fmt: skip
        return len(ids)

    # ---------------------------------------------------------------- the call

    def _run(
        self,
        charge_id: int,
        kind: Call | None,
        amount: Decimal | str | None,
        actor: str | None,
        reason: str | None,
        *,
        retries: int = 0,
        automatic: bool = False,
        again: bool = False,
    ) -> SettlementResult:
        actor = actor or self.ctx.actor
        claimed = self._claim(charge_id, kind, amount, actor, reason, automatic, again)
        if isinstance(claimed, SettlementResult):
            return claimed
        started = time.monotonic()
        call = (
            self.ctx.client.validate_deferred
            if claimed.kind == Call.VALIDATE
            else self.ctx.client.cancel
        )
        result = call(
            merchant_id=claimed.charge.merchant_id,
            tx=claimed.charge.tx or "",
            amount=claimed.amount,
            private_key=claimed.private_key,
        )
        metrics.observe_gateway_call(
            OPERATION_OF[claimed.kind], result.kind, time.monotonic() - started
        )
        return recorded_surely(
            lambda: self.record(claimed, result, retries=retries), f"{claimed.kind} {charge_id}"
        )

    def _claim(
        self,
        charge_id: int,
        kind: Call | None,
        amount: Decimal | str | None,
        actor: str,
        reason: str | None,
        automatic: bool,
        again: bool,
    ) -> SettlementResult | SettlementClaim:
        now = utcnow()
        with session_scope(self.ctx.url) as session:
            charge = load_charge(session, charge_id, lock=True)
            if automatic and charge.state != ChargeState.AUTHORIZED:
                return SettlementResult(charge_id, kind, "not_claimed", ZERO)  # done meanwhile
            if kind == Call.VALIDATE and charge.state != ChargeState.AUTHORIZED:
                raise StateError(
                    f"charge {charge_id} is {charge.state}: only an authorized (deferred) "
                    "charge can be validated"
                )
            sub = load_subscription(session, charge.subscription_id)
            if kind == Call.VALIDATE and automatic and sub.status == SubscriptionStatus.CANCELLED:
                kind, reason = Call.RELEASE, "subscription cancelled before validation"
            kind = kind or kind_of_cancel(charge)
            left = remaining(charge, kind)
            amount_d = left if amount is None else parse_amount(amount, field="amount")
            if amount_d > left:
                raise InvalidInput(
                    f"amount {amount_d} exceeds the {left} {charge.currency} that charge "
                    f"{charge_id} still allows to {kind}"
                )
            if left <= 0 or amount_d <= 0:
                raise StateError(f"charge {charge_id} has nothing left to {kind}")
            if kind == Call.REFUND and not again:
                _refuse_repeat(session, charge, amount_d)
            if not charge.tx:
                raise StateError(f"charge {charge_id} has no transaction number to {kind}")
            # The key first: a missing one must stop the call before anything is claimed.
            account = self.ctx.plans.accounts.get(charge.currency)
            if account is None:
                raise ConfigError(
                    f"charge {charge_id}: no account for {charge.currency} in the plans file"
                )
            private_key = account.private_key()
            claimed = lifecycle.move(
                session, charge_id, "settle", to=KEEP, now=now,
                where=[
                    Charge.operation.is_(None),
                    Charge.state == charge.state,
                    _left_in_sql(kind) >= amount_d,
                ],
                values={
                    "operation": kind.value, "operation_since": now,
                    "attempts": Charge.attempts + 1,
                },
            )  # fmt: skip
            if isinstance(claimed, Lost):
                if automatic:
                    return SettlementResult(charge_id, kind, "not_claimed", ZERO)
                raise StateError(
                    f"charge {charge_id} changed while the {kind} was being asked for (another "
                    "validation or cancellation, or less left now): look again with "
                    f"`billing failed show {charge_id}`"
                )
            attempt_id = (
                session.connection()
                .execute(
                    insert(Attempt)
                    .values(
                        charge_id=charge_id,
                        number=claimed.attempts,
                        operation=kind.value,
                        amount=amount_d,
                        worker=widths.fit(actor, widths.ACTOR),
                        started_at=now,
                    )
                    .returning(Attempt.id)
                )
                .scalar_one()
            )
            return SettlementClaim(
                claimed, sub, kind, amount_d, attempt_id, actor, reason, automatic, private_key
            )

    # ---------------------------------------------------------------- the record

    def record(
        self, claim: SettlementClaim, result: Outcome, *, retries: int = 0
    ) -> SettlementResult:
        """Write the call's answer on its attempt; a late answer as evidence only."""
        now = utcnow()
        kind = claim.kind
        retry_in: float | None = None
        with session_scope(self.ctx.url) as session:
            session.connection().execute(
                update(Attempt)
                .where(Attempt.id == claim.attempt_id)
                .values(
                    finished_at=now,
                    outcome=result.kind,
                    code=widths.fit(result.code or None, widths.CODE),
                )
            )
            answer = {
                "operation": None,
                "operation_since": None,
                "last_code": widths.fit(result.code or None, widths.CODE),
                "last_message": widths.fit(
                    result.message or getattr(result, "reason", "") or None, widths.MESSAGE
                ),
            }
            to: Any = KEEP
            outcome: LedgerOutcome
            moved_amount = ZERO
            match result:
                case Approved():
                    to, money = approved_move(kind, claim.amount, now)
                    answer |= money | {"reason": None}
                    outcome, moved_amount = APPROVED_OUTCOME[kind], claim.amount
                    if _answered_otherwise(result, claim.amount):
                        # The gateway says it moved another amount: a person reconciles it.
                        answer["review"] = lifecycle.add_flag(Review.AMOUNT_MISMATCH)
                case Declined():
                    outcome = LedgerOutcome.DECLINED
                    if claim.automatic:
                        to = ChargeState.FAILED
                        answer["reason"] = FailureReason.of_call(kind, "declined")
                case NotSent():
                    outcome = LedgerOutcome.NOT_SENT
                    # Safe to send again: the request never reached the gateway.
                    if retries < self.ctx.settings.not_sent_max_retries:
                        retry_in = self.ctx.backoff(retries)
                    elif claim.automatic:
                        to = ChargeState.FAILED
                        answer["reason"] = FailureReason.of_call(kind, "not_sent")
                case Unknown():
                    outcome = LedgerOutcome.UNKNOWN
                    to = ChargeState.UNKNOWN
                    answer["reason"] = FailureReason.of_call(kind, "unknown")
            moved = lifecycle.move(
                session, claim.charge.id, "settled", to=to, now=now, attempt=claim.number,
                where=[Charge.operation == kind.value], values=answer,
            )  # fmt: skip
            if isinstance(moved, Lost):
                moved = self._after_stuck(session, claim, result, now)
            if isinstance(moved, Lost):
                self._late(session, claim, result, now)
                return SettlementResult(claim.charge.id, kind, "late", claim.amount)
            # Locked before any row refers to it (see ``load_subscription``).
            sub = load_subscription(session, moved.subscription_id, lock=True)
            ledger.append_outcome(
                session, moved, sub, result, operation=OPERATION_OF[kind],
                actor=claim.actor, outcome=outcome, amount=moved_amount,
                attempt_id=claim.attempt_id, reason=claim.reason,
                secrets=(claim.private_key,),
                details={
                    "kind": kind.value, "asked": str(claim.amount),
                    "before": amounts(claim.charge), "after": amounts(moved),
                },
            )  # fmt: skip
            self._events(session, claim, result, moved, sub)
        log.info(
            "%s charge=%s tx=%s amount=%s outcome=%s code=%s http=%s", kind, claim.charge.id,
            claim.charge.tx, claim.amount, result.kind, result.code,
            result.http_status if result.http_status is not None else "-",
        )  # fmt: skip
        message = result.message or getattr(result, "reason", "")
        return SettlementResult(claim.charge.id, kind, result.kind, claim.amount, message, retry_in)

    def _after_stuck(
        self, session: Session, claim: SettlementClaim, result: Outcome, now: datetime
    ) -> ChargeRow | Lost:
        """The stuck sweep gave this call up before its answer came, and nobody settled it
        since: the answer is still the attempt's own. Approved moves the money; declined or
        not sent means nothing moved; unknown leaves it for a person."""
        kind = claim.kind
        lost = Lost(claim.charge.id, "settled")
        base: dict[str, Any] = {
            "last_code": widths.fit(result.code or None, widths.CODE),
            "last_message": widths.fit(result.message or None, widths.MESSAGE),
            "reason": None,
        }
        match result:
            case Approved():
                to, money = approved_move(kind, claim.amount, now)
                to = START_STATE[kind] if to == KEEP else to
                values = base | money
            case Declined() if kind == Call.REFUND:
                to, values = START_STATE[kind], base
            case Declined():
                to = ChargeState.FAILED
                values = base | {"reason": FailureReason.of_call(kind, "declined")}
            case NotSent():
                to, values = START_STATE[kind], base
            case _:
                return lost
        return lifecycle.move(
            session, claim.charge.id, "settled", to=to, now=now, attempt=claim.number,
            where=[Charge.state == ChargeState.UNKNOWN,
                   Charge.reason == FailureReason.of_call(kind, "unknown")],
            values=values,
        )  # fmt: skip

    def _late(
        self, session: Session, claim: SettlementClaim, result: Outcome, now: datetime
    ) -> None:
        """An answer of a settlement call that a person settled meanwhile: evidence. When it
        says money moved and the books do not hold it, the charge is flagged (its row first,
        then the subscription locked, then the evidence: the lock order)."""
        if isinstance(result, Approved):
            booked = session.connection().scalar(
                select(
                    exists().where(
                        LedgerEntry.attempt_id == claim.attempt_id,
                        LedgerEntry.outcome.in_(
                            [o.value for o in (*COLLECTED, *AUTHORIZED, *REFUNDED)]
                            + [LedgerOutcome.RESOLVED_CANCELLED.value]
                        ),
                    )
                )
            )
            if not booked:  # the money moved and the books do not say so: a person looks
                lifecycle.flag(
                    session, claim.charge.id, lifecycle.add_flag(Review.LATE_APPROVAL), now=now
                )
        sub = load_subscription(session, claim.charge.subscription_id, lock=True)
        ledger.append_outcome(
            session, claim.charge, sub, result, operation=OPERATION_OF[claim.kind],
            actor=claim.actor, outcome=LedgerOutcome.LATE_ANSWER, attempt_id=claim.attempt_id,
            secrets=(claim.private_key,),
            reason=f"late answer of attempt {claim.number}: the charge had moved on",
            details={
                "call": claim.kind.value, "attempt": claim.number, "answer": result.kind,
                "amount": str(claim.amount),
            },
        )  # fmt: skip

    def _events(
        self,
        session: Session,
        claim: SettlementClaim,
        result: Outcome,
        moved: ChargeRow,
        sub: SubRow,
    ) -> None:
        kind = claim.kind
        match result:
            case Approved():
                extra: dict[str, Any] = {}
                if kind == Call.REFUND:
                    extra["refunded_total"] = str(_d(moved.refunded_amount))
                charge_event(
                    session, APPROVED_EVENT[kind], moved, sub, amount=claim.amount,
                    reason=claim.reason, **extra,
                )  # fmt: skip
            case Declined():
                charge_event(
                    session, EventType.CHARGE_DECLINED, moved, sub, reason=claim.reason,
                    call=kind.value, soft=None, next_attempt_at=None,
                )  # fmt: skip
            case Unknown():
                charge_event(
                    session, EventType.CHARGE_UNKNOWN, moved, sub, reason=claim.reason,
                    call=kind.value,
                )  # fmt: skip
            case NotSent():
                pass
        if moved.state == ChargeState.FAILED:
            charge_event(session, EventType.CHARGE_FAILED, moved, sub, failure=moved.reason)


def _answered_otherwise(result: Approved, asked: Decimal) -> bool:
    """Whether an approval's ``MONTANT`` says another amount than asked (or no amount)."""
    if result.amount is not None:
        return result.amount != asked
    return bool(result.amount_text)


def _refuse_repeat(session: Session, charge: ChargeRow, amount: Decimal) -> None:
    """The same refund twice is most often the same command run twice by mistake."""
    earlier = (
        session.connection()
        .execute(
            select(LedgerEntry.at, LedgerEntry.actor)
            .where(
                LedgerEntry.charge_id == charge.id,
                LedgerEntry.outcome == LedgerOutcome.REFUNDED,
                LedgerEntry.amount == amount,
            )
            .order_by(LedgerEntry.id.desc())
            .limit(1)
        )
        .one_or_none()
    )
    if earlier is not None:
        raise StateError(
            f"charge {charge.id} already had a refund of {amount} {charge.currency} at "
            f"{earlier.at:%Y-%m-%d %H:%M:%S}Z by {earlier.actor}; pass --again if a second "
            "refund of the same amount is meant"
        )


def resolve_unknown(
    session: Session, charge_id: int, *, approved: bool, by: str, reason: str | None
) -> ChargeRow:
    """A person records what the back office shows for a validation or cancellation whose
    answer was lost. The charge returns to where that answer would have left it."""
    now = utcnow()
    charge = load_charge(session, charge_id, lock=True)
    if charge.reason not in SETTLEMENT_UNKNOWN:
        raise StateError(f"charge {charge_id} is not waiting on a lost validation or cancellation")
    kind = FailureReason(charge.reason).call
    attempt = (
        session.connection()
        .execute(
            select(Attempt.id, Attempt.amount).where(
                Attempt.charge_id == charge_id, Attempt.number == charge.attempts
            )
        )
        .one()
    )
    if approved:
        to, values = approved_move(kind, attempt.amount, now)
        if to == KEEP:
            to = START_STATE[kind]
        values |= {"reason": None}
        outcome = LedgerOutcome(f"resolved_{APPROVED_OUTCOME[kind]}")
        moved_amount = attempt.amount
    else:
        to, values = START_STATE[kind], {"reason": None}
        outcome = LedgerOutcome(f"resolved_{kind}_declined")
        moved_amount = ZERO
    moved = lifecycle.move(
        session, charge_id, "resolve_settlement", to=to, now=now, attempt=charge.attempts,
        where=[Charge.reason == charge.reason], values=values,
    )  # fmt: skip
    if isinstance(moved, Lost):
        raise StateError(f"charge {charge_id} changed meanwhile: look at it again")
    sub = load_subscription(session, charge.subscription_id, lock=True)
    ledger.append(
        session, outcome=outcome, operation="person", actor=by, subscription=sub, charge=moved,
        amount=moved_amount, tx=charge.tx, reason=reason, attempt_id=attempt.id,
        details={"kind": kind.value, "asked": str(attempt.amount)},
    )  # fmt: skip
    charge_event(
        session, EventType.CHARGE_RESOLVED, moved, sub, amount=moved_amount, reason=reason,
        by=by, resolution=outcome.removeprefix("resolved_"),
    )  # fmt: skip
    return moved


__all__ = [
    "Settlement",
    "SettlementResult",
    "amounts",
    "kind_of_cancel",
    "remaining",
    "resolve_unknown",
]
