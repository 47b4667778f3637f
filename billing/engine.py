"""The rebilling engine: everything the worker and the beat do, callable without Celery.

A thin facade over the roles in ``billing.charging`` (sweep, dispatch, calls, settlement,
housekeeping), which share one ``Context``. How a card is never charged twice for one
period:

- a charge row is unique per (subscription, period): a second sweep inserts nothing;
- a charge is sent only after an atomic ``queued -> in_flight`` claim that numbers the
  attempt: a second message for it finds it claimed and does nothing;
- the attempt row is committed before the call, and a call whose answer is lost (or whose
  worker died) ends ``unknown``: never sent again without a person;
- an answer is recorded on its attempt's number: one that comes after the charge moved on
  is evidence, never the charge's outcome, and a late approval stops any retry;
- a subscription's next period only advances on approval, so a later period cannot be
  created while an earlier one waits for a person.

Celery never appears here: the task layer hands in a ``dispatcher`` that sends messages.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

from billing.charging.calls import Calls, ChargeResult, Claim
from billing.charging.context import Context, Dispatcher, Gateway, worker_name
from billing.charging.dispatch import Dispatch
from billing.charging.housekeeping import Housekeeping
from billing.charging.settlement import Settlement
from billing.charging.sweep import Sweeper, SweepResult
from billing.gateway import KlikAndPayClient, get_client
from billing.models import utcnow
from billing.outcomes import Outcome
from billing.plans import PlanSet
from billing.ratelimit import RateLimiter
from billing.settings import Settings, get_settings

log = logging.getLogger("billing.engine")


@dataclass(frozen=True)
class EngineSweepResult:
    """What one engine sweep did."""

    stuck: int
    requeued: int
    captures: int
    released: int
    dispatched: int


class Engine:
    """Sweeps, dispatch, charges, settlement and housekeeping over one ``Context``."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        plans: PlanSet | None = None,
        client: Gateway | KlikAndPayClient | None = None,
        dispatcher: Dispatcher | None = None,
        capture_dispatcher: Dispatcher | None = None,
        limiter: RateLimiter | None = None,
        actor: str | None = None,
    ) -> None:
        settings = settings or get_settings()
        redis_url = settings.effective_redis_url
        self.ctx = Context(
            settings=settings,
            client=client or get_client(settings),
            dispatcher=dispatcher or (lambda ids: None),
            capture_dispatcher=capture_dispatcher or (lambda ids: None),
            limiter=limiter
            if limiter is not None
            else (RateLimiter(redis_url) if redis_url else None),
            actor=actor or worker_name(),
            fixed_plans=plans,
        )
        self.sweeper = Sweeper(self.ctx)
        self.dispatch = Dispatch(self.ctx)
        self.calls = Calls(self.ctx)
        self.settlement = Settlement(self.ctx)
        self.housekeeping = Housekeeping(self.ctx)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._refill_every = max(1, settings.max_in_flight // 4)
        self._messages = 0
        #: Charges finished since this process last refilled.
        self._unfilled = 0
        self._messages_lock = threading.Lock()

    @property
    def settings(self) -> Settings:
        return self.ctx.settings

    @property
    def url(self) -> str:
        return self.ctx.url

    @property
    def plans(self) -> PlanSet:
        return self.ctx.plans

    @property
    def actor(self) -> str:
        return self.ctx.actor

    # ------------------------------------------------------------------ sweeps

    def sweep_plan(self, plan_name: str, now: datetime | None = None) -> SweepResult:
        """Create the charge row of every due subscription of the plan, then dispatch."""
        now = now or utcnow()
        created, skipped = self.sweeper.create_due(plan_name, now)
        dispatched = self.dispatch_due(now)
        log.info(
            "sweep plan=%s created=%d skipped_periods=%d dispatched=%d",
            plan_name, created, skipped, dispatched,
        )  # fmt: skip
        return SweepResult(plan_name, created, skipped, dispatched)

    def dispatch_due(self, now: datetime | None = None) -> int:
        """Send due pending charges, never more than ``max_in_flight`` in the broker or workers."""
        return self.dispatch.dispatch_due(now or utcnow())

    def engine_sweep(self, now: datetime | None = None) -> EngineSweepResult:
        """The frequent housekeeping: stuck calls, lost messages, captures, due retries."""
        now = now or utcnow()
        stuck = self.mark_stuck(now)
        requeued = self.requeue_lost(now)
        captures = self.settlement.dispatch_due_captures(now)
        if captures:
            self.ctx.capture_dispatcher(captures)
        released = self.settlement.release_cancelled(now)
        dispatched = self.dispatch_due(now)
        return EngineSweepResult(stuck, requeued, len(captures), released, dispatched)

    def mark_stuck(self, now: datetime | None = None) -> int:
        """Calls in flight longer than any call can last become ``unknown``."""
        return self.housekeeping.mark_stuck(now or utcnow())

    def requeue_lost(self, now: datetime | None = None) -> int:
        """Send again the messages of charges queued too long ago."""
        return self.dispatch.requeue_lost(now or utcnow())

    # ------------------------------------------------------------------- charges

    def charge(self, charge_id: int, *, retries: int = 0) -> ChargeResult:
        """Make one gateway call for a queued charge and record what came of it."""
        return self._charge_one(charge_id, retries=retries)

    def charge_many(self, charge_ids: Sequence[int]) -> list[ChargeResult]:
        """Each of ``charge_ids`` charged on its own, all at once: a message of several
        charges takes as long as its slowest call, not the sum of its calls.

        Every call runs to its end and is recorded before this returns, whatever another
        one raised; then the first error is raised (the message is dead-lettered, and a
        charge it left queued is sent again by the engine sweep)."""
        if len(charge_ids) == 1:
            return [self.charge(charge_ids[0])]
        with self._message():
            futures = [self._calls_pool().submit(self._charge_one, cid) for cid in charge_ids]
            errors = [f.exception() for f in futures]
        for error in errors:
            if error is not None:
                raise error
        return [f.result() for f in futures]

    def _charge_one(self, charge_id: int, *, retries: int = 0) -> ChargeResult:
        result = self.calls.charge(charge_id, retries=retries)
        if result.status == "done":
            self._refill()
        return result

    @contextlib.contextmanager
    def _message(self) -> Iterator[None]:
        """One message of several charges being worked on in this process. The last one to
        end while no other is under way refills: the counts of :meth:`_refill` are per
        process, so several processes could each stay just short of theirs while every
        charge in flight finished, and with no beat the charges still due would wait for
        ever (review: five processes at a quarter of the bound). A process left with nothing
        to do asks. A lone charge (a retry, or the one charge a dispatch had room for) only
        counts: dispatches send lone charges only when the room is one."""
        with self._messages_lock:
            self._messages += 1
        try:
            yield
        finally:
            with self._messages_lock:
                self._messages -= 1
                # Only if a charge finished since this process last refilled: a message whose
                # last charge has just made the count refill needs no second dispatch.
                idle = self._messages == 0 and self._unfilled > 0
                if idle:
                    self._unfilled = 0
            if idle:
                self._dispatch_quietly()

    def _calls_pool(self) -> ThreadPoolExecutor:
        """Threads for the calls of several-charge messages (``calls_per_process``, started
        only when needed): a charge waiting for one is still queued, not claimed."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=self.ctx.settings.calls_per_process, thread_name_prefix="charge"
                )
            return self._pool

    def claim(self, charge_id: int, now: datetime | None = None) -> Claim | ChargeResult:
        """The claim step alone (for tests and tools that make the call themselves)."""
        return self.calls.claim(charge_id, now)

    def record(
        self, claim: Claim, result: Outcome, *, retries: int = 0, now: datetime | None = None
    ) -> ChargeResult:
        """The record step alone: the answer ``result`` of the ``claim``'s attempt."""
        return self.calls.record(claim, result, retries=retries, now=now)

    def _refill(self) -> None:
        """Slots in flight freed up: keep the pipeline full without waiting for beat.

        Every few finished charges (a quarter of the in-flight bound, per process), not
        after each one: a dispatch counts what is in flight and sends a message, so doing it
        per charge would cost a query and a message per charge for no gain while plenty is
        still queued. A process whose last message ends refills too (:meth:`_message`).
        """
        with self._messages_lock:
            self._unfilled += 1
            due = self._unfilled >= self._refill_every
            if due:
                self._unfilled = 0
        if due:
            self._dispatch_quietly()

    def _dispatch_quietly(self) -> None:
        """:meth:`dispatch_due`, logging rather than raising what fails."""
        try:
            self.dispatch_due()
        except Exception as exc:
            # Whatever failed (the database, or the broker: Kombu's OperationalError is
            # neither SQLAlchemy's nor an OSError), the charge itself is recorded: raising
            # would make its task an error and dead-letter a message whose charge was made.
            # Safe to drop: charges whose send failed are pending again (Dispatch._unsend),
            # and every due charge is sent by the next dispatch or engine sweep.
            log.warning("refill after a charge failed: %s", exc)


__all__ = ["ChargeResult", "Claim", "Engine", "EngineSweepResult", "SweepResult"]
