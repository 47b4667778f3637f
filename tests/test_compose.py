"""docker-compose.yml cannot be started here (no Docker engine), so it is read: every
service the project runs must start a real ``billing`` command with real options, with
the settings the project accepts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from billing import broker
from billing.cli import app
from billing.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
OURS = {name: s for name, s in SERVICES.items() if s.get("image") == "klikandpay-billing:latest"}
CELERY = str(Path(sys.executable).with_name("celery"))


def test_every_part_of_the_service_is_there_with_health_checks():
    assert {"postgres", "redis", "migrate", "worker", "beat", "flower", "sandbox"} <= set(SERVICES)
    for name in ("postgres", "redis", "sandbox", "worker"):
        assert "healthcheck" in SERVICES[name], name
    for name, service in SERVICES.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in SERVICES, f"{name} depends on unknown {dependency}"


DEFAULTED = re.compile(r"^\$\{(?P<name>[A-Z0-9_]+):-(?P<default>.*)\}$")


def _settings(**shell: str) -> Settings:
    """The shared settings as compose resolves them, with ``shell`` as the environment."""
    values = {}
    for key, value in OURS["worker"]["environment"].items():
        found = DEFAULTED.match(value)
        if found:
            value = shell.get(found["name"]) or found["default"]
        if key.startswith("BILLING_") and value:
            values[key.removeprefix("BILLING_").lower()] = value
    return Settings(**values)


def test_the_shared_settings_are_accepted_by_the_project():
    env = OURS["worker"]["environment"]
    settings = _settings()
    assert settings.database_url.startswith("postgresql://")
    assert settings.broker_url == "redis://redis:6379/0"
    assert settings.effective_redis_url == "redis://redis:6379/0"
    assert all(service["environment"] == env for service in OURS.values())


def test_the_rabbitmq_profile_is_what_the_comment_says_to_switch_to():
    rabbit = SERVICES["rabbitmq"]
    assert rabbit["profiles"] == ["rabbitmq"]
    assert "management" in rabbit["image"] and "healthcheck" in rabbit
    # The management UI on this machine's loopback only, nothing else published.
    assert rabbit["ports"] == ["127.0.0.1:15672:15672"]
    text = (ROOT / "docker-compose.yml").read_text()
    (switch,) = re.findall(
        r"BILLING_BROKER_URL=(amqp://\S+) docker compose --profile rabbitmq", text
    )
    user, password = switch.removeprefix("amqp://").split("@")[0].split(":")
    assert rabbit["environment"] == {
        "RABBITMQ_DEFAULT_USER": user,
        "RABBITMQ_DEFAULT_PASS": password,
    }
    settings = _settings(BILLING_BROKER_URL=switch)
    assert broker.is_amqp(settings.broker_url) and settings.broker_url.split("@")[1].startswith(
        "rabbitmq:"
    )
    # Redis still holds the rate limit and RedBeat's lock, whatever the broker.
    assert settings.effective_redis_url == "redis://redis:6379/0"
    for name in ("worker", "beat"):
        assert SERVICES[name]["depends_on"]["rabbitmq"] == {
            "condition": "service_healthy", "required": False,
        }  # fmt: skip


@pytest.mark.parametrize("name", sorted(OURS))
def test_each_service_runs_a_real_billing_command(name):
    argv = [str(a) for a in OURS[name]["command"]]
    command: Any = typer.main.get_command(app)
    words = list(argv)
    while hasattr(command, "commands"):  # a group (Typer may bundle its own click)
        command = command.commands[words.pop(0)]
    known = {opt for param in command.params for opt in getattr(param, "opts", [])}
    options = [w.split("=")[0] for w in words if w.startswith("-")]
    passthrough = command.context_settings.get("allow_extra_args", False)
    for option in options:
        if option in known:
            continue
        assert passthrough, f"{name}: billing {argv[0]} has no option {option}"
        # worker and beat hand unknown options to Celery: Celery must know them.
        help_text = subprocess.run(
            [CELERY, "-A", "tasks", argv[0], "--help"], capture_output=True, text=True, cwd=ROOT
        ).stdout
        assert option in help_text, f"{name}: celery {argv[0]} has no option {option}"
