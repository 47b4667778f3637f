"""Dead letters keep what a person needs to requeue a task, never a secret it carried.

A task message comes from outside (a shop sends ``billing.add_subscription``), so its
arguments may hold anything: card fields the shop should never have sent, an alias, a
card number pasted in a reference. The task runs for real (Celery's ``apply``, which goes
through ``BillingTask.on_failure``) against a real database, and the letter is read back
through ``billing deadletters`` as a person would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from billing import deadletters
from billing.cli import app
from billing.db import session_scope
from billing.errors import StateError
from billing.models import DeadLetter
from billing.redact import mask_alias
from billing.settings import get_settings
from tests.fixtures.engine import ENGINE_PLANS

ROOT = Path(__file__).resolve().parents[1]
BILLING = str(Path(sys.executable).with_name("billing"))
DEAD_BROKER = "redis://127.0.0.1:1/0"
CARD = "4012888888881881"
ALIAS = "ab12cd34ef56gh78"
MESSAGE = {
    "external_ref": "shop-9",
    "plan": "monthly",
    "alias": ALIAS,
    "customer_ip": "203.0.113.7",
    "next_charge_at": "2030-01-15T09:00:00Z",
}


@pytest.fixture
def env(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """This test's database and the engine's plans, for the tasks and the CLI."""
    monkeypatch.setenv("BILLING_DATABASE_URL", db_url)
    monkeypatch.setenv("BILLING_PLANS_FILE", str(ENGINE_PLANS))
    monkeypatch.setenv("COLUMNS", "200")
    # A requeue that slipped through would reach no broker (and no one else's worker).
    monkeypatch.setenv("BILLING_BROKER_URL", DEAD_BROKER)
    get_settings.cache_clear()
    yield db_url
    get_settings.cache_clear()


def _letters(url: str) -> list[DeadLetter]:
    with session_scope(url) as session:
        return list(session.scalars(select(DeadLetter).order_by(DeadLetter.id)))


def _cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def test_an_add_subscription_message_with_card_fields_is_stored_without_them(env: str) -> None:
    """Before: the message was stored whole and ``billing deadletters list`` printed the
    card number, the CVV and the alias."""
    from tasks.charges import add_subscription

    data = {**MESSAGE, "card_number": CARD, "cvv": "987", "4111 1111 1111 1111": "x"}
    add_subscription.apply(args=[data])

    (letter,) = _letters(env)
    assert letter.task_name == "billing.add_subscription"
    assert letter.exc_type == "InvalidInput" and "unknown field(s)" in letter.exc_message
    (kept,) = letter.args["args"]
    assert kept == {**MESSAGE, "alias": mask_alias(ALIAS)}  # unknown keys dropped
    assert letter.args["masked"] == ["args[0]: 3 unknown key(s) dropped", "args[0].alias"]
    listed = _cli("deadletters", "list", "--json")
    table = _cli("deadletters", "list")
    shown = _cli("deadletters", "show", str(letter.id))
    for text in (
        json.dumps(letter.args),
        letter.exc_message,
        letter.traceback,
        listed.stdout,
        table.stdout,
        shown.stdout,
    ):
        assert CARD not in text and "4111 1111" not in text and ALIAS not in text
        assert "987" not in text and "card_number" not in text.split("unknown field")[0]
    assert mask_alias(ALIAS) in table.stdout


def test_a_letter_whose_arguments_were_masked_is_not_requeued(env: str) -> None:
    from tasks.charges import add_subscription

    add_subscription.apply(args=[{**MESSAGE, "cvv": "987"}])
    (letter,) = _letters(env)

    refused = _cli("deadletters", "requeue", str(letter.id), "--by", "bob")
    assert isinstance(refused.exception, StateError)
    message = str(refused.exception)
    assert message.startswith(f"dead letter {letter.id} cannot be requeued: its arguments were")
    assert "args[0].alias" in message and "send billing.add_subscription again" in message
    (after,) = _letters(env)
    assert after.requeued_at is None  # not marked: it stays in the list for a person


def test_the_refusal_is_one_line_and_exit_status_2(env: str) -> None:
    letter = deadletters.record(
        env,
        task_name="billing.add_subscription",
        task_id="t-1",
        args=[dict(MESSAGE)],
        kwargs={},
        exc=ValueError("boom"),
    )
    done = subprocess.run(
        [BILLING, "deadletters", "requeue", str(letter)],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert f"dead letter {letter} cannot be requeued" in line and "Traceback" not in line


def test_exception_text_and_traceback_are_scrubbed_of_what_the_arguments_held(env: str) -> None:
    letter = deadletters.record(
        env,
        task_name="billing.add_subscription",
        task_id="t-2",
        args=[{**MESSAGE, "note": "pan 5555-5555-5555-4444"}],
        kwargs={},
        exc=ValueError(f"alias {ALIAS} refused, note pan 5555-5555-5555-4444, cvv=987"),
        traceback=(
            "Traceback (most recent call last):\n"
            f"  ValueError: alias {ALIAS} note=4012%208888%208888%201881"
        ),
    )
    (stored,) = _letters(env)
    assert stored.id == letter
    for text in (stored.exc_message, stored.traceback):
        assert ALIAS not in text and mask_alias(ALIAS) in text
        assert "5555-5555" not in text and "4012%208888" not in text and "987" not in text


def test_arguments_of_each_task_keep_only_its_parameters(env: str) -> None:
    letter = deadletters.record(
        env,
        task_name="billing.charge",
        task_id="t-3",
        args=[17, CARD],
        kwargs={"retries": 2, "charge_id": 3},
        exc=RuntimeError("boom"),
    )
    (stored,) = _letters(env)
    assert stored.id == letter
    assert stored.args["args"] == [17] and stored.args["kwargs"] == {}
    assert CARD not in json.dumps(stored.args)


def test_a_plain_letter_is_requeued_as_before(env: str) -> None:
    letter = deadletters.record(
        env, task_name="billing.charge", task_id="t-4", args=[17], kwargs={}, exc=RuntimeError("x")
    )
    (stored,) = _letters(env)
    assert stored.args == {"args": [17], "kwargs": {}}
    with session_scope(env) as session:
        assert deadletters.mark_requeued(session, letter, by="bob").requeued_by == "bob"


def test_every_task_s_parameters_are_known_to_the_dead_letters() -> None:
    """``deadletters.TASKS`` keeps what each task takes: it must follow the tasks' code."""
    import inspect

    from tasks.app import app as celery_app

    celery_app.loader.import_default_modules()  # the modules of ``include``
    ours = {name: task for name, task in celery_app.tasks.items() if name.startswith("billing.")}
    assert set(ours) == set(deadletters.TASKS)
    for name, task in ours.items():
        params = tuple(inspect.signature(task.run).parameters)
        assert deadletters.TASKS[name].params == params, name


def test_a_letter_of_an_unknown_task_keeps_its_arguments_redacted(env: str) -> None:
    deadletters.record(
        env,
        task_name="shop.custom",
        task_id=None,
        args=[f"card {CARD}", 7, [{"alias": ALIAS}]],
        kwargs={"alias": ALIAS, "note": "fine", "pan": int(CARD)},
        exc=RuntimeError("x"),
    )
    (stored,) = _letters(env)
    assert stored.args["args"] == ["card [redacted-pan]", 7, [{"alias": mask_alias(ALIAS)}]]
    assert stored.args["kwargs"] == {
        "alias": mask_alias(ALIAS), "note": "fine", "pan": "[redacted-pan]"
    }  # fmt: skip
    assert stored.args["masked"] == ["args[0]", "args[2][0].alias", "kwargs.alias", "kwargs.pan"]


def test_a_message_of_thousands_of_fields_is_recorded_quickly(env: str) -> None:
    import time

    data = {**MESSAGE, **{f"field{n}": f"value-{n:05d}" for n in range(5000)}}
    started = time.monotonic()
    deadletters.record(
        env, task_name="billing.add_subscription", task_id="big", args=[data], kwargs={},
        exc=ValueError("value-00001 value-04999"),
    )  # fmt: skip
    assert time.monotonic() - started < 10
    (stored,) = _letters(env)
    assert stored.args["masked"] == ["args[0]: 5000 unknown key(s) dropped", "args[0].alias"]
    assert stored.exc_message == "[redacted] value-04999"  # the first values, by value


def test_a_letter_stored_raw_by_an_older_version_is_shown_masked(env: str) -> None:
    with session_scope(env) as session:
        session.add(
            DeadLetter(
                task_name="billing.add_subscription", task_id="old",
                args={"args": [{**MESSAGE, "card_number": CARD}], "kwargs": {}},
                exc_type="InvalidInput", exc_message=f"bad card {CARD}",
                traceback=f"Traceback ...\nInvalidInput: bad card {CARD}",
            )
        )  # fmt: skip
    (letter,) = _letters(env)
    listed = _cli("deadletters", "list", "--json")
    shown = _cli("deadletters", "show", str(letter.id))
    for text in (listed.stdout, shown.stdout, _cli("deadletters", "list").stdout):
        assert CARD not in text and ALIAS not in text and "card_number" not in text
    assert json.loads(listed.stdout)[0]["args"] == [{**MESSAGE, "alias": mask_alias(ALIAS)}]
