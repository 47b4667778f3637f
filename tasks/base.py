"""The base every task runs on: one engine per process, dead letters, clean forks, and
(on Redis) a bound on deliveries that kill their worker.

Task bodies stay a few lines: they unpack arguments and call the engine; what goes wrong
unexpectedly lands in the dead-letter table here, once, for every task.

A message whose task kills its worker process every time is redelivered for ever under
``task_acks_late`` + ``task_reject_on_worker_lost``. RabbitMQ stops it itself (the quorum
queue's delivery limit); on Redis each start is counted (``billing.deliveries``) and,
past the same limit, the message becomes a dead letter instead of running again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from celery import Task
from celery.exceptions import Ignore, Reject, Retry
from celery.signals import worker_process_init, worker_process_shutdown

from billing import broker, deadletters
from billing.db import dispose_all
from billing.deliveries import DeliveryCounter, PoisonMessage, dead_letters_after
from billing.engine import Engine
from billing.settings import get_settings
from tasks.app import app

log = logging.getLogger("billing.tasks")

_engine: Engine | None = None
_engine_pid: int | None = None
_counter: tuple[int, DeliveryCounter | None] | None = None


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    """A forked pool process must not share its parent's sockets or pooled connections."""
    global _engine, _engine_pid
    dispose_all()
    _engine = _engine_pid = None


@worker_process_shutdown.connect
def _metrics_of_dead_process(pid: int | None = None, **_: Any) -> None:
    """Multiprocess metrics: a pool process that exits must stop counting in live gauges."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid())  # type: ignore[no-untyped-call]


def send_charges(charge_ids: Sequence[int]) -> None:
    """Send the charge messages, several IDs each (``billing.broker.send_charges``)."""
    broker.send_charges(app, charge_ids, get_settings().charge_batch)


def send_captures(charge_ids: Sequence[int]) -> None:
    """Send one validation message per authorized charge whose capture time has come."""
    broker.send_many(app, broker.CAPTURE_TASK, charge_ids)


def delivery_counter() -> DeliveryCounter | None:
    """The process's counter of unfinished deliveries: on Redis only (RabbitMQ counts)."""
    global _counter
    if _counter is None or _counter[0] != os.getpid():
        settings = get_settings()
        url = None if broker.is_amqp(settings.broker_url) else settings.effective_redis_url
        _counter = (os.getpid(), DeliveryCounter(url, settings.delivery_limit) if url else None)
    return _counter[1]


def get_engine() -> Engine:
    """The process's engine, built on first use (after any fork)."""
    global _engine, _engine_pid
    if _engine is None or _engine_pid != os.getpid():
        _engine = Engine(get_settings(), dispatcher=send_charges, capture_dispatcher=send_captures)
        _engine_pid = os.getpid()
    return _engine


class BillingTask(Task):
    """Base task: gives access to the engine and dead-letters unexpected exceptions."""

    abstract = True
    #: Celery's control-flow exceptions, never dead-lettered.
    control_flow = (Retry, Ignore, Reject)

    @property
    def engine(self) -> Engine:
        return get_engine()

    def _counted(self) -> DeliveryCounter | None:
        """The counter, for a redelivered message on Redis (None: nothing to count)."""
        if self.request.called_directly or not (self.request.delivery_info or {}).get(
            "redelivered"
        ):
            return None
        return delivery_counter()

    def before_start(self, task_id: str, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
        """On Redis, for a message delivered again: count it; past the delivery limit,
        dead-letter it (acknowledged, not run). Redis being unreachable only skips the
        count: running a task again is safe, every task claims its work in the database."""
        counter = self._counted()
        if counter is None:
            return
        retries = int(self.request.retries or 0)
        try:
            redeliveries = counter.redelivered(task_id, retries)
        except Exception as exc:
            log.warning("task %s[%s]: deliveries not counted: %s", self.name, task_id, exc)
            return
        if not dead_letters_after(redeliveries, counter.limit):
            return
        poison = PoisonMessage(redeliveries, counter.limit, "the workers (Redis delivery count)")
        done = broker.record_poison(
            get_settings().database_url, task_name=self.name, task_id=task_id,
            args=list(args), kwargs=dict(kwargs), poison=poison, source=deadletters.SOURCE_REDIS,
        )  # fmt: skip
        counter.finished(task_id, retries)
        log.error(
            "task %s[%s] killed its worker %d times; dead letter %d (billing deadletters show %d)",
            self.name, task_id, redeliveries, done.letter, done.letter,
        )  # fmt: skip
        raise Ignore()

    def after_return(
        self,
        status: str,
        retval: Any,
        task_id: str,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        einfo: Any,
    ) -> None:
        """The task ended (success, failure or retry): this delivery did not kill its worker."""
        counter = self._counted()
        if counter is None:
            return
        try:
            counter.finished(task_id, int(self.request.retries or 0))
        except Exception as exc:  # the counter expires on its own
            log.warning("task %s[%s]: delivery count not cleared: %s", self.name, task_id, exc)

    def on_failure(
        self,
        exc: BaseException,
        task_id: str,
        args: Sequence[Any],
        kwargs: dict[str, Any],
        einfo: Any,
    ) -> None:
        if isinstance(exc, self.control_flow):
            return
        try:
            letter = deadletters.record(
                get_settings().database_url,
                task_name=self.name,
                task_id=task_id,
                args=list(args),
                kwargs=dict(kwargs),
                exc=exc,
                traceback=str(einfo),
            )
            # The letter holds the (scrubbed) message; the exception itself may name what
            # the arguments held (an alias, a card field), so only its type is logged.
            log.error(
                "task %s[%s] failed with %s; dead letter %d (billing deadletters show %d)",
                self.name, task_id, type(exc).__qualname__, letter, letter,
            )  # fmt: skip
        except Exception:  # the database itself is down: the worker log is all we have
            log.exception(
                "task %s[%s] failed with %s and could not be dead-lettered",
                self.name, task_id, type(exc).__qualname__,
            )  # fmt: skip
