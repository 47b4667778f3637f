"""``make bench``: the worker's throughput and costs beside the least the machine can do.

One module per role: ``bench.run`` is the entry point (``python -m bench.run``) and the
list of measurements; ``bench.config`` reads ``BENCH_*``; ``bench.context`` starts the
run's Redis, database and sandbox (``billing.harness``); ``bench.ours`` measures the real
``billing worker`` and ``bench.noop`` Celery's own cost per message through it;
``bench.floor`` holds the raw floor and the sequential script, ``bench.samewrites`` the
same-writes floor, and ``bench.yardsticks`` runs them; ``bench.probe`` counts SQL
statements in process; ``bench.measure`` reads PostgreSQL's and Redis's counters;
``bench.profiling`` is ``BENCH_PROFILE=1``; ``bench.series`` runs ``make bench-configs``
and ``make bench-scale``; ``bench.report`` judges the targets, prints the table and writes
the JSON. ``bench/README.md`` explains every figure.
"""
