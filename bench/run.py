"""``make bench``: one command, one run, one machine (``python -m bench.run``).

It starts what it needs (its own broker: a Redis, or with ``BENCH_BROKER=amqp`` a RabbitMQ
virtual host; its own PostgreSQL database, the sandbox with a
latency: ``bench.context``), then takes each measurement of ``MEASUREMENTS`` in turn
against the same services: the real worker (``bench.ours``), Celery's own cost per message
(``bench.noop``), the raw floor, the same-writes floor and the sequential script
(``bench.yardsticks`` running ``bench.floor`` and ``bench.samewrites``), and an in-process probe
that counts the SQL statements of one sweep and one charge (``bench.probe``). It prints a
table and writes the same to ``bench/results/<time>-n<N>.json`` (``bench.report``).
``bench/README.md`` explains each figure.

It exits non-zero when the run itself fails (a charge not settled, a process that would
not start, an exception), not when a target is missed, unless ``BENCH_STRICT=1``.

A new measurement is a function from the run's ``Context`` to a dict of figures, added to
``MEASUREMENTS`` under the key the results JSON will hold it by.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from bench import context, noop, ours, probe, report, yardsticks
from bench.config import Config, console, load_config
from billing.errors import BillingError


@dataclass(frozen=True)
class Measurement:
    """One part of the results: its key in the JSON, what the progress log calls it, how."""

    key: str
    title: str
    measure: Callable[[context.Context], dict[str, Any]]


#: Taken in this order, each against the same broker, database and sandbox.
MEASUREMENTS = (
    Measurement("ours", "the worker", ours.measure),
    Measurement("noop", "Celery's own cost: no-op messages", noop.measure),
    Measurement("floor", "the raw floor", yardsticks.floor),
    Measurement("writes", "the same-writes floor", yardsticks.same_writes),
    Measurement("sequential", "the sequential script", yardsticks.sequential),
    Measurement("probe", "the in-process probe: SQL statements per charge", probe.measure),
)


def measure_all(
    config: Config, measurements: Sequence[Measurement] = MEASUREMENTS
) -> dict[str, dict[str, Any]]:
    """Each measurement against one broker, database and sandbox, all stopped afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    parts: dict[str, dict[str, Any]] = {}
    ok = False
    try:
        broker = "a RabbitMQ vhost" if config.broker == "amqp" else "Redis"
        console.log(f"starting {broker}, PostgreSQL database and sandbox")
        with context.started(config, workdir) as ctx:
            for measurement in measurements:
                console.log(measurement.title)
                part = parts[measurement.key] = measurement.measure(ctx)
                if "throughput" in part:
                    console.log(f"{measurement.title}: {part['throughput']:.1f} charges/s")
        ok = True
    finally:
        if ok and not config.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            console.log(f"logs kept in {workdir}")
    return parts


def run(config: Config) -> dict[str, Any]:
    """Every measurement of one run, set side by side (``report.summarize``)."""
    started = datetime.now(UTC)
    return report.summarize(config, measure_all(config), started)


def measurement(key: str) -> Measurement:
    """The measurement of ``MEASUREMENTS`` stored under ``key``."""
    return next(m for m in MEASUREMENTS if m.key == key)


def main() -> int:
    try:
        config = load_config(os.environ)
        results = run(config)
    except BillingError as exc:
        console.print(f"[red]bench failed:[/red] {exc}", soft_wrap=True)
        return exc.exit_code
    out = Console()
    report.render(results, out if out.width >= 120 else Console(width=120))
    path = report.write(results, config.results_dir)
    console.print(f"results written to {path}")
    missed = [row["target"] for row in results["targets"] if row["ok"] is False]
    if missed and config.strict:
        console.print(f"[red]BENCH_STRICT=1: targets missed:[/red] {', '.join(missed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
