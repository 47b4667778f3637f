"""Changing a subscription: a new card, another plan, a new price.

Why it is shaped like this:
- **One function, three doors.** :func:`update_subscription` is what the CLI
  (``billing subscriptions update``), the Celery task ``billing.update_subscription``
  (through :func:`update_subscription_from_dict`) and the web console call. Each field is
  checked by the validator the import uses (``billing.intake``), every problem is named
  at once, and nothing is written unless the whole change is valid.
- **A new card takes effect at once.** The alias (and the customer IP of the payment that
  produced it) is replaced by one statement guarded by the alias it replaces. A
  subscription that declines put on the ladder or suspended gets its open charge tried
  with the new card now (``billing.charging.newcard``).
- **A plan or a price takes effect from a coming period**, never the current one: the
  current period's charge keeps its amount (no proration). The change is stored as a row
  of ``subscription_changes`` that the sweep applies to the first charge due at or after
  its date. A new interval re-anchors the subscription there. A change of currency is
  refused: Klik & Pay has one merchant ID per currency, so it is another subscription.
- **Once is enough.** A message delivered twice, or a person pressing the button twice,
  finds the subscription already as asked: nothing is written the second time.

Each change writes one ledger row (who, why, what it was before: the old alias masked)
and one event for the shop, in the transaction that makes it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy.orm import Session

from billing import ledger, widths
from billing.charging import lifecycle, newcard, terms
from billing.charging.lifecycle import Lost
from billing.charging.newcard import Retried
from billing.charging.rows import SubRow, load_subscription
from billing.charging.terms import Scheduled
from billing.db import session_scope
from billing.errors import InvalidInput, StateError
from billing.events import emit, iso
from billing.intake import check_alias, check_amount, check_ip, check_plan, check_time
from billing.models import utcnow
from billing.money import format_amount
from billing.plans import PlanSet, get_plans
from billing.redact import mask_alias, redact
from billing.subscriptions import get_subscription
from billing.vocabulary import (
    ATTENTION_STATES,
    OPEN_STATES,
    EventType,
    LedgerOutcome,
    Operation,
    SubscriptionStatus,
)

log = logging.getLogger(__name__)

#: The fields of a change as a dict (the task's message, a form): one vocabulary.
FIELDS = (
    "external_ref",
    "alias",
    "customer_ip",
    "plan",
    "amount",
    "effective_from",
    "reason",
    "by",
)
#: Who a change sent as a task is by when its message does not say.
TASK_ACTOR = "shop"


@dataclass(frozen=True)
class Asked:
    """A change as asked, each field checked (None: not to change)."""

    alias: str | None
    customer_ip: str | None
    plan: str | None
    amount: Decimal | None
    effective_from: date | datetime | None
    reason: str
    by: str


@dataclass(frozen=True)
class CardUpdated:
    """The card replaced, and what the new card did to the subscription's charges."""

    previous_alias: str
    previous_ip: str
    retried: Retried | None
    note: str | None


@dataclass(frozen=True)
class Updated:
    """What :func:`update_subscription` did (nothing, when the subscription was already so)."""

    subscription: SubRow
    card: CardUpdated | None = None
    scheduled: Scheduled | None = None

    @property
    def changed(self) -> bool:
        return self.card is not None or self.scheduled is not None

    def lines(self) -> list[str]:
        """What happened, for a person: one line per change."""
        ref = self.subscription.external_ref
        if not self.changed:
            return [f"subscription {ref}: nothing changed (it is already as asked)"]
        found: list[str] = []
        if self.card is not None:
            line = (
                f"subscription {ref}: card updated to {mask_alias(self.subscription.alias)} "
                f"(was {mask_alias(self.card.previous_alias)})"
            )
            found.append(line + (f"; {self.card.note}" if self.card.note else ""))
        if self.scheduled is not None:
            t = self.scheduled
            what = (
                f"plan {t.previous.plan.name} -> {t.terms.plan.name}"
                if t.kind == EventType.SUBSCRIPTION_PLAN_CHANGED
                else "price"
            )
            line = (
                f"subscription {ref}: {what}, {format_amount(t.previous.amount)} -> "
                f"{format_amount(t.terms.amount)} {t.terms.plan.currency}, from period "
                f"{t.first_period} (due {iso(t.first_due_at)}); the charges before it keep "
                "their amount"
            )
            if t.re_anchored:
                line += (
                    f"; re-anchored: billed every {t.terms.plan.every} from {iso(t.first_due_at)}"
                )
            found.append(line)
        return found

    def as_dict(self) -> dict[str, Any]:
        """Plain data (the task's result): references and amounts, the alias masked."""
        card = self.card
        change = self.scheduled
        return {
            "external_ref": self.subscription.external_ref,
            "changed": self.changed,
            "card": None
            if card is None
            else {
                "alias": mask_alias(self.subscription.alias),
                "previous_alias": mask_alias(card.previous_alias),
                "retried_charge": card.retried.charge.id if card.retried else None,
                "note": card.note,
            },
            "terms": None if change is None else {"change_id": change.change_id, **change.facts()},
            "lines": self.lines(),
        }


# --------------------------------------------------------------------------- checking


def _date_or_time(value: object) -> tuple[date | datetime | None, str | None]:
    """``effective_from``: a day (``2026-07-01``, the start of that day in the plan's time
    zone) or a time with its offset."""
    if isinstance(value, str) and len(value.strip()) == 10:
        try:
            return date.fromisoformat(value.strip()), None
        except ValueError:
            return None, f'effective_from "{value.strip()}" is not a date such as 2026-07-01'
    if isinstance(value, date) and not isinstance(value, datetime):
        return value, None
    return check_time(value, "effective_from")


def _text(value: object, name: str) -> tuple[str | None, str | None]:
    if value is None:
        return None, None
    if not isinstance(value, str):
        return None, f"{name} must be text, not {type(value).__name__}"
    return value.strip() or None, None


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def check_change(
    plans: PlanSet,
    current_plan: str,
    *,
    by: object,
    reason: object,
    alias: object = None,
    customer_ip: object = None,
    plan: object = None,
    amount: object = None,
    effective_from: object = None,
) -> Asked:
    """Check every field of a change of a subscription on ``current_plan`` as the import
    checks its rows; raise ``InvalidInput`` naming each problem (values quoted, never the
    alias)."""
    problems: list[str] = []

    def checked(found: tuple[Any, str | None]) -> Any:
        value, problem = found
        if problem:
            problems.append(problem)
        return value

    new_alias = checked(check_alias(alias))
    new_ip = checked(check_ip(customer_ip))
    new_plan = checked(check_plan(plan, plans))
    new_amount = checked(check_amount(amount))
    starting = checked(_date_or_time(effective_from))
    why = checked(_text(reason, "reason"))
    who = checked(_text(by, "by"))
    if _blank(reason):
        problems.append("reason is required: say why the subscription changes")
    if _blank(by):
        problems.append("by must name who makes the change")
    if all(_blank(v) for v in (alias, customer_ip, plan, amount)):
        problems.append("nothing to change: give a new alias, plan or amount")
    elif not _blank(customer_ip) and _blank(alias):
        problems.append(
            "customer_ip goes with alias: it is the IP of the payment that gave the new alias"
        )
    if not _blank(effective_from) and _blank(plan) and _blank(amount):
        problems.append("effective_from goes with plan or amount (a new card counts at once)")
    target = plans.plans.get(new_plan or current_plan)
    if new_amount is not None and target is not None:
        checked((None, terms.price_problem(new_amount, target)))
    if problems:
        raise InvalidInput("; ".join(redact(p) for p in problems))
    assert why is not None and who is not None
    return Asked(
        alias=new_alias,
        customer_ip=new_ip,
        plan=new_plan,
        amount=new_amount,
        effective_from=starting,
        reason=widths.fit(redact(why), widths.LEDGER_TEXT) or why,
        by=widths.fit(redact(who), widths.ACTOR) or who,
    )


# --------------------------------------------------------------------------- changing


def update_subscription(
    session: Session,
    plans: PlanSet,
    ref: str,
    *,
    by: str,
    reason: str | None,
    alias: str | None = None,
    customer_ip: str | None = None,
    plan: str | None = None,
    amount: Decimal | str | None = None,
    effective_from: datetime | date | str | None = None,
    now: datetime | None = None,
) -> Updated:
    """Change the subscription ``ref`` (reference or id) in ``session``'s transaction.

    ``alias`` (and ``customer_ip``) replace the card at once; ``plan`` and/or ``amount``
    take effect from the next period, or from the first period due at or after
    ``effective_from`` (a day, or a time with its offset). Blank fields are not changed,
    so a web form's empty inputs can be passed as they are. Raises ``InvalidInput`` naming
    every bad field, ``NotFound`` or ``StateError``, and writes nothing then. The caller
    dispatches a retried charge after commit (or leaves it to the engine sweep).
    """
    found = get_subscription(session, ref)
    asked = check_change(
        plans, found.plan, by=by, reason=reason, alias=alias, customer_ip=customer_ip,
        plan=plan, amount=amount, effective_from=effective_from,
    )  # fmt: skip
    return apply_change(session, plans, found.id, asked, now=now)


def apply_change(
    session: Session, plans: PlanSet, sub_id: int, asked: Asked, *, now: datetime | None = None
) -> Updated:
    """Make a checked change of subscription ``sub_id`` (see :func:`update_subscription`)."""
    now = now or utcnow()
    changes_terms = asked.plan is not None or asked.amount is not None
    if changes_terms:
        terms.hold_terms(session, exclusive=True)  # no sweep insert is half-way meanwhile
    lifecycle.lock_open_charges(session, sub_id, (*OPEN_STATES, *ATTENTION_STATES))
    sub = load_subscription(session, sub_id, lock=True)
    if sub.status == SubscriptionStatus.CANCELLED:
        raise StateError(f"subscription {sub.external_ref} is cancelled: nothing can change")
    scheduled = None
    if changes_terms:
        scheduled = terms.to_schedule(
            session, plans, sub, plan=asked.plan, amount=asked.amount,
            starting=asked.effective_from, now=now,
        )  # fmt: skip
    card = None
    if asked.alias is not None:
        sub, card = _replace_card(session, plans, sub, asked, now)
    if scheduled is not None:
        scheduled = terms.store(session, plans, sub, scheduled, by=asked.by, reason=asked.reason)
    updated = Updated(sub, card, scheduled)
    for line in updated.lines():
        log.info("%s (by %s)", line, asked.by)
    return updated


def _replace_card(
    session: Session, plans: PlanSet, sub: SubRow, asked: Asked, now: datetime
) -> tuple[SubRow, CardUpdated | None]:
    assert asked.alias is not None
    values = {"alias": asked.alias, "customer_ip": asked.customer_ip or sub.customer_ip}
    if values["alias"] == sub.alias and values["customer_ip"] == sub.customer_ip:
        return sub, None
    after = lifecycle.rewrite_subscription(session, sub, values, now=now)
    if isinstance(after, Lost):
        raise StateError(f"subscription {sub.external_ref} changed meanwhile; try again")
    outcome = newcard.retry_with_new_card(session, plans, after, now=now)
    after = outcome.subscription
    retried = outcome.retried
    plan = plans.plans.get(sub.plan)
    account = plans.accounts.get(plan.currency) if plan is not None else None
    ledger.append(
        session, outcome=LedgerOutcome.SUBSCRIPTION_CARD_UPDATED, operation=Operation.PERSON,
        actor=asked.by, subscription=after, charge=retried.charge if retried else None,
        currency=plan.currency if plan else None,
        merchant_id=account.merchant_id if account else None,
        reason=asked.reason,
        details={
            "previous_alias": mask_alias(sub.alias),
            "alias": mask_alias(after.alias),
            "previous_customer_ip": sub.customer_ip,
            "customer_ip": after.customer_ip,
            "retry": retried.details() if retried else None,
            "note": outcome.note,
        },
    )  # fmt: skip
    emit(
        session, EventType.SUBSCRIPTION_CARD_UPDATED, subscription=after,
        charge=retried.charge if retried else None,
        data={
            "by": asked.by,
            "reason": asked.reason,
            "customer_ip_changed": after.customer_ip != sub.customer_ip,
            "retry": retried.how if retried else None,
        },
    )  # fmt: skip
    newcard.tell_status(session, outcome)
    return after, CardUpdated(sub.alias, sub.customer_ip, retried, outcome.note)


# --------------------------------------------------------------------------- the task's door


def update_subscription_from_dict(url: str, data: Mapping[str, object]) -> dict[str, Any]:
    """The plain-data entry (the task ``billing.update_subscription``): ``data`` holds
    :data:`FIELDS` (``external_ref`` and ``reason`` required; ``by`` defaults to
    :data:`TASK_ACTOR`; ``amount`` as text). Returns :meth:`Updated.as_dict`; safe to call
    again with the same data."""
    unknown = sorted(str(k) for k in data if k not in FIELDS)
    if unknown:
        raise InvalidInput(
            "unknown field(s): "
            + ", ".join(redact(k)[:64] for k in unknown[:10])
            + f" (fields are: {', '.join(FIELDS)})"
        )
    ref, problem = _text(data.get("external_ref"), "external_ref")
    if ref is None:
        raise InvalidInput(problem or "external_ref is missing")
    plans = get_plans()
    fields = {name: data.get(name) for name in FIELDS if name not in ("external_ref", "by")}
    with session_scope(url) as session:
        found = get_subscription(session, ref)
        asked = check_change(plans, found.plan, by=data.get("by") or TASK_ACTOR, **fields)
        return apply_change(session, plans, found.id, asked).as_dict()


__all__ = [
    "FIELDS",
    "Asked",
    "CardUpdated",
    "Updated",
    "apply_change",
    "check_change",
    "update_subscription",
    "update_subscription_from_dict",
]
