"""``billing worker`` and ``billing beat``: the Celery processes, started with the project's
settings after the plans file has been validated (an invalid file stops them with the
same named errors as ``billing plans check``)."""

from __future__ import annotations

from typing import Annotated

import typer

from billing.cli import params
from billing.plans import load_plans
from billing.settings import get_settings

CELERY_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}
#: The largest pool a worker is started with: far more than the cores of any machine here.
MAX_CONCURRENCY = 1024

LogLevel = Annotated[str, params.option("--loglevel", params.TEXT, "-l", help="Celery log level.")]


def _validated() -> None:
    settings = get_settings()
    load_plans(settings.plans_file)


def worker(
    ctx: typer.Context,
    pool: Annotated[
        str,
        params.option("--pool", params.TEXT, help="Celery pool: prefork, threads, solo, gevent."),
    ] = "prefork",
    concurrency: Annotated[
        int,
        params.option(
            "--concurrency",
            params.count(0, MAX_CONCURRENCY),
            "-c",
            help="Pool size (0: CPU count).",
        ),
    ] = 0,
    loglevel: LogLevel = "INFO",
) -> None:
    """Run a worker that charges, retries and sweeps. Extra arguments go to Celery."""
    _validated()
    from tasks.app import app

    argv = [
        "worker",
        f"--pool={pool}",
        f"--loglevel={loglevel}",
        f"--queues={get_settings().queue}",
    ]
    if concurrency:
        argv.append(f"--concurrency={concurrency}")
    app.worker_main(argv + list(ctx.args))


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
    from tasks.app import app

    argv = ["beat", f"--loglevel={loglevel}"]
    if redbeat:
        app.conf.redbeat_redis_url = get_settings().effective_redis_url
        argv.append("--scheduler=redbeat.RedBeatScheduler")
    app.start(argv + list(ctx.args))


def register(app: typer.Typer) -> None:
    app.command(context_settings=CELERY_ARGS)(worker)
    app.command(context_settings=CELERY_ARGS)(beat)
