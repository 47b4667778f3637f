"""Beat's schedule, built from the plans file: each plan's sweep in its own time zone, plus
the frequent engine sweep (retries, lost messages, stuck calls, deferred captures)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from zoneinfo import ZoneInfo

from celery.schedules import crontab

from billing.durations import Cron
from billing.plans import PlanSet
from billing.settings import Settings

#: Task names, shared with ``tasks/`` (kept here so beat never imports the worker's tasks).
SWEEP_PLAN = "billing.sweep_plan"
ENGINE_SWEEP = "billing.engine_sweep"
DELIVER_EVENTS = "billing.deliver_events"


class ZonedCrontab(crontab):
    """A crontab evaluated in a plan's time zone rather than the app's (UTC).

    Celery reads the zone from the ``tz`` attribute; ``__reduce__`` keeps it through the
    pickling that beat's schedule file does.
    """

    def __init__(
        self,
        minute: str = "*",
        hour: str = "*",
        day_of_week: str = "*",
        day_of_month: str = "*",
        month_of_year: str = "*",
        zone: str = "UTC",
        **kwargs: Any,
    ) -> None:
        super().__init__(minute, hour, day_of_week, day_of_month, month_of_year, **kwargs)
        self.zone = zone
        self.tz = ZoneInfo(zone)

    def __reduce__(self) -> tuple[Any, ...]:
        fields = (
            self._orig_minute,
            self._orig_hour,
            self._orig_day_of_week,
            self._orig_day_of_month,
            self._orig_month_of_year,
            self.zone,
        )
        return (self.__class__, fields, self._orig_kwargs)

    def __repr__(self) -> str:
        return (
            f"<crontab: {self._orig_minute} {self._orig_hour} {self._orig_day_of_month} "
            f"{self._orig_month_of_year} {self._orig_day_of_week} ({self.zone})>"
        )


def plan_schedule(sweep: Cron | timedelta, zone: ZoneInfo) -> ZonedCrontab | timedelta:
    if isinstance(sweep, timedelta):
        return sweep
    return ZonedCrontab(
        minute=sweep.minute,
        hour=sweep.hour,
        day_of_week=sweep.day_of_week,
        day_of_month=sweep.day_of_month,
        month_of_year=sweep.month_of_year,
        zone=zone.key,
    )


def build_beat_schedule(plans: PlanSet, settings: Settings) -> dict[str, dict[str, Any]]:
    """Celery's ``beat_schedule`` for ``plans``.

    Sweep messages expire: a sweep that waited in the broker past its next run is
    pointless (the next one does the same work), so they never pile up during an outage.
    """
    engine_every = timedelta(seconds=settings.engine_sweep_seconds)
    schedule: dict[str, dict[str, Any]] = {
        "engine-sweep": {
            "task": ENGINE_SWEEP,
            "schedule": engine_every,
            "options": {"expires": max(engine_every.total_seconds(), 5.0)},
        }
    }
    # Posts due webhook events; without an endpoint the task returns at once.
    events_every = timedelta(seconds=settings.webhook_deliver_seconds)
    schedule["deliver-events"] = {
        "task": DELIVER_EVENTS,
        "schedule": events_every,
        "options": {"expires": max(events_every.total_seconds(), 5.0)},
    }
    for name, plan in sorted(plans.plans.items()):
        schedule[f"sweep:{name}"] = {
            "task": SWEEP_PLAN,
            "schedule": plan_schedule(plan.sweep, plan.timezone),
            "args": (name,),
            "options": {"expires": 300.0},
        }
    return schedule
