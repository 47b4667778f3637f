"""The Celery app. Configuration comes from ``billing.settings``; beat's schedule from the
plans file, so a worker or beat refuses to start on an invalid plans file.

Why these settings:
- ``task_acks_late`` + ``task_reject_on_worker_lost``: a message is acknowledged only once
  its task has finished, so a worker that dies mid-task leaves the message to be delivered
  again. Redelivery is safe because a charge is claimed atomically in the database.
- ``worker_prefetch_multiplier = 1``: a worker holds no more messages than it runs, so a
  crash strands nothing and the sweep's in-flight bound is real.
- ``visibility_timeout``: how long Redis waits for an acknowledgement before handing a
  message to another worker. No task runs or waits (countdown) longer than a fraction of
  it; long delays (retry ladders, captures) live in the database.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, bootsteps
from celery.signals import setup_logging

from billing.broker import celery_config, declare_dead_letters, is_amqp
from billing.logs import celery_setup_logging
from billing.plans import get_plans
from billing.ratelimit import require_redis
from billing.settings import Settings, get_settings
from schedules.beat import build_beat_schedule


class DeadLetterQueue(bootsteps.StartStopStep):
    """RabbitMQ: declare the dead-letter exchange and queue before the worker consumes, so
    the first poison message has somewhere to go (an exchange that does not exist drops)."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def include_if(self, parent: Any) -> bool:
        return is_amqp(parent.app.conf.broker_url)

    def start(self, parent: Any) -> None:
        declare_dead_letters(parent.connection, get_settings())


#: Set to ``1`` in a worker's environment to load ``tasks.poison`` (tests only).
POISON_TASKS_ENV = "BILLING_POISON_TASKS"


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    include = ["tasks.charges", "tasks.events", "tasks.diagnostics"]
    if os.environ.get(POISON_TASKS_ENV) == "1":  # tests only: a task that kills its worker
        include.append("tasks.poison")
    app = Celery("klikandpay_billing", include=include)
    app.conf.update(celery_config(settings))
    plans = get_plans(settings)
    require_redis(plans.accounts, settings.effective_redis_url)
    app.conf.beat_schedule = build_beat_schedule(plans, settings)
    # Read only by ``billing beat --redbeat`` (RedBeat's scheduler): Redis holds its lock.
    app.conf.redbeat_redis_url = settings.effective_redis_url
    app.steps["consumer"].add(DeadLetterQueue)
    return app


# Workers and beat log like the CLI: one format (BILLING_LOG_FORMAT), always redacted.
setup_logging.connect(celery_setup_logging, weak=False)

app = make_app()
