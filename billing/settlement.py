"""Deferred charges and money going back: validation (``validedifferee.pl``), and
cancellation (``cancel_transaction.pl``) that releases an authorization or refunds a
collected charge.

These calls move money like a charge does, so they follow the charge's rules: claimed
atomically before the call (``charges.operation``), an attempt row committed before it,
the outcome and ledger row written together, a lost answer sent to the failed-charge
queue and never retried by itself.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Literal

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from billing import ledger, metrics
from billing.db import checked_id, session_scope
from billing.errors import InvalidInput, NotFound, StateError
from billing.models import (
    Attempt,
    Charge,
    ChargeState,
    LedgerEntry,
    Subscription,
    SubscriptionStatus,
    utcnow,
)
from billing.money import parse_amount
from billing.outcomes import Approved, Declined, NotSent, Outcome, Unknown

if TYPE_CHECKING:
    from billing.engine import Engine

log = logging.getLogger("billing.settlement")

Kind = Literal["validate", "release", "refund"]
ZERO = Decimal("0.00")

#: Failed-queue reasons of settlement calls whose answer was lost: resolving them applies
#: (or not) the operation, it does not advance the subscription like a charge would.
UNKNOWN_REASONS = {"validate_unknown", "release_unknown", "refund_unknown"}
#: Ledger outcome written when each kind of call is approved.
APPROVED_OUTCOME: dict[Kind, str] = {
    "validate": "validated",
    "release": "cancelled",
    "refund": "refunded",
}


@dataclass(frozen=True)
class SettlementResult:
    """What one validation or cancellation did."""

    charge_id: int
    kind: Kind | None
    outcome: str  # approved, declined, not_sent, unknown, not_claimed
    amount: Decimal
    message: str = ""
    retry_in: float | None = None


def _d(value: Decimal | None) -> Decimal:
    return value if value is not None else ZERO


def amounts(charge: Charge) -> dict[str, str]:
    """The charge's money, for the ledger's before/after details."""
    return {
        "authorized": str(_d(charge.authorized_amount)),
        "collected": str(_d(charge.collected_amount)),
        "refunded": str(_d(charge.refunded_amount)),
        "released": str(_d(charge.released_amount)),
    }


def remaining(charge: Charge, kind: Kind) -> Decimal:
    """What a call of ``kind`` may still move on ``charge``."""
    if kind == "refund":
        return _d(charge.collected_amount) - _d(charge.refunded_amount)
    return _d(charge.authorized_amount) - _d(charge.released_amount)


def kind_of_cancel(charge: Charge) -> Kind:
    """A cancellation releases an authorization, or refunds what was collected."""
    if charge.state == ChargeState.AUTHORIZED:
        return "release"
    if charge.state == ChargeState.APPROVED:
        return "refund"
    raise StateError(
        f"charge {charge.id} is {charge.state}: only an authorized charge can be released "
        "and only an approved one refunded"
    )


class Settlement:
    """Validation and cancellation, using the engine's settings, client and plans."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.url = engine.url

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
            charge_id, "validate", amount, actor, reason, retries=retries, automatic=automatic
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

    def dispatch_due_captures(self, now: datetime | None = None) -> list[int]:
        """Authorized charges whose ``capture_after`` has passed, leased for one task each.

        The lease (``next_attempt_at`` moved ahead) keeps the next sweeps from sending the
        same capture again while its message is on its way; the claim does the rest.
        """
        now = now or utcnow()
        lease = now + timedelta(seconds=self.engine.settings.requeue_after_seconds)
        with session_scope(self.url) as session:
            due = (
                select(Charge.id)
                .join(Subscription, Subscription.id == Charge.subscription_id)
                .where(
                    Charge.state == ChargeState.AUTHORIZED,
                    Charge.operation.is_(None),
                    Charge.next_attempt_at <= now,
                    Subscription.status != SubscriptionStatus.CANCELLED,
                )
                .limit(self.engine.settings.max_in_flight)
            )
            ids = list(
                session.scalars(
                    update(Charge)
                    .where(Charge.id.in_(due.scalar_subquery()))
                    .values(next_attempt_at=lease)
                    .returning(Charge.id)
                )
            )
        return sorted(ids)

    def release_cancelled(self, now: datetime | None = None, limit: int = 50) -> int:
        """Cancel, never validate, what is still authorized for cancelled subscriptions."""
        with session_scope(self.url) as session:
            ids = list(
                session.scalars(
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
                charge_id, "release", None, self.engine.actor,
                "subscription cancelled while its deferred charge was still authorized",
                automatic=True,
            )  # fmt: skip
        return len(ids)

    # ---------------------------------------------------------------- the call

    def _run(
        self,
        charge_id: int,
        kind: Kind | None,
        amount: Decimal | str | None,
        actor: str | None,
        reason: str | None,
        *,
        retries: int = 0,
        automatic: bool = False,
        again: bool = False,
    ) -> SettlementResult:
        actor = actor or self.engine.actor
        claimed = self._claim(charge_id, kind, amount, actor, reason, automatic, again)
        if isinstance(claimed, SettlementResult):
            return claimed
        kind, amount_d, tx, merchant_id, currency, attempt_id, reason = claimed
        private_key = self.engine.plans.accounts[currency].private_key()
        started = time.monotonic()
        call = (
            self.engine.client.validate_deferred
            if kind == "validate"
            else self.engine.client.cancel
        )
        result = call(merchant_id=merchant_id, tx=tx, amount=amount_d, private_key=private_key)
        operation = "validate" if kind == "validate" else "cancel"
        metrics.observe_gateway_call(operation, result.kind, time.monotonic() - started)
        return self._record(
            charge_id, kind, amount_d, attempt_id, result, actor, reason, retries, automatic,
            (private_key,),
        )  # fmt: skip

    def _claim(
        self,
        charge_id: int,
        kind: Kind | None,
        amount: Decimal | str | None,
        actor: str,
        reason: str | None,
        automatic: bool,
        again: bool,
    ) -> SettlementResult | tuple[Kind, Decimal, str, str, str, int, str | None]:
        now = utcnow()
        with session_scope(self.url) as session:
            charge = session.get(Charge, checked_id(charge_id, "charge"))
            if charge is None:
                raise NotFound(f"charge {charge_id} does not exist")
            if automatic and charge.state != ChargeState.AUTHORIZED:
                return SettlementResult(charge_id, kind, "not_claimed", ZERO)  # done meanwhile
            if kind == "validate" and charge.state != ChargeState.AUTHORIZED:
                raise StateError(
                    f"charge {charge_id} is {charge.state}: only an authorized (deferred) "
                    "charge can be validated"
                )
            if (
                kind == "validate"
                and automatic
                and charge.subscription.status == SubscriptionStatus.CANCELLED
            ):
                kind, reason = "release", "subscription cancelled before validation"
            kind = kind or kind_of_cancel(charge)
            left = remaining(charge, kind)
            amount_d = left if amount is None else parse_amount(amount, field="amount")
            if amount_d > left:
                raise InvalidInput(
                    f"amount {amount_d} exceeds the {left} {charge.currency} that charge "
                    f"{charge_id} still allows to {kind}"
                )
            if left <= 0:
                raise StateError(f"charge {charge_id} has nothing left to {kind}")
            if kind == "refund" and not again:
                self._refuse_repeat(session, charge, amount_d)
            if not charge.tx:
                raise StateError(f"charge {charge_id} has no transaction number to {kind}")
            claimed = session.scalar(
                update(Charge)
                .where(
                    Charge.id == charge_id,
                    Charge.operation.is_(None),
                    Charge.state == charge.state,
                )
                .values(operation=kind, operation_since=now)
                .returning(Charge.id)
            )
            if claimed is None:
                if automatic:
                    return SettlementResult(charge_id, kind, "not_claimed", ZERO)
                raise StateError(
                    f"another validation or cancellation of charge {charge_id} is under way"
                )
            number = session.scalar(
                select(func.count()).select_from(Attempt).where(Attempt.charge_id == charge_id)
            )
            attempt = Attempt(
                charge_id=charge_id,
                number=int(number or 0) + 1,
                operation=kind,
                amount=amount_d,
                worker=actor,
                started_at=now,
            )
            session.add(attempt)
            session.flush()
            return (
                kind, amount_d, charge.tx, charge.merchant_id, charge.currency, attempt.id, reason,
            )  # fmt: skip

    @staticmethod
    def _refuse_repeat(session: Session, charge: Charge, amount: Decimal) -> None:
        """The same refund twice is most often the same command run twice by mistake."""
        earlier = session.scalar(
            select(LedgerEntry)
            .where(
                LedgerEntry.charge_id == charge.id,
                LedgerEntry.outcome == "refunded",
                LedgerEntry.amount == amount,
            )
            .order_by(LedgerEntry.id.desc())
            .limit(1)
        )
        if earlier is not None:
            raise StateError(
                f"charge {charge.id} already had a refund of {amount} {charge.currency} at "
                f"{earlier.at:%Y-%m-%d %H:%M:%S}Z by {earlier.actor}; pass --again if a second "
                "refund of the same amount is meant"
            )

    def _record(
        self,
        charge_id: int,
        kind: Kind,
        amount: Decimal,
        attempt_id: int,
        result: Outcome,
        actor: str,
        reason: str | None,
        retries: int,
        automatic: bool,
        secrets: tuple[str, ...],
    ) -> SettlementResult:
        now = utcnow()
        operation = "validate" if kind == "validate" else "cancel"
        retry_in: float | None = None
        with session_scope(self.url) as session:
            charge = session.get_one(Charge, charge_id, with_for_update=True)
            attempt = session.get_one(Attempt, attempt_id)
            attempt.finished_at = now
            attempt.outcome = result.kind
            attempt.code = result.code or None
            if charge.operation != kind:
                # The engine sweep declared this call lost before its answer came: keep the
                # answer as evidence; the charge already waits for a person.
                ledger.append_outcome(
                    session, charge, result, operation=operation, actor=actor,
                    ledger_outcome=result.kind, attempt_id=attempt_id, secrets=secrets,
                    reason=f"late answer: charge was already {charge.state}",
                )  # fmt: skip
                return SettlementResult(charge_id, kind, result.kind, amount)
            charge.operation = None
            charge.operation_since = None
            charge.updated_at = now
            before = amounts(charge)
            moved = ZERO
            match result:
                case Approved():
                    moved = amount
                    apply_approved(charge, kind, amount, now)
                    ledger_outcome = APPROVED_OUTCOME[kind]
                case Declined():
                    ledger_outcome = "declined"
                    if automatic:
                        charge.state = ChargeState.FAILED
                        charge.reason = f"{kind}_declined"
                case NotSent():
                    ledger_outcome = "not_sent"
                    # Safe to send again: the request never reached the gateway.
                    if retries < self.engine.settings.not_sent_max_retries:
                        retry_in = self.engine._backoff(retries)
                    elif automatic:
                        charge.state = ChargeState.FAILED
                        charge.reason = f"{kind}_not_sent"
                case Unknown():
                    ledger_outcome = "unknown"
                    charge.state = ChargeState.UNKNOWN
                    charge.reason = f"{kind}_unknown"
            charge.last_code = result.code or None
            charge.last_message = result.message or getattr(result, "reason", "") or None
            after = amounts(charge)
            ledger.append_outcome(
                session, charge, result, operation=operation, actor=actor,
                ledger_outcome=ledger_outcome, amount=moved, attempt_id=attempt_id,
                reason=reason, secrets=secrets,
                details={"kind": kind, "asked": str(amount), "before": before, "after": after},
            )  # fmt: skip
        log.info(
            "%s charge=%s amount=%s outcome=%s code=%s", kind, charge_id, amount,
            result.kind, result.code,
        )  # fmt: skip
        message = result.message or getattr(result, "reason", "")
        return SettlementResult(charge_id, kind, result.kind, amount, message, retry_in)

    def mark_stuck(self, session: Session, cutoff: datetime, now: datetime) -> int:
        """Validations and cancellations in flight since before ``cutoff``: answer lost."""
        stuck = list(
            session.scalars(
                select(Charge)
                .where(Charge.operation.is_not(None), Charge.operation_since < cutoff)
                .with_for_update(skip_locked=True)
            )
        )
        for charge in stuck:
            kind = charge.operation
            charge.state = ChargeState.UNKNOWN
            charge.reason = f"{kind}_unknown"
            charge.operation = None
            charge.operation_since = None
            charge.updated_at = now
            ledger.append(
                session, outcome="unknown", operation="engine", actor=self.engine.actor,
                charge=charge, reason=f"the worker stopped during a {kind} call; the money may "
                "have moved",
            )  # fmt: skip
        return len(stuck)


def apply_approved(charge: Charge, kind: Kind, amount: Decimal, now: datetime) -> None:
    """Move the charge's amounts as an approved call of ``kind`` does."""
    if kind == "validate":
        charge.released_amount = _d(charge.released_amount) + remaining(charge, kind) - amount
        charge.collected_amount = amount
        charge.state = ChargeState.APPROVED
        charge.next_attempt_at = None
    elif kind == "release":
        charge.released_amount = _d(charge.released_amount) + amount
        if remaining(charge, "release") <= 0:
            charge.state = ChargeState.CANCELLED
            charge.next_attempt_at = None
    else:
        charge.refunded_amount = _d(charge.refunded_amount) + amount
    charge.reason = None
    charge.updated_at = now


def resolve_unknown(
    session: Session, charge: Charge, *, approved: bool, by: str, reason: str | None
) -> LedgerEntry:
    """A person records what the back office shows for a validation or cancellation whose
    answer was lost. The charge returns to where that answer would have left it."""
    if charge.reason not in UNKNOWN_REASONS:
        raise StateError(f"charge {charge.id} is not waiting on a lost validation or cancellation")
    kind: Kind = charge.reason.removesuffix("_unknown")  # type: ignore[assignment]
    attempt = session.scalars(
        select(Attempt)
        .where(Attempt.charge_id == charge.id, Attempt.operation == kind)
        .order_by(Attempt.id.desc())
        .limit(1)
    ).one()
    now = utcnow()
    # Back to the state the call started from; an approval then moves it on.
    charge.state = ChargeState.APPROVED if kind == "refund" else ChargeState.AUTHORIZED
    moved = ZERO
    if approved:
        apply_approved(charge, kind, attempt.amount, now)
        moved = attempt.amount
    charge.reason = None
    charge.updated_at = now
    return ledger.append(
        session,
        outcome=f"resolved_{APPROVED_OUTCOME[kind]}" if approved else f"resolved_{kind}_declined",
        operation="person",
        actor=by,
        charge=charge,
        amount=moved,
        tx=charge.tx,
        reason=reason,
        details={"kind": kind, "asked": str(attempt.amount)},
    )
