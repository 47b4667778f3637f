"""Reading the ledger back: filtered listings, CSV/JSON-lines exports, the money report.

The ledger is the record accountants reconcile against the Klik & Pay statements, so
everything here is exact: amounts stay ``Decimal`` (sums are taken in whole cents, which
SQLite's floating-point ``SUM`` cannot get wrong) and are written ``"29.90"``; times are
ISO 8601 in UTC. Listings stream in batches, so a ledger of millions of rows exports in
constant memory.
"""

from __future__ import annotations

import csv
import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as time_of_day
from decimal import Decimal
from typing import Any, Literal, TextIO

from sqlalchemy import ColumnElement, Integer, Select, SQLColumnExpression, cast, func, select
from sqlalchemy.orm import Session

from billing.errors import InvalidInput, NotFound
from billing.models import Attempt, Charge, LedgerEntry, Subscription
from billing.money import format_amount
from billing.vocabulary import AUTHORIZED, COLLECTED, REFUNDED, ChargeState, LedgerOutcome

ExportFormat = Literal["csv", "jsonl"]
FORMATS: tuple[ExportFormat, ...] = ("csv", "jsonl")

#: Every outcome the code writes (``billing.vocabulary.LedgerOutcome``).
KNOWN_OUTCOMES: tuple[str, ...] = tuple(o.value for o in LedgerOutcome)

#: Columns of an export, in order.
COLUMNS = (
    "id",
    "at",
    "outcome",
    "operation",
    "charge_id",
    "attempt_id",
    "subscription_id",
    "external_ref",
    "plan",
    "period",
    "amount",
    "currency",
    "merchant_id",
    "tx",
    "alias_masked",
    "code",
    "message",
    "raw",
    "http_status",
    "actor",
    "reason",
    "details",
)

_BATCH = 500
_ZERO = Decimal("0.00")


def entry_dict(entry: LedgerEntry) -> dict[str, Any]:
    """A ledger row as plain data: amount ``"29.90"``, times ISO 8601 UTC, alias masked."""
    return {
        "id": entry.id,
        "at": entry.at.isoformat(),
        "outcome": entry.outcome,
        "operation": entry.operation,
        "charge_id": entry.charge_id,
        "attempt_id": entry.attempt_id,
        "subscription_id": entry.subscription_id,
        "external_ref": entry.external_ref,
        "plan": entry.plan,
        "period": entry.period,
        "amount": format_amount(entry.amount),
        "currency": entry.currency,
        "merchant_id": entry.merchant_id,
        "tx": entry.tx,
        "alias_masked": entry.alias_masked,
        "code": entry.code,
        "message": entry.message,
        "raw": entry.raw,
        "http_status": entry.http_status,
        "actor": entry.actor,
        "reason": entry.reason,
        "details": entry.details,
    }


# --- listing --------------------------------------------------------------------------


def _filtered(
    session: Session,
    query: Select[Any],
    *,
    subscription: str | None,
    plan: str | None,
    outcome: str | None,
    since: datetime | None,
    until: datetime | None,
) -> Select[Any]:
    """Apply the listing filters, refusing ones that can only be typos."""
    if since is not None and until is not None and since >= until:
        raise InvalidInput(
            f"the period is empty: from {since.isoformat()} is not before to {until.isoformat()}"
        )
    if subscription is not None:
        known = session.scalar(
            select(Subscription.id).where(Subscription.external_ref == subscription)
        )
        if known is None:
            raise NotFound(f'no subscription with reference "{subscription}"')
        query = query.where(LedgerEntry.external_ref == subscription)
    if plan is not None:
        query = query.where(LedgerEntry.plan == plan)
    if outcome is not None:
        if outcome not in KNOWN_OUTCOMES and not session.scalar(
            select(LedgerEntry.id).where(LedgerEntry.outcome == outcome).limit(1)
        ):
            raise InvalidInput(f'outcome "{outcome}" is not one of: {", ".join(KNOWN_OUTCOMES)}')
        query = query.where(LedgerEntry.outcome == outcome)
    if since is not None:
        query = query.where(LedgerEntry.at >= since)
    if until is not None:
        query = query.where(LedgerEntry.at < until)
    return query


def ledger_rows(
    session: Session,
    *,
    subscription: str | None = None,
    plan: str | None = None,
    outcome: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    last: int | None = None,
) -> Iterator[LedgerEntry]:
    """Ledger rows in order of ``id``, fetched in batches; ``since`` inclusive, ``until`` not.

    ``last`` keeps only the newest ``last`` matching rows (still in order). The filters are
    checked at the call (an unknown subscription raises ``NotFound`` now, not at the first
    row); the rows must be consumed before ``session`` closes.
    """
    filters: dict[str, Any] = {
        "subscription": subscription,
        "plan": plan,
        "outcome": outcome,
        "since": since,
        "until": until,
    }
    if last is None:
        query = _filtered(session, select(LedgerEntry).order_by(LedgerEntry.id), **filters)
    else:
        newest = _filtered(session, select(LedgerEntry.id), **filters)
        newest = newest.order_by(LedgerEntry.id.desc()).limit(last)
        query = (
            select(LedgerEntry)
            .where(LedgerEntry.id.in_(newest.scalar_subquery()))
            .order_by(LedgerEntry.id)
        )
    return _stream(session, query)


def _stream(session: Session, query: Select[Any]) -> Iterator[LedgerEntry]:
    yield from session.scalars(query.execution_options(yield_per=_BATCH))


def count_ledger_rows(
    session: Session,
    *,
    subscription: str | None = None,
    plan: str | None = None,
    outcome: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> int:
    """How many rows :func:`ledger_rows` would give (for a progress bar)."""
    query = _filtered(
        session,
        select(func.count()).select_from(LedgerEntry),
        subscription=subscription,
        plan=plan,
        outcome=outcome,
        since=since,
        until=until,
    )
    return int(session.scalar(query) or 0)


# --- export ---------------------------------------------------------------------------


def export(
    rows: Iterable[LedgerEntry],
    fmt: str,
    out: TextIO,
    *,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write ``rows`` to ``out`` as CSV (with a header) or JSON lines; return how many.

    ``progress`` is called with the number of rows written since its last call.
    """
    if fmt not in FORMATS:
        raise InvalidInput(f'export format "{fmt}" is not one of: {", ".join(FORMATS)}')
    writer = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
    if writer is not None:
        writer.writerow(COLUMNS)
    count = pending = 0
    for entry in rows:
        data = entry_dict(entry)
        if writer is not None:
            writer.writerow(_csv_cell(data[column]) for column in COLUMNS)
        else:
            out.write(json.dumps(data, ensure_ascii=False) + "\n")
        count += 1
        pending += 1
        if progress is not None and pending >= _BATCH:
            progress(pending)
            pending = 0
    if progress is not None and pending:
        progress(pending)
    return count


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    return spreadsheet_text(str(value))


#: What a spreadsheet reads as the start of a formula in a cell (OWASP's CSV injection
#: list, and the full-width forms some spreadsheets take for them).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\uff1d", "\uff0b", "\uff0d", "\uff20")
#: What may split a cell when a spreadsheet guesses another separator (French and German
#: Excel split a ``.csv`` at ``;``) or a reader takes the file line by line: each part is a
#: cell of its own there.
CELL_SPLITTERS = ",;\t|\r\n"
_NUMBER = re.compile(r"-?\d+(\.\d+)?", re.ASCII)


def _looks_like_formula(part: str) -> bool:
    """Whether ``part`` starts like a formula once what a spreadsheet may trim is gone
    (spaces, no-break spaces, zero-width and other invisible characters)."""
    start = next(
        (ch for ch in part if not (ch.isspace() or unicodedata.category(ch)[0] in "CZ")),
        "",
    )
    return bool(part) and (part.startswith(FORMULA_STARTS) or start in FORMULA_STARTS)


def spreadsheet_text(text: str) -> str:
    """A CSV cell a spreadsheet shows as text and never runs, however it splits the row.

    A cell starting like a formula gets a quote first (a plain number such as a refund's
    ``-10.00`` stays a number); so does every part after a character a spreadsheet may take
    for a separator (``x;=cmd|…`` is two cells in a French Excel), the quote going right
    after that character.
    """
    if _looks_like_formula(text) and not _NUMBER.fullmatch(text):
        text = "'" + text
    if not any(ch in text for ch in CELL_SPLITTERS):
        return text
    parts = re.split(f"([{re.escape(CELL_SPLITTERS)}])", text)
    return "".join(
        "'" + part if index % 2 == 0 and index and _looks_like_formula(part) else part
        for index, part in enumerate(parts)
    )


# --- the report -----------------------------------------------------------------------


@dataclass
class ReportLine:
    """Money of one (plan, currency) between two instants.

    ``collected``, ``authorized``, ``refunded`` and ``declined_*`` come from ledger rows in
    the period. ``collected`` is gross (approved + validated + resolved_approved; refunds
    are not subtracted). A deferred charge counts in ``authorized`` when authorized and in
    ``collected`` when validated. ``declined_amount`` is what was asked for in each declined
    call. ``in_dunning`` and ``unknown_*`` are the state of the charges *now*, whatever the
    period: what is still being retried and what may have been charged without our knowing.
    """

    plan: str
    currency: str
    collected: Decimal = _ZERO
    collected_count: int = 0
    authorized: Decimal = _ZERO
    refunded: Decimal = _ZERO
    declined_count: int = 0
    declined_amount: Decimal = _ZERO
    in_dunning: int = 0
    unknown_count: int = 0
    unknown_amount: Decimal = _ZERO
    #: Approvals that came for an attempt no longer current: evidence the card was charged,
    #: never counted as collected; each is flagged for a person.
    late_approved_count: int = 0
    late_approved_amount: Decimal = _ZERO

    def as_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan,
            "currency": self.currency,
            "collected": format_amount(self.collected),
            "collected_count": self.collected_count,
            "authorized": format_amount(self.authorized),
            "refunded": format_amount(self.refunded),
            "declined_count": self.declined_count,
            "declined_amount": format_amount(self.declined_amount),
            "in_dunning": self.in_dunning,
            "unknown_count": self.unknown_count,
            "unknown_amount": format_amount(self.unknown_amount),
            "late_approved_count": self.late_approved_count,
            "late_approved_amount": format_amount(self.late_approved_amount),
        }


def _cents(column: SQLColumnExpression[Decimal]) -> ColumnElement[Any]:
    """The sum of a money column in whole cents: exact on PostgreSQL and SQLite alike."""
    return func.coalesce(func.sum(cast(func.round(column * 100), Integer)), 0)


def _money(cents: int | None) -> Decimal:
    return Decimal(int(cents or 0)).scaleb(-2)


def report(session: Session, *, since: datetime, until: datetime) -> list[ReportLine]:
    """Money per (plan, currency) from ``since`` (inclusive) to ``until`` (exclusive)."""
    if since >= until:
        raise InvalidInput(
            f"the period is empty: from {since.isoformat()} is not before to {until.isoformat()}"
        )
    lines: dict[tuple[str, str], ReportLine] = {}

    def line(plan: str | None, currency: str) -> ReportLine:
        key = (plan or "", currency)
        if key not in lines:
            lines[key] = ReportLine(plan=key[0], currency=currency)
        return lines[key]

    in_period = (LedgerEntry.at >= since, LedgerEntry.at < until)
    counted = (*COLLECTED, *AUTHORIZED, *REFUNDED)
    moved = session.execute(
        select(
            LedgerEntry.plan,
            LedgerEntry.currency,
            LedgerEntry.outcome,
            func.count(),
            _cents(LedgerEntry.amount),
        )
        .where(*in_period, LedgerEntry.outcome.in_(counted))
        .group_by(LedgerEntry.plan, LedgerEntry.currency, LedgerEntry.outcome)
    )
    for plan, currency, outcome, count, cents in moved:
        target = line(plan, currency)
        if outcome in COLLECTED:
            target.collected += _money(cents)
            target.collected_count += count
        elif outcome in AUTHORIZED:
            target.authorized += _money(cents)
        else:
            target.refunded += _money(cents)

    # A late approval moves no money in the books (amount 0): what it charged is the attempt's.
    late = session.execute(
        select(LedgerEntry.plan, LedgerEntry.currency, func.count(), _cents(Attempt.amount))
        .join(Attempt, Attempt.id == LedgerEntry.attempt_id)
        .where(
            *in_period,
            LedgerEntry.outcome == LedgerOutcome.LATE_ANSWER,
            Attempt.outcome == "approved",
            Attempt.operation == "duplicate",
        )
        .group_by(LedgerEntry.plan, LedgerEntry.currency)
    )
    for plan, currency, count, cents in late:
        target = line(plan, currency)
        target.late_approved_count = count
        target.late_approved_amount = _money(cents)

    # A declined call moves no money (its ledger amount is 0): what was asked is the charge's.
    declined = session.execute(
        select(LedgerEntry.plan, LedgerEntry.currency, func.count(), _cents(Charge.amount))
        .join(Charge, Charge.id == LedgerEntry.charge_id)
        .where(*in_period, LedgerEntry.outcome == "declined")
        .group_by(LedgerEntry.plan, LedgerEntry.currency)
    )
    for plan, currency, count, cents in declined:
        target = line(plan, currency)
        target.declined_count = count
        target.declined_amount = _money(cents)

    dunning = session.execute(
        select(Charge.plan, Charge.currency, func.count())
        .where(Charge.state == ChargeState.PENDING, Charge.declines > 0)
        .group_by(Charge.plan, Charge.currency)
    )
    for plan, currency, count in dunning:
        line(plan, currency).in_dunning = count

    unknown = session.execute(
        select(Charge.plan, Charge.currency, func.count(), _cents(Charge.amount))
        .where(Charge.state == ChargeState.UNKNOWN)
        .group_by(Charge.plan, Charge.currency)
    )
    for plan, currency, count, cents in unknown:
        target = line(plan, currency)
        target.unknown_count = count
        target.unknown_amount = _money(cents)

    return [lines[key] for key in sorted(lines)]


__all__ = [
    "COLUMNS",
    "FORMATS",
    "KNOWN_OUTCOMES",
    "ReportLine",
    "count_ledger_rows",
    "entry_dict",
    "export",
    "ledger_rows",
    "report",
]


# --- the console's overview (``billing web``) -------------------------------------------
# Read-only questions the overview page asks: how much moved today and this month, per
# currency, and what the last days looked like. Appended here, beside ``report``, so the
# console and the CLI read the ledger the same way.

#: Ledger outcomes of a call that failed: declined by the gateway, or its answer was lost.
FAILED_OUTCOMES = ("declined", "unknown")
#: Outcomes of a charge call (``duplicate.pl``) the gateway answered: the decline rate's base.
ANSWERED_CHARGE_OUTCOMES = ("approved", "authorized", "declined")


@dataclass(frozen=True)
class DayCounts:
    """Ledger rows of one UTC day: what the overview's chart draws."""

    day: date
    #: Rows that collected money (approved, validated, resolved as approved).
    collected: int = 0
    #: Calls declined or whose answer was lost.
    failed: int = 0
    #: Charge calls the gateway answered, and how many of them it declined.
    charge_calls: int = 0
    charge_declines: int = 0


def _utc_day(session: Session) -> ColumnElement[Any]:
    """``YYYY-MM-DD`` of a ledger row's UTC day, in either database's SQL."""
    if session.get_bind().dialect.name == "postgresql":
        return func.to_char(func.timezone("UTC", LedgerEntry.at), "YYYY-MM-DD")
    return func.strftime("%Y-%m-%d", LedgerEntry.at)  # SQLite stores UTC already


def daily_counts(session: Session, *, days: int, now: datetime) -> list[DayCounts]:
    """One ``DayCounts`` per UTC day for the ``days`` days ending with ``now``'s, oldest
    first; a day without rows is there with zeros."""
    if days < 1:
        raise InvalidInput(f"days must be at least 1, not {days}")
    last = now.astimezone(UTC).date()
    first = last - timedelta(days=days - 1)
    since = datetime.combine(first, time_of_day.min, tzinfo=UTC)
    day = _utc_day(session).label("day")
    rows = session.execute(
        select(day, LedgerEntry.outcome, LedgerEntry.operation, func.count())
        .where(
            LedgerEntry.at >= since,
            LedgerEntry.outcome.in_((*COLLECTED, *FAILED_OUTCOMES, "authorized")),
        )
        .group_by(day, LedgerEntry.outcome, LedgerEntry.operation)
    )
    counts: dict[date, dict[str, int]] = {}
    for text, outcome, operation, count in rows:
        bucket = counts.setdefault(date.fromisoformat(text), {})
        if outcome in COLLECTED:
            bucket["collected"] = bucket.get("collected", 0) + count
        if outcome in FAILED_OUTCOMES:
            bucket["failed"] = bucket.get("failed", 0) + count
        if operation == "duplicate" and outcome in ANSWERED_CHARGE_OUTCOMES:
            bucket["charge_calls"] = bucket.get("charge_calls", 0) + count
            if outcome == "declined":
                bucket["charge_declines"] = bucket.get("charge_declines", 0) + count
    return [
        DayCounts(day=d, **counts.get(d, {}))
        for d in (first + timedelta(days=i) for i in range(days))
    ]


def decline_rate(days: Iterable[DayCounts]) -> Decimal | None:
    """Declined charge calls over answered ones (0.25 for one in four); None when none."""
    calls = declines = 0
    for d in days:
        calls += d.charge_calls
        declines += d.charge_declines
    if not calls:
        return None
    return (Decimal(declines) / Decimal(calls)).quantize(Decimal("0.0001"))


@dataclass(frozen=True)
class CurrencyTotals:
    """Money of one currency between two instants, over every plan (see ``ReportLine``)."""

    currency: str
    collected: Decimal = _ZERO
    authorized: Decimal = _ZERO
    refunded: Decimal = _ZERO


def totals_by_currency(
    session: Session, *, since: datetime, until: datetime
) -> list[CurrencyTotals]:
    """``report``'s collected, authorized and refunded summed per currency, by currency."""
    sums: dict[str, CurrencyTotals] = {}
    for line in report(session, since=since, until=until):
        was = sums.get(line.currency, CurrencyTotals(line.currency))
        sums[line.currency] = CurrencyTotals(
            line.currency,
            was.collected + line.collected,
            was.authorized + line.authorized,
            was.refunded + line.refunded,
        )
    return [sums[c] for c in sorted(sums)]


__all__ += [
    "CurrencyTotals",
    "DayCounts",
    "daily_counts",
    "decline_rate",
    "totals_by_currency",
]
