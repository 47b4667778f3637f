"""What every role of the charge's life shares: settings, plans, the gateway, who acts.

One ``Context`` per engine; the roles (sweep, dispatch, calls, settlement, housekeeping)
take it instead of a dozen arguments each. Celery never appears here: the task layer hands
in the ``dispatcher`` that sends charge messages.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from sqlalchemy.exc import OperationalError

from billing.gateway import KlikAndPayClient
from billing.outcomes import Outcome
from billing.plans import PlanSet, get_plans
from billing.ratelimit import RateLimiter
from billing.settings import Settings

Dispatcher = Callable[[Sequence[int]], None]
T = TypeVar("T")

log = logging.getLogger("billing.engine")

#: Pauses (seconds) between tries of recording an outcome when the database connection
#: breaks; after the last, the error propagates (the stuck sweep then marks it unknown).
RECORD_RETRY_PAUSES = (0.2, 1.0, 3.0)


class Gateway(Protocol):
    """The calls the engine makes (``billing.gateway.KlikAndPayClient`` is the real one)."""

    def duplicate(
        self,
        *,
        merchant_id: str,
        alias: str,
        ip: str,
        amount: object,
        private_key: str,
        deferred: bool = False,
    ) -> Outcome: ...

    def validate_deferred(
        self, *, merchant_id: str, tx: str, amount: object, private_key: str
    ) -> Outcome: ...

    def cancel(self, *, merchant_id: str, tx: str, amount: object, private_key: str) -> Outcome: ...


def worker_name() -> str:
    """Who acts when nobody does by hand: this process."""
    return f"worker:{socket.gethostname()}:{os.getpid()}"


@dataclass
class Context:
    """Settings, plans, gateway, dispatchers, rate limiter and actor of one engine."""

    settings: Settings
    client: Gateway | KlikAndPayClient
    dispatcher: Dispatcher
    capture_dispatcher: Dispatcher
    limiter: RateLimiter | None
    actor: str
    fixed_plans: PlanSet | None = None

    @property
    def url(self) -> str:
        return self.settings.database_url

    @property
    def plans(self) -> PlanSet:
        # Re-read only when the file changes (get_plans caches by modification time).
        return self.fixed_plans if self.fixed_plans is not None else get_plans(self.settings)

    def backoff(self, retries: int) -> float:
        """Seconds before resending a not-sent call: see :func:`compute_backoff`."""
        return compute_backoff(self.settings, retries)


def compute_backoff(settings: Settings, retries: int) -> float:
    """Exponential backoff with jitter, capped far below the broker's visibility timeout
    (a countdown longer than it would make the broker hand the message out twice)."""
    cap = min(settings.not_sent_backoff_cap, settings.visibility_timeout / 4)
    ceiling = min(cap, settings.not_sent_backoff_base * (2**retries))
    return random.uniform(ceiling / 2, ceiling)


def recorded_surely(record: Callable[[], T], what: str) -> T:
    """``record()``, tried again while the database connection breaks.

    Safe: the answer is written in one transaction, on condition that its attempt is still
    the current one and still claimed; a broken connection wrote nothing, so writing again
    cannot write twice. If the database stays away, the last error propagates and the stuck
    sweep marks the call unknown later, never sent again.
    """
    for pause in RECORD_RETRY_PAUSES:
        try:
            return record()
        except OperationalError:
            log.warning("%s: recording the outcome failed; retrying", what)
            time.sleep(pause)
    return record()
