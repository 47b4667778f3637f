"""The bench's reading of ``BENCH_WORKER_ARGS`` and its CPU figure of a process tree.

``make bench`` runs ``billing worker`` as a user does and must know what that command
starts (processes, pool, threads: C, and the in-flight bound) from the same rule the
command uses; and its CPU per charge is the whole tree's, supervisor and workers together.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from bench.config import load_config, parse_worker_args
from bench.floor import process_cpu_seconds, process_tree, tree_cpu_seconds
from billing.errors import ConfigError
from billing.supervisor import DEFAULT_THREADS, default_processes


def test_no_arguments_is_the_default_command_and_sets_c() -> None:
    config = load_config({})
    assert config.worker_args == ()
    assert (config.worker_processes, config.pool) == (default_processes(), "threads")
    assert config.worker_pool_size == DEFAULT_THREADS
    assert config.concurrency == default_processes() * DEFAULT_THREADS
    assert config.max_in_flight == 2 * config.concurrency


@pytest.mark.parametrize(
    ("raw", "processes", "pool", "size"),
    [
        ("--processes 1 --concurrency 64", 1, "threads", 64),
        ("--processes=2 -c 32", 2, "threads", 32),
        ("--pool prefork", 1, "prefork", default_processes()),
        ("--loglevel WARNING --processes 3", 3, "threads", DEFAULT_THREADS),
    ],
)
def test_worker_args_give_the_shape_billing_worker_starts(
    raw: str, processes: int, pool: str, size: int
) -> None:
    args, got_processes, got_pool, got_size = parse_worker_args(raw)
    assert args == tuple(raw.split())
    assert (got_processes, got_pool, got_size) == (processes, pool, size)
    config = load_config({"BENCH_WORKER_ARGS": raw, "BENCH_CONCURRENCY": "10"})
    assert config.concurrency == 10  # the floors' C may be set apart
    assert config.max_in_flight == 2 * processes * size


@pytest.mark.parametrize(
    ("raw", "named"),
    [("--processes x", "--processes"), ("--pool nope", "--pool"), ("--processes '1", "")],
)
def test_bad_worker_args_are_one_named_error(raw: str, named: str) -> None:
    with pytest.raises(ConfigError, match="BENCH_WORKER_ARGS") as caught:
        load_config({"BENCH_WORKER_ARGS": raw})
    assert named in str(caught.value)


def _within(seconds: float, condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_tree_cpu_counts_a_grandchild_that_spins() -> None:
    spin = "import time\nend = time.process_time() + 2\nwhile time.process_time() < end: pass"
    code = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {spin!r}])"
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        assert _within(20, lambda: len(process_tree(parent.pid)) == 2)
        child = process_tree(parent.pid)[1]
        # The parent only waits: what the tree spends beyond it is its child's spinning.
        assert _within(20, lambda: tree_cpu_seconds(parent.pid) >= 0.3)
        assert tree_cpu_seconds(parent.pid) >= process_cpu_seconds(child)
        assert process_cpu_seconds(parent.pid) < 0.3
    finally:
        parent.kill()
        parent.wait()
