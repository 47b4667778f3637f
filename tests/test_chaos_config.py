"""The chaos run's settings: each ``CHAOS_*`` variable read, a bad one named."""

from __future__ import annotations

import pytest

from chaos.run import BROKERS, Config, RunError


def test_the_broker_is_redis_unless_told_rabbitmq() -> None:
    assert Config.from_env({}).broker == "redis"
    assert Config.from_env({"CHAOS_BROKER": " RabbitMQ "}).broker == "rabbitmq"
    assert set(BROKERS) == {"redis", "rabbitmq"}


@pytest.mark.parametrize("value", ["kafka", "amqp://x", "redis,rabbitmq"])
def test_an_unknown_broker_is_named(value: str) -> None:
    with pytest.raises(RunError, match=r"CHAOS_BROKER: .* is not one of redis, rabbitmq"):
        Config.from_env({"CHAOS_BROKER": value})


@pytest.mark.parametrize(
    ("name", "value"), [("CHAOS_N", "0"), ("CHAOS_N", "x"), ("CHAOS_DURATION", "-1")]
)
def test_a_bad_number_is_named(name: str, value: str) -> None:
    with pytest.raises(RunError, match=name.split("_")[1]):
        Config.from_env({name: value})
