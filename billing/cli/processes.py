"""``billing worker`` and ``billing beat``: the Celery processes, started with the project's
settings after the plans file has been validated (an invalid file stops them with the
same named errors as ``billing plans check``).

``billing worker`` with no options uses the machine: one Celery worker process per core,
each with a pool of threads, under one supervisor that passes signals on and keeps them
running (``billing.supervisor``). ``billing beat`` becomes ``celery -A tasks beat``.
Both start Celery as separate programs: ``billing`` never imports the task layer.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from billing.cli import params
from billing.durations import quote
from billing.errors import InvalidInput
from billing.plans import load_plans
from billing.ratelimit import require_redis
from billing.settings import get_settings
from billing.supervisor import DEFAULT_THREADS, Supervisor, celery_worker_specs, worker_shape

CELERY_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}
#: The largest pool a worker is started with: far more than the cores of any machine here.
MAX_CONCURRENCY = 1024
#: The most worker processes one supervisor starts.
MAX_PROCESSES = 256
POOLS = ("threads", "prefork", "solo", "gevent")

#: The levels Celery's ``--loglevel`` accepts, in any case.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "FATAL")


def _loglevel(value: str, where: str) -> str:
    level = params.checked_text(value, where).strip().upper()
    if level not in LOG_LEVELS:
        known = ", ".join(LOG_LEVELS)
        raise InvalidInput(f"{where}: {quote(value)} is not one of {known}")
    return level


#: Checked here, so a bad level is one error line of ours and not Celery's usage text.
LOG_LEVEL = params.Kind("LEVEL", _loglevel)
LogLevel = Annotated[str, params.option("--loglevel", LOG_LEVEL, "-l", help="Celery log level.")]


def _validated() -> None:
    settings = get_settings()
    require_redis(load_plans(settings.plans_file).accounts, settings.effective_redis_url)


def worker(
    ctx: typer.Context,
    processes: Annotated[
        int,
        params.option(
            "--processes",
            params.count(0, MAX_PROCESSES),
            help="Worker processes (0: one per core; with --pool prefork, 1).",
        ),
    ] = 0,
    pool: Annotated[
        str,
        params.option(
            "--pool", params.TEXT, help="Celery pool of each process: " + ", ".join(POOLS)
        ),
    ] = "threads",
    concurrency: Annotated[
        int,
        params.option(
            "--concurrency",
            params.count(0, MAX_CONCURRENCY),
            "-c",
            help=f"Pool size of each process (0: {DEFAULT_THREADS} threads; prefork: a core each).",
        ),
    ] = 0,
    loglevel: LogLevel = "INFO",
) -> None:
    """Run the workers that charge, retry and sweep. Extra arguments go to Celery."""
    if pool not in POOLS:
        raise InvalidInput(f"--pool: {pool!r} is not one of {', '.join(POOLS)}")
    _validated()
    count, size = worker_shape(processes, pool, concurrency)
    specs = celery_worker_specs(
        count,
        pool=pool,
        concurrency=size,
        queue=get_settings().queue,
        loglevel=loglevel,
        extra=list(ctx.args),
    )
    raise typer.Exit(Supervisor(specs).run())


def beat(
    ctx: typer.Context,
    redbeat: Annotated[
        bool,
        typer.Option(help="Use RedBeat: a Redis lock keeps a second beat idle (optional extra)."),
    ] = False,
    loglevel: LogLevel = "INFO",
) -> None:
    """Run beat: each plan's sweep on its schedule, and the engine sweep.

    Correctness never depends on a single beat: two beats create the same charge rows
    (a no-op the second time) and the dispatch is serialised in the database.
    """
    _validated()
    argv = [sys.executable, "-m", "celery", "-A", "tasks", "beat", f"--loglevel={loglevel}"]
    if redbeat:
        argv.append("--scheduler=redbeat.RedBeatScheduler")
    # Beat is one process: it becomes Celery's, so signals reach it directly.
    os.execv(sys.executable, [*argv, *ctx.args])


def register(app: typer.Typer) -> None:
    app.command(context_settings=CELERY_ARGS)(worker)
    app.command(context_settings=CELERY_ARGS)(beat)
