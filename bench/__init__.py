"""``make bench``: the worker's throughput and costs beside the least the machine can do.

One module per role: ``bench.run`` is the entry point (``python -m bench.run``) and the
list of measurements; ``bench.config`` reads ``BENCH_*``; ``bench.context`` starts the
run's Redis, database and sandbox (``billing.harness``); ``bench.ours`` measures the real
worker; ``bench.floor`` holds the yardsticks and ``bench.yardsticks`` runs them;
``bench.probe`` counts SQL statements in process; ``bench.measure`` reads PostgreSQL's and
Redis's counters; ``bench.report`` judges the targets, prints the table and writes the
JSON. ``bench/README.md`` explains every figure.
"""
