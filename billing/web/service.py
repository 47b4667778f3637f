"""The console's one door to the service layer: every read and every action goes here.

Nothing here decides what a charge may do: ``billing.ops``, ``settlement``,
``subscriptions``, ``webhooks``, ``deadletters`` and ``reports`` decide, exactly as for the
CLI. This module only shapes their answers for pages, names the signed-in person as the
actor (``console:NAME``) with the reason they typed, and dispatches after commit the way
the CLI does. When the service layer changes (the state-machine work), this is the one
file to adapt.

The failed-charge queue is described by two tables, ``QUEUE_FILTERS`` and
``QUEUE_COLUMNS``: a new filter or column is one line there.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import IO, Any, TextIO, cast

from sqlalchemy import select
from sqlalchemy.orm import Session

from billing import (
    broker,
    changes,
    deadletters,
    metrics,
    ops,
    reports,
    subscriptions,
    webhooks,
)
from billing.accounts import SignedIn
from billing.charging import settlement
from billing.charging.settlement import SettlementResult
from billing.db import checked_id, session_scope
from billing.durations import parse_delay
from billing.engine import Engine
from billing.errors import BillingError, InvalidInput, NotFound, StateError
from billing.events import EVENT_TYPES
from billing.models import (
    ATTENTION_STATES,
    Charge,
    ChargeState,
    DeadLetter,
    Event,
    EventDelivery,
    EventStatus,
    LedgerEntry,
    Subscription,
    SubscriptionChange,
    SubscriptionStatus,
)
from billing.money import format_amount
from billing.plans import PlanSet, get_plans
from billing.redact import mask_alias
from billing.settings import Settings
from billing.vocabulary import (
    SETTLEMENT_FAILED,
    SETTLEMENT_UNKNOWN,
    Call,
    FailureReason,
    LedgerOutcome,
)
from billing.web.config import BULK_MAX, CHART_DAYS


def actor(user: SignedIn) -> str:
    """How the ledger names a person acting from the console."""
    return f"console:{user.name}"


@dataclass
class Backend:
    """What the console needs besides a database session: plans, the engine (for
    settlement calls), and how to hand work to the workers after commit."""

    settings: Settings
    plans: Callable[[], PlanSet]
    engine: Callable[[], Engine]
    #: Dispatch a retried charge now; returns what became of it, in words.
    send_retried: Callable[[int], str]
    #: Send a Celery task by name (a requeued dead letter); returns its task ID.
    send_task: Callable[[str, list[Any], dict[str, Any]], str]
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))

    @classmethod
    def from_settings(cls, settings: Settings) -> Backend:
        return cls(
            settings=settings,
            plans=lambda: get_plans(settings),
            engine=lambda: Engine(settings),
            send_retried=lambda number: broker.send_retried(number, settings),
            send_task=lambda name, args, kwargs: broker.send_task(settings, name, args, kwargs),
        )

    @property
    def url(self) -> str:
        return self.settings.database_url

    def session(self) -> AbstractContextManager[Session]:
        return session_scope(self.url)


# --- the overview -------------------------------------------------------------------------


@dataclass(frozen=True)
class Overview:
    depth: dict[str, int]
    oldest_unknown_age: timedelta | None
    today: list[reports.CurrencyTotals]
    month: list[reports.CurrencyTotals]
    days: list[reports.DayCounts]
    decline_rate_30d: Decimal | None
    decline_rate_today: Decimal | None

    @property
    def waiting(self) -> int:
        return sum(self.depth.values())


def overview(session: Session, now: datetime) -> Overview:
    depth, oldest = metrics.failed_queue_state(session)
    day_start = datetime.combine(now.astimezone(UTC).date(), datetime.min.time(), tzinfo=UTC)
    month_start = day_start.replace(day=1)
    end = now + timedelta(seconds=1)
    days = reports.daily_counts(session, days=CHART_DAYS, now=now)
    return Overview(
        depth=dict(sorted(depth.items())),
        oldest_unknown_age=max(now - oldest, timedelta(0)) if oldest else None,
        today=reports.totals_by_currency(session, since=day_start, until=end),
        month=reports.totals_by_currency(session, since=month_start, until=end),
        days=days,
        decline_rate_30d=reports.decline_rate(days),
        decline_rate_today=reports.decline_rate(days[-1:]),
    )


# --- the failed-charge queue --------------------------------------------------------------


def _older_than(text: str) -> timedelta:
    try:
        return parse_delay(text)
    except ValueError as exc:
        raise InvalidInput(f"waiting longer than: {exc}") from None


@dataclass(frozen=True)
class QueueFilter:
    """One filter of ``/failed``: a query parameter, its label and how it applies.

    ``service`` names the keyword of ``ops.list_failed`` that applies it in SQL; a filter
    the service does not offer (yet) applies ``keep`` to each row instead.
    """

    name: str
    label: str
    #: The values offered in a select, or None for a text field.
    choices: Callable[[PlanSet], Sequence[str]] | None = None
    parse: Callable[[str], Any] = str
    service: str | None = None
    keep: Callable[[ops.FailedCharge, Any], bool] | None = None
    placeholder: str = ""


#: The filters of ``/failed``, in the order the page shows them. One line adds one.
QUEUE_FILTERS: tuple[QueueFilter, ...] = (
    QueueFilter("plan", "Plan", choices=lambda plans: sorted(plans.plans), service="plan"),
    QueueFilter("reason", "Reason", choices=lambda plans: ops.REASONS, service="reason"),
    QueueFilter(
        "state",
        "State",
        choices=lambda plans: [s.value for s in ATTENTION_STATES],
        service="state",
    ),
    QueueFilter(
        "older_than",
        "Waiting longer than",
        parse=_older_than,
        service="older_than",
        placeholder="2 days",
    ),
)


def _age_text(age: timedelta) -> str:
    seconds = int(age.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@dataclass(frozen=True)
class QueueColumn:
    """One column of ``/failed`` and of its CSV export. ``value`` is what sorts and what
    the CSV holds; ``shown`` what the page prints (``value`` by default)."""

    key: str
    label: str
    value: Callable[[ops.FailedCharge], Any]
    shown: Callable[[ops.FailedCharge], str] | None = None
    numeric: bool = False
    #: False: in the CSV only (the page shows it within another column).
    on_page: bool = True

    def text(self, row: ops.FailedCharge) -> str:
        if self.shown is not None:
            return self.shown(row)
        value = self.value(row)
        return "" if value is None else str(value)


#: The columns of ``/failed``, in order. One line adds one (the CSV gets it too).
QUEUE_COLUMNS: tuple[QueueColumn, ...] = (
    QueueColumn("charge_id", "Charge", lambda r: r.charge_id, numeric=True),
    QueueColumn("external_ref", "Reference", lambda r: r.external_ref),
    QueueColumn("plan", "Plan", lambda r: r.plan),
    QueueColumn(
        "amount",
        "Amount",
        lambda r: r.amount,
        shown=lambda r: f"{format_amount(r.amount)} {r.currency}",
        numeric=True,
    ),
    QueueColumn("currency", "Currency", lambda r: r.currency, on_page=False),
    QueueColumn("state", "State", lambda r: r.state),
    QueueColumn("reason", "Reason", lambda r: r.reason),
    QueueColumn("attempts", "Attempts", lambda r: r.attempts, numeric=True),
    QueueColumn("last_code", "Code", lambda r: r.last_code),
    QueueColumn("last_message", "Message", lambda r: r.last_message),
    QueueColumn(
        "age",
        "Waiting",
        lambda r: int(r.age.total_seconds()),
        shown=lambda r: _age_text(r.age),
        numeric=True,
    ),
)
COLUMN_BY_KEY = {c.key: c for c in QUEUE_COLUMNS}
PAGE_COLUMNS = tuple(c for c in QUEUE_COLUMNS if c.on_page)
#: The queue's order unless the person chooses another: longest waiting first.
DEFAULT_SORT = "age"


@dataclass(frozen=True)
class QueueQuery:
    """A filtered, sorted view of the queue, as the page's query string says it."""

    values: dict[str, str] = field(default_factory=dict)
    sort: str = DEFAULT_SORT
    descending: bool = True

    @classmethod
    def from_params(cls, params: Any) -> QueueQuery:
        values = {}
        for f in QUEUE_FILTERS:
            text = str(params.get(f.name, "") or "").strip()
            if text:
                values[f.name] = text
        sort = str(params.get("sort", DEFAULT_SORT))
        if sort not in COLUMN_BY_KEY:
            raise InvalidInput(f'sort: "{sort}" is not a column ({", ".join(COLUMN_BY_KEY)})')
        return cls(values=values, sort=sort, descending=params.get("order", "desc") != "asc")

    def params(self, **changes: str) -> dict[str, str]:
        """The query string of this view (for links), with ``changes`` applied."""
        out = dict(self.values)
        out["sort"] = self.sort
        out["order"] = "desc" if self.descending else "asc"
        out.update(changes)
        return out


def failed_queue(session: Session, query: QueueQuery, now: datetime) -> list[ops.FailedCharge]:
    """The queue through ``query``'s filters, in its order."""
    kwargs: dict[str, Any] = {}
    kept: list[tuple[QueueFilter, Any]] = []
    for f in QUEUE_FILTERS:
        if f.name not in query.values:
            continue
        value = f.parse(query.values[f.name])
        if f.service is not None:
            kwargs[f.service] = value
        elif f.keep is not None:
            kept.append((f, value))
    rows = ops.list_failed(session, now=now, **kwargs)
    rows = [r for r in rows if all(f.keep(r, v) for f, v in kept if f.keep is not None)]
    column = COLUMN_BY_KEY[query.sort]
    present = [r for r in rows if column.value(r) is not None]
    missing = [r for r in rows if column.value(r) is None]
    present.sort(key=column.value, reverse=query.descending)
    return present + missing


def _csv_text(value: Any) -> str:
    """A cell a spreadsheet shows as text (see ``reports.spreadsheet_text``)."""
    return "" if value is None else reports.spreadsheet_text(str(value))


def queue_csv(rows: Sequence[ops.FailedCharge]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([c.key for c in QUEUE_COLUMNS])
    for row in rows:
        cells = []
        for c in QUEUE_COLUMNS:
            value = c.value(row)
            cells.append(format_amount(value) if isinstance(value, Decimal) else _csv_text(value))
        writer.writerow(cells)
    return out.getvalue()


# --- one charge ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TimelineItem:
    at: datetime
    kind: str  # attempt | ledger | event
    title: str
    amount: str | None = None
    code: str | None = None
    message: str | None = None
    actor: str | None = None
    reason: str | None = None
    detail: str | None = None


@dataclass(frozen=True)
class BackOffice:
    """What to look up in the Klik & Pay back office for an unknown charge."""

    merchant_id: str
    amount: str
    currency: str
    window_from: datetime | None
    window_to: datetime | None
    alias: str
    customer_ip: str
    tx: str | None
    call: str


@dataclass(frozen=True)
class ChargePage:
    story: ops.ChargeStory
    customer_ip: str
    timeline: list[TimelineItem]
    back_office: BackOffice | None
    #: It waits on a lost validation or cancellation answer: resolved, never retried.
    settling: bool
    #: What the charge can still be asked, by its state (the service still decides).
    can_retry: bool
    can_resolve: bool
    #: Flagged for a person (a late approval, a possible double charge, another amount).
    can_review: bool
    can_discard: bool
    can_capture: bool
    can_cancel: bool
    cancel_kind: str | None
    cancel_left: str | None
    capture_left: str | None


def _call_window(page_attempts: Sequence[Any], settings: Settings) -> tuple[Any, Any]:
    if not page_attempts:
        return None, None
    last = page_attempts[-1]
    bound = timedelta(
        seconds=settings.connect_timeout + settings.read_timeout + settings.stuck_margin_seconds
    )
    start = last.started_at - timedelta(minutes=1)
    return start, (last.finished_at or last.started_at + bound) + timedelta(minutes=1)


def charge_page(session: Session, charge_id: int, settings: Settings) -> ChargePage:
    story = ops.charge_story(session, charge_id)
    charge = story.charge
    sub = charge.subscription
    items: list[TimelineItem] = []
    for a in story.attempts:
        items.append(
            TimelineItem(
                at=a.started_at,
                kind="attempt",
                title=f"call #{a.number}: {a.operation} "
                f"{format_amount(a.amount)} {charge.currency}",
                code=a.code,
                actor=a.worker,
                detail=f"outcome {a.outcome or 'not recorded yet'}"
                + (f", finished {a.finished_at:%Y-%m-%d %H:%M:%S}Z" if a.finished_at else ""),
            )
        )
    for e in story.ledger:
        items.append(
            TimelineItem(
                at=e.at,
                kind="ledger",
                title=f"ledger: {e.outcome} ({e.operation})",
                amount=f"{format_amount(e.amount)} {e.currency}",
                code=e.code,
                message=e.message,
                actor=e.actor,
                reason=e.reason,
                detail=f"tx {e.tx}" if e.tx else None,
            )
        )
    events = webhooks.list_events(session, subscription=sub.external_ref, limit=1000)
    for ev in events:
        if ev.charge_id != charge.id:
            continue
        states = ", ".join(f"{d.endpoint}: {d.status}" for d in webhooks.deliveries_of(ev))
        items.append(
            TimelineItem(at=ev.created_at, kind="event", title=f"event: {ev.type}", detail=states)
        )
    order = {"attempt": 0, "ledger": 1, "event": 2}
    items.sort(key=lambda i: (i.at, order[i.kind]))

    box = None
    if charge.state == ChargeState.UNKNOWN:
        start, end = _call_window(story.attempts, settings)
        box = BackOffice(
            merchant_id=charge.merchant_id,
            amount=format_amount(story.attempts[-1].amount if story.attempts else charge.amount),
            currency=charge.currency,
            window_from=start,
            window_to=end,
            alias=mask_alias(sub.alias),
            customer_ip=sub.customer_ip,
            tx=charge.tx,
            call=(charge.reason or "").removesuffix("_unknown")
            if charge.reason in SETTLEMENT_UNKNOWN
            else "charge",
        )
    waiting = charge.state in ATTENTION_STATES
    settling = charge.reason in SETTLEMENT_UNKNOWN
    cancel_kind: Call | None = None
    if charge.operation is None:  # none under way: the settlement says what a cancel is
        with contextlib.suppress(StateError):
            cancel_kind = settlement.kind_of_cancel(charge)
    cancel_left = format_amount(_left(charge, cancel_kind)) if cancel_kind is not None else None
    can_capture = charge.state == ChargeState.AUTHORIZED and charge.operation is None
    return ChargePage(
        story=story,
        customer_ip=sub.customer_ip,
        timeline=items,
        back_office=box,
        settling=settling,
        can_retry=waiting
        and not settling
        and charge.reason != FailureReason.LATE_APPROVAL
        and (sub.status != SubscriptionStatus.CANCELLED or charge.reason in SETTLEMENT_FAILED),
        can_review=charge.review is not None,
        can_resolve=waiting,
        can_discard=waiting and not settling,
        can_capture=can_capture,
        can_cancel=cancel_kind is not None and _left(charge, cancel_kind) > 0,
        cancel_kind=cancel_kind,
        cancel_left=cancel_left,
        capture_left=format_amount(_left(charge, Call.VALIDATE)) if can_capture else None,
    )


def _left(charge: Charge, kind: Call) -> Decimal:
    return settlement.remaining(charge, kind)


# --- actions on charges -------------------------------------------------------------------


@dataclass(frozen=True)
class Done:
    """What an action did, for the person who asked."""

    message: str
    ok: bool = True


def _reason(text: str | None, *, required: bool, what: str) -> str | None:
    cleaned = (text or "").strip()
    if required and not cleaned:
        raise InvalidInput(f"reason: say why you {what} (it is written to the ledger)")
    if len(cleaned) > 500:
        raise InvalidInput("reason: at most 500 characters")
    return cleaned or None


_CONFIRM_BOX = "tick the box saying the back office shows no charge for this attempt"


def retry(
    backend: Backend,
    user: SignedIn,
    charge_id: int,
    *,
    confirm_not_charged: bool,
    attempt: int | None = None,
    reason: str | None,
) -> Done:
    why = _reason(reason, required=False, what="retry")
    try:
        with backend.session() as session:
            done = ops.retry(
                session,
                charge_id,
                by=actor(user),
                confirm_not_charged=confirm_not_charged,
                attempt=attempt,
                reason=why,
            )
    except StateError as exc:
        # The service speaks the CLI's flag; the console has a box for it.
        text = str(exc).replace("pass --confirm-not-charged", _CONFIRM_BOX)
        raise StateError(text) from None
    if done.charge.state == ChargeState.AUTHORIZED:
        return Done(
            f"charge {charge_id}: its failed call is tried again by the next engine sweep "
            "(the authorization is kept, never renewed)"
        )
    return Done(f"charge {charge_id} put back in line: {backend.send_retried(charge_id)}")


def review(backend: Backend, user: SignedIn, charge_id: int, *, reason: str | None) -> Done:
    """A person reconciled a flagged charge: the flag goes, with what they did."""
    why = _reason(reason, required=True, what="clear the review flag")
    assert why is not None
    with backend.session() as session:
        ops.review(session, charge_id, by=actor(user), reason=why)
    return Done(f"charge {charge_id} reviewed")


def resolve(
    backend: Backend,
    user: SignedIn,
    charge_id: int,
    *,
    outcome: str,
    tx: str | None,
    reason: str | None,
) -> Done:
    if outcome not in ("approved", "declined"):
        raise InvalidInput('outcome: choose "approved" (with its TX) or "declined"')
    why = _reason(reason, required=True, what="resolve this charge")
    with backend.session() as session:
        done = ops.resolve(
            session,
            charge_id,
            approved=outcome == "approved",
            tx=(tx or "").strip() or None,
            by=actor(user),
            reason=why,
            plans=backend.plans(),
        )
        sub = done.subscription
        return Done(
            f"charge {charge_id} is {done.charge.state}; subscription {sub.external_ref} is "
            f"{sub.status}"
        )


def discard(backend: Backend, user: SignedIn, charge_id: int, *, reason: str | None) -> Done:
    why = _reason(reason, required=True, what="discard this charge")
    assert why is not None
    with backend.session() as session:
        done = ops.discard(session, charge_id, by=actor(user), reason=why, plans=backend.plans())
        sub = done.subscription
        return Done(
            f"charge {charge_id} discarded; subscription {sub.external_ref} continues at "
            f"period {sub.next_period}"
        )


_SETTLED = {"validate": "validated", "release": "released", "refund": "refunded"}


def _settlement_done(result: SettlementResult) -> Done:
    amount = format_amount(result.amount)
    kind = result.kind or "validate"
    if result.outcome == "approved":
        return Done(f"charge {result.charge_id}: {_SETTLED[kind]} {amount}")
    if result.outcome == "declined":
        return Done(f"charge {result.charge_id}: {kind} declined: {result.message}", ok=False)
    if result.outcome == "unknown":
        return Done(
            f"charge {result.charge_id}: the gateway's answer to the {kind} was lost; the charge "
            "is in the failed-charge queue: check the Klik & Pay back office, then resolve it",
            ok=False,
        )
    if result.outcome == "late":
        return Done(
            f"charge {result.charge_id}: the {kind}'s answer came after the charge had moved "
            "on; it is kept in the ledger and the charge is flagged for review",
            ok=False,
        )
    if result.outcome == "not_sent":
        return Done(
            f"charge {result.charge_id}: {kind} not sent (nothing moved): {result.message}; "
            "try again in a moment",
            ok=False,
        )
    return Done(f"charge {result.charge_id}: nothing to do (it changed meanwhile)", ok=False)


def capture(
    backend: Backend, user: SignedIn, charge_id: int, *, amount: str | None, reason: str | None
) -> Done:
    why = _reason(reason, required=True, what="capture now")
    result = backend.engine().settlement.capture(
        charge_id, amount=(amount or "").strip() or None, actor=actor(user), reason=why
    )
    return _settlement_done(result)


def cancel_charge(
    backend: Backend,
    user: SignedIn,
    charge_id: int,
    *,
    amount: str | None,
    reason: str | None,
    again: bool,
) -> Done:
    why = _reason(reason, required=True, what="release or refund")
    assert why is not None
    result = backend.engine().settlement.cancel(
        charge_id,
        amount=(amount or "").strip() or None,
        reason=why,
        actor=actor(user),
        again=again,
    )
    return _settlement_done(result)


# --- bulk actions on the queue ------------------------------------------------------------

BULK_ACTIONS = ("retry", "discard")


@dataclass(frozen=True)
class BulkLine:
    charge_id: int
    ok: bool
    message: str


def bulk(
    backend: Backend,
    user: SignedIn,
    action: str,
    ids: Sequence[int],
    *,
    reason: str | None,
    confirm_not_charged: bool,
) -> list[BulkLine]:
    """Apply one action to each charge in turn: one charge refused leaves the others done."""
    if action not in BULK_ACTIONS:
        raise InvalidInput(f'action: "{action}" is not one of {", ".join(BULK_ACTIONS)}')
    if not ids:
        raise InvalidInput("no charge is selected")
    if len(ids) > BULK_MAX:
        raise InvalidInput(f"at most {BULK_MAX} charges at once ({len(ids)} selected)")
    why = _reason(reason, required=True, what=f"{action} these charges")
    lines = []
    for number in ids:
        try:
            if action == "retry":
                done = retry(
                    backend, user, number, confirm_not_charged=confirm_not_charged, reason=why
                )
            else:
                done = discard(backend, user, number, reason=why)
            lines.append(BulkLine(number, done.ok, done.message))
        except BillingError as exc:
            lines.append(BulkLine(number, False, str(exc)))
    return lines


# --- subscriptions ------------------------------------------------------------------------


@dataclass(frozen=True)
class SubscriptionRow:
    """A subscription as the service shows it (alias masked), and what the console adds."""

    view: ops.SubscriptionView
    customer_ip: str
    email: str | None
    paused_at: datetime | None
    created_at: datetime

    @classmethod
    def of(cls, sub: Subscription) -> SubscriptionRow:
        return cls(ops.SubscriptionView.of(sub), sub.customer_ip, sub.email, sub.paused_at,
                   sub.created_at)  # fmt: skip

    def __getattr__(self, name: str) -> Any:
        return getattr(self.view, name)


SUBSCRIPTION_STATUSES = tuple(s.value for s in SubscriptionStatus)


def find_subscriptions(
    session: Session, *, ref: str | None, plan: str | None, status: str | None, limit: int = 200
) -> list[SubscriptionRow]:
    if ref:
        return [SubscriptionRow.of(subscriptions.get_subscription(session, ref))]
    found = subscriptions.list_subscriptions(session, plan=plan, status=status, limit=limit)
    return [SubscriptionRow.of(s) for s in found]


@dataclass(frozen=True)
class CardChange:
    """One new card of a subscription, as the ledger row of the change keeps it: masked."""

    at: datetime
    previous_alias: str
    alias: str
    previous_ip: str | None
    customer_ip: str | None
    by: str
    reason: str | None
    #: The charge the new card tried at once, if any.
    retried_charge: int | None

    @classmethod
    def of(cls, row: LedgerEntry) -> CardChange:
        details = row.details or {}
        retry = details.get("retry")
        # The row holds masked aliases; masking again (a no-op on a masked one) keeps a
        # page safe even from a row that someone wrote by hand.
        return cls(
            at=row.at,
            previous_alias=mask_alias(str(details.get("previous_alias") or "")),
            alias=mask_alias(str(details.get("alias") or "")),
            previous_ip=details.get("previous_customer_ip"),
            customer_ip=details.get("customer_ip"),
            by=row.actor,
            reason=row.reason,
            retried_charge=retry.get("charge_id") if isinstance(retry, dict) else None,
        )


@dataclass(frozen=True)
class SubscriptionPage:
    sub: SubscriptionRow
    charges: list[Charge]
    ledger: list[LedgerEntry]
    #: What the next charge costs now: the subscription's own price, else its plan's.
    price: str
    own_price: bool
    #: Plan and price changes, as asked (``billing subscriptions show`` lists the same).
    scheduled: list[SubscriptionChange]
    #: The new cards, newest first, aliases masked.
    cards: list[CardChange]
    #: The plans a change may move it to: the plans of its currency.
    plan_choices: list[str]


def subscription_by_id(session: Session, sub_id: int) -> Subscription:
    """The subscription whose id is ``sub_id``, never one whose reference reads so."""
    sub = session.get(Subscription, checked_id(sub_id, "subscription"))
    if sub is None:
        raise NotFound(f"subscription {sub_id} does not exist")
    return sub


def subscription_page(session: Session, sub_id: int, plans: PlanSet) -> SubscriptionPage:
    sub = subscription_by_id(session, sub_id)
    rows = list(reports.ledger_rows(session, subscription=sub.external_ref, last=50))
    cards = reports.ledger_rows(
        session, subscription=sub.external_ref, outcome=LedgerOutcome.SUBSCRIPTION_CARD_UPDATED
    )
    scheduled = session.scalars(
        select(SubscriptionChange)
        .where(SubscriptionChange.subscription_id == sub.id)
        .order_by(SubscriptionChange.effective_at, SubscriptionChange.id)
    )
    plan = plans.plans.get(sub.plan)
    amount = sub.amount_override
    if amount is None and plan is not None:
        amount = plan.amount
    currency = plan.currency if plan is not None else ""
    return SubscriptionPage(
        sub=SubscriptionRow.of(sub),
        charges=sorted(sub.charges, key=lambda c: c.period, reverse=True),
        ledger=rows,
        price=f"{format_amount(amount)} {currency}" if amount is not None else "?",
        own_price=sub.amount_override is not None,
        scheduled=list(scheduled),
        cards=[CardChange.of(row) for row in cards][::-1],
        plan_choices=sorted(
            name for name, p in plans.plans.items() if plan is None or p.currency == currency
        ),
    )


def _ref(session: Session, sub_id: int) -> str:
    return subscription_by_id(session, sub_id).external_ref


def pause(backend: Backend, user: SignedIn, sub_id: int, *, reason: str | None) -> Done:
    why = _reason(reason, required=True, what="pause it")
    with backend.session() as session:
        sub = subscriptions.pause(session, _ref(session, sub_id), by=actor(user), reason=why)
        return Done(f"subscription {sub.external_ref} paused")


def resume(backend: Backend, user: SignedIn, sub_id: int, *, reason: str | None) -> Done:
    why = _reason(reason, required=True, what="resume it")
    plans = backend.plans()
    with backend.session() as session:
        ref = _ref(session, sub_id)
        sub = subscriptions.resume(session, ref, plans, by=actor(user), reason=why)
        return Done(
            f"subscription {sub.external_ref} resumed; next charge (period {sub.next_period}) "
            f"at {sub.next_charge_at:%Y-%m-%d %H:%M}Z"
        )


def cancel_subscription(
    backend: Backend, user: SignedIn, sub_id: int, *, reason: str | None
) -> Done:
    why = _reason(reason, required=True, what="cancel it")
    with backend.session() as session:
        sub = subscriptions.cancel(session, _ref(session, sub_id), by=actor(user), reason=why)
        return Done(f"subscription {sub.external_ref} cancelled")


def change_card(
    backend: Backend, user: SignedIn, sub_id: int, *, alias: str, customer_ip: str, reason: str
) -> Done:
    """A new card, at once; a declined charge it re-opens goes to the workers as Retry's."""
    return _change(backend, user, sub_id, {"alias": alias, "customer_ip": customer_ip}, reason)


def change_plan(
    backend: Backend,
    user: SignedIn,
    sub_id: int,
    *,
    plan: str,
    amount: str,
    effective_from: str,
    reason: str,
) -> Done:
    """Another plan and/or a new price, from the next period or the first due from a day."""
    asked = {"plan": plan, "amount": amount, "effective_from": effective_from}
    return _change(backend, user, sub_id, asked, reason)


def _change(
    backend: Backend, user: SignedIn, sub_id: int, asked: dict[str, str], reason: str
) -> Done:
    """One call to ``changes.update_subscription`` with the fields of one form (the others
    are left as they are; it names every bad field at once), then the charge the new card
    re-opened is dispatched after commit."""
    _reason(reason, required=False, what="change it")  # the console's 500 characters
    with backend.session() as session:
        done = changes.update_subscription(
            session, backend.plans(), _ref(session, sub_id), by=actor(user), reason=reason,
            alias=asked.get("alias"), customer_ip=asked.get("customer_ip"),
            plan=asked.get("plan"), amount=asked.get("amount"),
            effective_from=asked.get("effective_from"),
        )  # fmt: skip
    lines = done.lines()
    retried = done.card.retried if done.card is not None else None
    if retried is not None:
        lines.append(f"charge {retried.charge.id}: {backend.send_retried(retried.charge.id)}")
    return Done("\n".join(lines))


# --- dead letters -------------------------------------------------------------------------


def letters(session: Session, *, include_requeued: bool) -> list[DeadLetter]:
    return deadletters.list_letters(session, include_requeued=include_requeued)


def letter(session: Session, letter_id: int) -> DeadLetter:
    return deadletters.get(session, letter_id)


def requeue(backend: Backend, user: SignedIn, letter_id: int) -> Done:
    name, task_id = deadletters.requeue(
        backend.url, letter_id, by=actor(user), send=backend.send_task
    )
    note = broker.requeued_charges(backend.url, letter_id)
    sent = f"dead letter {letter_id}: {name} sent again as task {task_id}"
    return Done(f"{sent}; {note}" if note else sent)


# --- events -------------------------------------------------------------------------------

EVENT_STATUSES = tuple(s.value for s in EventStatus)


def events(
    session: Session, *, status: str | None, endpoint: str | None, type_: str | None
) -> list[tuple[Event, list[EventDelivery]]]:
    found = webhooks.list_events(session, status=status, endpoint=endpoint, type_=type_, limit=200)
    return [(e, webhooks.deliveries_of(e)) for e in reversed(found)]


def event(session: Session, ref: str) -> tuple[Event, list[EventDelivery]]:
    found = webhooks.get_event(session, ref)
    return found, webhooks.deliveries_of(found)


def endpoints(session: Session) -> list[str]:
    return webhooks.known_endpoints(session)


def redeliver(backend: Backend, user: SignedIn, ref: str, *, endpoint: str | None) -> Done:
    with backend.session() as session:
        sent = webhooks.redeliver(session, ref, by=actor(user), endpoint=endpoint or None)
        names = ", ".join(d.endpoint for d in sent)
        return Done(f"event {ref} will be posted again to {names}")


# --- the ledger ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LedgerQuery:
    subscription: str | None = None
    plan: str | None = None
    outcome: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    @classmethod
    def from_params(cls, params: Any) -> LedgerQuery:
        def text(name: str) -> str | None:
            value = str(params.get(name, "") or "").strip()
            return value or None

        return cls(
            subscription=text("subscription"),
            plan=text("plan"),
            outcome=text("outcome"),
            since=_day(text("from"), "from"),
            until=_day(text("to"), "to"),
        )

    def kwargs(self) -> dict[str, Any]:
        return {
            "subscription": self.subscription,
            "plan": self.plan,
            "outcome": self.outcome,
            "since": self.since,
            "until": self.until,
        }

    def params(self) -> dict[str, str]:
        out = {k: v for k, v in self.kwargs().items() if isinstance(v, str)}
        if self.since:
            out["from"] = self.since.date().isoformat()
        if self.until:
            out["to"] = (self.until - timedelta(days=1)).date().isoformat()
        return out


def _day(text: str | None, name: str) -> datetime | None:
    """A ``YYYY-MM-DD`` filter as the UTC instant that starts it (``to`` is inclusive)."""
    if text is None:
        return None
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise InvalidInput(f'{name}: "{text}" is not a date such as 2026-11-30') from None
    start = datetime.combine(day, datetime.min.time(), tzinfo=UTC)
    return start + timedelta(days=1) if name == "to" else start


def ledger_page(session: Session, query: LedgerQuery, last: int) -> tuple[list[LedgerEntry], int]:
    rows = list(reports.ledger_rows(session, last=last, **query.kwargs()))
    total = reports.count_ledger_rows(session, **query.kwargs())
    rows.reverse()  # newest first on the page
    return rows, total


#: Bytes of an export kept in memory before it spills to a temporary file.
_EXPORT_IN_MEMORY = 1024 * 1024


def ledger_export(backend: Backend, query: LedgerQuery, fmt: str) -> Iterator[str]:
    """The filtered ledger in ``fmt`` (csv or jsonl), exactly as ``billing ledger export``
    writes it: written whole first (a bad filter fails before the answer starts, and the
    database is not held while a slow client reads), then given back in chunks."""
    if fmt not in reports.FORMATS:
        raise InvalidInput(f'format: "{fmt}" is not one of {", ".join(reports.FORMATS)}')
    spool = tempfile.SpooledTemporaryFile(  # noqa: SIM115 (closed by the generator below)
        max_size=_EXPORT_IN_MEMORY, mode="w+", encoding="utf-8", newline=""
    )
    try:
        with backend.session() as session:
            reports.export(reports.ledger_rows(session, **query.kwargs()), fmt, cast(TextIO, spool))
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    return _chunks(spool)


def _chunks(spool: IO[str]) -> Iterator[str]:
    with spool:
        while chunk := spool.read(64 * 1024):
            yield chunk


OUTCOMES = reports.KNOWN_OUTCOMES


# --- plans --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlansView:
    plans: PlanSet
    #: Which accounts have their private key in this process's environment (never the key).
    keys_present: dict[str, bool]
    default_webhook: str | None


def plans_view(backend: Backend) -> PlansView:
    plans = backend.plans()
    return PlansView(
        plans=plans,
        keys_present={
            c: bool(os.environ.get(a.private_key_env, "").strip())
            for c, a in plans.accounts.items()
        },
        default_webhook=backend.settings.webhook_url,
    )


__all__ = [
    "EVENT_TYPES",
    "QUEUE_COLUMNS",
    "QUEUE_FILTERS",
    "Backend",
    "Done",
    "actor",
]
