"""Prometheus metrics. Multiprocess-safe: with ``PROMETHEUS_MULTIPROC_DIR`` set (the worker
and ``billing metrics`` set it), every process writes its own files and the endpoint sums them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from datetime import datetime

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, Metric
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from billing.db import read_scope
from billing.errors import ConfigError
from billing.models import Charge, utcnow
from billing.vocabulary import ATTENTION_STATES, ChargeState
from billing.vocabulary import QUEUE_REASONS as VOCABULARY_QUEUE_REASONS

CHARGES = Counter(
    "billing_charges_total",
    "Charge attempts by plan and outcome (approved, declined, not_sent, unknown).",
    ["plan", "outcome"],
)
GATEWAY_LATENCY = Histogram(
    "billing_gateway_call_seconds",
    "Duration of gateway calls by script and outcome.",
    ["operation", "outcome"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)


def count_charge(plan: str, outcome: str) -> None:
    CHARGES.labels(plan=plan, outcome=outcome).inc()


def observe_gateway_call(operation: str, outcome: str, seconds: float) -> None:
    GATEWAY_LATENCY.labels(operation=operation, outcome=outcome).observe(seconds)


# --- the endpoint's view of the database ------------------------------------------------
# What workers count lives in their processes; what waits for a person lives in the
# database. The collector below reads the latter at every scrape, so an alert on the
# failed-charge queue needs no worker to be running.

#: Reasons always exported (0 when empty), so an alert never meets an absent series:
#: every failure reason and review flag of ``billing.vocabulary``.
QUEUE_REASONS = VOCABULARY_QUEUE_REASONS

log = logging.getLogger("billing.metrics")

QUEUE_DEPTH = "billing_failed_queue_depth"
QUEUE_DEPTH_HELP = "Charges waiting for a person (failed, unknown or flagged), by reason."
OLDEST_UNKNOWN = "billing_oldest_unknown_charge_age_seconds"
OLDEST_UNKNOWN_HELP = (
    "Seconds since the oldest charge with an unknown outcome last changed (0 when none)."
)
DATABASE_UP = "billing_metrics_database_up"
DATABASE_UP_HELP = "1 when the metrics endpoint could read the database at this scrape."


class FailedQueueCollector(Collector):
    """Gauges of the failed-charge queue, queried from the database at scrape time."""

    def __init__(self, url: str, clock: Callable[[], datetime] | None = None) -> None:
        self.url = url
        self.clock = clock or utcnow

    def describe(self) -> Iterable[Metric]:
        # Declaring the names keeps registration from running a query.
        return [
            GaugeMetricFamily(QUEUE_DEPTH, QUEUE_DEPTH_HELP, labels=["reason"]),
            GaugeMetricFamily(OLDEST_UNKNOWN, OLDEST_UNKNOWN_HELP),
            GaugeMetricFamily(DATABASE_UP, DATABASE_UP_HELP),
        ]

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(DATABASE_UP, DATABASE_UP_HELP)
        try:
            depth, oldest = self._query()
        except SQLAlchemyError as exc:
            log.warning("metrics: cannot read the failed-charge queue: %s", exc)
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        gauge = GaugeMetricFamily(QUEUE_DEPTH, QUEUE_DEPTH_HELP, labels=["reason"])
        for reason in sorted(set(QUEUE_REASONS) | set(depth)):
            gauge.add_metric([reason], depth.get(reason, 0))
        age = GaugeMetricFamily(OLDEST_UNKNOWN, OLDEST_UNKNOWN_HELP)
        age.add_metric([], max(0.0, (self.clock() - oldest).total_seconds()) if oldest else 0.0)
        return [gauge, age, up]

    def _query(self) -> tuple[dict[str, int], datetime | None]:
        with read_scope(self.url) as session:
            return failed_queue_state(session)


def failed_queue_state(session: Session) -> tuple[dict[str, int], datetime | None]:
    """The failed-charge queue's depth by reason (``none`` for no reason; a flagged charge
    counts under its review flag, whatever its state) and when its oldest unknown charge
    last changed: what the gauges and the web console's overview show."""
    rows = session.execute(
        select(Charge.reason, func.count())
        .where(Charge.state.in_(ATTENTION_STATES), Charge.review.is_(None))
        .group_by(Charge.reason)
    )
    depth: dict[str, int] = {}
    for reason, count in rows:
        key = reason or "none"
        depth[key] = depth.get(key, 0) + count
    flagged = session.execute(
        select(Charge.review, func.count())
        .where(Charge.review.is_not(None))
        .group_by(Charge.review)
    )
    for review, count in flagged:
        key = review or "none"
        depth[key] = depth.get(key, 0) + count
    oldest = session.scalar(
        select(func.min(Charge.updated_at)).where(Charge.state == ChargeState.UNKNOWN)
    )
    return depth, oldest


class _InProcess(Collector):
    """The default registry seen as one collector (no ``PROMETHEUS_MULTIPROC_DIR``)."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


def build_registry(url: str) -> CollectorRegistry:
    """What ``billing metrics`` serves: the workers' counters plus the database gauges.

    With ``PROMETHEUS_MULTIPROC_DIR`` set (every worker must have the same value, or its
    counters are invisible here) the counters are summed from the files of every process;
    without it, only this process's own registry is served.
    """
    registry = CollectorRegistry()
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        if not os.path.isdir(directory):
            raise ConfigError(
                f"PROMETHEUS_MULTIPROC_DIR: {directory} is not a directory; create it (the "
                "workers write their counters there) or unset the variable"
            )
        MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    else:
        registry.register(_InProcess())
    registry.register(FailedQueueCollector(url))
    return registry
