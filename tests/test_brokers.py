"""Both brokers, with real worker processes: what each does with a message that kills its
worker every time, and (RabbitMQ) how a countdown travels on a quorum queue.

- A poison message (a task that kills its worker process on every delivery) ends as a dead
  letter after the delivery limit — RabbitMQ's quorum queue counts, on Redis the task base
  class does — and is not delivered again, while the worker keeps charging everything else.
  A poison *charge* message (its worker dies before the claim) also moves its charge to the
  failed-charge queue (``poison``), so that the engine sweep never sends it again.
- On RabbitMQ a not-sent charge's retry countdown travels through Celery's native delayed
  delivery (the topic exchange): it arrives on time, more than twice in a row (celery#10111:
  the routing key used to grow with each retry until the message was stuck), is not lost
  (celery#9912: messages stuck in a ``celery_delayed_*`` queue when nothing bound the
  billing queue to the delivery exchange), and does not hold a worker meanwhile: a worker
  with one thread keeps charging others while the retry waits.
- On RabbitMQ a message the broker confirmed is still in the quorum queue after the node
  was stopped cleanly and after it was killed (a node of the test's own).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from itertools import pairwise
from pathlib import Path

import pytest
from kombu import Connection, Queue
from sqlalchemy import select

from billing import broker
from billing.db import session_scope
from billing.harness.base import billing_command
from billing.harness.rabbitmq import RabbitNode, RabbitVhost, can_start_nodes
from billing.models import Charge, ChargeState, DeadLetter, LedgerEntry, Subscription, utcnow
from billing.settings import Settings
from tasks.app import POISON_TASKS_ENV
from tasks.poison import EXIT_PROCESS, POISON_CHARGES_ENV
from tests.fixtures.processes import Cluster, wait_until
from tests.test_invariants import _env_for, _one_call_per_alias, _queued, _states, _subscribe

pytestmark = pytest.mark.slow

LIMIT = 2


def _send(cluster: Cluster, name: str, *args: object) -> str:
    settings = Settings(
        broker_url=cluster.env["BILLING_BROKER_URL"],
        queue=cluster.env["BILLING_QUEUE"],
        delivery_limit=int(cluster.env.get("BILLING_DELIVERY_LIMIT", "5")),
    )
    return broker.send_task(settings, name, list(args), {})


def _runs(marker: Path) -> int:
    return len(marker.read_text().splitlines()) if marker.exists() else 0


def test_a_poison_message_is_dead_lettered_after_the_limit_and_charging_goes_on(
    broker_url, cluster, gateway, pg_url, tmp_path, request
):
    _env_for(
        cluster, gateway, BILLING_BROKER_URL=broker_url, BILLING_DELIVERY_LIMIT=str(LIMIT),
        **{POISON_TASKS_ENV: "1"},
    )  # fmt: skip
    source = "rabbitmq" if broker.is_amqp(broker_url) else "redis"
    aliases = gateway.seed_aliases("1234567", 20)
    gateway.set_latency(50)
    cluster.worker("w1", pool="prefork", concurrency=2)
    marker = tmp_path / "poison-runs"
    task_id = _send(cluster, EXIT_PROCESS, str(marker))
    _subscribe(pg_url, aliases)
    cluster.beat("b1")  # its engine sweep also moves RabbitMQ's dead letters to the table

    wait_until(lambda: _states(pg_url)[ChargeState.APPROVED] == 20, timeout=90)
    wait_until(lambda: len(_letters(pg_url)) == 1, timeout=60)
    runs = _runs(marker)
    time.sleep(4)  # nothing delivers it again

    # Delivered once, then again after each of LIMIT deaths: LIMIT + 1 worker processes.
    assert runs == _runs(marker) == LIMIT + 1
    assert cluster.log("w1").count("WorkerLostError") >= LIMIT + 1
    _one_call_per_alias(gateway, aliases)
    (letter,) = _letters(pg_url)
    assert (letter.task_name, letter.task_id, letter.source) == (EXIT_PROCESS, task_id, source)
    assert letter.args == {"args": [str(marker)], "kwargs": {}}
    assert f"dead-lettered by {'RabbitMQ' if source == 'rabbitmq' else 'the workers'}" in (
        letter.exc_message
    )
    assert letter.exc_message.startswith(f"{LIMIT + 1} deliveries ended without the task")
    if source == "rabbitmq":
        vhost: RabbitVhost = request.getfixturevalue("rabbit")
        dead = broker.dead_letter_queue(cluster.env["BILLING_QUEUE"])
        assert vhost.messages(dead) == 0  # moved to the table, not copied

    # One view: the letter is listed with where it came from, and requeued like any other.
    listed = json.loads(_billing(cluster, "deadletters", "list", "--json"))
    assert [(row["id"], row["source"]) for row in listed] == [(letter.id, source)]
    assert "delivery limit" in listed[0]["from"]
    assert f"dead letter {letter.id}: {EXIT_PROCESS} sent again" in _billing(
        cluster, "deadletters", "requeue", str(letter.id), "--by", "tester"
    )
    # Sent again, it kills its workers again, LIMIT + 1 times, and is dead-lettered again.
    wait_until(lambda: len(_letters(pg_url)) == 2, timeout=60)
    assert _runs(marker) == 2 * (LIMIT + 1)
    again = _letters(pg_url)[1]
    assert (again.task_name, again.source) == (EXIT_PROCESS, source)
    assert again.task_id != task_id


#: Seconds a charge stays ``queued`` before the engine sweep sends it again, in the test of
#: a poison charge: far longer than its LIMIT + 1 deaths take (a few seconds, more on a busy
#: machine: a re-send before the charge failed would be delivered and killed again), short
#: enough to wait out.
REQUEUE_AFTER = 30


def test_a_poison_charge_ends_in_the_failed_queue_and_is_not_sent_again(
    broker_url, cluster, gateway, pg_url, tmp_path
):
    poisoned = tmp_path / "poison-charges"
    _env_for(
        cluster, gateway, BILLING_BROKER_URL=broker_url, BILLING_DELIVERY_LIMIT=str(LIMIT),
        BILLING_REQUEUE_AFTER_SECONDS=str(REQUEUE_AFTER),
        **{POISON_TASKS_ENV: "1", POISON_CHARGES_ENV: str(poisoned)},
    )  # fmt: skip
    aliases = gateway.seed_aliases("1234567", 3)
    _subscribe(pg_url, aliases)
    ids = sorted(_queued(pg_url, gateway))
    queued_at = time.monotonic()
    poison = ids[0]
    poisoned.write_text(f"{poison}\n")
    for charge_id in ids:
        _send(cluster, broker.CHARGE_TASK, charge_id)
    cluster.worker("w1", pool="prefork", concurrency=2)
    cluster.beat("b1")  # the engine sweep: requeue_lost, and (RabbitMQ) the drain

    wait_until(lambda: _charge(pg_url, poison).state == ChargeState.FAILED, timeout=90)
    wait_until(lambda: _states(pg_url)[ChargeState.APPROVED] == 2, timeout=60)
    # Past the cutoff, and a few engine sweeps more: nothing sends it again.
    time.sleep(max(0.0, queued_at + REQUEUE_AFTER + 5 - time.monotonic()))

    runs = poisoned.with_name(poisoned.name + ".runs").read_text().splitlines()
    assert len(runs) == LIMIT + 1 and {r.split()[0] for r in runs} == {str(poison)}, runs
    charge = _charge(pg_url, poison)
    assert (charge.state, charge.reason) == (ChargeState.FAILED, "poison")
    (letter,) = _letters(pg_url)
    assert (letter.task_name, letter.args["args"]) == (broker.CHARGE_TASK, [poison])
    assert f"dead letter {letter.id}" in (charge.last_message or "")
    assert gateway.calls(alias=aliases[ids.index(poison)], script="duplicate") == []
    _one_call_per_alias(gateway, aliases)
    failed = json.loads(_billing(cluster, "failed", "list", "--json"))
    assert [(row["charge_id"], row["reason"]) for row in failed] == [(poison, "poison")]
    poisoned.write_text("")  # the cause is fixed
    # A requeued letter meets a failed charge: the task leaves it, and the CLI says so.
    said = _billing(cluster, "deadletters", "requeue", str(letter.id), "--by", "tester")
    assert f"charge {poison} is failed (poison)" in said
    assert f"billing failed retry {poison}" in said
    # A person's retry sends it, as for any failed charge.
    _billing(cluster, "failed", "retry", str(poison), "--by", "tester")
    wait_until(lambda: _charge(pg_url, poison).state == ChargeState.APPROVED, timeout=60)
    _one_call_per_alias(gateway, aliases)


def _charge(url: str, charge_id: int) -> Charge:
    with session_scope(url) as session:
        return session.get_one(Charge, charge_id)


def _billing(cluster: Cluster, *args: str) -> str:
    done = subprocess.run(
        billing_command(*args), env=cluster.env, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def _letters(url: str) -> list[DeadLetter]:
    with session_scope(url) as session:
        return list(session.scalars(select(DeadLetter).order_by(DeadLetter.id)))


def _not_sent_env(cluster: Cluster, gateway, rabbit: RabbitVhost, backoff: str) -> None:
    _env_for(
        cluster, gateway, BILLING_BROKER_URL=rabbit.url,
        BILLING_NOT_SENT_BACKOFF_BASE=backoff, BILLING_NOT_SENT_BACKOFF_CAP=backoff,
        # Only the delayed message can bring a retry back: no sweep re-sends it meanwhile.
        BILLING_REQUEUE_AFTER_SECONDS="300",
    )  # fmt: skip


def _gaps(entries: list[LedgerEntry]) -> list[float]:
    return [(later.at - earlier.at).total_seconds() for earlier, later in pairwise(entries)]


def test_a_retry_s_countdown_does_not_hold_the_worker_meanwhile(rabbit, cluster, gateway, pg_url):
    """One worker thread: a countdown held by the worker (what Celery does for a quorum
    queue on a direct exchange) would stop every other charge until it is due."""
    _not_sent_env(cluster, gateway, rabbit, backoff="10")  # a countdown of 5 to 10 s
    (slow, *others) = gateway.seed_aliases("1234567", 11)
    gateway.set_behaviour(slow, unavailable=1)  # one call not sent (503), then approved
    (slow_sub,) = _subscribe(pg_url, [slow])
    cluster.worker("w1", concurrency=1)
    cluster.beat("b1")
    wait_until(lambda: _outcomes(pg_url, slow_sub) == ["not_sent"], timeout=30, step=0.05)
    _subscribe_more(pg_url, others)

    wait_until(lambda: _states(pg_url)[ChargeState.APPROVED] == 11, timeout=60)

    entries = _ledger(pg_url)
    retried = [e for e in entries if e.subscription_id == slow_sub]
    assert [e.outcome for e in retried] == ["not_sent", "approved"]
    (gap,) = _gaps(retried)
    assert 5 <= gap <= 10 + 5, gap  # on time: not early, not lost (no re-send for 300 s)
    others_at = [e.at for e in entries if e.subscription_id != slow_sub]
    assert len(others_at) == 10
    # The ten others were charged while the retry waited, by the worker's only thread.
    assert max(others_at) < retried[-1].at
    assert len(gateway.calls(alias=slow, script="duplicate")) == 2
    log = cluster.log("w1")
    assert "re-sending" not in log
    assert "direct exchange" not in log.lower()


def test_five_retries_in_a_row_each_arrive_after_their_countdown(rabbit, cluster, gateway, pg_url):
    """celery#10111: each retry used to add a delay prefix to the routing key until it
    was stuck. Countdowns under a second (0.5-1 s here) are rounded up to one: Celery's
    delayed delivery refuses less and truncates fractions (``broker.countdown``)."""
    _not_sent_env(cluster, gateway, rabbit, backoff="1")
    (alias,) = gateway.seed_aliases("1234567", 1)
    gateway.set_behaviour(alias, unavailable=5)
    (sub_id,) = _subscribe(pg_url, [alias])
    cluster.worker("w1", concurrency=2)
    cluster.beat("b1")

    wait_until(lambda: _states(pg_url)[ChargeState.APPROVED] == 1, timeout=60)

    retried = _ledger(pg_url)
    assert [e.outcome for e in retried] == ["not_sent"] * 5 + ["approved"]
    assert all(0.95 <= gap <= 6 for gap in _gaps(retried)), _gaps(retried)
    assert len(gateway.calls(alias=alias, script="duplicate")) == 6
    assert "re-sending" not in cluster.log("w1")
    assert sub_id == retried[-1].subscription_id


def _subscribe_more(url: str, aliases: list[str]) -> None:
    """More due subscriptions, with references of their own (``_subscribe`` numbers its)."""
    due = utcnow() - timedelta(minutes=1)
    with session_scope(url) as session:
        session.add_all(
            Subscription(
                external_ref=f"other-{uuid.uuid4().hex[:8]}", plan="monthly", alias=alias,
                customer_ip="203.0.113.9", anchor_at=due, next_period=0, next_charge_at=due,
                status="active",
            )
            for alias in aliases
        )  # fmt: skip


def _ledger(url: str) -> list[LedgerEntry]:
    with session_scope(url) as session:
        return list(session.scalars(select(LedgerEntry).order_by(LedgerEntry.id)))


def _outcomes(url: str, sub_id: int) -> list[str]:
    return [e.outcome for e in _ledger(url) if e.subscription_id == sub_id]


def test_a_dead_letter_is_moved_from_rabbitmq_once_even_when_its_message_comes_twice(
    rabbit, pg_url
):
    """The drain acknowledges a message after its letter committed: a drain that died in
    between leaves it for the next, which must not store it twice."""
    settings = Settings(
        broker_url=rabbit.url, database_url=pg_url, queue=f"q-{uuid.uuid4().hex[:6]}"
    )
    app = broker.sending_app(settings)
    headers = {
        "task": broker.CHARGE_TASK, "id": "dead-1", "retries": 0,
        "x-first-death-reason": "delivery_limit",
    }  # fmt: skip
    with app.connection_for_write() as connection:
        broker.declare_dead_letters(connection, settings)
        producer = connection.Producer()
        for _ in range(2):  # the same message twice
            producer.publish(
                [[41], {}, {}], exchange=broker.DEAD_LETTER_EXCHANGE,
                routing_key=settings.queue, headers=headers, serializer="json",
            )  # fmt: skip

    moved = broker.drain_dead_letters(settings)

    assert len(moved) == 1 and broker.drain_dead_letters(settings) == []
    assert rabbit.messages(broker.dead_letter_queue(settings.queue)) == 0
    (letter,) = _letters(pg_url)
    assert (letter.id, letter.task_name, letter.task_id) == (moved[0], "billing.charge", "dead-1")
    assert (letter.source, letter.args) == ("rabbitmq", {"args": [41], "kwargs": {}})
    assert "dead-lettered by RabbitMQ (delivery_limit)" in letter.exc_message
    # Redis has no dead-letter queue: nothing to move, no connection made.
    assert broker.drain_dead_letters(Settings(broker_url="redis://127.0.0.1:1/0")) == []


@pytest.fixture
def node(tmp_path: Path) -> Iterator[RabbitNode]:
    """A RabbitMQ node of this test's own: it is killed, which nobody else may feel."""
    if not can_start_nodes():
        if os.environ.get("BILLING_REQUIRE_RABBITMQ"):
            pytest.fail("a RabbitMQ node of the test's own cannot be started here")
        pytest.skip("a RabbitMQ node of the test's own needs rabbitmq-server and root")
    with RabbitNode(tmp_path) as started:
        yield started


def _ready(url: str, queue: Queue) -> int:
    with Connection(url) as connection, connection.channel() as channel:
        return int(queue.bind(channel).queue_declare(passive=True).message_count)


def test_charge_messages_rabbitmq_confirmed_survive_a_clean_restart_and_a_crash(node):
    """A send returns once RabbitMQ confirmed the message into the quorum queue, so what
    was sent is still there after ``rabbitmqctl stop`` and after a SIGKILL of the node."""
    settings = Settings(broker_url=node.url, queue=f"q-{uuid.uuid4().hex[:6]}", charge_batch=4)
    app = broker.sending_app(settings)
    queue = broker.billing_queue(settings)

    broker.send_charges(app, list(range(1, 11)), settings.charge_batch)  # 3 messages
    node.settle()  # a clean stop and start (and the queue's registration on disk)
    wait_until(lambda: _ready(node.url, queue) >= 3, timeout=30)
    assert _ready(node.url, queue) == 3

    broker.send_charges(app, list(range(11, 19)), settings.charge_batch)  # 2 more
    node.restart()  # SIGKILL: nothing flushed on the way out

    # Right after a restart a quorum queue may still be replaying its log: its count
    # catches up within moments (and must reach every message confirmed).
    wait_until(lambda: _ready(node.url, queue) >= 5, timeout=30)
    assert _ready(node.url, queue) == 5
    with Connection(node.url) as connection, connection.channel() as channel:
        bodies = []
        while (message := queue.bind(channel).get(no_ack=True, accept=["json"])) is not None:
            bodies.append(message.decode()[0])
    sent = sorted(i for args in bodies for i in (args[0] if isinstance(args[0], list) else args))
    assert sent == list(range(1, 19))


def test_a_letter_rabbitmq_dead_lettered_for_another_reason_fails_no_charge(
    rabbit, pg_url, gateway, make_harness
):
    """Only the delivery limit makes a message poison. One RabbitMQ dead-lettered because a
    worker rejected it (Celery rejects a message with a bad ``eta`` without requeueing it)
    is kept as a letter, and the charges it names are left queued — anyone who can publish
    a message naming charge IDs must not be able to fail them."""
    h = make_harness(pg_url)
    (alias,) = gateway.seed_aliases("1234567", 1)
    h.subscribe("shop-1", alias)
    h.engine.sweep_plan("monthly")
    (charge_id,) = h.take_sent()
    settings = Settings(
        broker_url=rabbit.url, database_url=pg_url, queue=f"q-{uuid.uuid4().hex[:6]}"
    )
    headers = {
        "task": broker.CHARGE_BATCH_TASK, "id": "rejected-1", "retries": 0,
        "x-first-death-reason": "rejected",
    }  # fmt: skip
    with broker.sending_app(settings).connection_for_write() as connection:
        broker.declare_dead_letters(connection, settings)
        connection.Producer().publish(
            [[[charge_id]], {}, {}], exchange=broker.DEAD_LETTER_EXCHANGE,
            routing_key=settings.queue, headers=headers, serializer="json",
        )  # fmt: skip

    (letter_id,) = broker.drain_dead_letters(settings)

    assert h.charge(h.charge_sub(charge_id)).state == ChargeState.QUEUED
    (letter,) = _letters(pg_url)
    assert letter.id == letter_id and "rejected" in letter.exc_message
    assert h.engine.charge(charge_id).status == "done"  # its real message still charges it
