"""Log lines: JSON with the extra fields, text by default, never a card number."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from billing.errors import ConfigError
from billing.logs import celery_setup_logging, configure_logging
from billing.settings import Settings, get_settings

PAN = "4012888888881881"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_the_extra_fields() -> None:
    stream = io.StringIO()
    configure_logging(Settings(log_format="json"), stream=stream)
    logging.getLogger("billing.engine").info(
        "charge outcome charge=%s outcome=%s",
        7,
        "approved",
        extra={
            "charge_id": 7,
            "external_ref": "shop-42",
            "alias": "ab12…78",
            "outcome": "approved",
            "code": "00",
            "duration": 0.4321,
        },
    )
    [line] = _lines(stream)
    assert line["level"] == "INFO"
    assert line["logger"] == "billing.engine"
    assert line["message"] == "charge outcome charge=7 outcome=approved"
    assert str(line["ts"]).endswith("+00:00")
    for key, value in {
        "charge_id": 7,
        "external_ref": "shop-42",
        "alias": "ab12…78",
        "outcome": "approved",
        "code": "00",
        "duration": 0.4321,
    }.items():
        assert line[key] == value


def test_a_card_number_never_reaches_a_log_line() -> None:
    stream = io.StringIO()
    configure_logging(Settings(log_format="json"), stream=stream)
    log = logging.getLogger("billing.test")
    log.warning("customer pasted %s", PAN)
    log.warning(f"in the message itself: {PAN}")
    log.warning("in an extra field", extra={"note": f"card {PAN}"})
    try:
        raise ValueError(f"gateway echoed NUMCARTE={PAN}")
    except ValueError:
        log.exception("call failed")
    text = stream.getvalue()
    assert PAN not in text
    lines = _lines(stream)
    assert len(lines) == 4
    assert "[redacted-pan]" in str(lines[0]["message"])
    assert "[redacted-pan]" in str(lines[1]["message"])
    assert lines[2]["note"] == "card [redacted-pan]"
    assert "NUMCARTE=[redacted]" in str(lines[3]["exc"])


def test_text_format_is_the_default_and_redacts_too() -> None:
    stream = io.StringIO()
    configure_logging(Settings(), stream=stream)
    logging.getLogger("billing.test").info("card %s declined", PAN)
    line = stream.getvalue().strip()
    assert PAN not in line
    assert line.endswith("INFO billing.test: card [redacted-pan] declined")


def test_configuring_twice_does_not_double_lines() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging(Settings(), stream=first)
    configure_logging(Settings(log_level="warning"), stream=second)
    log = logging.getLogger("billing.test")
    log.info("hidden")
    log.warning("shown")
    assert first.getvalue() == ""
    assert second.getvalue().count("shown") == 1
    assert "hidden" not in second.getvalue()


def test_a_bad_level_is_named() -> None:
    with pytest.raises(ConfigError, match="BILLING_LOG_LEVEL: 'LOUD' is not one of"):
        configure_logging(Settings(log_level="LOUD"))


def test_celery_signal_receiver_uses_celery_level_unless_billing_sets_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("BILLING_LOG_LEVEL", raising=False)
    get_settings.cache_clear()
    try:
        celery_setup_logging(loglevel=logging.DEBUG, logfile=None, format="", colorize=False)
        assert logging.getLogger().level == logging.DEBUG
        monkeypatch.setenv("BILLING_LOG_LEVEL", "ERROR")
        get_settings.cache_clear()
        celery_setup_logging(loglevel=logging.DEBUG, logfile=None, format="", colorize=False)
        assert logging.getLogger().level == logging.ERROR
    finally:
        get_settings.cache_clear()


def test_json_logging_from_the_environment_in_a_real_process() -> None:
    code = (
        "import logging\n"
        "from billing.logs import configure_logging\n"
        "from billing.settings import get_settings\n"
        "configure_logging(get_settings())\n"
        "logging.getLogger('billing.engine').info('charge outcome', "
        f"extra={{'charge_id': 3, 'note': 'pan {PAN}'}})\n"
    )
    env = {**os.environ, "BILLING_LOG_FORMAT": "json", "BILLING_LOG_LEVEL": "INFO"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    [line] = [json.loads(x) for x in done.stderr.splitlines()]
    assert (line["message"], line["charge_id"]) == ("charge outcome", 3)
    assert PAN not in done.stderr


# --- secrets the record does not know, in every encoding (issue 14, item 5) -------------

ODD_KEY = 'Zk9+ab/Q1w==&x%41\\y"z'
HOOK_SECRET = 'whsec+/=%&\\"0123456789'


@pytest.fixture
def remembered(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The engine's plans file, its EUR key and a webhook secret in the environment."""
    from tests.fixtures.engine import ENGINE_PLANS

    monkeypatch.setenv("KLIKANDPAY_KEY_EUR", ODD_KEY)
    monkeypatch.setenv("BILLING_PLANS_FILE", str(ENGINE_PLANS))
    yield
    from billing.redact import forget_secrets

    forget_secrets(ODD_KEY, HOOK_SECRET, "tok-0123456789")


def test_the_configured_keys_and_secrets_never_reach_a_log_line_in_any_encoding(
    remembered: None,
) -> None:
    """Before: a log record was scrubbed of card numbers and fields only; a private key in
    an exception message (any encoding) was printed as it came."""
    from urllib.parse import quote, quote_plus

    from tests.fixtures.engine import ENGINE_PLANS

    stream = io.StringIO()
    settings = Settings(
        log_format="json",
        plans_file=ENGINE_PLANS,
        webhook_url="https://shop.example/hooks?token=tok-0123456789",
        webhook_secret=HOOK_SECRET,
    )
    configure_logging(settings, stream=stream)
    log = logging.getLogger("billing.test")
    for secret in (ODD_KEY, HOOK_SECRET, "tok-0123456789"):
        forms = [
            secret,
            secret.replace("+", " "),
            quote(secret, safe=""),
            re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), quote_plus(secret, safe="")),
            json.dumps(secret)[1:-1].replace("/", "\\/"),
        ]
        for form in forms:
            log.warning("echo %s", form, extra={"note": f"k={form}", "nested": {"a": [form]}})
            try:
                raise ValueError(f"gateway said {form}")
            except ValueError:
                log.exception("call failed")
    text = stream.getvalue()
    assert text.count("[redacted]") >= 30
    for secret in (ODD_KEY, HOOK_SECRET, "tok-0123456789"):
        for line in text.splitlines():
            assert secret not in json.loads(line)["message"]
            for form in (secret, secret.replace("+", " "), quote(secret, safe="")):
                assert form not in line


def test_a_task_s_arguments_in_a_celery_log_record_are_not_logged() -> None:
    """Celery logs a failed task with ``extra={"data": {"args": ..., "kwargs": ...}}``: a
    dict, which used to be printed as it was (Python quotes and all: ``'cvv': '987'``)."""
    stream = io.StringIO()
    configure_logging(Settings(log_format="json"), stream=stream)
    logging.getLogger("celery.app.trace").error(
        "Task %(name)s[%(id)s] raised unexpected: %(exc)s",
        {"name": "billing.add_subscription", "id": "t-1", "exc": "InvalidInput()"},
        extra={
            "data": {
                # Celery's safe_repr of the arguments: Python quotes, not JSON's.
                "args": f"({{'alias': 'ab12cd34ef56gh78', 'cvv': '987', 'card_number': '{PAN}'}},)",
                "kwargs": {"cvv": "CVV=123", "pan": [PAN]},
            },
            "obj": ValueError(PAN),
        },
    )
    logging.getLogger("billing.x").info(
        "nested", extra={"data": {"a": [{"b": f"{PAN[:4]} {PAN[4:]}"}]}}
    )
    line, nested = _lines(stream)
    assert nested["data"] == {"a": [{"b": "[redacted-pan]"}]}
    assert PAN not in stream.getvalue() and "4012 8888" not in stream.getvalue()
    assert line["data"]["args"] == line["data"]["kwargs"] == "[task arguments are not logged]"
    assert "987" not in stream.getvalue() and "ab12cd34" not in stream.getvalue()
    assert line["message"] == "Task billing.add_subscription[t-1] raised unexpected: InvalidInput()"
