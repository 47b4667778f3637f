"""Series of bench runs, one table each: ``make bench-configs`` and ``make bench-scale``.

- ``python -m bench.series configs``: the worker under a few ``billing worker`` option sets
  (``BENCH_CONFIGS``, separated by ``;``; the empty one is the default command), each with
  the no-op messages of the same command, beside the raw and same-writes floors measured
  once. It answers whether the default is within 10 % of the best configuration found.
- ``python -m bench.series scale``: the default worker at each N of ``BENCH_SCALE_NS``
  (2,000, 20,000 and 100,000), to see how cost grows: throughput, CPU per charge, sweep
  speed, Redis peak above idle, PostgreSQL transactions and rows per charge. CPU per
  charge and Redis peak must not grow with N. With matplotlib installed (the ``bench``
  extra, which ``make bench-scale`` installs) a PNG plot is written beside the JSON.

Each point is a run of its own (``bench.run.measure_all``: its own Redis, database and
sandbox), so no point sees another's rows or keys. Everything else is as in ``make bench``
(``BENCH_*`` variables, ``bench/README.md``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.config import MB, Config, console, load_config
from bench.report import broker_memory
from bench.run import measure_all, measurement
from billing.errors import BillingError, ConfigError

DEFAULT_CONFIGS = "; --processes 1 --concurrency 64; --processes 2 --concurrency 32; --pool gevent"
DEFAULT_SCALE = "2000,20000,100000"
#: The issue's target: the default command within 10 % of the best configuration's throughput.
WITHIN = 0.9


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _stamp() -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}"


def _write(results: Mapping[str, Any], directory: Path, name: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return path


def config_list(env: Mapping[str, str]) -> list[str]:
    """The option sets of ``BENCH_CONFIGS``; gevent's are left out when it is not installed."""
    raw = env.get("BENCH_CONFIGS", DEFAULT_CONFIGS)
    found = [part.strip() for part in raw.split(";")]
    if importlib.util.find_spec("gevent") is None:
        skipped = [args for args in found if "gevent" in args]
        if skipped:
            console.log(f"gevent is not installed: skipping {', '.join(skipped)}")
        found = [args for args in found if "gevent" not in args]
    if not found:
        raise ConfigError("BENCH_CONFIGS: no configuration to run")
    return found


def scale_list(env: Mapping[str, str]) -> list[int]:
    """The N of ``BENCH_SCALE_NS`` (comma-separated whole numbers, at least 1)."""
    raw = env.get("BENCH_SCALE_NS", DEFAULT_SCALE)
    try:
        values = [int(part.strip().replace("_", "")) for part in raw.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"BENCH_SCALE_NS: {raw!r} is not a list of whole numbers") from None
    if not values or min(values) < 1:
        raise ConfigError(f"BENCH_SCALE_NS: {raw!r} must list N of at least 1")
    return values


# --- make bench-configs -------------------------------------------------------------------


def configs(env: Mapping[str, str]) -> tuple[dict[str, Any], Table]:
    """Ours and the no-op at each configuration; both floors once, with the first."""
    rows: list[dict[str, Any]] = []
    floors: dict[str, dict[str, Any]] = {}
    for index, args in enumerate(config_list(env)):
        config = load_config({**env, "BENCH_WORKER_ARGS": args})
        keys = ["ours", "noop", *(["floor", "writes"] if index == 0 else [])]
        parts = measure_all(config, [measurement(key) for key in keys])
        floors = floors or {key: parts[key] for key in ("floor", "writes")}
        rows.append({"config": _shape(config), "ours": parts["ours"], "noop": parts["noop"]})
    best = max(row["ours"]["throughput"] for row in rows)
    default = next((row for row in rows if not row["config"]["args"]), None)
    results = {
        "started_at": datetime.now(UTC).isoformat(),
        "configs": rows,
        "floors": floors,
        "default_vs_best": default["ours"]["throughput"] / best if default else None,
    }
    table = Table(
        title=f"make bench-configs: N={rows[0]['config']['n']:,}, "
        f"latency {rows[0]['config']['latency_ms']:g} ms",
        caption=f"floors at C={rows[0]['config']['concurrency']}: raw "
        f"{floors['floor']['throughput']:,.1f} charges/s, "
        f"{floors['floor']['cpu_per_charge_ms']:.2f} ms CPU/charge; same writes "
        f"{floors['writes']['throughput']:,.1f} charges/s, "
        f"{floors['writes']['cpu_per_charge_ms']:.2f} ms CPU/charge",
    )
    headings = (
        "billing worker", "processes x pool", "charges/s", "vs best", "vs raw floor",
        "CPU/charge (ms)", "vs same writes", "no-op msg/s", "no-op CPU/msg (ms)",
    )  # fmt: skip
    for heading in headings:
        table.add_column(heading, justify="left" if heading == "billing worker" else "right")
    for row in rows:
        ours, shape = row["ours"], row["config"]
        table.add_row(
            shape["args"] or "(default)",
            f"{shape['processes']} x {shape['pool_size']} {shape['pool']}",
            _fmt(ours["throughput"]),
            _fmt(ours["throughput"] / best, 2),
            _fmt(ours["throughput"] / floors["floor"]["throughput"], 2),
            _fmt(ours["cpu_per_charge_ms"], 2),
            _fmt(ours["cpu_per_charge_ms"] / floors["writes"]["cpu_per_charge_ms"], 2),
            _fmt(row["noop"]["messages_per_second"], 0),
            _fmt(row["noop"]["cpu_per_message_ms"], 2),
        )
    return results, table


def _shape(config: Config) -> dict[str, Any]:
    return {
        "args": " ".join(config.worker_args),
        "processes": config.worker_processes,
        "pool": config.pool,
        "pool_size": config.worker_pool_size,
        "concurrency": config.concurrency,
        "n": config.n,
        "latency_ms": config.latency_ms,
    }


# --- make bench-scale ---------------------------------------------------------------------


def scale(env: Mapping[str, str]) -> tuple[dict[str, Any], Table]:
    """The worker at each N; the probe's statements per charge once (they do not depend on N)."""
    points: list[dict[str, Any]] = []
    statements: float | None = None
    for n in scale_list(env):
        config = load_config({**env, "BENCH_N": str(n)})
        keys = ["ours", *(["probe"] if statements is None else [])]
        parts = measure_all(config, [measurement(key) for key in keys])
        if "probe" in parts:
            statements = parts["probe"]["charge"]["statements"]
        ours = parts["ours"]
        points.append(
            {
                "n": n,
                "throughput": ours["throughput"],
                "cpu_per_charge_ms": ours["cpu_per_charge_ms"],
                "sweep_per_second": ours["sweep"]["per_second"],
                "redis_peak_above_idle_mb": broker_memory(ours)[1]["peak_above_idle_bytes"] / MB,
                "memory_label": broker_memory(ours)[0],
                "transactions_per_charge": ours["db"]["commits_per_charge"],
                "rows_written_per_charge": ours["db"]["rows_written_per_charge"],
                "ours": ours,
            }
        )
    results = {
        "started_at": datetime.now(UTC).isoformat(),
        "worker": points[0]["ours"]["worker"]["command"],
        "statements_per_charge": statements,
        "points": points,
    }
    table = Table(
        title=f"make bench-scale: {results['worker']}",
        caption=f"SQL statements per charge (in-process probe, independent of N): "
        f"{_fmt(statements)}",
    )
    headings = (
        "N", "charges/s", "CPU/charge (ms)", "sweep (subs/s)", points[0]["memory_label"],
        "PG transactions/charge", "PG rows written/charge",
    )  # fmt: skip
    for heading in headings:
        table.add_column(heading, justify="right")
    for point in points:
        table.add_row(
            f"{point['n']:,}",
            _fmt(point["throughput"]),
            _fmt(point["cpu_per_charge_ms"], 2),
            _fmt(point["sweep_per_second"], 0),
            _fmt(point["redis_peak_above_idle_mb"], 2),
            _fmt(point["transactions_per_charge"], 2),
            _fmt(point["rows_written_per_charge"], 2),
        )
    return results, table


def plot(points: list[dict[str, Any]], path: Path) -> Path | None:
    """Four panels against N (log scale); None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.log("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return None
    panels = (
        ("throughput", "charges/s"),
        ("cpu_per_charge_ms", "CPU per charge (ms)"),
        ("sweep_per_second", "sweep (subscriptions/s)"),
        # The key predates BENCH_BROKER; the label says which broker's memory it is.
        ("redis_peak_above_idle_mb", points[0].get("memory_label", "Redis peak above idle (MB)")),
    )
    ns = [point["n"] for point in points]
    figure, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, label) in zip(axes.flat, panels, strict=True):
        ax.plot(ns, [point[key] for point in points], marker="o")
        ax.set_xscale("log")
        ax.set_xticks(ns, labels=[f"{n:,}" for n in ns])
        ax.minorticks_off()
        ax.set_xlabel("N (due subscriptions)")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    figure.suptitle("make bench-scale: how cost grows with N")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    series: dict[str, Callable[[Mapping[str, str]], tuple[dict[str, Any], Table]]] = {
        "configs": configs,
        "scale": scale,
    }
    if len(args) != 1 or args[0] not in series:
        console.print(f"error: usage: python -m bench.series {'|'.join(series)}")
        return 2
    env = dict(os.environ)
    try:
        results_dir = load_config(env).results_dir
        results, table = series[args[0]](env)
    except BillingError as exc:
        console.print(f"[red]bench failed:[/red] {exc}", soft_wrap=True)
        return exc.exit_code
    out = Console()
    out = out if out.width >= 120 else Console(width=120)
    out.print(table)
    stem = f"{_stamp()}-{args[0]}"
    results_dir.mkdir(parents=True, exist_ok=True)
    if args[0] == "scale":
        picture = plot(results["points"], results_dir / f"{stem}.png")
        results["plot"] = str(picture) if picture else None
        if picture:
            console.print(f"plot written to {picture}")
    else:
        ratio = results["default_vs_best"]
        if ratio is not None:
            verdict = "met" if ratio >= WITHIN else "missed"
            out.print(
                f"default billing worker: {ratio:.2f} x the best throughput ({verdict}, "
                f"target >= {WITHIN})"
            )
    path = _write(results, results_dir, f"{stem}.json")
    console.print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
