"""The rebilling engine: sweeps turn due periods into charge rows, charges call the gateway,
the engine sweep picks up retries, lost messages and stuck calls.

How a card is never charged twice for one period:
- a charge row is unique per (subscription, period): a second sweep inserts nothing;
- a charge is sent only after an atomic ``queued -> in_flight`` claim: a second message for
  it (redelivery, a second worker, a requeue) finds it claimed and does nothing;
- the attempt row is committed before the call, and a call whose answer is lost (or whose
  worker died) ends ``unknown``: never sent again without a person;
- a subscription's next period only advances on approval, so a later period cannot be
  created while an earlier one waits for a person.

Celery never appears here: the task layer hands in a ``dispatcher`` that sends messages.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Select, exists, func, literal, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, joinedload

from billing import dates, dunning, ledger, metrics
from billing.db import session_scope
from billing.durations import Interval
from billing.errors import NotFound
from billing.gateway import KlikAndPayClient, get_client
from billing.models import (
    Attempt,
    Charge,
    ChargeState,
    Money,
    Subscription,
    SubscriptionStatus,
    UTCDateTime,
    utcnow,
)
from billing.outcomes import Approved, Declined, NotSent, Outcome, Unknown
from billing.plans import Plan, PlanSet, get_plans, sync_plan_versions
from billing.ratelimit import RateLimiter
from billing.redact import mask_alias
from billing.settings import Settings, get_settings
from billing.settlement import Settlement

log = logging.getLogger("billing.engine")

#: Subscriptions whose charges may be created and sent.
CHARGEABLE = (SubscriptionStatus.ACTIVE, SubscriptionStatus.PAST_DUE)

#: Load a charge's subscription in the same query (one round trip, not two).
WITH_SUBSCRIPTION = joinedload(Charge.subscription, innerjoin=True)

#: Pauses (seconds) between tries of recording an outcome when the database connection
#: breaks; the last try's error propagates (and the charge is later marked unknown).
RECORD_RETRY_PAUSES = (0.2, 1.0, 3.0)

#: Key of the PostgreSQL advisory lock that serialises dispatching, so that two beats or
#: many finishing charges never send more than ``max_in_flight`` between them.
DISPATCH_LOCK = 0x4B50_0001

Dispatcher = Callable[[Sequence[int]], None]


@dataclass(frozen=True)
class SweepResult:
    """What one plan sweep did."""

    plan: str
    created: int
    skipped_periods: int
    dispatched: int


@dataclass(frozen=True)
class EngineSweepResult:
    """What one engine sweep did."""

    stuck: int
    requeued: int
    captures: int
    released: int
    dispatched: int


@dataclass(frozen=True)
class ChargeResult:
    """What a charge task did. ``retry_in`` asks the task layer for a delayed retry."""

    charge_id: int
    status: Literal["done", "not_claimed", "held", "retry"]
    outcome: str | None = None
    retry_in: float | None = None


def worker_name() -> str:
    return f"worker:{socket.gethostname()}:{os.getpid()}"


class Engine:
    """Everything the worker and the beat do, callable from tests without Celery."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        plans: PlanSet | None = None,
        client: KlikAndPayClient | None = None,
        dispatcher: Dispatcher | None = None,
        capture_dispatcher: Dispatcher | None = None,
        limiter: RateLimiter | None = None,
        actor: str | None = None,
    ) -> None:
        self.settings = settings or get_settings()
        self.url = self.settings.database_url
        self._plans = plans
        self.client = client or get_client(self.settings)
        self.dispatcher: Dispatcher = dispatcher or (lambda ids: None)
        self.capture_dispatcher: Dispatcher = capture_dispatcher or (lambda ids: None)
        redis_url = self.settings.effective_redis_url
        self.limiter = (
            limiter if limiter is not None else (RateLimiter(redis_url) if redis_url else None)
        )
        self.actor = actor or worker_name()
        self.settlement = Settlement(self)
        self._finished = itertools.count(1)
        self._refill_every = max(1, self.settings.max_in_flight // 8)

    @property
    def plans(self) -> PlanSet:
        # Re-read only when the file changes (get_plans caches by modification time).
        return self._plans if self._plans is not None else get_plans(self.settings)

    # ------------------------------------------------------------------ sweeps

    def sweep_plan(self, plan_name: str, now: datetime | None = None) -> SweepResult:
        """Create the charge row of every due subscription of the plan, then dispatch.

        Runs in batches of ``sweep_batch_size``, one transaction each; a second sweep at
        the same moment inserts nothing (the unique constraint) and sends nothing extra.
        """
        now = now or utcnow()
        plan = self.plans.plan(plan_name)
        account = self.plans.account_for(plan)
        with session_scope(self.url) as session:
            version = sync_plan_versions(session, self.plans)[plan.name]
        created = self._insert_on_time(plan, account.merchant_id, version, now)
        skipped = 0
        last_id = 0
        # What the set-based insert left: overdue subscriptions, and under catch_up = "all"
        # those charged too recently; each needs the date arithmetic below.
        while True:
            with session_scope(self.url) as session:
                rows = session.execute(self._due_query(plan.name, now, last_id)).all()
                if not rows:
                    break
                last_id = rows[-1].id
                new_rows: list[dict[str, Any]] = []
                for row in rows:
                    period, due, not_before, n_skipped = self._period_to_charge(
                        session, plan, row, now
                    )
                    skipped += n_skipped
                    if period is None:
                        continue
                    new_rows.append(
                        {
                            "subscription_id": row.id,
                            "period": period,
                            "due_at": due,
                            "plan": plan.name,
                            "plan_version": version,
                            "amount": row.amount_override or plan.amount,
                            "currency": plan.currency,
                            "merchant_id": account.merchant_id,
                            "deferred": plan.deferred,
                            "state": ChargeState.PENDING,
                            "attempts": 0,
                            "declines": 0,
                            "manual": False,
                            "next_attempt_at": not_before,
                            "created_at": now,
                            "updated_at": now,
                        }
                    )
                created += _insert_new_charges(session, new_rows)
        dispatched = self.dispatch_due(now)
        log.info(
            "sweep plan=%s created=%d skipped_periods=%d dispatched=%d",
            plan.name,
            created,
            skipped,
            dispatched,
        )
        return SweepResult(plan.name, created, skipped, dispatched)

    def _insert_on_time(self, plan: Plan, merchant_id: str, version: int, now: datetime) -> int:
        """Charge rows for subscriptions due exactly one period, in one statement per batch.

        A subscription whose ``next_charge_at`` is later than ``now`` minus the plan's
        shortest possible period cannot have a second period due, so its row needs no date
        arithmetic: the database builds it from the subscription in place (the sweep's hot
        path; issue 7 asks for 10,000 rows a second).
        """
        conditions = [
            Subscription.plan == plan.name,
            Subscription.status.in_(CHARGEABLE),
            Subscription.next_charge_at <= now,
            Subscription.next_charge_at > now - shortest_period(plan.every),
            ~exists().where(
                Charge.subscription_id == Subscription.id,
                Charge.period == Subscription.next_period,
            ),
        ]
        if plan.catch_up == "all":
            conditions.append(
                (Subscription.last_charged_at.is_(None))
                | (Subscription.last_charged_at <= now - plan.catch_up_spacing)
            )
        rows = (
            select(
                Subscription.id,
                Subscription.next_period,
                Subscription.next_charge_at,
                literal(plan.name),
                literal(version),
                func.coalesce(Subscription.amount_override, literal(plan.amount, Money)),
                literal(plan.currency),
                literal(merchant_id),
                literal(plan.deferred),
                literal(ChargeState.PENDING.value),
                literal(0),
                literal(0),
                literal(False),
                Subscription.next_charge_at,
                literal(now, UTCDateTime()),
                literal(now, UTCDateTime()),
            )
            .where(*conditions)
            .order_by(Subscription.id)
            .limit(self.settings.sweep_batch_size)
        )
        columns = [
            "subscription_id", "period", "due_at", "plan", "plan_version", "amount", "currency",
            "merchant_id", "deferred", "state", "attempts", "declines", "manual",
            "next_attempt_at", "created_at", "updated_at",
        ]  # fmt: skip
        created = 0
        while True:
            with session_scope(self.url) as session:
                dialect = session.get_bind().dialect.name
                insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
                stmt = (
                    insert(Charge)
                    .from_select(columns, rows)
                    .on_conflict_do_nothing(index_elements=["subscription_id", "period"])
                )
                # rowcount of an INSERT is only kept when asked for (SQLAlchemy 2).
                result = session.connection().execute(
                    stmt.execution_options(preserve_rowcount=True)
                )
                inserted = max(result.rowcount, 0)
            created += inserted
            if inserted < self.settings.sweep_batch_size:
                return created

    def _due_query(self, plan: str, now: datetime, after_id: int) -> Select[*tuple[Any, ...]]:
        no_charge_yet = ~exists().where(
            Charge.subscription_id == Subscription.id, Charge.period == Subscription.next_period
        )
        return (
            select(
                Subscription.id,
                Subscription.next_period,
                Subscription.next_charge_at,
                Subscription.anchor_at,
                Subscription.amount_override,
                Subscription.last_charged_at,
            )
            .where(
                Subscription.plan == plan,
                Subscription.status.in_(CHARGEABLE),
                Subscription.next_charge_at <= now,
                Subscription.id > after_id,
                no_charge_yet,
            )
            .order_by(Subscription.id)
            .limit(self.settings.sweep_batch_size)
        )

    def _period_to_charge(
        self, session: Session, plan: Plan, row: Any, now: datetime
    ) -> tuple[int | None, datetime, datetime, int]:
        """The period to charge now, its due time, the earliest send time, periods skipped.

        Overdue subscriptions (several periods due at once) never get a burst of charges:
        under ``catch_up = "latest"`` the older periods are written off as ``skipped``;
        under ``"all"`` they are charged one by one, ``catch_up_spacing`` apart.
        """
        period, due = row.next_period, row.next_charge_at
        if plan.catch_up == "all":
            # The last period of a backlog is due on time too, but still waits its spacing.
            not_before = due
            if row.last_charged_at is not None:
                not_before = max(due, row.last_charged_at + plan.catch_up_spacing)
            return period, due, not_before, 0
        latest = dates.latest_due_period(row.anchor_at, plan.every, plan.timezone, now)
        if latest is None or latest <= period:
            return period, due, due, 0
        new_due = dates.due_at(row.anchor_at, plan.every, latest, plan.timezone)
        moved = session.scalar(
            update(Subscription)
            .where(Subscription.id == row.id, Subscription.next_period == period)
            .values(next_period=latest, next_charge_at=new_due, updated_at=now)
            .returning(Subscription.id)
        )
        if moved is None:  # another sweep moved it first and wrote the skips
            return None, due, due, 0
        sub = session.get_one(Subscription, row.id)
        account = self.plans.account_for(plan)
        for skipped_period in range(period, latest):
            ledger.append(
                session,
                outcome="skipped",
                operation="engine",
                actor=self.actor,
                subscription=sub,
                period=skipped_period,
                currency=plan.currency,
                merchant_id=account.merchant_id,
                reason=(
                    f"period {skipped_period} not charged: {latest - period} periods were due"
                    f" at once and plan {plan.name} charges only the latest (catch_up=latest)"
                ),
            )
        return latest, new_due, new_due, latest - period

    # --------------------------------------------------------------- dispatching

    def dispatch_due(self, now: datetime | None = None) -> int:
        """Send due pending charges, never more than ``max_in_flight`` in the broker or workers.

        The state change to ``queued`` commits before any message is sent: a message is
        never about a charge the database does not know is on its way.
        """
        now = now or utcnow()
        with session_scope(self.url) as session:
            if not _lock_dispatch(session):
                return 0  # another process is dispatching right now; it fills the room
            busy = session.scalar(
                select(func.count())
                .select_from(Charge)
                .where(Charge.state.in_((ChargeState.QUEUED, ChargeState.IN_FLIGHT)))
            )
            room = self.settings.max_in_flight - int(busy or 0)
            if room <= 0:
                return 0
            due = (
                select(Charge.id)
                .join(Subscription, Subscription.id == Charge.subscription_id)
                .where(
                    Charge.state == ChargeState.PENDING,
                    Charge.next_attempt_at <= now,
                    Subscription.status.in_(CHARGEABLE),
                )
                .order_by(Charge.next_attempt_at, Charge.id)
                .limit(room)
            )
            ids = list(
                session.scalars(
                    update(Charge)
                    .where(Charge.id.in_(due.scalar_subquery()))
                    .where(Charge.state == ChargeState.PENDING)
                    .values(state=ChargeState.QUEUED, queued_at=now, updated_at=now)
                    .returning(Charge.id)
                )
            )
        if ids:
            self.dispatcher(sorted(ids))
        return len(ids)

    # ------------------------------------------------------------------- charges

    def charge(self, charge_id: int, *, retries: int = 0) -> ChargeResult:
        """Make one gateway call for a queued charge and record what came of it."""
        if self._rate_limited():
            waited = self._wait_for_slot(charge_id)
            if waited is not None:
                return waited
        claim = self._claim(charge_id)
        if isinstance(claim, ChargeResult):
            return claim
        attempt_id, call, plan, private_key = claim

        started = time.monotonic()
        result = self.client.duplicate(
            merchant_id=call["merchant_id"],
            alias=call["alias"],
            ip=call["ip"],
            amount=call["amount"],
            private_key=private_key,
            deferred=call["deferred"],
        )
        duration = time.monotonic() - started
        metrics.observe_gateway_call("duplicate", result.kind, duration)
        for pause in RECORD_RETRY_PAUSES:
            try:
                outcome = self._record(
                    charge_id, plan, attempt_id, result, retries, duration, private_key
                )
                break
            except OperationalError:
                # The database connection broke before the outcome committed. Trying again
                # is safe: the charge is still in flight and nothing was written. If it
                # stays down, the engine sweep later marks the charge unknown, never resent.
                log.warning("charge %s: recording the outcome failed; retrying", charge_id)
                time.sleep(pause)
        else:
            outcome = self._record(
                charge_id, plan, attempt_id, result, retries, duration, private_key
            )
        if outcome.status == "done":
            self._refill()
        return outcome

    def _refill(self) -> None:
        """Slots in flight freed up: keep the pipeline full without waiting for beat.

        Every few finished charges (an eighth of the in-flight bound), not after each one:
        a dispatch counts what is in flight, so doing it per charge would cost a query per
        charge for no gain while plenty is still queued.
        """
        if next(self._finished) % self._refill_every:
            return
        try:
            self.dispatch_due()
        except (OperationalError, OSError) as exc:  # the engine sweep dispatches instead
            log.warning("refill after a charge failed: %s", exc)

    def _rate_limited(self) -> bool:
        return self.limiter is not None and any(
            account.max_charges_per_second for account in self.plans.accounts.values()
        )

    def _wait_for_slot(self, charge_id: int) -> ChargeResult | None:
        """Under a rate limit, wait for the account's slot *before* claiming: time spent
        waiting must not count as time in flight, which the stuck-call sweep measures."""
        with session_scope(self.url) as session:
            found = session.execute(
                select(Charge.state, Charge.currency).where(Charge.id == charge_id)
            ).one_or_none()
        if found is None:
            raise NotFound(f"charge {charge_id} does not exist")
        if found.state != ChargeState.QUEUED:
            return ChargeResult(charge_id, "not_claimed")
        account = self.plans.accounts.get(found.currency)
        if self.limiter is not None and account is not None and account.max_charges_per_second:
            self.limiter.acquire(account.merchant_id, account.max_charges_per_second)
        return None

    def _claim(self, charge_id: int) -> ChargeResult | tuple[int, dict[str, Any], Plan, str]:
        """Atomically take the charge from ``queued`` to ``in_flight`` and commit the attempt.

        Returns what the call needs, or why nothing is sent. A missing private key raises
        inside this transaction, so the claim rolls back and the charge stays queued.
        """
        now = utcnow()
        with session_scope(self.url) as session:
            number = session.scalar(
                update(Charge)
                .where(Charge.id == charge_id, Charge.state == ChargeState.QUEUED)
                .values(
                    state=ChargeState.IN_FLIGHT,
                    claimed_at=now,
                    attempts=Charge.attempts + 1,
                    updated_at=now,
                )
                .returning(Charge.attempts)
            )
            if number is None:
                if session.get(Charge, charge_id) is None:
                    raise NotFound(f"charge {charge_id} does not exist")
                return ChargeResult(charge_id, "not_claimed")
            charge = session.get_one(Charge, charge_id, options=[WITH_SUBSCRIPTION])
            sub = charge.subscription
            plan = self.plans.plans.get(charge.plan)
            account = self.plans.accounts.get(charge.currency)
            if plan is None or account is None:  # nothing is sent for an unknown plan
                return self._hold(session, charge, "unknown_plan", now)
            private_key = account.private_key()
            held = self._hold_reason(charge, sub, now)
            if held is not None:
                return self._hold(session, charge, held, now)
            attempt = Attempt(
                charge_id=charge_id,
                number=number,
                operation="duplicate",
                amount=charge.amount,
                worker=self.actor,
                started_at=now,
            )
            session.add(attempt)
            session.flush()
            call = {
                "merchant_id": charge.merchant_id,
                "alias": sub.alias,
                "ip": sub.customer_ip,
                "amount": charge.amount,
                "deferred": charge.deferred,
            }
            return attempt.id, call, plan, private_key

    def _hold_reason(self, charge: Charge, sub: Subscription, now: datetime) -> str | None:
        if sub.status not in CHARGEABLE:
            return f"subscription_{sub.status}"
        gap = timedelta(hours=self.settings.min_charge_gap_hours)
        if (
            not charge.manual
            and sub.last_charged_at is not None
            and now - sub.last_charged_at < gap
        ):
            return "velocity_guard"
        return None

    def _hold(self, session: Session, charge: Charge, reason: str, now: datetime) -> ChargeResult:
        """Keep a claimed charge away from the gateway, and say why."""
        charge.attempts -= 1
        if reason == "velocity_guard":
            charge.state = ChargeState.FAILED
            charge.reason = reason
            message = (
                f"not sent: subscription was charged successfully less than "
                f"{self.settings.min_charge_gap_hours:g} hours ago"
            )
            charge.last_message = message
            ledger.append(
                session, outcome="held", operation="engine", actor=self.actor, charge=charge,
                reason=message,
            )  # fmt: skip
        elif reason == "unknown_plan":
            charge.state = ChargeState.FAILED
            charge.reason = reason
            charge.last_message = (
                f"plan {charge.plan!r} or the account for {charge.currency} is no longer in the "
                "plans file: nothing was sent; add it back, then `billing failed retry`"
            )
            ledger.append(
                session, outcome="held", operation="engine", actor=self.actor, charge=charge,
                reason=charge.last_message,
            )  # fmt: skip
        elif reason == "subscription_cancelled":
            charge.state = ChargeState.DISCARDED
            charge.reason = reason
            ledger.append(
                session, outcome="discarded", operation="engine", actor=self.actor,
                charge=charge, reason="subscription cancelled before the charge was sent",
            )  # fmt: skip
        else:  # paused or suspended: it waits, unsent, until the subscription is chargeable
            charge.state = ChargeState.PENDING
        charge.updated_at = now
        log.info("charge %s held: %s", charge.id, reason)
        return ChargeResult(charge.id, "held", reason)

    def _record(
        self,
        charge_id: int,
        plan: Plan,
        attempt_id: int,
        result: Outcome,
        retries: int,
        duration: float,
        private_key: str,
    ) -> ChargeResult:
        """Write the outcome, ledger rows, charge state and subscription period together."""
        now = utcnow()
        secrets = (private_key,)
        retry_in: float | None = None
        with session_scope(self.url) as session:
            charge = session.get_one(
                Charge, charge_id, options=[WITH_SUBSCRIPTION], with_for_update={"of": Charge}
            )
            sub = charge.subscription
            session.execute(
                update(Attempt)
                .where(Attempt.id == attempt_id)
                .values(finished_at=now, outcome=result.kind, code=result.code or None)
            )
            late = charge.state != ChargeState.IN_FLIGHT
            if late and not (charge.state == ChargeState.UNKNOWN and isinstance(result, Approved)):
                # The engine sweep declared the call lost before its answer came back; the
                # answer is still evidence, so it is written, but the charge waits for a person.
                ledger.append_outcome(
                    session, charge, result, operation="duplicate", actor=self.actor,
                    ledger_outcome=result.kind, attempt_id=attempt_id, secrets=secrets,
                    reason=f"late answer: charge was already {charge.state}",
                )  # fmt: skip
                return ChargeResult(charge_id, "done", result.kind)
            charge.last_code = result.code or None
            charge.last_message = result.message or getattr(result, "reason", "") or None
            charge.updated_at = now
            match result:
                case Approved():
                    self._approved(session, charge, sub, plan, result, attempt_id, now, secrets)
                case Declined():
                    self._declined(session, charge, sub, plan, result, attempt_id, now, secrets)
                case NotSent():
                    ledger.append_outcome(
                        session, charge, result, operation="duplicate", actor=self.actor,
                        ledger_outcome="not_sent", attempt_id=attempt_id, secrets=secrets,
                    )  # fmt: skip
                    if retries < self.settings.not_sent_max_retries:
                        # Safe to send again: the request provably never reached the gateway.
                        charge.state = ChargeState.QUEUED
                        charge.queued_at = now
                        retry_in = self._backoff(retries)
                    else:
                        self._to_failed(charge, "not_sent_exhausted")
                case Unknown():
                    ledger.append_outcome(
                        session, charge, result, operation="duplicate", actor=self.actor,
                        ledger_outcome="unknown", attempt_id=attempt_id, secrets=secrets,
                    )  # fmt: skip
                    charge.state = ChargeState.UNKNOWN
                    charge.reason = "unknown_outcome"
            outcome = result.kind
            log.info(
                "charge outcome charge=%s ref=%s alias=%s outcome=%s code=%s duration=%.3f",
                charge.id,
                sub.external_ref,
                mask_alias(sub.alias),
                outcome,
                result.code,
                duration,
                extra={
                    "charge_id": charge.id,
                    "external_ref": sub.external_ref,
                    "alias": mask_alias(sub.alias),
                    "outcome": outcome,
                    "code": result.code,
                    "duration": round(duration, 4),
                },
            )
        metrics.count_charge(charge.plan, outcome)
        if retry_in is not None:
            return ChargeResult(charge_id, "retry", outcome, retry_in)
        return ChargeResult(charge_id, "done", outcome)

    def _approved(
        self,
        session: Session,
        charge: Charge,
        sub: Subscription,
        plan: Plan,
        result: Approved,
        attempt_id: int,
        now: datetime,
        secrets: tuple[str, ...],
    ) -> None:
        charge.tx = result.tx
        charge.reason = None
        charge.next_attempt_at = None
        if charge.deferred:
            charge.state = ChargeState.AUTHORIZED
            charge.authorized_amount = charge.amount
            charge.next_attempt_at = now + plan.capture_after  # the engine sweep validates then
            ledger_outcome, moved = "authorized", charge.amount
        else:
            charge.state = ChargeState.APPROVED
            charge.collected_amount = charge.amount
            ledger_outcome, moved = "approved", charge.amount
        ledger.append_outcome(
            session, charge, result, operation="duplicate", actor=self.actor,
            ledger_outcome=ledger_outcome, amount=moved, attempt_id=attempt_id, secrets=secrets,
        )  # fmt: skip
        advance_subscription(sub, plan, charge.period, now)

    def _declined(
        self,
        session: Session,
        charge: Charge,
        sub: Subscription,
        plan: Plan,
        result: Declined,
        attempt_id: int,
        now: datetime,
        secrets: tuple[str, ...],
    ) -> None:
        charge.declines += 1
        delay = dunning.next_retry_delay(plan, charge.declines) if result.soft else None
        reason = None
        if delay is not None:
            charge.state = ChargeState.PENDING
            charge.next_attempt_at = now + delay
            if sub.status == SubscriptionStatus.ACTIVE:
                sub.status = SubscriptionStatus.PAST_DUE
        else:
            reason = "ladder_exhausted" if result.soft else "hard_decline"
            self._to_failed(charge, reason)
            sub.status = dunning.status_after_failure(plan)
        ledger.append_outcome(
            session, charge, result, operation="duplicate", actor=self.actor,
            ledger_outcome="declined", attempt_id=attempt_id, secrets=secrets, reason=reason,
            details={"soft": result.soft, "next_attempt_at": (
                charge.next_attempt_at.isoformat() if delay and charge.next_attempt_at else None
            )},
        )  # fmt: skip

    @staticmethod
    def _to_failed(charge: Charge, reason: str) -> None:
        charge.state = ChargeState.FAILED
        charge.reason = reason
        charge.next_attempt_at = None

    def _backoff(self, retries: int) -> float:
        """Exponential backoff with full jitter, capped far below the visibility timeout."""
        cap = min(self.settings.not_sent_backoff_cap, self.settings.visibility_timeout / 4)
        ceiling = min(cap, self.settings.not_sent_backoff_base * (2**retries))
        return random.uniform(ceiling / 2, ceiling)

    # -------------------------------------------------------------- engine sweep

    def engine_sweep(self, now: datetime | None = None) -> EngineSweepResult:
        """The frequent housekeeping: stuck calls, lost messages, captures, due retries."""
        now = now or utcnow()
        stuck = self.mark_stuck(now)
        requeued = self.requeue_lost(now)
        captures = self.settlement.dispatch_due_captures(now)
        if captures:
            self.capture_dispatcher(captures)
        released = self.settlement.release_cancelled(now)
        dispatched = self.dispatch_due(now)
        return EngineSweepResult(stuck, requeued, len(captures), released, dispatched)

    def mark_stuck(self, now: datetime | None = None) -> int:
        """Charges in flight longer than any call can last: their worker died mid-call.

        They become ``unknown``, never sent again: the call may have reached the gateway.
        """
        now = now or utcnow()
        limit = (
            self.settings.connect_timeout
            + self.settings.read_timeout
            + self.settings.stuck_margin_seconds
        )
        cutoff = now - timedelta(seconds=limit)
        with session_scope(self.url) as session:
            stuck = list(
                session.scalars(
                    select(Charge)
                    .where(Charge.state == ChargeState.IN_FLIGHT, Charge.claimed_at < cutoff)
                    .with_for_update(skip_locked=True)
                )
            )
            for charge in stuck:
                charge.state = ChargeState.UNKNOWN
                charge.reason = "stuck_in_flight"
                charge.last_message = "the worker stopped during the gateway call"
                charge.updated_at = now
                ledger.append(
                    session, outcome="unknown", operation="engine", actor=self.actor,
                    charge=charge, reason=(
                        f"in flight since {charge.claimed_at:%Y-%m-%d %H:%M:%S}Z, longer than "
                        f"any call can last ({limit:g} s): the worker died mid-call; the card "
                        "may have been charged"
                    ),
                )  # fmt: skip
            stuck_operations = self.settlement.mark_stuck(session, cutoff, now)
        total = len(stuck) + stuck_operations
        if total:
            log.warning("marked %d stuck call(s) unknown", total)
        return total

    def requeue_lost(self, now: datetime | None = None) -> int:
        """Send again the messages of charges queued too long ago (the broker lost them).

        Safe: the charge task claims atomically, so a message that was not lost after all
        meets a claimed charge and does nothing.
        """
        now = now or utcnow()
        cutoff = now - timedelta(seconds=self.settings.requeue_after_seconds)
        with session_scope(self.url) as session:
            ids = list(
                session.scalars(
                    update(Charge)
                    .where(Charge.state == ChargeState.QUEUED, Charge.queued_at < cutoff)
                    .values(queued_at=now, updated_at=now)
                    .returning(Charge.id)
                )
            )
        if ids:
            log.warning("re-sending %d charge message(s) queued before %s", len(ids), cutoff)
            self.dispatcher(sorted(ids))
        return len(ids)


def advance_subscription(sub: Subscription, plan: Plan, period: int, now: datetime) -> None:
    """After a period is paid (or authorized): move to the next one and back to ``active``."""
    if sub.next_period == period:
        sub.next_period = period + 1
        sub.next_charge_at = dates.due_at(sub.anchor_at, plan.every, sub.next_period, plan.timezone)
    if sub.status in CHARGEABLE:
        sub.status = SubscriptionStatus.ACTIVE
    sub.last_charged_at = now
    sub.updated_at = now


def shortest_period(every: Interval) -> timedelta:
    """A lower bound of the time between two due dates of a plan (months of 28 days, and an
    hour or two lost to a daylight-saving change)."""
    days = {"days": 1, "weeks": 7, "months": 28, "years": 365}[every.unit] * every.count
    return timedelta(days=days) - timedelta(hours=2)


def _lock_dispatch(session: Session) -> bool:
    """Serialise dispatchers on PostgreSQL; SQLite serialises writers by itself."""
    if session.get_bind().dialect.name != "postgresql":
        return True
    return bool(session.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": DISPATCH_LOCK}))


def _insert_new_charges(session: Session, rows: list[dict[str, Any]]) -> int:
    """Insert charge rows, ignoring periods that already have one; return how many were new."""
    if not rows:
        return 0
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = (
        insert(Charge)
        .on_conflict_do_nothing(index_elements=["subscription_id", "period"])
        .returning(Charge.id)
    )
    return len(session.execute(stmt, rows).all())


__all__ = [
    "ChargeResult",
    "Engine",
    "EngineSweepResult",
    "SweepResult",
    "advance_subscription",
]
