"""One gateway call of a charge: claim, call, record.

- **Claim** (one transaction, committed before the call): ``queued -> in_flight`` as one
  conditional statement that also numbers the attempt, then the attempt row. A second
  message for the charge (a redelivery, a second worker, a requeue) loses the claim and does
  nothing. A charge that must not go out (its subscription paused, the velocity guard, a
  plan gone from the file) is held back in the same transaction, unsent.
- **Call**: ``duplicate.pl``, ending in one of the four outcomes, within a total deadline.
- **Record** (one transaction): the attempt, the charge's move, its ledger row, the
  subscription and the events. The move is made on the attempt's number: an answer whose
  attempt is no longer current (the stuck sweep gave up on it and a person retried, say)
  loses the move and is written as a ``late_answer``: evidence, never money in the books.
  A late *approval* stops a retry that is still waiting (the charge goes to the failed
  queue, ``late_approval``) and otherwise flags the charge for a person: a possible double
  charge if the period was approved again meanwhile.

If recording fails because the database connection broke, it is tried again (the charge is
still in flight and nothing was written). If it fails for any other reason, the attempt is
still recorded, as ``unknown`` with the redacted evidence: an answer is never lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import case, exists, insert, select, update
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from billing import dunning, ledger, metrics, widths
from billing.charging import hotpath, lifecycle, newcard
from billing.charging.context import Context, recorded_surely
from billing.charging.lifecycle import CURRENT, Lost
from billing.charging.rows import ChargeRow, SubRow, load_subscription
from billing.db import connect_unpinged, is_sqlite, session_scope
from billing.errors import BillingError, ConfigError, InvalidInput, NotFound
from billing.events import charge_event, endpoint_filters, subscription_event
from billing.models import Attempt, Charge, LedgerEntry, utcnow
from billing.outcomes import Approved, Declined, NotSent, Outcome, Unknown
from billing.plans import Plan
from billing.redact import mask_alias
from billing.vocabulary import (
    AUTHORIZED,
    CHARGEABLE,
    COLLECTED,
    PAID_STATES,
    STATUS_EVENTS,
    SUBSCRIPTION_CANCELLED,
    Call,
    ChargeState,
    EventType,
    FailureReason,
    LedgerOutcome,
    Operation,
    Review,
    SubscriptionStatus,
)

log = logging.getLogger("billing.engine")

#: Why a retry scheduled while its subscription was being cancelled is discarded.
CANCELLED_WHILE_SENT = "subscription cancelled while the charge was being sent"

Status = Literal["done", "not_claimed", "held", "retry", "late"]


@dataclass(frozen=True)
class ChargeResult:
    """What a charge task did. ``retry_in`` asks the task layer for a delayed retry."""

    charge_id: int
    status: Status
    outcome: str | None = None
    retry_in: float | None = None


@dataclass(frozen=True)
class Claim:
    """A charge claimed for one gateway call: everything the call and its record need."""

    charge: ChargeRow
    subscription: SubRow
    attempt_id: int
    plan: Plan
    private_key: str = field(repr=False)

    @property
    def number(self) -> int:
        """The attempt's number: the answer is recorded on it."""
        return self.charge.attempts


@dataclass(frozen=True)
class Recorded:
    """The charge after an on-time answer, and what the shop is told about it."""

    charge: ChargeRow
    ledger_outcome: LedgerOutcome
    reason: str | None = None


class Calls:
    """Claims, calls and records charges."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        #: The common path in one statement each (PostgreSQL; see ``hotpath``). Turned off
        #: only to compare the two paths (``tests/test_hotpath.py``).
        self.at_once = not is_sqlite(ctx.url)

    # ------------------------------------------------------------------ the whole call

    def charge(self, charge_id: int, *, retries: int = 0) -> ChargeResult:
        """Make one gateway call for a queued charge and record what came of it."""
        if self._rate_limited():
            waited = self._wait_for_slot(charge_id)
            if waited is not None:
                return waited
        claimed = self.claim(charge_id)
        if isinstance(claimed, ChargeResult):
            return claimed
        result, duration = self.call(claimed)
        if isinstance(result, NotSent) and result.reason.startswith("invalid request"):
            retries = self.ctx.settings.not_sent_max_retries  # sending again cannot help
        return self.record_surely(claimed, result, retries=retries, duration=duration)

    def call(self, claim: Claim) -> tuple[Outcome, float]:
        """``duplicate.pl`` for the claim; the outcome and how long it took."""
        started = time.monotonic()
        try:
            result = self.ctx.client.duplicate(
                merchant_id=claim.charge.merchant_id,
                alias=claim.subscription.alias,
                ip=claim.subscription.customer_ip,
                amount=claim.charge.amount,
                private_key=claim.private_key,
                deferred=claim.charge.deferred,
            )
        except InvalidInput as exc:  # refused before anything was sent
            result = NotSent(reason=f"invalid request: {exc}")
        duration = time.monotonic() - started
        metrics.observe_gateway_call(Operation.DUPLICATE, result.kind, duration)
        return result, duration

    def record_surely(
        self, claim: Claim, result: Outcome, *, retries: int, duration: float
    ) -> ChargeResult:
        """:meth:`record`, tried again if the connection broke, and never lost otherwise:
        any other failure still records the attempt, as unknown (:meth:`record_unknown`)."""
        try:
            return recorded_surely(
                lambda: self.record(claim, result, retries=retries, duration=duration),
                f"charge {claim.charge.id}",
            )
        except OperationalError:
            # The charge's one line would have said what the gateway answered: say it here,
            # since the stuck sweep will only know the charge as unknown.
            log.error(
                "charge %s: the database stayed away; the answer (outcome=%s code=%s tx=%s)"
                " is not recorded, the stuck sweep will mark the charge unknown",
                claim.charge.id, result.kind, result.code, getattr(result, "tx", None) or "-",
            )  # fmt: skip
            raise
        except Exception as exc:
            log.exception(
                "charge %s: the answer (outcome=%s code=%s tx=%s) could not be recorded",
                claim.charge.id, result.kind, result.code, getattr(result, "tx", None) or "-",
            )  # fmt: skip
            return self.record_unknown(claim, result, exc)

    # ----------------------------------------------------------------------- claim

    def claim(self, charge_id: int, now: datetime | None = None) -> Claim | ChargeResult:
        """Take the charge from ``queued`` to ``in_flight`` and commit its attempt.

        A missing private key raises inside this transaction, so the claim rolls back and
        the charge stays queued, unsent and not unknown.
        """
        now = now or utcnow()
        if self.at_once:
            claimed = self._claim_at_once(charge_id, now)
            if claimed is not None:
                return claimed
        with session_scope(self.ctx.url) as session:
            moved = lifecycle.move(
                session, charge_id, "claim", to=ChargeState.IN_FLIGHT, now=now,
                values={"claimed_at": now, "attempts": Charge.attempts + 1},
            )  # fmt: skip
            if isinstance(moved, Lost):
                if session.get(Charge, charge_id) is None:
                    raise NotFound(f"charge {charge_id} does not exist")
                return ChargeResult(charge_id, "not_claimed")
            sub = load_subscription(session, moved.subscription_id)
            plans = self.ctx.plans
            plan = plans.plans.get(moved.plan)
            account = plans.accounts.get(moved.currency)
            if plan is None or account is None:  # nothing is sent for an unknown plan
                return self._hold(session, moved, sub, FailureReason.UNKNOWN_PLAN, now)
            private_key = account.private_key()
            held = self._hold_reason(moved, sub, now)
            if held is not None:
                return self._hold(session, moved, sub, held, now)
            attempt_id = (
                session.connection()
                .execute(
                    insert(Attempt)
                    .values(
                        charge_id=charge_id,
                        number=moved.attempts,
                        operation=Operation.DUPLICATE,
                        amount=moved.amount,
                        worker=widths.fit(self.ctx.actor, widths.ACTOR),
                        started_at=now,
                    )
                    .returning(Attempt.id)
                )
                .scalar_one()
            )
            return Claim(moved, sub, attempt_id, plan, private_key)

    def _claim_at_once(self, charge_id: int, now: datetime) -> Claim | None:
        """The claim in one statement (``billing.charging.hotpath``), for a charge that may
        go out; ``None`` leaves it to the general claim (which says why not, and holds it).

        Only accounts whose private key is there are claimed for: the key is read before
        the statement commits, so a missing key leaves the charge queued, as it does in the
        general claim."""
        plans = self.ctx.plans
        keys: dict[str, str] = {}
        for currency, account in plans.accounts.items():
            with contextlib.suppress(ConfigError):
                keys[currency] = account.private_key()
        gap = timedelta(hours=self.ctx.settings.min_charge_gap_hours)

        def claim_once() -> hotpath.Claimed | None:
            with connect_unpinged(self.ctx.url) as conn:
                return hotpath.claim(
                    conn.execution_options(isolation_level="AUTOCOMMIT"), charge_id, now=now,
                    gap_start=now - gap, plans=list(plans.plans), currencies=list(keys),
                    worker=self.ctx.actor,
                )  # fmt: skip

        try:
            claimed = claim_once()
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
            # Safe to run again: the claim is one conditional statement (``queued ->
            # in_flight``, committed on its own), and no call is made before it returns. If
            # the broken connection had committed it, the second run finds the charge no
            # longer queued and claims nothing (the general claim then answers
            # "not_claimed", and the stuck sweep makes that in-flight charge unknown, for a
            # person); if not, this is the only claim. It is never claimed twice. The
            # connection was checked out without a ping (``connect_unpinged``); the error
            # invalidated the pool, so this run gets a new connection.
            log.warning("charge %s: the claim's connection was broken; claiming again", charge_id)
            claimed = claim_once()
        if claimed is None:
            return None
        charge = claimed.charge
        return Claim(
            charge, claimed.subscription, claimed.attempt_id, plans.plans[charge.plan],
            keys[charge.currency],
        )  # fmt: skip

    def _hold_reason(self, charge: ChargeRow, sub: SubRow, now: datetime) -> str | None:
        if sub.status not in CHARGEABLE:
            return f"subscription_{sub.status}"
        gap = timedelta(hours=self.ctx.settings.min_charge_gap_hours)
        if (
            not charge.manual
            and sub.last_charged_at is not None
            and now - sub.last_charged_at < gap
        ):
            return FailureReason.VELOCITY_GUARD
        return None

    def _hold(
        self, session: Session, charge: ChargeRow, sub: SubRow, reason: str, now: datetime
    ) -> ChargeResult:
        """Keep a claimed charge away from the gateway, and say why (no attempt is made)."""
        back = {"attempts": Charge.attempts - 1}
        if reason in (FailureReason.VELOCITY_GUARD, FailureReason.UNKNOWN_PLAN):
            if reason == FailureReason.VELOCITY_GUARD:
                message = (
                    "not sent: subscription was charged successfully less than "
                    f"{self.ctx.settings.min_charge_gap_hours:g} hours ago"
                )
            else:
                message = (
                    f"plan {charge.plan!r} or the account for {charge.currency} is no longer in "
                    "the plans file: nothing was sent; add it back, then `billing failed retry`"
                )
            held = lifecycle.move(
                session, charge.id, "hold", to=ChargeState.FAILED, now=now,
                attempt=charge.attempts,
                values={**back, "reason": reason, "last_message": message, "next_attempt_at": None},
            )  # fmt: skip
            if isinstance(held, ChargeRow):
                ledger.append(
                    session, outcome=LedgerOutcome.HELD, operation=Operation.ENGINE,
                    actor=self.ctx.actor, subscription=sub, charge=held, reason=message,
                )  # fmt: skip
                charge_event(
                    session, EventType.CHARGE_FAILED, held, sub, reason=None, failure=reason
                )
        elif reason == f"subscription_{SubscriptionStatus.CANCELLED}":
            message = "subscription cancelled before the charge was sent"
            held = lifecycle.move(
                session, charge.id, "hold", to=ChargeState.DISCARDED, now=now,
                attempt=charge.attempts,
                values={**back, "reason": reason, "next_attempt_at": None},
            )  # fmt: skip
            if isinstance(held, ChargeRow):
                ledger.append(
                    session, outcome=LedgerOutcome.DISCARDED, operation=Operation.ENGINE,
                    actor=self.ctx.actor, subscription=sub, charge=held, reason=message,
                )  # fmt: skip
                charge_event(session, EventType.CHARGE_DISCARDED, held, sub, reason=message)
        else:  # paused or suspended: it waits, unsent, until the subscription is chargeable
            lifecycle.move(
                session, charge.id, "hold", to=ChargeState.PENDING, now=now,
                attempt=charge.attempts, values=back,
            )  # fmt: skip
        log.info("charge %s held: %s", charge.id, reason)
        return ChargeResult(charge.id, "held", reason)

    def _rate_limited(self) -> bool:
        return self.ctx.limiter is not None and any(
            account.max_charges_per_second for account in self.ctx.plans.accounts.values()
        )

    def _wait_for_slot(self, charge_id: int) -> ChargeResult | None:
        """Under a rate limit, wait for the account's slot *before* claiming: time spent
        waiting must not count as time in flight, which the stuck sweep measures."""
        with session_scope(self.ctx.url) as session:
            found = (
                session.connection()
                .execute(select(Charge.state, Charge.currency).where(Charge.id == charge_id))
                .one_or_none()
            )
        if found is None:
            raise NotFound(f"charge {charge_id} does not exist")
        if found.state != ChargeState.QUEUED:
            return ChargeResult(charge_id, "not_claimed")
        account = self.ctx.plans.accounts.get(found.currency)
        if self.ctx.limiter is not None and account is not None and account.max_charges_per_second:
            self.ctx.limiter.acquire(account.merchant_id, account.max_charges_per_second)
        return None

    # ---------------------------------------------------------------------- record

    def record(
        self,
        claim: Claim,
        result: Outcome,
        *,
        retries: int = 0,
        duration: float = 0.0,
        now: datetime | None = None,
    ) -> ChargeResult:
        """Write the answer of the claim's attempt: charge, attempt, ledger, subscription
        and events in one transaction; a late answer as evidence only."""
        now = now or utcnow()
        if (
            self.at_once
            and isinstance(result, Approved)
            and self._approved_at_once(claim, result, now)
        ):
            self._log(claim, result, duration, late=False)
            metrics.count_charge(claim.charge.plan, result.kind)
            return ChargeResult(claim.charge.id, "done", result.kind)
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
            match result:
                case Approved():
                    recorded = self._approved(session, claim, result, now)
                case Declined():
                    recorded = self._declined(session, claim, result, now)
                case NotSent():
                    again = retries < self.ctx.settings.not_sent_max_retries
                    recorded = self._not_sent(session, claim, result, now, again=again)
                    if (
                        isinstance(recorded, Recorded)
                        and recorded.charge.state == ChargeState.QUEUED
                    ):
                        # Safe to send again: the request provably never reached the gateway.
                        retry_in = self.ctx.backoff(retries)
                case Unknown():
                    recorded = self._unknown(session, claim, result, now)
            if isinstance(recorded, Lost):
                self._late(session, claim, result, now)
        self._log(claim, result, duration, late=isinstance(recorded, Lost))
        if isinstance(recorded, Lost):
            return ChargeResult(claim.charge.id, "late", result.kind)
        metrics.count_charge(claim.charge.plan, result.kind)
        if retry_in is not None:
            return ChargeResult(claim.charge.id, "retry", result.kind, retry_in)
        return ChargeResult(claim.charge.id, "done", result.kind)

    def _ledger(
        self,
        session: Session,
        claim: Claim,
        charge: ChargeRow,
        result: Outcome,
        outcome: LedgerOutcome,
        **extra: Any,
    ) -> None:
        """The ledger row of this attempt's answer (the private key scrubbed from it), with
        the card the attempt was made with (the subscription as the claim read it).

        The caller has locked the subscription already: see ``load_subscription``.
        """
        ledger.append_outcome(
            session, charge, claim.subscription, result, operation=Operation.DUPLICATE,
            actor=self.ctx.actor, outcome=outcome, attempt_id=claim.attempt_id,
            secrets=(claim.private_key,), **extra,
        )  # fmt: skip

    def _answer(
        self,
        session: Session,
        claim: Claim,
        to: ChargeState,
        values: dict[str, Any],
        now: datetime,
    ) -> ChargeRow | Lost:
        """The move an on-time answer makes. Another try is never scheduled once an earlier
        attempt was approved late: the charge fails instead, for a person."""
        where = [CURRENT]
        if to in (ChargeState.PENDING, ChargeState.QUEUED):
            where.append(lifecycle.not_late_flagged())
        moved = lifecycle.move(
            session, claim.charge.id, "answer", to=to, now=now, attempt=claim.number,
            where=where, values=values,
        )  # fmt: skip
        if isinstance(moved, Lost) and to in (ChargeState.PENDING, ChargeState.QUEUED):
            moved = lifecycle.move(
                session, claim.charge.id, "answer", to=ChargeState.FAILED, now=now,
                attempt=claim.number, where=[CURRENT, lifecycle.late_flagged()],
                values={
                    **values, "reason": FailureReason.LATE_APPROVAL, "next_attempt_at": None,
                    "last_message": "an earlier attempt was approved late: see its ledger row",
                },
            )  # fmt: skip
        return moved

    def _approved(
        self, session: Session, claim: Claim, result: Approved, now: datetime
    ) -> Recorded | Lost:
        charge, plan = claim.charge, claim.plan
        asked = charge.amount
        mismatch = result.amount != asked if result.amount is not None else bool(result.amount_text)
        tx = widths.fit(result.tx, widths.TX)
        # The flags the database sets from the row: a late approval of an earlier attempt
        # becomes a possible double charge; another amount, or a TX another charge holds,
        # adds its own flag. None of them hides another.
        review: Any = lifecycle.upgraded_late_approval()
        if mismatch:
            review = lifecycle.add_flag(Review.AMOUNT_MISMATCH, review)
        held_elsewhere = exists().where(Charge.tx == tx, Charge.id != charge.id)
        review = case((held_elsewhere, lifecycle.add_flag(Review.TX_REUSED, review)), else_=review)
        values: dict[str, Any] = {"tx": tx, "reason": None, "review": review, **_said(result)}
        if charge.deferred:
            to, outcome, event = (
                ChargeState.AUTHORIZED,
                LedgerOutcome.AUTHORIZED,
                EventType.CHARGE_AUTHORIZED,
            )
            values |= {"authorized_amount": asked, "next_attempt_at": now + plan.capture_after}
        else:
            to, outcome, event = (
                ChargeState.APPROVED,
                LedgerOutcome.APPROVED,
                EventType.CHARGE_APPROVED,
            )
            values |= {"collected_amount": asked, "next_attempt_at": None}
        moved = self._answer(session, claim, to, values, now)
        if isinstance(moved, Lost):
            return moved
        # The subscription is locked (by the advance) before any row refers to it.
        advanced = lifecycle.advance_subscription(
            session, charge.subscription_id, plan, charge.period, now
        )
        details = _answered(result, asked) if mismatch else None
        self._ledger(session, claim, moved, result, outcome, amount=asked, details=details)
        charge_event(session, event, moved, advanced.after, amount=asked)
        _subscription_changed(session, advanced)
        return Recorded(moved, outcome)

    def _approved_at_once(self, claim: Claim, result: Approved, now: datetime) -> bool:
        """:meth:`_approved` in one statement (``billing.charging.hotpath``) when its attempt
        is current and the subscription active and as the claim read it; ``False`` (nothing
        written) leaves it to the general record."""
        approval = self._approval(claim, result, now)
        if approval is None:
            return False
        # Checked out without a ping: a broken connection raises OperationalError, which
        # ``record_surely`` answers by recording again (safe: see ``recorded_surely``).
        with connect_unpinged(self.ctx.url) as conn, conn.begin() as transaction:
            written = hotpath.approve(conn, approval, endpoints=endpoint_filters(conn), now=now)
            if not written:
                transaction.rollback()
                return False
        return True

    def _approval(self, claim: Claim, result: Approved, now: datetime) -> hotpath.Approval | None:
        """What :meth:`_approved` writes when nothing moved since the claim, worked out."""
        charge, plan, seen = claim.charge, claim.plan, claim.subscription
        asked = charge.amount
        mismatch = result.amount != asked if result.amount is not None else bool(result.amount_text)
        if charge.deferred:
            to, outcome, event = (
                ChargeState.AUTHORIZED, LedgerOutcome.AUTHORIZED, EventType.CHARGE_AUTHORIZED,
            )  # fmt: skip
            money: dict[str, Any] = {
                "authorized_amount": asked, "next_attempt_at": now + plan.capture_after,
            }  # fmt: skip
        else:
            to, outcome, event = (
                ChargeState.APPROVED, LedgerOutcome.APPROVED, EventType.CHARGE_APPROVED,
            )  # fmt: skip
            money = {"collected_amount": asked, "next_attempt_at": None}
        try:
            next_due = lifecycle.schedule_of(seen, plan).due(charge.period + 1)
        except BillingError:  # the general path says what is wrong with the schedule
            return None
        after = dataclasses.replace(
            charge, state=to.value, tx=widths.fit(result.tx, widths.TX), reason=None,
            updated_at=now, **_said(result), **money,
        )  # fmt: skip
        ledger_row = ledger.row(
            **ledger.outcome_fields(
                after, seen, result, operation=Operation.DUPLICATE, actor=self.ctx.actor,
                outcome=outcome, amount=asked, attempt_id=claim.attempt_id,
                secrets=(claim.private_key,),
                details=_answered(result, asked) if mismatch else None,
            ),
            at=now,
        )  # fmt: skip
        return hotpath.Approval(
            charge=after, number=claim.number, attempt_id=claim.attempt_id, seen=seen,
            subscription=dataclasses.replace(seen, last_charged_at=now, updated_at=now),
            event=event, kind=result.kind, code=widths.fit(result.code or None, widths.CODE),
            mismatch=mismatch, next_due=next_due, ledger_row=ledger_row,
        )  # fmt: skip

    def _declined(
        self, session: Session, claim: Claim, result: Declined, now: datetime
    ) -> Recorded | Lost:
        charge, plan = claim.charge, claim.plan
        declines = charge.declines + 1
        delay = dunning.next_retry_delay(plan, declines) if result.soft else None
        values: dict[str, Any] = {"declines": declines, **_said(result)}
        if delay is not None:
            to, failure = ChargeState.PENDING, None
            values |= {"next_attempt_at": now + delay, "reason": None}
        else:
            to = ChargeState.FAILED
            failure = FailureReason.LADDER_EXHAUSTED if result.soft else FailureReason.HARD_DECLINE
            values |= {"next_attempt_at": None, "reason": failure}
        moved = self._answer(session, claim, to, values, now)
        if isinstance(moved, Lost):
            return moved
        sub = load_subscription(session, charge.subscription_id, lock=True)
        # A new card stored while this call was made with the old one: the decline was the
        # old card's, and the new card gets its try at once (billing.charging.newcard).
        new_card = sub.alias != claim.subscription.alias
        if new_card:
            again = newcard.try_again(session, moved, plan, now)
            new_card = isinstance(again, ChargeRow)
            if isinstance(again, ChargeRow):
                moved, failure = again, None
        if moved.state == ChargeState.FAILED:
            failure = FailureReason(moved.reason) if moved.reason else failure
        retry_at = (
            moved.next_attempt_at.isoformat()
            if moved.state == ChargeState.PENDING and moved.next_attempt_at is not None
            else None
        )
        details: dict[str, Any] = {"soft": result.soft, "next_attempt_at": retry_at}
        if new_card:
            details["new_card"] = True
        self._ledger(
            session, claim, moved, result, LedgerOutcome.DECLINED, reason=failure,
            details=details,
        )  # fmt: skip
        discarded = self._unless_cancelled(session, moved, sub, now)
        changed: lifecycle.SubMove | Lost = Lost(None, "declined")
        if moved.state == ChargeState.PENDING and discarded is None:
            changed = lifecycle.move_subscription(
                session, charge.subscription_id, "declined", to=SubscriptionStatus.PAST_DUE,
                now=now,
            )  # fmt: skip
        elif failure in (FailureReason.LADDER_EXHAUSTED, FailureReason.HARD_DECLINE):
            changed = lifecycle.move_subscription(
                session, charge.subscription_id, "failed",
                to=dunning.status_after_failure(plan), now=now,
            )  # fmt: skip
        # The shop sees the subscription as it is after the whole change.
        sub = changed.after if isinstance(changed, lifecycle.SubMove) else sub
        told = discarded or moved
        charge_event(
            session, EventType.CHARGE_DECLINED, told, sub, reason=failure, call=Call.CHARGE,
            soft=result.soft, next_attempt_at=retry_at.replace("+00:00", "Z") if retry_at else None,
        )  # fmt: skip
        if moved.state == ChargeState.FAILED:
            charge_event(session, EventType.CHARGE_FAILED, moved, sub, failure=failure)
        if discarded is not None:
            charge_event(
                session, EventType.CHARGE_DISCARDED, discarded, sub, reason=CANCELLED_WHILE_SENT
            )
        _subscription_changed(session, changed)
        return Recorded(discarded or moved, LedgerOutcome.DECLINED, failure)

    def _unless_cancelled(
        self, session: Session, moved: ChargeRow, sub: SubRow, now: datetime
    ) -> ChargeRow | None:
        """A retry scheduled for a subscription cancelled while its call was out: nothing
        would ever send it, so it is discarded now (with its ledger row)."""
        if moved.state != ChargeState.PENDING or sub.status != SubscriptionStatus.CANCELLED:
            return None
        discarded = lifecycle.move(
            session, moved.id, "discard", to=ChargeState.DISCARDED, now=now,
            where=[Charge.state == ChargeState.PENDING],
            values={"next_attempt_at": None, "reason": SUBSCRIPTION_CANCELLED},
        )  # fmt: skip
        if isinstance(discarded, Lost):
            return None
        ledger.append(
            session, outcome=LedgerOutcome.DISCARDED, operation=Operation.ENGINE,
            actor=self.ctx.actor, subscription=sub, charge=discarded, reason=CANCELLED_WHILE_SENT,
        )  # fmt: skip
        return discarded

    def _not_sent(
        self, session: Session, claim: Claim, result: NotSent, now: datetime, *, again: bool
    ) -> Recorded | Lost:
        values = _said(result)
        if again:
            moved = self._answer(
                session, claim, ChargeState.QUEUED, values | {"queued_at": now}, now
            )
        else:
            values |= {"reason": FailureReason.NOT_SENT_EXHAUSTED, "next_attempt_at": None}
            moved = self._answer(session, claim, ChargeState.FAILED, values, now)
        if isinstance(moved, Lost):
            return moved
        sub = load_subscription(session, moved.subscription_id, lock=True)
        self._ledger(session, claim, moved, result, LedgerOutcome.NOT_SENT)
        if moved.state == ChargeState.FAILED:
            charge_event(session, EventType.CHARGE_FAILED, moved, sub, failure=moved.reason)
        return Recorded(moved, LedgerOutcome.NOT_SENT)

    def _unknown(
        self, session: Session, claim: Claim, result: Unknown, now: datetime
    ) -> Recorded | Lost:
        values = {"reason": FailureReason.UNKNOWN_OUTCOME, "next_attempt_at": None, **_said(result)}
        moved = self._answer(session, claim, ChargeState.UNKNOWN, values, now)
        if isinstance(moved, Lost):
            return moved
        sub = load_subscription(session, moved.subscription_id, lock=True)
        self._ledger(session, claim, moved, result, LedgerOutcome.UNKNOWN)
        charge_event(session, EventType.CHARGE_UNKNOWN, moved, sub, call=Call.CHARGE)
        return Recorded(moved, LedgerOutcome.UNKNOWN)

    # ------------------------------------------------------------------ late answers

    def _late(
        self,
        session: Session,
        claim: Claim,
        result: Outcome,
        now: datetime,
        *,
        approval: Approved | None = None,
    ) -> None:
        """The answer of an attempt that is no longer current: evidence (``result``), and a
        person is told when it says money moved (``approval``, by default ``result`` if it
        is one). The charge's row is moved (or flagged) first and the subscription locked
        next, before the evidence row refers to it (the lock order)."""
        approval = approval or (result if isinstance(result, Approved) else None)
        stopped = None
        if approval is not None:
            stopped = late_approval(session, claim.charge.id, approval, claim.number, now)
        elif isinstance(result, Declined | NotSent):
            contradicted(session, claim.charge.id, claim.number, now)
        sub = load_subscription(session, claim.charge.subscription_id, lock=True)
        answered = getattr(result, "amount", None)
        self._ledger(
            session, claim, stopped or claim.charge, result, LedgerOutcome.LATE_ANSWER,
            reason=f"late answer of attempt {claim.number}: the charge had moved on",
            details={
                "call": Call.CHARGE.value,
                "attempt": claim.number,
                "answer": result.kind,
                "amount": str(claim.charge.amount),
                "answered_amount": str(answered) if answered is not None else None,
            },
        )  # fmt: skip
        if stopped is not None:
            charge_event(
                session, EventType.CHARGE_FAILED, stopped, sub, failure=FailureReason.LATE_APPROVAL
            )

    def record_unknown(self, claim: Claim, result: Outcome, error: Exception) -> ChargeResult:
        """The last resort: recording the answer failed for a reason other than a lost
        connection; the attempt is still recorded, as unknown, with the redacted evidence.
        If the charge had moved on meanwhile, this is a late answer like any other."""
        now = utcnow()
        why = f"the answer ({result.kind}) could not be recorded ({type(error).__name__})"
        # As little as will say what happened: the (redacted) body, nothing parsed from it
        # (one of those values may be what the database refused).
        evidence = Unknown(reason=why, http_status=result.http_status, raw=result.raw)
        with session_scope(self.ctx.url) as session:
            session.connection().execute(
                update(Attempt)
                .where(Attempt.id == claim.attempt_id)
                .values(finished_at=now, outcome="unknown")
            )
            moved = lifecycle.move(
                session, claim.charge.id, "answer", to=ChargeState.UNKNOWN, now=now,
                attempt=claim.number, where=[CURRENT],
                values={"reason": FailureReason.UNKNOWN_OUTCOME, "next_attempt_at": None,
                        "last_message": widths.fit(why, widths.MESSAGE)},
            )  # fmt: skip
            if isinstance(moved, Lost):
                self._late(
                    session, claim, result if isinstance(result, Approved) else evidence, now
                )
                return ChargeResult(claim.charge.id, "late", result.kind)
            sub = load_subscription(session, claim.charge.subscription_id, lock=True)
            self._ledger(session, claim, moved, evidence, LedgerOutcome.UNKNOWN, reason=why)
            charge_event(session, EventType.CHARGE_UNKNOWN, moved, sub, call=Call.CHARGE)
        metrics.count_charge(claim.charge.plan, "unknown")
        return ChargeResult(claim.charge.id, "done", "unknown")

    def _log(self, claim: Claim, result: Outcome, duration: float, *, late: bool) -> None:
        """The one line of a charge's outcome (the gateway's own line of an answered call is
        DEBUG: this one carries its TX and HTTP status)."""
        if not log.isEnabledFor(logging.INFO):
            return
        outcome = f"late_{result.kind}" if late else result.kind
        alias = mask_alias(claim.subscription.alias)
        tx = getattr(result, "tx", None)
        log.info(
            "charge outcome charge=%s ref=%s alias=%s outcome=%s code=%s tx=%s http=%s"
            " duration=%.3f",
            claim.charge.id,
            claim.subscription.external_ref,
            alias,
            outcome,
            result.code,
            tx or "-",
            result.http_status if result.http_status is not None else "-",
            duration,
            extra={
                "charge_id": claim.charge.id,
                "external_ref": claim.subscription.external_ref,
                "alias": alias,
                "outcome": outcome,
                "code": result.code,
                "tx": tx,
                "http_status": result.http_status,
                "duration": round(duration, 4),
            },
        )


def _said(result: Outcome) -> dict[str, Any]:
    """What the gateway said, as the charge keeps it (cut to its columns). For an unknown
    outcome that is why it is unknown; the gateway's own words are in the ledger row."""
    said = result.reason if isinstance(result, Unknown) else result.message
    return {
        "last_code": widths.fit(result.code or None, widths.CODE),
        "last_message": widths.fit(said or getattr(result, "reason", "") or None, widths.MESSAGE),
    }


def _answered(result: Approved, asked: Decimal) -> dict[str, Any]:
    """What the gateway said it moved, when it is not what was asked."""
    return {
        "asked": str(asked),
        "answered_amount": str(result.amount) if result.amount is not None else None,
        "answered_amount_raw": result.amount_text,
    }


def _subscription_changed(session: Session, moved: lifecycle.SubMove | Lost) -> None:
    """The shop's event for a subscription whose status changed."""
    if isinstance(moved, lifecycle.SubMove) and moved.changed:
        type_ = STATUS_EVENTS.get(SubscriptionStatus(moved.after.status))
        if type_ is not None:
            subscription_event(session, type_, moved.after, previous=moved.before)


def late_approval(
    session: Session, charge_id: int, result: Approved, number: int, now: datetime
) -> ChargeRow | None:
    """An attempt no longer current was approved: the card was charged for this period.

    A retry still waiting stops (the charge goes to the failed queue, ``late_approval``;
    returned, for its event); otherwise the charge is flagged for a person: a possible
    double charge when the period was approved again meanwhile, a late approval else.
    Nothing is flagged when the books already hold this transaction (a person resolved the
    charge with it).
    """
    message = widths.fit(
        f"attempt {number} was approved after it was given up on (TX {result.tx}): the card "
        "was charged; confirm it in the Klik & Pay back office, then "
        f"`billing failed resolve {charge_id} --approved --tx {result.tx}`",
        widths.MESSAGE,
    )
    stopped = lifecycle.move(
        session, charge_id, "late_approval", to=ChargeState.FAILED, now=now,
        values={"reason": FailureReason.LATE_APPROVAL, "next_attempt_at": None,
                "last_message": message},
    )  # fmt: skip
    if isinstance(stopped, ChargeRow):
        return stopped
    booked = session.connection().scalar(
        select(
            exists().where(
                LedgerEntry.charge_id == charge_id,
                LedgerEntry.tx == widths.fit(result.tx, widths.TX),
                LedgerEntry.outcome.in_([o.value for o in (*COLLECTED, *AUTHORIZED)]),
            )
        )
    )
    if not booked:
        paid = Charge.state.in_(list(PAID_STATES))
        lifecycle.flag(
            session,
            charge_id,
            case(
                (paid, lifecycle.add_flag(Review.POSSIBLE_DOUBLE_CHARGE)),
                else_=lifecycle.add_flag(Review.LATE_APPROVAL),
            ),
            now=now,
        )
    return None


def contradicted(session: Session, charge_id: int, number: int, now: datetime) -> None:
    """The gateway's own answer for attempt ``number`` says no money moved (a decline, or
    a call it never received), yet the charge is paid on that attempt: only a person's
    resolution can have booked it (an on-time approval of the attempt would have been its
    answer). Flag it: the books hold money the gateway says it never took. The condition
    is the row's (still paid, still that attempt), so a retry meanwhile is not flagged."""
    lifecycle.flag(
        session, charge_id, lifecycle.add_flag(Review.RESOLUTION_CONTRADICTED), now=now,
        where=[Charge.attempts == number, Charge.state.in_(list(PAID_STATES))],
    )  # fmt: skip


__all__ = ["Calls", "ChargeResult", "Claim", "contradicted", "late_approval"]
