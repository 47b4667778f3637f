"""Plan sweeps: every due (subscription, period) gets its one charge row.

A charge row is unique per (subscription, period) under a database constraint, so a second
sweep at the same moment (a second beat) inserts nothing and sends nothing extra. Overdue
subscriptions (several periods due at once) never get a burst of charges: under
``catch_up = "latest"`` the older periods are written off as ``skipped`` in the ledger;
under ``"all"`` they are charged one by one, ``catch_up_spacing`` apart.

A plan or price change scheduled for a subscription (``billing.changes``) is applied here,
when the first charge due at or after its date is created: the charge is made on the new
terms and the subscription moves to them in the same transaction (re-anchored on that
period when the interval changes). Such a subscription leaves the set-based hot path for
the per-row one. Every insert holds ``TERMS_LOCK`` shared (``billing.charging.terms``), so a
change never races an insert that read the old terms.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, exists, func, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from billing import ledger
from billing.charging import lifecycle
from billing.charging.context import Context
from billing.charging.rows import load_subscription
from billing.charging.terms import Terms, apply_due, hold_terms, pending_change
from billing.db import session_scope
from billing.durations import Interval
from billing.models import Charge, Money, Subscription, UTCDateTime
from billing.plans import Plan, sync_plan_versions
from billing.vocabulary import CHARGEABLE, ChargeState, LedgerOutcome, Operation

log = logging.getLogger("billing.engine")

#: Columns of a new charge row, in the order the set-based insert selects them.
NEW_CHARGE_COLUMNS = (
    "subscription_id", "period", "due_at", "plan", "plan_version", "amount", "currency",
    "merchant_id", "deferred", "state", "attempts", "declines", "manual",
    "next_attempt_at", "created_at", "updated_at",
)  # fmt: skip


@dataclass(frozen=True)
class SweepResult:
    """What one plan sweep did."""

    plan: str
    created: int
    skipped_periods: int
    dispatched: int


@dataclass(frozen=True)
class PeriodToCharge:
    """The period an overdue subscription is charged for now, and when it may be sent."""

    period: int
    due_at: datetime
    not_before: datetime
    skipped: int


def shortest_period(every: Interval) -> timedelta:
    """A lower bound of the time between two due dates of a plan (months of 28 days, and an
    hour or two lost to a daylight-saving change)."""
    days = {"days": 1, "weeks": 7, "months": 28, "years": 365}[every.unit] * every.count
    return timedelta(days=days) - timedelta(hours=2)


def _insert(session: Session) -> Any:
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


class Sweeper:
    """Creates the charge rows of due periods, plan by plan."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def create_due(self, plan_name: str, now: datetime) -> tuple[int, int]:
        """Insert the charge rows of the plan's due subscriptions: (created, skipped)."""
        plans = self.ctx.plans
        plan = plans.plan(plan_name)
        account = plans.account_for(plan)
        with session_scope(self.ctx.url) as session:
            versions = sync_plan_versions(session, plans)
        created = self._insert_on_time(plan, account.merchant_id, versions[plan.name], now)
        skipped = 0
        last_id = 0
        # What the set-based insert left: overdue subscriptions, under catch_up = "all"
        # those charged too recently, and those with a change to apply: each needs the date
        # arithmetic below.
        while True:
            with session_scope(self.ctx.url) as session:
                hold_terms(session)
                rows = session.connection().execute(self._due_query(plan.name, now, last_id)).all()
                if not rows:
                    break
                last_id = rows[-1].id
                new_rows: list[dict[str, Any]] = []
                for row in rows:
                    found = self._period_to_charge(session, plan, row, now)
                    if found is None:
                        continue
                    skipped += found.skipped
                    terms: Terms | None = Terms(plan, row.amount_override)
                    if row.has_change:
                        terms = apply_due(
                            session, plans, plan, row.id, period=found.period,
                            due_at=found.due_at, now=now,
                        )  # fmt: skip
                    if terms is None:
                        continue
                    new_rows.append(self._new_charge(row.id, found, terms, versions, now))
                created += _insert_new_charges(session, new_rows)
        return created, skipped

    def _new_charge(
        self,
        sub_id: int,
        found: PeriodToCharge,
        terms: Terms,
        versions: dict[str, int],
        now: datetime,
    ) -> dict[str, Any]:
        """The values of one charge row made in Python (the per-row path)."""
        plan = terms.plan
        return {
            "subscription_id": sub_id,
            "period": found.period,
            "due_at": found.due_at,
            "plan": plan.name,
            "plan_version": versions[plan.name],
            "amount": terms.amount,
            "currency": plan.currency,
            "merchant_id": self.ctx.plans.account_for(plan).merchant_id,
            "deferred": plan.deferred,
            "state": ChargeState.PENDING,
            "attempts": 0,
            "declines": 0,
            "manual": False,
            "next_attempt_at": found.not_before,
            "created_at": now,
            "updated_at": now,
        }

    def _insert_on_time(self, plan: Plan, merchant_id: str, version: int, now: datetime) -> int:
        """Charge rows for subscriptions due exactly one period, in one statement per batch.

        A subscription whose ``next_charge_at`` is later than ``now`` minus the plan's
        shortest possible period cannot have a second period due, so its row needs no date
        arithmetic: the database builds it from the subscription in place (the sweep's hot
        path).
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
            # A change taking effect with this period: the per-row path applies it.
            ~pending_change(Subscription.id, due_by=Subscription.next_charge_at),
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
            .limit(self.ctx.settings.sweep_batch_size)
        )
        created = 0
        while True:
            with session_scope(self.ctx.url) as session:
                hold_terms(session)
                stmt = (
                    _insert(session)(Charge)
                    .from_select(list(NEW_CHARGE_COLUMNS), rows)
                    .on_conflict_do_nothing(index_elements=["subscription_id", "period"])
                )
                # rowcount of an INSERT is only kept when asked for (SQLAlchemy 2).
                result = session.connection().execute(
                    stmt.execution_options(preserve_rowcount=True)
                )
                inserted = max(result.rowcount, 0)
            created += inserted
            if inserted < self.ctx.settings.sweep_batch_size:
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
                Subscription.anchor_period,
                Subscription.amount_override,
                Subscription.last_charged_at,
                pending_change(Subscription.id).label("has_change"),
            )
            .where(
                Subscription.plan == plan,
                Subscription.status.in_(CHARGEABLE),
                Subscription.next_charge_at <= now,
                Subscription.id > after_id,
                no_charge_yet,
            )
            .order_by(Subscription.id)
            .limit(self.ctx.settings.sweep_batch_size)
        )

    def _period_to_charge(
        self, session: Session, plan: Plan, row: Any, now: datetime
    ) -> PeriodToCharge | None:
        """The period to charge now; None when another sweep moved the subscription first."""
        period, due = row.next_period, row.next_charge_at
        if plan.catch_up == "all":
            # The last period of a backlog is due on time too, but still waits its spacing.
            not_before = due
            if row.last_charged_at is not None:
                not_before = max(due, row.last_charged_at + plan.catch_up_spacing)
            return PeriodToCharge(period, due, not_before, 0)
        schedule = lifecycle.schedule_of(row, plan)
        latest = schedule.latest(now)
        if latest is None or latest <= period:
            return PeriodToCharge(period, due, due, 0)
        new_due = schedule.due(latest)
        moved = session.connection().scalar(
            update(Subscription)
            .where(Subscription.id == row.id, Subscription.next_period == period)
            .values(next_period=latest, next_charge_at=new_due, updated_at=now)
            .returning(Subscription.id)
        )
        if moved is None:  # another sweep moved it first and wrote the skips
            return None
        sub = load_subscription(session, row.id)
        merchant_id = self.ctx.plans.account_for(plan).merchant_id
        for skipped_period in range(period, latest):
            ledger.append(
                session,
                outcome=LedgerOutcome.SKIPPED,
                operation=Operation.ENGINE,
                actor=self.ctx.actor,
                subscription=sub,
                period=skipped_period,
                currency=plan.currency,
                merchant_id=merchant_id,
                reason=(
                    f"period {skipped_period} not charged: {latest - period} periods were due"
                    f" at once and plan {plan.name} charges only the latest (catch_up=latest)"
                ),
            )
        return PeriodToCharge(latest, new_due, new_due, latest - period)


def _insert_new_charges(session: Session, rows: list[dict[str, Any]]) -> int:
    """Insert charge rows, ignoring periods that already have one; return how many were new."""
    if not rows:
        return 0
    stmt = (
        _insert(session)(Charge)
        .on_conflict_do_nothing(index_elements=["subscription_id", "period"])
        .returning(Charge.id)
    )
    return len(session.connection().execute(stmt, rows).all())


__all__ = ["SweepResult", "Sweeper", "shortest_period"]
