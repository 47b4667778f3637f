# Every target creates .venv and installs the project on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo console screenshots test test-slow test-rabbitmq lint format bench bench-smoke bench-smoke-rabbitmq bench-configs bench-scale chaos clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,redbeat]'
	touch $(STAMP)

# The bench's optional extra (matplotlib, for bench-scale's plot), on top of the above.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,redbeat,bench]'
	touch $(BENCH_STAMP)

# The README's first command: sandbox, worker and beat as real processes, in under a minute.
demo: $(STAMP)
	$(VENV)/bin/billing demo

# The demo, then its sandbox, worker and beat keep running with the web console beside them;
# it prints the console's URL and a demo account. Ctrl-C stops everything.
console: $(STAMP)
	$(VENV)/bin/billing demo --serve

# The README's pictures of the console (docs/screenshots/), from a seeded database, with
# Debian's Chromium at /usr/bin/chromium.
screenshots: $(STAMP)
	$(PY) -m billing.web.screenshots docs/screenshots

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The invariant tests again, with every worker on RabbitMQ (a virtual host per test) instead
# of Redis, and test 6 on a RabbitMQ node of its own that it kills; test 9 (a thousand
# charges: throughput, not the broker) runs on Redis only, to keep this within about four
# minutes. tests/test_brokers.py runs both brokers in test-slow.
test-rabbitmq: $(STAMP)
	TEST_BROKER=rabbitmq $(PY) -m pytest -q -m slow tests/test_invariants.py -k "not test_9_"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy billing tasks schedules chaos bench

# One run on this machine: the default `billing worker` beside Celery's no-op cost, the
# same-writes floor, the raw floor and the sequential script. BENCH_N, BENCH_LATENCY_MS,
# BENCH_WORKER_ARGS, BENCH_PROFILE=1 (and more, see bench/README.md) change it.
bench: $(STAMP)
	$(PY) -m bench.run

# The same run, small enough for CI: it fails when the run fails, never on a slow machine.
bench-smoke: $(STAMP)
	BENCH_N=300 BENCH_SEQUENTIAL_N=40 BENCH_PROBE_N=40 $(PY) -m bench.run

# The same on RabbitMQ (BENCH_BROKER=amqp): a virtual host of its own on the machine's
# RabbitMQ, created and deleted by the run.
bench-smoke-rabbitmq: $(STAMP)
	BENCH_BROKER=amqp BENCH_N=300 BENCH_SEQUENTIAL_N=40 BENCH_PROBE_N=40 $(PY) -m bench.run

# The worker under a few `billing worker` option sets (BENCH_CONFIGS), one table.
bench-configs: $(STAMP)
	$(PY) -m bench.series configs

# How cost grows: the default worker at N = 2,000 / 20,000 / 100,000 (BENCH_SCALE_NS),
# one table and a PNG plot beside the JSON in bench/results/.
bench-scale: $(BENCH_STAMP)
	$(PY) -m bench.series scale

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# Fault run (issue 8): 5,000 due subscriptions, 3 workers, 2 beats, SIGKILLs, a Redis
# restart, cut PostgreSQL connections and a misbehaving sandbox; then the sandbox's call log
# is set beside the ledger. CHAOS_N, CHAOS_SEED, CHAOS_DURATION, CHAOS_DEADLINE override.
.PHONY: chaos-small chaos-rabbitmq chaos-small-rabbitmq
chaos: $(STAMP)
	$(PY) -m chaos.run

# The same with 500 subscriptions, within three minutes: part of CI.
chaos-small: $(STAMP)
	CHAOS_N=500 CHAOS_DURATION=100 CHAOS_DEADLINE=170 $(PY) -m chaos.run

# Both again on RabbitMQ: a node of the run's own (root, or the rabbitmq user, starts it),
# killed with SIGKILL where the Redis run kills Redis. chaos-small-rabbitmq is part of CI.
chaos-rabbitmq: $(STAMP)
	CHAOS_BROKER=rabbitmq $(PY) -m chaos.run

chaos-small-rabbitmq: $(STAMP)
	CHAOS_BROKER=rabbitmq CHAOS_N=500 CHAOS_DURATION=100 CHAOS_DEADLINE=170 $(PY) -m chaos.run
