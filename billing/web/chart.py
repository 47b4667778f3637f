"""The overview's chart: collected and failed per day, drawn as SVG on the server.

Only numbers and dates computed here reach the SVG (the template escapes them anyway), so
the chart needs no chart library, no script and nothing from another origin, and it reads
the same with JavaScript off.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from billing.reports import DayCounts

#: The drawing's size in SVG units (it scales to the page's width).
WIDTH = 720
HEIGHT = 220
#: Room for the axis labels.
LEFT, BOTTOM, TOP = 36, 24, 18


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    #: collected | failed: the CSS class that colours it.
    series: str
    #: The tooltip: the day and the count.
    title: str


@dataclass(frozen=True)
class Tick:
    position: float
    label: str
    #: SVG text-anchor: the last day's label ends at its bar, so it is never cut off.
    anchor: str = "middle"


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    bars: list[Bar]
    y_ticks: list[Tick]
    x_ticks: list[Tick]
    baseline: float
    total_collected: int
    total_failed: int


def _nice_top(value: int) -> int:
    """The smallest of 4, 8, 20, 40, 80, 200, ... at least ``value``: its quarters (the
    axis labels) are whole numbers."""
    magnitude = 1
    while True:
        for step in (4, 8, 20):
            if step * magnitude >= value:
                return step * magnitude
        magnitude *= 10


def day_chart(days: Sequence[DayCounts]) -> Chart:
    """Two bars per day (collected, failed) on one count axis."""
    plot_w = WIDTH - LEFT - 4
    plot_h = HEIGHT - BOTTOM - TOP
    top = _nice_top(max([1, *(max(d.collected, d.failed) for d in days)]))
    slot = plot_w / max(len(days), 1)
    bar_w = max(slot * 0.38, 1.0)
    baseline = TOP + plot_h
    bars = []
    for i, d in enumerate(days):
        for j, (series, count) in enumerate((("collected", d.collected), ("failed", d.failed))):
            h = plot_h * count / top
            bars.append(
                Bar(
                    x=round(LEFT + i * slot + slot * 0.1 + j * bar_w, 2),
                    y=round(baseline - h, 2),
                    width=round(bar_w, 2),
                    height=round(h, 2),
                    series=series,
                    title=f"{d.day.isoformat()}: {count} {series}",
                )
            )
    y_ticks = [Tick(round(baseline - plot_h * k / 4, 2), str(top * k // 4)) for k in range(5)]
    x_ticks = [
        Tick(
            round(LEFT + i * slot + slot * (0.9 if i == len(days) - 1 else 0.5), 2),
            d.day.strftime("%d %b"),
            "end" if i == len(days) - 1 else "middle",
        )
        for i, d in enumerate(days)
        if i % 7 == (len(days) - 1) % 7
    ]
    return Chart(
        width=WIDTH,
        height=HEIGHT,
        bars=bars,
        y_ticks=y_ticks,
        x_ticks=x_ticks,
        baseline=baseline,
        total_collected=sum(d.collected for d in days),
        total_failed=sum(d.failed for d in days),
    )
