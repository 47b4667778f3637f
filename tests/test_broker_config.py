"""What each broker is configured with, without a broker: RabbitMQ gets the quorum queue,
its dead letters and a topic exchange; Redis keeps exactly what it had.

The behaviour behind each value is proven with real workers in ``tests/test_brokers.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from billing import broker
from billing.deliveries import dead_letters_after
from billing.settings import Settings
from tests.fixtures.engine import ENGINE_PLANS

AMQP = "amqp://guest:guest@127.0.0.1:5672//"


def test_rabbitmq_gets_a_quorum_queue_on_a_topic_exchange_with_a_delivery_limit() -> None:
    config = broker.celery_config(Settings(broker_url=AMQP, queue="charges", delivery_limit=7))
    (queue,) = config["task_queues"]
    assert (queue.name, queue.exchange.name, queue.exchange.type) == ("charges", "billing", "topic")
    assert queue.routing_key == "charges"
    assert queue.queue_arguments == {
        "x-queue-type": "quorum",
        "x-delivery-limit": 7,
        "x-dead-letter-exchange": "billing.dead",
        "x-dead-letter-routing-key": "charges",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    assert config["broker_transport_options"] == {"confirm_publish": True}
    assert config["task_default_exchange_type"] == "topic"
    assert config["task_default_queue_type"] == "quorum"
    assert config["worker_detect_quorum_queues"] is True
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    dead = broker.dead_letters_queue(Settings(broker_url=AMQP, queue="charges"))
    assert (dead.name, dead.exchange.name, dead.routing_key) == (
        "charges.dead", "billing.dead", "charges",
    )  # fmt: skip


def test_redis_keeps_its_configuration() -> None:
    config = broker.celery_config(Settings(broker_url="redis://127.0.0.1:6379/0"))
    assert config["broker_transport_options"] == {"visibility_timeout": 3600}
    assert not {"task_queues", "task_default_queue_type", "task_default_exchange"} & set(config)


@pytest.mark.parametrize(
    ("asked", "sent"), [(0.2, 1), (0.5, 1), (1.0, 1), (1.01, 2), (2.7, 3), (300.0, 300)]
)
def test_a_countdown_is_whole_seconds_rounded_up(asked: float, sent: int) -> None:
    assert broker.countdown(asked) == sent


def test_redis_dead_letters_where_rabbitmq_does() -> None:
    """RabbitMQ 3.10+ dead-letters once a message came back more than the limit's times."""
    assert [dead_letters_after(again, 2) for again in (1, 2, 3)] == [False, False, True]


def test_a_rate_limit_without_redis_is_refused_when_the_worker_starts(tmp_path: Path) -> None:
    plans = tmp_path / "plans.toml"
    plans.write_text(
        ENGINE_PLANS.read_text().replace(
            'private_key_env = "KLIKANDPAY_KEY_EUR"',
            'private_key_env = "KLIKANDPAY_KEY_EUR"\nmax_charges_per_second = 5',
        )
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("BILLING_")},
        "BILLING_BROKER_URL": AMQP,
        "BILLING_PLANS_FILE": str(plans),
        "BILLING_DATABASE_URL": f"sqlite:///{tmp_path / 'billing.db'}",
    }
    done = subprocess.run(
        [sys.executable, "-m", "billing.cli", "worker"], env=env, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "error: accounts.EUR: max_charges_per_second needs a Redis shared by every worker: set "
        "BILLING_REDIS_URL (the broker is not Redis)"
    ]
