"""The charge lifecycle's promise, searched for counterexamples over interleavings (issue 13).

The hand-written race tests (``tests/test_charge_races.py``) each pin one interleaving. Here
hypothesis drives a ``RuleBasedStateMachine`` over the real engine and a real database
(PostgreSQL and SQLite), and tries many: periods falling due, workers claiming, answers
arriving on time, late (an old attempt's, after a person's retry) or never, the stuck
sweep, lost messages sent again, poison messages dead-lettered (their queued charges
failed), a person's retry / resolve / discard, pause / resume / cancel, captures of
deferred charges and refunds.

What the model keeps on the Python side is only what the gateway *did*: which attempt it
approved, for which period, and what validations and refunds it approved. That is the truth
of money moved. After every step one snapshot of the database is read and checked against
it:

- no period has more than one transaction booked as collected, nor more money collected
  than its charge's amount;
- every approval the gateway gave is the charge's booked outcome, or the charge is in front
  of a person (failed, unknown, or flagged): never silently lost;
- more than one approval for a period happens only after a person retried an unknown charge
  (the back office showed nothing yet), and then the charge is flagged;
- every booked charge transaction is one the gateway approved for that charge;
- refunds: booked ≤ collected, and ≤ what the gateway refunded;
- every answered charge attempt has exactly one outcome row in the ledger;
- every charge state is one of ``ChargeState``.

The charge call itself is made by the model (``Engine.claim``, then ``Engine.record`` with
the answer it chose), which is how an answer can be held back across other steps without
threads. Validation and cancellation calls go to a scripted gateway standing in for Klik &
Pay's HTTP service (the network is the only thing replaced); everything of ours is real.
The gateway may process a call (the back office shows it) before its answer arrives, or
the answer may never arrive. The person is honest: before confirming an unknown charge was
not charged they look at what the gateway had done by then, book an approval they find
there, and know of a second one (a double charge they refund in the back office). An
approval made after their look and never answered is not generated: nobody could know it.

Budgets: a few examples per database in ``make test`` (well under a minute each) and many
more under the ``slow`` marker (``make test-slow``).
"""

from __future__ import annotations

import itertools
import shutil
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import select

from billing import broker, ops, subscriptions
from billing.charging.calls import Claim
from billing.charging.settlement import SettlementResult
from billing.db import get_engine, read_scope, session_scope
from billing.deliveries import PoisonMessage
from billing.engine import Engine
from billing.errors import BillingError
from billing.models import Charge, LedgerEntry, Subscription
from billing.outcomes import Approved, Declined, NotSent, Outcome, Unknown
from billing.plans import load_plans
from billing.settings import Settings
from billing.vocabulary import (
    ATTENTION_STATES,
    AUTHORIZED,
    COLLECTED,
    LATE_FLAGS,
    REFUNDED,
    ChargeState,
    Operation,
)
from tests.fixtures.db import truncate_all
from tests.fixtures.engine import ENGINE_PLANS, Harness

PLANS = load_plans(ENGINE_PLANS)
REFS = {"m-1": "monthly", "d-1": "deferred"}
ALIAS = "A" * 20
#: Time steps: within a retry ladder step, past the stuck cutoff, a day, a month.
STEPS = (
    timedelta(seconds=3),
    timedelta(seconds=90),
    timedelta(days=1),
    timedelta(days=32),
)
ANSWERS = ("approved", "soft_decline", "hard_decline", "not_sent", "unknown")
SETTLE_ANSWERS = ("approved", "declined", "not_sent", "unknown")
ZERO = Decimal("0.00")

BOOKED = {o.value for o in (*COLLECTED, *AUTHORIZED)}
COLLECTED_V = {o.value for o in COLLECTED}
REFUNDED_V = {o.value for o in REFUNDED}
STATES = {s.value for s in ChargeState}
LATE = {f.value for f in LATE_FLAGS}


# --- the gateway's side --------------------------------------------------------------------


@dataclass(frozen=True)
class GatewayCharge:
    """The gateway approved this charge attempt: money moved (or is held, deferred)."""

    charge_id: int
    subscription_id: int
    period: int
    attempt: int
    tx: str
    attempt_id: int


@dataclass
class ScriptedGateway:
    """Klik & Pay's validation and cancellation scripts, answering what the model chose.

    The charge call is made by the model itself (claim, then record): ``duplicate`` is
    never reached.
    """

    next_answer: str = "approved"
    #: Approved settlement calls: (tx, script, amount).
    approved: list[tuple[str, str, Decimal]] = field(default_factory=list)

    def duplicate(self, **_: Any) -> Outcome:
        raise AssertionError("the model makes every charge call itself")

    def _answer(self, script: str, tx: str, amount: object) -> Outcome:
        kind, self.next_answer = self.next_answer, "approved"
        if kind == "approved":
            self.approved.append((tx, script, Decimal(str(amount))))
            return Approved(tx=tx, amount=Decimal(str(amount)))
        if kind == "declined":
            return Declined(code="05", message="refused", soft=False)
        if kind == "not_sent":
            return NotSent(reason="connection refused")
        return Unknown(reason="read timeout")

    def validate_deferred(
        self, *, merchant_id: str, tx: str, amount: object, private_key: str
    ) -> Outcome:
        return self._answer("validate", tx, amount)

    def cancel(self, *, merchant_id: str, tx: str, amount: object, private_key: str) -> Outcome:
        return self._answer("cancel", tx, amount)


def _outcome(kind: str, tx: str) -> Outcome:
    if kind == "approved":
        return Approved(tx=tx)
    if kind == "soft_decline":
        return Declined(code="51", message="insufficient funds", soft=True)
    if kind == "hard_decline":
        return Declined(code="05", message="do not honour", soft=False)
    if kind == "not_sent":
        return NotSent(reason="connection refused")
    return Unknown(reason="read timeout")


@dataclass(eq=False)
class OpenCall:
    """A claimed call whose answer has not come (yet)."""

    claim: Claim
    #: What the gateway made of it, once it has (the back office shows it from then on).
    decided: Outcome | None = None
    #: Approved after a person looked its attempt up: its answer must come, or nobody
    #: could ever know.
    after_check: bool = False


# --- one snapshot of the database ---------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    charges: dict[int, Any]
    ledger: list[Any]
    statuses: dict[int, str]

    @staticmethod
    def read(url: str) -> Snapshot:
        with read_scope(url) as session:
            conn = session.connection()
            charges = {row.id: row for row in conn.execute(select(Charge.__table__))}
            ledger = list(
                conn.execute(
                    select(
                        LedgerEntry.charge_id, LedgerEntry.attempt_id, LedgerEntry.subscription_id,
                        LedgerEntry.period, LedgerEntry.outcome, LedgerEntry.operation,
                        LedgerEntry.amount, LedgerEntry.tx,
                    ).where(LedgerEntry.charge_id.is_not(None))
                )
            )  # fmt: skip
            statuses = dict(conn.execute(select(Subscription.id, Subscription.status)).all())
        return Snapshot(charges, ledger, statuses)

    def in_front_of_a_person(self, charge_id: int) -> bool:
        charge = self.charges[charge_id]
        flags = set((charge.review or "").split(","))
        return charge.state in ATTENTION_STATES or bool(flags & LATE)


# --- the model -----------------------------------------------------------------------------


class LifecycleModel(RuleBasedStateMachine):
    """The charge lifecycle over the real engine; ``fresh`` gives each run an empty database."""

    fresh: Callable[[], str]

    def __init__(self) -> None:
        super().__init__()
        self.url = type(self).fresh()
        self.now = datetime.now(UTC).replace(microsecond=0)
        self.gateway = ScriptedGateway()
        settings_ = Settings(
            database_url=self.url, gateway_url="http://127.0.0.1:9", connect_timeout=2,
            read_timeout=2, min_charge_gap_hours=0,
        )  # fmt: skip
        self.h = Harness(engine=None, url=self.url, plans=PLANS)  # type: ignore[arg-type]
        self.h.engine = Engine(
            settings_, plans=PLANS, client=self.gateway, dispatcher=self.h.sent.extend,
            capture_dispatcher=self.h.captures.extend, limiter=None, actor="model-engine",
        )  # fmt: skip
        self.engine = self.h.engine
        self.subs: dict[str, int] = {}
        #: Claimed calls whose answer has not come (yet).
        self.calls: list[OpenCall] = []
        #: Every message ever sent for a charge: a broker may deliver any of them again.
        self.messages: list[int] = []
        self.approvals: list[GatewayCharge] = []
        #: Attempts (ids) whose answer was recorded: each has exactly one outcome row.
        self.answered: set[int] = set()
        #: The last attempt of each charge a person looked up in the back office.
        self.checked: dict[int, int] = {}
        #: Approvals (TX) a person saw in the back office besides the one they booked: a
        #: double charge they know of (and refund there).
        self.known_to_a_person: set[str] = set()
        #: Charges a person retried while their outcome was unknown.
        self.retried_unknown: set[int] = set()
        self.txs = itertools.count(7_000_001)
        self.snap = Snapshot({}, [], {})
        self.steps = 0

    def teardown(self) -> None:
        if self.url.startswith("sqlite"):
            get_engine(self.url).dispose()

    @initialize()
    def subscribe(self) -> None:
        for ref, plan in REFS.items():
            self.subs[ref] = self.h.subscribe(
                ref, ALIAS, plan=plan, next_charge_at=self.now - timedelta(minutes=1)
            )
        for plan in sorted(set(REFS.values())):  # the first beat: period 0 falls due
            self.engine.sweep_plan(plan, self.now)

    # --- time and the beat ------------------------------------------------------------

    @rule(
        step=st.sampled_from(STEPS),
        sweeps=st.integers(0, 2),
        answer=st.sampled_from(SETTLE_ANSWERS),
    )
    def the_beat(self, step: timedelta, sweeps: int, answer: str) -> None:
        """Time passes and the beat fires: ``sweeps`` plan sweeps (two beats at once: the
        same periods swept twice), then the engine sweep: stuck calls, lost messages, due
        captures, releases of cancelled subscriptions (whose call answers ``answer``), due
        retries."""
        self.now += step
        for _ in range(sweeps):
            for plan in sorted(set(REFS.values())):
                self.engine.sweep_plan(plan, self.now)
        self.gateway.next_answer = answer
        try:
            self.engine.engine_sweep(self.now)
        finally:
            self.gateway.next_answer = "approved"

    # --- workers and the gateway ------------------------------------------------------

    @precondition(lambda self: self.h.sent)
    @rule(data=st.data(), again=st.integers(0, 3))
    def worker_claims(self, data: st.DataObject, again: int) -> None:
        """A worker takes the next message, or (now and then) an earlier one delivered
        again."""
        if again < 3 or not self.messages:
            charge_id = self.h.sent.pop(0)
            self.messages.append(charge_id)
        else:
            charge_id = data.draw(st.sampled_from(self.messages), label="message")
        claimed = self.engine.claim(charge_id, self.now)
        if isinstance(claimed, Claim):
            self.calls.append(OpenCall(claimed))
        event(f"claim: {type(claimed).__name__}")

    @precondition(lambda self: self.h.sent)
    @rule()
    def a_call_outlives_the_cutoff(self) -> None:
        """A worker takes the next message and its call hangs past the stuck cutoff: the
        engine sweep calls it unknown while the answer may still come."""
        charge_id = self.h.sent.pop(0)
        self.messages.append(charge_id)
        claimed = self.engine.claim(charge_id, self.now)
        if isinstance(claimed, Claim):
            self.calls.append(OpenCall(claimed))
        self.now += STEPS[1]
        self.engine.engine_sweep(self.now)

    def _pick(self, data: st.DataObject, calls: list[OpenCall]) -> OpenCall:
        return data.draw(st.sampled_from(calls), label="call")

    def _decide(self, call: OpenCall, answer: str) -> Outcome:
        """The gateway processes the call: from now on the back office shows it."""
        tx = str(next(self.txs))
        call.decided = _outcome(answer, tx)
        if answer == "approved":
            claim = call.claim
            self.approvals.append(
                GatewayCharge(
                    claim.charge.id, claim.charge.subscription_id, claim.charge.period,
                    claim.number, tx, claim.attempt_id,
                )
            )  # fmt: skip
            call.after_check = claim.number <= self.checked.get(claim.charge.id, 0)
        return call.decided

    @precondition(lambda self: any(c.decided is None for c in self.calls))
    @rule(data=st.data(), answer=st.sampled_from(ANSWERS))
    def gateway_decides(self, data: st.DataObject, answer: str) -> None:
        """The gateway processes an open call; its answer is still on the way."""
        self._decide(self._pick(data, [c for c in self.calls if c.decided is None]), answer)

    @precondition(lambda self: self.calls)
    @rule(data=st.data(), answer=st.sampled_from(ANSWERS))
    def gateway_answers(self, data: st.DataObject, answer: str) -> None:
        """The answer of one open call arrives (any of them: the oldest may come last)."""
        call = self._pick(data, self.calls)
        self.calls.remove(call)
        outcome = call.decided or self._decide(call, answer)
        result = self.engine.record(call.claim, outcome, now=self.now)
        self.answered.add(call.claim.attempt_id)
        if result.status == "retry":  # the task layer sends it again after a backoff
            self.h.sent.append(call.claim.charge.id)
        event(f"answer {outcome.kind}: {result.status}")

    @precondition(lambda self: any(not c.after_check for c in self.calls))
    @rule(data=st.data(), charged=st.booleans())
    def worker_dies(self, data: st.DataObject, charged: bool) -> None:
        """A call's answer never comes; the gateway may have charged the card all the same.
        Only before a person looked at the back office for that attempt: an approval made
        after that, and never answered, nobody can know of."""
        call = self._pick(data, [c for c in self.calls if not c.after_check])
        self.calls.remove(call)
        claim = call.claim
        if call.decided is None and charged and claim.number > self.checked.get(claim.charge.id, 0):
            self._decide(call, "approved")

    # Seldom (every fourth step at most), next to the workers' and the engine's work.
    @precondition(lambda self: (self.h.sent or self.messages) and self.steps % 4 == 2)
    @rule(data=st.data(), batch=st.booleans())
    def a_message_is_poison(self, data: st.DataObject, batch: bool) -> None:
        """A message (mostly the next, or an earlier one delivered again) kills every worker that
        takes it until the delivery limit dead-letters it; with ``batch``, a message of
        every charge sent so far. Its charges still queued go to the failed queue."""
        if self.h.sent and (not self.messages or data.draw(st.integers(0, 3), label="next") < 3):
            charge_id = self.h.sent.pop(0)
            self.messages.append(charge_id)
        else:
            charge_id = data.draw(st.sampled_from(self.messages), label="message")
        task, args = (
            (broker.CHARGE_BATCH_TASK, [sorted(set(self.messages))])
            if batch
            else (broker.CHARGE_TASK, [charge_id])
        )
        done = broker.record_poison(
            self.url, task_name=task, task_id=f"model-{self.steps}", args=args, kwargs={},
            poison=PoisonMessage(6, 5, "the model"), source="redis",
        )  # fmt: skip
        event(f"poison: {len(done.failed)} failed, {len(done.untouched)} untouched")

    # --- a person ---------------------------------------------------------------------

    def _waiting(self) -> list[int]:
        return sorted(
            i for i, c in self.snap.charges.items() if c.state in ATTENTION_STATES or c.review
        )

    def _unbooked_approvals(self, charge_id: int) -> list[GatewayCharge]:
        """What the back office shows that the books do not: approvals of this charge."""
        booked = {
            e.tx for e in self.snap.ledger if e.charge_id == charge_id and e.outcome in BOOKED
        }
        return [a for a in self.approvals if a.charge_id == charge_id and a.tx not in booked]

    @precondition(lambda self: self._waiting())
    @rule(data=st.data(), action=st.sampled_from(("retry", "resolve", "discard")))
    def person_acts(self, data: st.DataObject, action: str) -> None:
        """A person works the failed-charge queue, after looking at the back office."""
        charge_id = data.draw(st.sampled_from(self._waiting()), label="charge")
        seen = self.snap.charges[charge_id]
        unbooked = self._unbooked_approvals(charge_id)
        approval = unbooked[0] if unbooked else None
        self.checked[charge_id] = seen.attempts
        try:
            with session_scope(self.url) as session:
                if approval is not None:  # the card was charged: they book it
                    action = "resolve approved"
                    ops.resolve(
                        session, charge_id, approved=True, tx=approval.tx, by="person",
                        reason="seen in the back office", plans=PLANS, now=self.now,
                    )  # fmt: skip
                elif action == "retry":
                    ops.retry(
                        session, charge_id, by="person", attempt=seen.attempts, now=self.now,
                        confirm_not_charged=seen.state == ChargeState.UNKNOWN,
                    )  # fmt: skip
                elif action == "resolve":
                    ops.resolve(
                        session, charge_id, approved=False, tx=None, by="person",
                        reason="declined in the back office", plans=PLANS, now=self.now,
                    )  # fmt: skip
                else:
                    ops.discard(
                        session, charge_id, by="person", reason="given up", plans=PLANS,
                        now=self.now,
                    )  # fmt: skip
        except BillingError as exc:
            event(f"person {action}: refused ({type(exc).__name__})")
            return
        if approval is not None:  # a second approval: they refund it in the back office
            self.known_to_a_person.update(a.tx for a in unbooked[1:])
        if action == "retry":
            if seen.state == ChargeState.UNKNOWN:
                self.retried_unknown.add(charge_id)
            self.engine.dispatch_due(self.now)  # the CLI dispatches after commit
        event(f"person {action}: done")

    @precondition(lambda self: self.steps % 4 == 0)  # seldom, next to the engine's work
    @rule(ref=st.sampled_from(sorted(REFS)), cancel=st.integers(0, 15))
    def person_changes_subscription(self, ref: str, cancel: int) -> None:
        """Pause an active subscription, resume a paused one, or now and then cancel it
        (rarely: that ends its story)."""
        status = self.snap.statuses.get(self.subs[ref])
        action = "cancel" if cancel == 15 else "resume" if status == "paused" else "pause"
        if status == "cancelled" or (action == "pause" and status == "suspended"):
            return
        try:
            with session_scope(self.url) as session:
                if action == "pause":
                    subscriptions.pause(session, ref, now=self.now, by="person")
                elif action == "resume":
                    subscriptions.resume(session, ref, PLANS, now=self.now, by="person")
                else:
                    subscriptions.cancel(session, ref, now=self.now, by="person")
        except BillingError as exc:
            event(f"{action}: refused ({type(exc).__name__})")
            return
        event(f"{action}: done")

    # --- settlement -------------------------------------------------------------------

    def _settle(self, what: str, answer: str, call: Callable[[], SettlementResult]) -> None:
        """A settlement call the gateway answers with ``answer`` (a refusal is fine)."""
        self.gateway.next_answer = answer
        try:
            done = call()
        except BillingError as exc:
            event(f"{what}: refused ({type(exc).__name__})")
        else:
            event(f"{what} {answer}: {done.outcome}")
        finally:
            self.gateway.next_answer = "approved"

    def _in_state(self, state: ChargeState) -> list[int]:
        return sorted(i for i, c in self.snap.charges.items() if c.state == state)

    @precondition(lambda self: self._in_state(ChargeState.AUTHORIZED))
    @rule(data=st.data(), answer=st.sampled_from(SETTLE_ANSWERS), automatic=st.booleans())
    def capture(self, data: st.DataObject, answer: str, automatic: bool) -> None:
        """A validation: the engine's (a due capture) or a person's."""
        charge_id = data.draw(st.sampled_from(self._in_state(ChargeState.AUTHORIZED)))
        self._settle(
            "capture", answer,
            lambda: self.engine.settlement.capture(charge_id, automatic=automatic, actor="person"),
        )  # fmt: skip

    @precondition(lambda self: self._in_state(ChargeState.APPROVED))
    @rule(
        data=st.data(),
        answer=st.sampled_from(SETTLE_ANSWERS),
        amount=st.sampled_from((None, "10.00", "20.00")),
    )
    def refund(self, data: st.DataObject, answer: str, amount: str | None) -> None:
        """A person refunds (part of) a collected charge."""
        charge_id = data.draw(st.sampled_from(self._in_state(ChargeState.APPROVED)))
        self._settle(
            "refund", answer,
            lambda: self.engine.settlement.cancel(
                charge_id, reason="customer asked", amount=amount, actor="person", again=True
            ),
        )  # fmt: skip

    # --- the promise ------------------------------------------------------------------

    @invariant()
    def the_promise_holds(self) -> None:
        self.steps += 1
        snap = self.snap = Snapshot.read(self.url)
        charges, ledger = snap.charges, snap.ledger
        for charge in charges.values():
            assert charge.state in STATES, charge
        collected: dict[tuple[int, int], set[str]] = defaultdict(set)
        collected_money: dict[int, Decimal] = defaultdict(lambda: ZERO)
        refunded_money: dict[int, Decimal] = defaultdict(lambda: ZERO)
        booked: dict[int, set[str]] = defaultdict(set)
        outcome_rows: dict[int, int] = defaultdict(int)
        for e in ledger:
            if e.outcome in COLLECTED_V:
                collected[(e.subscription_id, e.period)].add(e.tx)
                collected_money[e.charge_id] += e.amount
            if e.outcome in REFUNDED_V:
                refunded_money[e.charge_id] += e.amount
            if e.outcome in BOOKED:
                booked[e.charge_id].add(e.tx)
            if e.operation == Operation.DUPLICATE and e.attempt_id is not None:
                outcome_rows[e.attempt_id] += 1
        for key, txs in collected.items():
            assert len(txs) <= 1, f"(subscription, period) {key} collected twice: {sorted(txs)}"
        gateway_txs: dict[int, set[str]] = defaultdict(set)
        per_period: dict[tuple[int, int], list[GatewayCharge]] = defaultdict(list)
        on_the_way = {c.claim.attempt_id for c in self.calls}
        for a in self.approvals:
            gateway_txs[a.charge_id].add(a.tx)
            per_period[(a.subscription_id, a.period)].append(a)
            if a.attempt_id in on_the_way:  # the answer is still coming
                continue
            charge = charges[a.charge_id]
            open_call = charge.state == ChargeState.IN_FLIGHT and charge.attempts == a.attempt
            told = (
                a.tx in booked[a.charge_id]
                or a.tx in self.known_to_a_person
                or snap.in_front_of_a_person(a.charge_id)
            )
            assert told or open_call, f"approval {a} is lost: charge {dict(charge._mapping)}"
        for (sub_id, period), approvals in per_period.items():
            if len(approvals) > 1:
                charge_id = approvals[0].charge_id
                assert charge_id in self.retried_unknown, (
                    f"period {period} of subscription {sub_id} charged {len(approvals)} times "
                    "without a person retrying an unknown charge"
                )
            answered = [a for a in approvals if a.attempt_id not in on_the_way]
            if len(answered) > 1:
                charge_id = answered[0].charge_id
                known = {a.tx for a in answered} & self.known_to_a_person
                told = charges[charge_id].review or snap.in_front_of_a_person(charge_id)
                assert told or known, (
                    f"period {period} charged twice and nobody is told: {approvals}"
                )
        refunded_by_gateway: dict[str, Decimal] = defaultdict(lambda: ZERO)
        for tx, script, amount in self.gateway.approved:
            if script == "cancel":
                refunded_by_gateway[tx] += amount
        for charge_id, charge in charges.items():
            assert booked[charge_id] <= gateway_txs[charge_id], (
                f"charge {charge_id} books {booked[charge_id]} the gateway never approved"
            )
            assert collected_money[charge_id] <= charge.amount, (charge_id, collected_money)
            assert refunded_money[charge_id] <= collected_money[charge_id], charge_id
            assert refunded_money[charge_id] <= refunded_by_gateway[charge.tx or ""], charge_id
            if charge.refunded_amount is not None:
                assert charge.refunded_amount <= (charge.collected_amount or ZERO), charge_id
        for attempt_id in self.answered:
            assert outcome_rows[attempt_id] == 1, (
                f"attempt {attempt_id} has {outcome_rows[attempt_id]} outcome rows"
            )


# --- running it ----------------------------------------------------------------------------


@pytest.fixture(params=["postgresql", "sqlite"])
def fresh_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], str]]:
    """An empty database at the head revision for each run of the model: PostgreSQL's
    run database emptied, or a copy of one migrated SQLite file."""
    if request.param == "postgresql":
        url = str(request.getfixturevalue("pg_database"))

        def emptied() -> str:
            truncate_all(url)
            return url

        yield emptied
        return
    template = Path(str(request.getfixturevalue("sqlite_url")).removeprefix("sqlite:///"))
    get_engine(f"sqlite:///{template}").dispose()
    copies = itertools.count()

    def copied() -> str:
        path = tmp_path / f"model-{next(copies)}.db"
        shutil.copyfile(template, path)
        return f"sqlite:///{path}"

    yield copied


def model_settings(examples: int, steps: int) -> settings:
    return settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


@pytest.mark.parametrize(
    ("examples", "steps"),
    [pytest.param(30, 40, id="fast"), pytest.param(50, 60, id="long", marks=pytest.mark.slow)],
)
def test_the_lifecycle_keeps_its_promise_under_any_interleaving(
    fresh_database: Callable[[], str],
    monkeypatch: pytest.MonkeyPatch,
    examples: int,
    steps: int,
) -> None:
    monkeypatch.setenv("KLIKANDPAY_KEY_EUR", "test-key-eur")
    monkeypatch.setenv("KLIKANDPAY_KEY_USD", "test-key-usd")
    machine = type("Model", (LifecycleModel,), {"fresh": staticmethod(fresh_database)})
    run_state_machine_as_test(machine, settings=model_settings(examples, steps))
