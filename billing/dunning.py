"""What happens after a decline: the plan's retry ladder, and what follows its end."""

from __future__ import annotations

from datetime import timedelta

from billing.models import SubscriptionStatus
from billing.plans import Plan


def next_retry_delay(plan: Plan, declines: int) -> timedelta | None:
    """Delay before the next try after the ``declines``-th soft decline, or None when the
    ladder is spent. ``declines`` counts this charge's declines including the latest one."""
    if declines < 1 or declines > len(plan.retry_ladder):
        return None
    return plan.retry_ladder[declines - 1]


def status_after_failure(plan: Plan) -> SubscriptionStatus:
    """The subscription's status once a charge has failed for good (hard or ladder spent)."""
    if plan.after_ladder == "cancel":
        return SubscriptionStatus.CANCELLED
    return SubscriptionStatus.SUSPENDED
