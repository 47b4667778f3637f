"""The base every task runs on: one engine per process, dead letters, clean forks.

Task bodies stay a few lines: they unpack arguments and call the engine; what goes wrong
unexpectedly lands in the dead-letter table here, once, for every task.
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
from billing.engine import Engine
from billing.settings import get_settings
from tasks.app import app

log = logging.getLogger("billing.tasks")

_engine: Engine | None = None
_engine_pid: int | None = None


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
