"""The bench's settings: what one run measures, from ``BENCH_*`` variables, and its constants.

Everything a run is told comes from the environment (``make bench`` and ``make bench-smoke``
set a few; ``bench/README.md`` lists them all), read once into a frozen ``Config``; a bad
value is a ``ConfigError`` naming the variable. The plan, merchant and key every phase uses
are here too, so that each module of the bench speaks of the same ones.
"""

from __future__ import annotations

import importlib.util
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from billing.errors import BillingError, ConfigError
from billing.harness.databases import DEFAULT_ADMIN_URL
from billing.supervisor import worker_shape

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"

PLAN, PROBE_PLAN = "bench", "probe"
#: The subscriptions of the "same writes" floor: never swept (no worker runs meanwhile).
WRITES_PLAN = "writes"
MERCHANT_ID, PRIVATE_KEY, KEY_ENV = "1234567", "bench-key", "BENCH_KEY_EUR"
CUSTOMER_IP = "203.0.113.9"
#: The sweep is sent by the bench, as beat would send it at month start; the cron line
#: only keeps the plans file valid (no beat runs).
PLANS_TOML = f"""
[accounts.EUR]
merchant_id = "{MERCHANT_ID}"
private_key_env = "{KEY_ENV}"

[plans.{PLAN}]
amount = "29.90"
currency = "EUR"
every = "1 month"
sweep = "0 3 1 * *"
timezone = "UTC"

[plans.{PROBE_PLAN}]
amount = "29.90"
currency = "EUR"
every = "1 month"
sweep = "0 3 1 * *"
timezone = "UTC"
"""
MB = 1024 * 1024
#: ``BENCH_BROKER``: the run's own ``redis-server`` (the default), or ``amqp``: a fresh
#: virtual host on the machine's RabbitMQ, with the project's RabbitMQ configuration.
BROKERS = ("redis", "amqp")
#: Below this share of approved charges a run measures a misconfiguration, not the worker.
#: Above it, the odd ``unknown`` (an answer lost under load) is reported, not fatal.
MIN_APPROVED = 0.99

#: Progress goes to stderr; the table and the results path to stdout.
console = Console(stderr=True)


class BenchFailed(BillingError):
    """The run could not be measured: a process failed or charges did not settle."""


@dataclass(frozen=True)
class Config:
    """What to run, from ``BENCH_*`` variables; each default is the issue's setting."""

    n: int = 20_000
    #: The broker of the workers, the sweep and the no-op row: one of ``BROKERS``.
    broker: str = "redis"
    latency_ms: float = 50.0
    #: C: the worker's calls at a time in all (processes x pool size), and the floors' threads.
    concurrency: int = 64
    #: Extra arguments of ``billing worker`` (``BENCH_WORKER_ARGS``); none: the default command.
    worker_args: tuple[str, ...] = ()
    #: What those arguments start: processes, the pool of each and its size.
    worker_processes: int = 2
    pool: str = "threads"
    worker_pool_size: int = 32
    max_in_flight: int = 128
    sequential_n: int = 500
    probe_n: int = 200
    #: No-op messages sent to the worker to measure Celery's own cost per message.
    noop_n: int = 20_000
    #: ``BENCH_PROFILE=1``: one worker process runs under cProfile; the top goes to results.
    profile: bool = False
    timeout: float = 1_120.0
    pg_admin_url: str = DEFAULT_ADMIN_URL
    strict: bool = False
    keep: bool = False
    results_dir: Path = RESULTS_DIR


def _int(env: Mapping[str, str], name: str, default: int, least: int = 1) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a whole number") from None
    if value < least:
        raise ConfigError(f"{name}: must be at least {least}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a number") from None
    if value < 0:
        raise ConfigError(f"{name}: must not be negative, got {value:g}")
    return value


#: The options of ``billing worker`` that decide its shape, and the names they go by.
_SHAPE_OPTIONS = {
    "--processes": "processes",
    "--pool": "pool",
    "--concurrency": "concurrency",
    "-c": "concurrency",
}


def worker_options(args: Sequence[str]) -> dict[str, str]:
    """``--processes``, ``--pool`` and ``--concurrency`` (or ``-c``) of ``billing worker``
    arguments, each as given (``--name value`` or ``--name=value``); the last one counts."""
    found: dict[str, str] = {}
    items = iter(args)
    for arg in items:
        name, sep, value = arg.partition("=")
        if name not in _SHAPE_OPTIONS:
            continue
        if not sep:
            value = next(items, "")
        found[_SHAPE_OPTIONS[name]] = value
    return found


def parse_worker_args(raw: str) -> tuple[tuple[str, ...], int, str, int]:
    """``BENCH_WORKER_ARGS`` -> (the arguments, processes, pool, pool size of each process).

    The shape is the one ``billing worker`` itself derives (``billing.supervisor.worker_shape``);
    the command checks every other argument when it starts.
    """
    try:
        args = tuple(shlex.split(raw))
    except ValueError as exc:
        raise ConfigError(f"BENCH_WORKER_ARGS: {exc}") from None
    options = worker_options(args)
    numbers: dict[str, int] = {}
    for name in ("processes", "concurrency"):
        value = options.get(name, "0")
        if not value.isdigit():
            raise ConfigError(f"BENCH_WORKER_ARGS: --{name} {value!r} is not a whole number")
        numbers[name] = int(value)
    pool = options.get("pool", "threads")
    if pool not in ("threads", "gevent", "prefork", "solo"):
        raise ConfigError(f"BENCH_WORKER_ARGS: --pool {pool!r} is not a pool of billing worker")
    if pool == "gevent" and importlib.util.find_spec("gevent") is None:
        raise ConfigError("BENCH_WORKER_ARGS: --pool gevent, but gevent is not installed")
    processes, size = worker_shape(numbers["processes"], pool, numbers["concurrency"])
    return args, processes, pool, size


def parse_broker(raw: str) -> str:
    """``BENCH_BROKER`` -> one of ``BROKERS`` (empty: ``redis``); anything else is an error."""
    value = raw.strip()
    if not value:
        return BROKERS[0]
    if value not in BROKERS:
        raise ConfigError(
            f"BENCH_BROKER: {value!r} is not a broker of the bench: "
            + " or ".join(repr(name) for name in BROKERS)
        )
    return value


def load_config(env: Mapping[str, str]) -> Config:
    """Read ``BENCH_*``; a bad value raises ``ConfigError`` naming the variable."""
    n = _int(env, "BENCH_N", 20_000)
    args, processes, pool, size = parse_worker_args(env.get("BENCH_WORKER_ARGS", ""))
    concurrency = _int(env, "BENCH_CONCURRENCY", processes * size)
    return Config(
        n=n,
        broker=parse_broker(env.get("BENCH_BROKER", "")),
        latency_ms=_float(env, "BENCH_LATENCY_MS", 50.0),
        concurrency=concurrency,
        worker_args=args,
        worker_processes=processes,
        pool=pool,
        worker_pool_size=size,
        max_in_flight=_int(env, "BENCH_MAX_IN_FLIGHT", 2 * processes * size),
        sequential_n=min(n, _int(env, "BENCH_SEQUENTIAL_N", 500)),
        probe_n=_int(env, "BENCH_PROBE_N", 200),
        noop_n=_int(env, "BENCH_NOOP_N", n),
        profile=env.get("BENCH_PROFILE", "") == "1",
        # Generous: the run fails on a stall long before this unless it is merely slow.
        timeout=_float(env, "BENCH_TIMEOUT", 120.0 + n / 20),
        pg_admin_url=env.get("BENCH_PG_ADMIN_URL", Config.pg_admin_url),
        strict=env.get("BENCH_STRICT", "") == "1",
        keep=env.get("BENCH_KEEP", "") == "1",
        results_dir=Path(env.get("BENCH_RESULTS_DIR", str(RESULTS_DIR))),
    )
