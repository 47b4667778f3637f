"""The bench on either broker (``BENCH_BROKER``): its reading, and the pure parts of the
RabbitMQ run — ``rabbitmqctl``'s queue figures, the log count that times the no-op drain,
and the report's choice of which saved runs to set beside a run.

Why here and not in a bench run: ``make bench-smoke-rabbitmq`` proves the run works, but a
misread figure or a run compared with the other broker's would still print a table.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from bench.config import PLANS_TOML, BenchFailed, load_config, parse_broker
from bench.measure import parse_queues
from bench.noop import LogCounter, task_line, wait_logged
from bench.report import (
    MEMORY_LABELS,
    _comparable_run,
    broker_memory,
    other_broker_run,
    side_by_side,
)
from billing.errors import ConfigError
from billing.plans import load_plans
from billing.ratelimit import require_redis


def test_broker_is_redis_unless_told() -> None:
    assert load_config({}).broker == "redis"
    assert load_config({"BENCH_BROKER": ""}).broker == "redis"
    assert load_config({"BENCH_BROKER": "amqp"}).broker == "amqp"
    assert parse_broker(" redis ") == "redis"


@pytest.mark.parametrize("raw", ["rabbitmq", "AMQP", "amqp://localhost", "kafka"])
def test_a_bad_broker_is_an_error_naming_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError, match="BENCH_BROKER") as caught:
        load_config({"BENCH_BROKER": raw})
    assert repr(raw.strip()) in str(caught.value)
    assert "'redis' or 'amqp'" in str(caught.value)


def test_the_bench_plans_need_no_redis(tmp_path: Path) -> None:
    """On RabbitMQ the bench runs no Redis: its plans must set no rate limit."""
    plans = tmp_path / "plans.toml"
    plans.write_text(PLANS_TOML)
    plans.chmod(0o600)
    require_redis(load_plans(plans).accounts, None)


def test_queue_figures_from_rabbitmqctl() -> None:
    out = (
        "bench-1a2b\t12\t128\t1048576\n"
        "celery_delayed_0\t0\t0\t29692\n"
        "billing-1@host.celery.pidbox\t\t\t\n"  # being declared: no figures yet
        "\n"
        "odd line\n"
    )
    assert parse_queues(out) == {
        "bench-1a2b": (12, 128, 1_048_576),
        "celery_delayed_0": (0, 0, 29_692),
        "billing-1@host.celery.pidbox": (0, 0, 0),
    }
    assert parse_queues("") == {}


def test_log_counter_counts_a_needle_cut_between_reads() -> None:
    needle = task_line("billing.noop")
    counter = LogCounter(Path("/nonexistent"), needle)
    line = f"INFO celery: {needle}abc] succeeded in 0.001s: None\n"
    assert counter.feed(line[:20]) == 0
    assert counter.feed(line[20:] + line) == 2
    assert counter.feed("no task here\n") == 2
    assert counter.read() == 2  # a log not written yet adds nothing


def test_log_counter_reads_only_what_was_appended(tmp_path: Path) -> None:
    log = tmp_path / "noop-worker.log"
    log.write_text("Task billing.noop[1] received\n")
    counter = LogCounter(log, "Task billing.noop[")
    assert counter.read() == 1
    assert counter.read() == 1
    with log.open("a") as out:
        out.write("Task billing.noop[1] succeeded\nTask billing.no")
    assert counter.read() == 2
    with log.open("a") as out:
        out.write("op[2] received\n")
    assert counter.read() == 3


def _results(broker: str | None, n: int, peak_mb: float, throughput: float) -> dict[str, Any]:
    config: dict[str, Any] = {
        "n": n, "concurrency": 64, "worker_args": [], "max_in_flight": 128, "latency_ms": 50.0,
    }  # fmt: skip
    if broker is not None:
        config["broker"] = broker
    memory = {"peak_above_idle_bytes": int(peak_mb * 1024 * 1024)}
    return {
        "config": config,
        "ours": {
            "throughput": throughput,
            "cpu_per_charge_ms": 3.0,
            "rabbitmq" if broker == "amqp" else "redis": memory,
        },
        "noop": {"cpu_per_message_ms": 1.0, "messages_per_second": 900.0},
    }


def _save(directory: Path, name: str, results: dict[str, Any]) -> None:
    (directory / name).write_text(json.dumps(results))


def test_memory_is_the_broker_s_own() -> None:
    assert broker_memory(_results("amqp", 300, 1.0, 1)["ours"])[0] == MEMORY_LABELS["rabbitmq"]
    assert broker_memory(_results(None, 300, 1.0, 1)["ours"])[0] == MEMORY_LABELS["redis"]


def test_peak_against_another_n_only_on_the_same_broker(tmp_path: Path) -> None:
    _save(tmp_path, "20260101T000000Z-n100000.json", _results("redis", 100_000, 5.0, 100))
    config = load_config({"BENCH_BROKER": "amqp", "BENCH_RESULTS_DIR": str(tmp_path)})
    assert _comparable_run(config) is None
    _save(tmp_path, "20260101T000001Z-n2000.json", _results("amqp", 2000, 2.0, 100))
    found = _comparable_run(config)
    assert found is not None and found[0].name == "20260101T000001Z-n2000.json"
    # A run from before BENCH_BROKER ran on Redis.
    _save(tmp_path, "20250101T000000Z-n2000.json", _results(None, 2000, 2.0, 100))
    on_redis = _comparable_run(load_config({"BENCH_RESULTS_DIR": str(tmp_path)}))
    assert on_redis is not None and on_redis[0].name == "20260101T000000Z-n100000.json"


def test_the_other_broker_s_run_is_set_beside(tmp_path: Path) -> None:
    mine = _results("amqp", 300, 0.5, 80.0)
    assert other_broker_run(mine["config"], tmp_path) is None
    _save(tmp_path, "20260101T000000Z-n300.json", _results("amqp", 300, 0.5, 70.0))
    _save(tmp_path, "20260101T000001Z-n2000.json", _results("redis", 2000, 1.0, 90.0))
    assert other_broker_run(mine["config"], tmp_path) is None  # same broker, or another N
    _save(tmp_path, "20260101T000002Z-n300.json", _results(None, 300, 1.0, 100.0))
    found = other_broker_run(mine["config"], tmp_path)
    assert found is not None and found[0].name == "20260101T000002Z-n300.json"
    line = side_by_side(mine, found[1], found[0].name)
    assert line.startswith("Brokers side by side (RabbitMQ vs Redis, 20260101T000002Z-n300.json)")
    assert "throughput (charges/s) 80.00 vs 100.00" in line
    assert "broker memory peak above idle (MB) 0.50 vs 1.00" in line


def test_the_drain_is_timed_from_the_first_task_logged(tmp_path: Path) -> None:
    log = tmp_path / "noop-worker.log"
    log.write_text("Task billing.noop[0] received\nTask billing.noop[0] succeeded\n")
    counter = LogCounter(log, task_line("billing.noop"))
    counter.read()  # what was logged before the drain is not counted

    def write_later() -> None:
        time.sleep(0.3)
        with log.open("a") as out:
            out.write("Task billing.noop[1] received\n")
        time.sleep(0.3)
        with log.open("a") as out:
            out.write("Task billing.noop[1] succeeded\n")

    writer = threading.Thread(target=write_later)
    asked = time.time()
    writer.start()
    began, done = wait_logged(counter, 2, timeout=10, alive=lambda: True)
    writer.join()
    assert began - asked >= 0.25
    assert 0.2 <= done - began <= 1.5
    with pytest.raises(BenchFailed, match="no-op: 0 of 1 tasks"):
        wait_logged(counter, 2, timeout=0.1, alive=lambda: True)


def test_tasks_logged_before_the_wait_began_count(tmp_path: Path) -> None:
    """The drain may start while the bench still sends add_consumer: its first tasks are
    in the log before the wait's first read, and must not be taken as the baseline."""
    log = tmp_path / "noop-worker.log"
    log.write_text("")
    counter = LogCounter(log, task_line("billing.noop"))
    counter.read()
    log.write_text("Task billing.noop[1] received\nTask billing.noop[1] succeeded\n")
    began, done = wait_logged(counter, 2, timeout=1, alive=lambda: True)
    assert began <= done
