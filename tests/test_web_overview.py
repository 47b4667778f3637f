"""The overview's numbers: the new ledger queries of ``billing.reports`` on PostgreSQL and
SQLite, the failed-queue state the metrics share, and the chart's geometry."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from billing import ledger, metrics, reports
from billing.db import session_scope
from billing.models import ChargeState
from billing.reports import DayCounts
from billing.web.chart import day_chart
from tests.test_ops import add_charge, add_subscription

NOW = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)


def _row(
    session, sub, charge, outcome: str, at: datetime, amount: str = "0.00", op: str = "duplicate"
):
    return ledger.append(
        session, outcome=outcome, operation=op, actor="test", charge=charge,
        amount=Decimal(amount), at=at,
    )  # fmt: skip


def test_daily_counts_bucket_utc_days_and_fill_empty_ones(db_url: str) -> None:
    with session_scope(db_url) as session:
        sub = add_subscription(session, "shop-1")
        charge = add_charge(session, sub, state=ChargeState.APPROVED)
        _row(session, sub, charge, "approved", NOW - timedelta(hours=1), "29.90")
        _row(session, sub, charge, "declined", NOW - timedelta(hours=2))
        _row(session, sub, charge, "unknown", NOW - timedelta(days=1, hours=1))
        _row(session, sub, charge, "declined", NOW - timedelta(days=1), op="validate")
        _row(session, sub, charge, "validated", NOW - timedelta(days=2), "120.00", op="validate")
        # 23:30 UTC on the 27th is the 28th in Paris: it counts on the 27th (UTC days).
        _row(session, sub, charge, "approved", datetime(2026, 11, 27, 23, 30, tzinfo=UTC), "1.00")
        _row(session, sub, charge, "approved", NOW - timedelta(days=40), "9.00")  # outside
    with session_scope(db_url) as session:
        days = reports.daily_counts(session, days=30, now=NOW)
    assert len(days) == 30 and days[0].day == NOW.date() - timedelta(days=29)
    by_day = {d.day: d for d in days}
    today = by_day[NOW.date()]
    assert (today.collected, today.failed, today.charge_calls, today.charge_declines) == (
        1,
        1,
        2,
        1,
    )
    yesterday = by_day[NOW.date() - timedelta(days=1)]
    assert (yesterday.failed, yesterday.charge_calls) == (
        2,
        0,
    )  # a lost answer, a settlement decline
    assert by_day[NOW.date() - timedelta(days=2)].collected == 1  # a validation collects
    assert by_day[datetime(2026, 11, 27).date()].collected == 1
    assert sum(d.collected for d in days) == 3
    assert reports.decline_rate(days) == Decimal("0.3333")  # 1 of 3 answered charge calls
    assert reports.decline_rate(days[:1]) is None


def test_totals_by_currency_sum_the_report(db_url: str) -> None:
    with session_scope(db_url) as session:
        eur = add_subscription(session, "shop-eur")
        usd = add_subscription(session, "shop-usd", plan="weekly-all")
        c1 = add_charge(session, eur, state=ChargeState.APPROVED)
        c2 = add_charge(session, usd, state=ChargeState.APPROVED)
        _row(session, eur, c1, "approved", NOW - timedelta(hours=1), "29.90")
        _row(session, eur, c1, "refunded", NOW - timedelta(minutes=30), "10.00", op="cancel")
        _row(session, usd, c2, "approved", NOW - timedelta(hours=1), "4.99")
        _row(session, usd, c2, "authorized", NOW - timedelta(hours=1), "7.00")
    with session_scope(db_url) as session:
        totals = reports.totals_by_currency(session, since=NOW - timedelta(days=1), until=NOW)
    assert [(t.currency, t.collected, t.authorized, t.refunded) for t in totals] == [
        ("EUR", Decimal("29.90"), Decimal("0.00"), Decimal("10.00")),
        ("USD", Decimal("4.99"), Decimal("7.00"), Decimal("0.00")),
    ]


def test_failed_queue_state_is_what_the_gauges_read(db_url: str) -> None:
    with session_scope(db_url) as session:
        sub = add_subscription(session, "shop-1")
        add_charge(
            session, sub, state=ChargeState.UNKNOWN, reason="unknown_outcome", updated_at=NOW
        )
        sub2 = add_subscription(session, "shop-2")
        add_charge(session, sub2, state=ChargeState.FAILED, reason=None)
    with session_scope(db_url) as session:
        depth, oldest = metrics.failed_queue_state(session)
    assert depth == {"unknown_outcome": 1, "none": 1} and oldest == NOW
    collected = {
        m.name: [(s.labels, s.value) for s in m.samples]
        for m in metrics.FailedQueueCollector(db_url, clock=lambda: NOW).collect()
    }
    assert ({"reason": "unknown_outcome"}, 1.0) in collected["billing_failed_queue_depth"]


def test_the_chart_has_two_bars_a_day_on_a_round_axis() -> None:
    start = NOW.date() - timedelta(days=29)
    days = [DayCounts(start + timedelta(days=i), collected=i, failed=i % 3) for i in range(30)]
    chart = day_chart(days)
    assert len(chart.bars) == 60
    assert [t.label for t in chart.y_ticks] == ["0", "10", "20", "30", "40"]
    tallest = max(chart.bars, key=lambda b: b.height)
    assert tallest.series == "collected" and tallest.title.endswith(": 29 collected")
    assert all(b.y + b.height == chart.baseline for b in chart.bars)
    assert all(0 <= b.x <= chart.width for b in chart.bars)
    assert day_chart([DayCounts(start)]).y_ticks[-1].label == "4"  # nothing moved: 0..4
