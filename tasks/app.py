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

from celery import Celery
from celery.signals import setup_logging

from billing.broker import celery_config
from billing.logs import celery_setup_logging
from billing.plans import get_plans
from billing.settings import Settings, get_settings
from schedules.beat import build_beat_schedule


def make_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery(
        "klikandpay_billing", include=["tasks.charges", "tasks.events", "tasks.diagnostics"]
    )
    app.conf.update(celery_config(settings))
    app.conf.beat_schedule = build_beat_schedule(get_plans(settings), settings)
    # Read only by ``billing beat --redbeat`` (RedBeat's scheduler): Redis holds its lock.
    app.conf.redbeat_redis_url = settings.effective_redis_url
    return app


# Workers and beat log like the CLI: one format (BILLING_LOG_FORMAT), always redacted.
setup_logging.connect(celery_setup_logging, weak=False)

app = make_app()
