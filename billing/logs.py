"""Logging for every process: the CLI, the worker and beat.

Two formats: readable text (the default) and JSON lines (``BILLING_LOG_FORMAT=json``), one
object per line with ``ts``, ``level``, ``logger``, ``message`` and every ``extra`` field,
so a log platform can count outcomes by code or find every line of one charge.

Whatever the format, each record goes through :class:`RedactFilter` on the way out: its
message, arguments, extra fields (at any depth) and traceback pass through
:func:`billing.redact.redact`, so a card number that slipped into an exception message
still never reaches a log line. Celery's records carry a task's arguments (a shop's
message, an alias) in their ``data`` field: those are not logged at all. A log record does not
know the private keys and webhook secrets, so :func:`configure_logging` has the process
remember the ones its settings and plans file name (see ``billing.redact``): they are
blanked, in any encoding, from every line.

Celery configures its own logging unless someone answers its ``setup_logging`` signal;
``tasks/app.py`` connects :func:`celery_setup_logging` to it, so workers log the same way.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, TextIO

from billing.errors import ConfigError
from billing.redact import redact, redact_data, remember_secrets, secrets_in_url
from billing.settings import Settings, get_settings

#: Attributes every ``LogRecord`` has; anything else on a record came from ``extra``.
_STANDARD = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None)).keys()
    | {"message", "asctime", "taskName"}
)
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a caller passed with ``extra=``."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class RedactFilter(logging.Filter):
    """Blanks card numbers and secret fields in everything a record will print.

    Attached to handlers (not loggers) so it also sees records propagated from child
    loggers. It rewrites the record once: message and arguments are merged, and the
    traceback is formatted and redacted ahead of the formatter.
    """

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_redacted", False):
            return True
        try:
            message = record.getMessage()
        except Exception:  # arguments that do not fit the format: still log, never raise
            message = f"{record.msg!r} (unformattable arguments {record.args!r})"
        record.msg = redact(message)
        record.args = None
        for key, value in extra_fields(record).items():
            setattr(record, key, _redacted_extra(_without_task_arguments(record, key, value)))
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        record._redacted = True
        return True


#: What Celery's task records show instead of the task's arguments.
NOT_LOGGED = "[task arguments are not logged]"


def _without_task_arguments(record: logging.LogRecord, key: str, value: Any) -> Any:
    """Celery passes each task's context as ``extra={"data": ...}``, with the repr of its
    arguments: a shop's message, alias and all. The dead letter keeps them, masked."""
    if key == "data" and record.name.startswith("celery") and isinstance(value, dict):
        return {k: NOT_LOGGED if k in ("args", "kwargs") else v for k, v in value.items()}
    return value


def _redacted_extra(value: Any) -> Any:
    """An ``extra`` value as it may be printed: strings (at any depth) redacted, and what
    the JSON formatter would print with ``repr`` turned into redacted text now."""
    if value is None or isinstance(value, bool | int | float | Decimal | datetime | date):
        return value
    if isinstance(value, str | dict | list | tuple):
        return redact_data(value)
    return redact(repr(value))


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    return repr(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (ISO 8601 UTC), ``level``, ``logger``, ``message``,
    the ``extra`` fields, and ``exc`` / ``stack`` when there is a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            data.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            data["exc"] = record.exc_text
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        return json.dumps(data, ensure_ascii=False, default=_plain)


class _Handler(logging.StreamHandler[TextIO]):
    """Marks the handler this module installed, so configuring twice replaces it."""


def _level(name: str) -> int:
    upper = name.strip().upper()
    if upper == "WARN":
        upper = "WARNING"
    if upper not in _LEVELS:
        raise ConfigError(f"BILLING_LOG_LEVEL: {name!r} is not one of {', '.join(_LEVELS)}")
    return logging.getLevelNamesMapping()[upper]


def configure_logging(
    settings: Settings,
    *,
    level: str | int | None = None,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Send every log record to ``stream`` (stderr) in the configured format, redacted.

    ``level`` overrides ``settings.log_level``. Safe to call more than once: the handler
    installed by an earlier call is replaced, not doubled. Returns the handler.
    """
    numeric = level if isinstance(level, int) else _level(level or settings.log_level)
    remember_secrets(*configured_secrets(settings))
    handler = _Handler(stream if stream is not None else sys.stderr)
    handler.addFilter(RedactFilter())
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.captureWarnings(True)
    return handler


def configured_secrets(settings: Settings) -> list[str]:
    """The secrets this process may handle: the webhook secret, the token of any webhook
    URL, and the private keys and endpoint secrets the plans file's variables hold.

    A plans file that cannot be read names none (it is reported where it is used).
    """
    found = [secret.get_secret_value() for secret in (settings.webhook_secret,) if secret]
    found += secrets_in_url(settings.webhook_url)
    try:
        from billing.plans import get_plans

        plans = get_plans(settings)
    except Exception:
        return found
    names = [account.private_key_env for account in plans.accounts.values()]
    names += [endpoint.secret_env for endpoint in plans.webhooks.values()]
    found += [os.environ.get(name, "").strip() for name in names]
    for endpoint in plans.webhooks.values():
        found += secrets_in_url(endpoint.url)
    return [value for value in found if value]


def celery_setup_logging(**kwargs: Any) -> None:
    """Receiver of Celery's ``setup_logging`` signal: workers and beat log like the CLI.

    Celery passes the ``--loglevel`` it was started with; ``BILLING_LOG_LEVEL``, when set,
    wins over it, so one variable sets the level of every process.
    """
    settings = get_settings()
    level: str | int | None = None
    if "log_level" not in settings.model_fields_set and kwargs.get("loglevel") is not None:
        level = kwargs["loglevel"]
    configure_logging(settings, level=level)


__all__ = [
    "JsonFormatter",
    "RedactFilter",
    "celery_setup_logging",
    "configure_logging",
    "configured_secrets",
    "extra_fields",
]
