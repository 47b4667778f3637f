"""Setting the gateway's call log beside the ledger: the five counts a chaos run must keep at 0.

1. ``double_charged``: (subscription, period) pairs the gateway charged more than once.
2. ``unaccounted``: charges the gateway recorded that the ledger shows neither as approved
   (with that transaction number) nor as unknown: money moved and nobody would know.
3. ``no_outcome``: due (subscription, period) pairs without an outcome: no charge, a charge
   still open, or a final state the ledger has no row for.
4. ``merchant_mismatches``: merchants whose ledger total differs from the gateway's, once
   each unknown charge is resolved the way a person reading the back office would: approved
   with the gateway's amount when the gateway recorded a charge for it, declined otherwise.
5. ``hostile``: gateway calls whose answer the sandbox made hostile (``HOSTILE_EXPECTED``:
   an answer behind a 503 or 429, a message wider than its column, a TX that is no
   transaction number, an amount that is not the one charged) and that did not end as
   their fault defines. The first four counts cannot see every wrong handling: an approval
   behind a 503 read as "not sent" and re-sent into a soft decline leaves one gateway
   charge and a ledger that explains it as unknown once a person looks, but it is a re-send
   of a charge the gateway had approved; a lied amount booked as answered is off by a cent
   the merchant totals see only if nothing else is. So each such call is held to its own
   outcome, read from the ledger rows of the attempt that made it.

A hostile answer the chaos kept from the worker (a worker killed mid-call, a connection
cut by the outage) ends unknown without having been read; that is counted apart
(``interrupted``), not as a failure: the answer never reached the code being judged.

The module works on plain records so that a test can build the evidence by hand; the
``load_*`` functions read it from a database and a sandbox's control API.

A gateway call is tied to a charge by merchant and alias, and among the charges of that
alias to the last one whose first attempt started before the call: the charges of one
subscription are made one period after another, never side by side. Within a charge, a
call is tied to the last attempt that started before it (each attempt is written before
its call is made).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import func, select

from billing import widths
from billing.db import session_scope
from billing.harness.sandbox import SandboxControl
from billing.ledger import COLLECTED, REFUNDED
from billing.models import Attempt, Charge, LedgerEntry, Subscription
from billing.money import format_amount

ZERO = Decimal("0.00")
#: Gateway scripts that take money from a card.
CHARGE_SCRIPTS = frozenset({"duplicate", "server_server"})
#: Ledger outcomes that show a recorded charge as paid (or held, for deferred plans).
APPROVED_OUTCOMES = frozenset({"approved", "authorized", "resolved_approved"})
#: Charge states that are an outcome for the period.
OUTCOME_STATES = frozenset({"approved", "authorized", "declined", "failed", "unknown"})
#: How far a gateway call's clock may be behind the attempt that made it.
CLOCK_TOLERANCE = timedelta(seconds=1)
#: The sandbox's hostile answer faults (``billing.sandbox.HOSTILE_FAULTS``) and the outcome
#: each one defines; ``_hostile_problem`` checks it.
HOSTILE_EXPECTED = {
    "answer_in_503": "the body decides, not the HTTP 503 or 429: an approval is approved with"
    " its TX and never sent again, a decline is a decline",
    "long_message": "approved with its TX, the message cut to its column with the marker",
    "bad_tx": "unknown, for a person: no TX kept from the answer, never sent again",
    "amount_lie": "approved with its TX for the amount asked, flagged amount_mismatch",
}
#: Statuses an ``answer_in_503`` answer comes in (``billing.sandbox.BUSY_STATUSES``).
BUSY_STATUSES = frozenset({503, 429})
#: What kind of answer a ledger row read, by its outcome (a late answer says it in details).
_ROW_KIND = {
    "approved": "approved",
    "authorized": "approved",
    "declined": "declined",
    "not_sent": "not_sent",
    "unknown": "unknown",
}


@dataclass(frozen=True)
class GatewayCall:
    """One script call in the sandbox's log (``GET /_sandbox/calls``)."""

    seq: int
    script: str
    merchant_id: str | None
    alias: str | None
    tx: str | None
    amount: Decimal | None
    deferred: bool
    recorded: bool
    result: str
    at: datetime
    #: The random fault the sandbox applied to this call, if any.
    fault: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GatewayCall:
        amount = data.get("amount")
        try:
            parsed = Decimal(str(amount)).quantize(Decimal("0.01")) if amount else None
        except ArithmeticError:
            parsed = None
        return cls(
            seq=int(data["seq"]),
            script=str(data["script"]),
            merchant_id=data.get("merchant_id"),
            alias=data.get("alias"),
            tx=data.get("tx"),
            amount=parsed,
            deferred=bool(data.get("deferred")),
            recorded=bool(data.get("recorded")),
            result=str(data.get("result") or ""),
            at=datetime.fromisoformat(str(data["at"])),
            fault=str(data["fault"]) if data.get("fault") else None,
        )

    @property
    def is_charge(self) -> bool:
        """The gateway took (or held) money from a card in this call."""
        return self.recorded and self.script in CHARGE_SCRIPTS


@dataclass(frozen=True)
class ChargeRecord:
    """A charge row, with its subscription's alias and its first attempt's start."""

    id: int
    subscription_id: int
    period: int
    alias: str
    merchant_id: str
    amount: Decimal
    state: str
    tx: str | None = None
    first_attempt_at: datetime | None = None
    reason: str | None = None
    review: str | None = None


@dataclass(frozen=True)
class AttemptRecord:
    """An attempt row: one gateway call of a charge, written before the call is made."""

    id: int
    charge_id: int
    number: int
    started_at: datetime


@dataclass(frozen=True)
class LedgerRecord:
    charge_id: int | None
    outcome: str
    amount: Decimal
    merchant_id: str
    tx: str | None = None
    attempt_id: int | None = None
    http_status: int | None = None
    message: str | None = None
    raw: str | None = None
    details: Mapping[str, Any] | None = None

    @property
    def read_answer(self) -> bool:
        """The row holds a script's answer (the sandbox always sends ``RESPONSE=``)."""
        return "RESPONSE=" in (self.raw or "")

    @property
    def kind(self) -> str:
        """``approved``, ``declined``, ``not_sent`` or ``unknown``: what the row read."""
        if self.outcome == "late_answer":
            return str((self.details or {}).get("answer") or "unknown")
        return _ROW_KIND.get(self.outcome, self.outcome)


@dataclass(frozen=True)
class HostileFinding:
    """A hostile answer that did not end as its fault defines."""

    seq: int
    fault: str
    charge_id: int | None
    problem: str

    def __str__(self) -> str:
        return f"call {self.seq} ({self.fault}), charge {self.charge_id}: {self.problem}"


@dataclass(frozen=True)
class MerchantTotal:
    merchant_id: str
    ledger: Decimal
    resolved_unknowns: Decimal
    gateway: Decimal

    @property
    def difference(self) -> Decimal:
        return self.ledger + self.resolved_unknowns - self.gateway


@dataclass
class Reconciliation:
    """What the comparison found; ``counts`` are the five numbers that must be 0."""

    double_charged: list[tuple[int, int, int]] = field(default_factory=list)
    unaccounted: list[GatewayCall] = field(default_factory=list)
    no_outcome: list[tuple[int, int, str]] = field(default_factory=list)
    merchants: list[MerchantTotal] = field(default_factory=list)
    hostile: list[HostileFinding] = field(default_factory=list)
    #: ``fault: ending`` -> calls; endings: as defined, late answer, interrupted, wrong.
    hostile_endings: Counter[str] = field(default_factory=Counter)
    states: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    ledger_outcomes: Counter[str] = field(default_factory=Counter)
    gateway_charges: int = 0
    unknowns_resolved_approved: int = 0
    unknowns_resolved_declined: int = 0

    @property
    def merchant_mismatches(self) -> list[MerchantTotal]:
        return [m for m in self.merchants if m.difference != ZERO]

    @property
    def counts(self) -> dict[str, int]:
        return {
            "gateway charges per (subscription, period) above one": len(self.double_charged),
            "recorded charges the ledger shows neither approved nor unknown": len(self.unaccounted),
            "due subscriptions with no outcome for the period": len(self.no_outcome),
            "merchants whose ledger total differs from the gateway's": len(
                self.merchant_mismatches
            ),
            "hostile answers not ended as their fault defines": len(self.hostile),
        }

    @property
    def ok(self) -> bool:
        return not any(self.counts.values())

    def render(self, examples: int = 5) -> str:
        """A plain-text report: the five counts, totals per merchant, then the details."""
        width = max(len(name) for name in self.counts)
        lines = ["", "reconciliation (each must be 0)", "-" * (width + 8)]
        lines += [f"{name:<{width}}  {count:>5}" for name, count in self.counts.items()]
        lines += ["", "per merchant (ledger + unknowns resolved = gateway)"]
        for m in self.merchants:
            lines.append(
                f"  {m.merchant_id}: ledger {format_amount(m.ledger)} + resolved unknowns "
                f"{format_amount(m.resolved_unknowns)} = "
                f"{format_amount(m.ledger + m.resolved_unknowns)}; gateway "
                f"{format_amount(m.gateway)}; difference {format_amount(m.difference)}"
            )
        lines += [
            "",
            f"gateway charges recorded: {self.gateway_charges}",
            "charges by state: " + _counter(self.states),
            "ledger rows by outcome: " + _counter(self.ledger_outcomes),
            "failed and unknown charges by reason: " + _counter(self.reasons),
            f"unknown: {self.states['unknown']} (resolved as approved "
            f"{self.unknowns_resolved_approved}, as declined {self.unknowns_resolved_declined});"
            f" failed: {self.states['failed']}; declined answers: "
            f"{self.ledger_outcomes['declined']}",
            "hostile answers by fault and ending: " + _counter(self.hostile_endings),
        ]
        for title, items in (
            ("double charges (subscription, period, calls)", self.double_charged),
            ("unaccounted gateway charges", self.unaccounted),
            ("no outcome (subscription, period, state)", self.no_outcome),
            ("hostile answers not ended as defined", self.hostile),
        ):
            if items:
                lines.append(f"{title}, first {min(examples, len(items))}:")
                lines += [f"  {item}" for item in items[:examples]]
        return "\n".join(lines)


def _counter(counter: Mapping[str, int]) -> str:
    return ", ".join(f"{key}={value}" for key, value in sorted(counter.items())) or "-"


def _tie_calls_to_charges(
    calls: Sequence[GatewayCall], charges: Sequence[ChargeRecord]
) -> dict[int, int | None]:
    """``call seq -> charge id`` (None when no charge explains the call)."""
    by_alias: dict[tuple[str | None, str], list[ChargeRecord]] = defaultdict(list)
    for charge in charges:
        if charge.first_attempt_at is not None:
            by_alias[(charge.merchant_id, charge.alias)].append(charge)
    for group in by_alias.values():
        group.sort(key=lambda c: (c.first_attempt_at, c.period))
    tied: dict[int, int | None] = {}
    for call in calls:
        match: int | None = None
        for charge in by_alias.get((call.merchant_id, call.alias or ""), []):
            assert charge.first_attempt_at is not None
            if charge.first_attempt_at <= call.at + CLOCK_TOLERANCE:
                match = charge.id
        tied[call.seq] = match
    return tied


def _attempt_of(call: GatewayCall, attempts: Sequence[AttemptRecord]) -> AttemptRecord | None:
    """The charge's last attempt started before ``call`` (``attempts`` in start order)."""
    found = None
    for attempt in attempts:
        if attempt.started_at <= call.at:
            found = attempt
    return found or (attempts[0] if attempts else None)


def _hostile_problem(
    call: GatewayCall, charge: ChargeRecord, rows: Sequence[LedgerRecord], sent_again: bool
) -> tuple[str, str | None]:
    """How a hostile answer ended (``as defined``, ``late answer``, ``interrupted``), and
    what is wrong with it, or None: ``HOSTILE_EXPECTED`` checked against the ledger rows of
    the attempt that made the call."""
    fault = call.fault or ""
    if sent_again and call.recorded:
        return "wrong", f"sent again after the gateway charged (TX {call.tx})"
    read = [row for row in rows if row.read_answer]
    if not read:
        # Never read: the worker was killed during the call, or the outage cut it. The
        # charge must then wait for a person, like any call whose answer was lost.
        if charge.state == "unknown":
            return "interrupted", None
        return "wrong", f"no ledger row holds its answer, and the charge is {charge.state}"
    row = read[0]
    if fault == "bad_tx":
        expected = "unknown"
    elif fault == "answer_in_503" and not call.recorded:
        expected = "declined"
    else:
        expected = "approved"
    if row.kind != expected:
        return "wrong", f"its answer was read as {row.kind}; {fault} defines {expected}"
    if row.outcome == "late_answer":
        return "late answer", None
    if expected == "approved" and row.tx != call.tx:
        return "wrong", f"approved with TX {row.tx!r}, the gateway's is {call.tx!r}"
    if fault == "answer_in_503" and row.http_status not in BUSY_STATUSES:
        return "wrong", f"the answer read came in HTTP {row.http_status}, not 503 or 429"
    if fault == "long_message" and not widths.was_cut(row.message):
        return "wrong", "its message was not cut to its column with the marker"
    if fault == "bad_tx" and (row.tx is not None or charge.tx is not None):
        return "wrong", "a TX was kept from an answer whose TX is no transaction number"
    if fault == "bad_tx" and charge.state != "unknown":
        return "wrong", f"the charge is {charge.state}, not unknown for a person"
    if fault == "amount_lie":
        if row.amount != charge.amount:
            asked = charge.amount
            return "wrong", f"booked {row.amount}, the amount asked (and charged) is {asked}"
        if "amount_mismatch" not in (charge.review or "").split(","):
            return "wrong", "the other amount answered is not flagged amount_mismatch"
    return "as defined", None


def _judge_hostile(
    calls: Sequence[GatewayCall],
    charges: Sequence[ChargeRecord],
    ledger: Sequence[LedgerRecord],
    attempts: Sequence[AttemptRecord],
    result: Reconciliation,
) -> None:
    """Count 5: each hostile answer held to what its fault defines."""
    script_calls = [call for call in calls if call.script in CHARGE_SCRIPTS]
    hostile = [call for call in script_calls if call.fault in HOSTILE_EXPECTED]
    if not hostile:
        return
    by_id = {charge.id: charge for charge in charges}
    tied = _tie_calls_to_charges(script_calls, charges)
    last_seq: dict[int, int] = {}
    for call in script_calls:
        charge_id = tied[call.seq]
        if charge_id is not None:
            last_seq[charge_id] = max(last_seq.get(charge_id, 0), call.seq)
    attempts_of: dict[int, list[AttemptRecord]] = defaultdict(list)
    for record in sorted(attempts, key=lambda a: (a.started_at, a.number)):
        attempts_of[record.charge_id].append(record)
    rows_of: dict[int, list[LedgerRecord]] = defaultdict(list)
    for entry in ledger:
        if entry.attempt_id is not None:
            rows_of[entry.attempt_id].append(entry)
    for call in hostile:
        fault = str(call.fault)
        charge_id = tied[call.seq]
        charge = by_id.get(charge_id) if charge_id is not None else None
        attempt = _attempt_of(call, attempts_of[charge_id]) if charge_id is not None else None
        if charge is None or attempt is None:
            ending: str = "wrong"
            problem: str | None = "no charge attempt explains the call"
        else:
            sent_again = last_seq.get(charge.id, 0) > call.seq
            ending, problem = _hostile_problem(call, charge, rows_of[attempt.id], sent_again)
        result.hostile_endings[f"{fault}: {ending}"] += 1
        if problem is not None:
            result.hostile.append(HostileFinding(call.seq, fault, charge_id, problem))


def reconcile(
    calls: Iterable[GatewayCall],
    gateway_totals: Mapping[str, Decimal],
    charges: Iterable[ChargeRecord],
    ledger: Iterable[LedgerRecord],
    due: Iterable[tuple[int, int]],
    attempts: Iterable[AttemptRecord] = (),
) -> Reconciliation:
    """Compare what the gateway did with what the ledger says (see the module docstring).

    ``gateway_totals`` is money each merchant keeps at the gateway (collected less
    refunded); ``due`` the (subscription, period) pairs that had to get an outcome;
    ``attempts`` the attempt rows, which tie a hostile answer to its ledger rows.
    """
    call_list = list(calls)
    charge_calls = [call for call in call_list if call.is_charge]
    charge_list = list(charges)
    ledger_list = list(ledger)
    by_id = {charge.id: charge for charge in charge_list}
    by_key = {(charge.subscription_id, charge.period): charge for charge in charge_list}
    tied = _tie_calls_to_charges(charge_calls, charge_list)
    result = Reconciliation(
        states=Counter(charge.state for charge in charge_list),
        reasons=Counter(
            f"{charge.state}:{charge.reason}"
            for charge in charge_list
            if charge.state in ("failed", "unknown")
        ),
        ledger_outcomes=Counter(entry.outcome for entry in ledger_list),
        gateway_charges=len(charge_calls),
    )

    calls_of: dict[int, list[GatewayCall]] = defaultdict(list)
    for call in charge_calls:
        charge_id = tied[call.seq]
        if charge_id is not None:
            calls_of[charge_id].append(call)

    # 1. More than one gateway charge for one (subscription, period).
    for charge_id, its_calls in sorted(calls_of.items()):
        if len(its_calls) > 1:
            charge = by_id[charge_id]
            result.double_charged.append((charge.subscription_id, charge.period, len(its_calls)))

    # 2. Recorded charges the ledger shows neither as approved nor as unknown.
    approved_txs: dict[int, set[str | None]] = defaultdict(set)
    unknown_charges: set[int] = set()
    has_rows: set[int] = set()
    for entry in ledger_list:
        if entry.charge_id is None:
            continue
        has_rows.add(entry.charge_id)
        if entry.outcome in APPROVED_OUTCOMES:
            approved_txs[entry.charge_id].add(entry.tx)
        elif entry.outcome == "unknown":
            unknown_charges.add(entry.charge_id)
    for call in charge_calls:
        charge_id = tied[call.seq]
        accounted = charge_id is not None and (
            call.tx in approved_txs[charge_id] or charge_id in unknown_charges
        )
        if not accounted:
            result.unaccounted.append(call)

    # 3. Due periods without an outcome.
    for subscription_id, period in sorted(set(due)):
        found = by_key.get((subscription_id, period))
        if found is None:
            result.no_outcome.append((subscription_id, period, "no charge"))
        elif found.state not in OUTCOME_STATES:
            result.no_outcome.append((subscription_id, period, found.state))
        elif found.id not in has_rows:
            result.no_outcome.append((subscription_id, period, f"{found.state}, no ledger row"))

    # 4. Money per merchant, unknowns resolved as a person would.
    ledger_money: dict[str, Decimal] = defaultdict(lambda: ZERO)
    for entry in ledger_list:
        if entry.outcome in COLLECTED:
            ledger_money[entry.merchant_id] += entry.amount
        elif entry.outcome in REFUNDED:
            ledger_money[entry.merchant_id] -= entry.amount
    resolved: dict[str, Decimal] = defaultdict(lambda: ZERO)
    for charge in charge_list:
        if charge.state != "unknown":
            continue
        recorded = sorted(calls_of.get(charge.id, []), key=lambda c: c.seq)
        if recorded:
            result.unknowns_resolved_approved += 1
            first = recorded[0]
            if not first.deferred:  # an authorization is not collected money
                resolved[charge.merchant_id] += first.amount or ZERO
        else:
            result.unknowns_resolved_declined += 1
    merchants = sorted(set(ledger_money) | set(resolved) | set(gateway_totals))
    result.merchants = [
        MerchantTotal(
            merchant_id=m,
            ledger=ledger_money[m],
            resolved_unknowns=resolved[m],
            gateway=gateway_totals.get(m, ZERO),
        )
        for m in merchants
    ]

    # 5. Hostile answers, each held to what its fault defines.
    _judge_hostile(call_list, charge_list, ledger_list, list(attempts), result)
    return result


# --- loading the evidence ---------------------------------------------------------------


def load_gateway(
    sandbox_url: str, timeout: float = 60.0
) -> tuple[list[GatewayCall], dict[str, Decimal]]:
    """The sandbox's call log and each merchant's money there (collected less refunded)."""
    control = SandboxControl(sandbox_url, timeout=timeout)
    money = {
        merchant: Decimal(values["collected"]) - Decimal(values["refunded"])
        for merchant, values in control.totals().items()
    }
    return [GatewayCall.from_json(c) for c in control.calls()], money


def load_database(
    url: str,
) -> tuple[list[ChargeRecord], list[LedgerRecord], list[AttemptRecord]]:
    """Every charge (with alias and first attempt time), every ledger row, every attempt."""
    first_attempt = (
        select(Attempt.charge_id, func.min(Attempt.started_at).label("first_at"))
        .group_by(Attempt.charge_id)
        .subquery()
    )
    with session_scope(url) as session:
        rows = session.execute(
            select(Charge, Subscription.alias, first_attempt.c.first_at)
            .join(Subscription, Subscription.id == Charge.subscription_id)
            .outerjoin(first_attempt, first_attempt.c.charge_id == Charge.id)
        ).all()
        charges = [
            ChargeRecord(
                id=charge.id,
                subscription_id=charge.subscription_id,
                period=charge.period,
                alias=alias,
                merchant_id=charge.merchant_id,
                amount=charge.amount,
                state=str(charge.state),
                tx=charge.tx,
                first_attempt_at=_aware(first_at),
                reason=charge.reason,
                review=charge.review,
            )
            for charge, alias, first_at in rows
        ]
        ledger = [
            LedgerRecord(
                charge_id=entry.charge_id,
                outcome=entry.outcome,
                amount=entry.amount,
                merchant_id=entry.merchant_id,
                tx=entry.tx,
                attempt_id=entry.attempt_id,
                http_status=entry.http_status,
                message=entry.message,
                raw=entry.raw,
                details=entry.details,
            )
            for entry in session.scalars(select(LedgerEntry).order_by(LedgerEntry.id))
        ]
        attempts = [
            AttemptRecord(
                id=attempt.id,
                charge_id=attempt.charge_id,
                number=attempt.number,
                started_at=_aware(attempt.started_at) or attempt.started_at,
            )
            for attempt in session.scalars(select(Attempt))
        ]
    return charges, ledger, attempts


def _aware(value: datetime | None) -> datetime | None:
    """Aggregates bypass the model's UTC type: PostgreSQL hands back an aware time anyway."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


__all__ = [
    "HOSTILE_EXPECTED",
    "AttemptRecord",
    "ChargeRecord",
    "GatewayCall",
    "HostileFinding",
    "LedgerRecord",
    "MerchantTotal",
    "Reconciliation",
    "load_database",
    "load_gateway",
    "reconcile",
]
