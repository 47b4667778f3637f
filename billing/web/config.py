"""The console's settings, from the environment (prefix ``BILLING_CONSOLE_``).

They live apart from ``billing.settings`` because only ``billing web`` reads them; a bad
value stops ``billing web`` with a message naming the variable, like every other setting.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from billing import accounts
from billing.errors import ConfigError

ENV_PREFIX = "BILLING_CONSOLE_"

#: Where ``billing web`` listens unless told otherwise: this machine only.
DEFAULT_HOST = "127.0.0.1"
#: The console's default port.
DEFAULT_PORT = 8080
#: Rows per page of the failed-charge queue.
PAGE_SIZE = 50
#: Ledger rows a page shows at first; "more" adds as many again, up to ``LEDGER_MAX``.
LEDGER_PAGE = 100
LEDGER_MAX = 5000
#: Days the overview's chart covers.
CHART_DAYS = 30
#: Most charges one bulk action may touch: more is more than a person can have checked.
BULK_MAX = 500
#: Largest form body read (bytes): a bulk form of ``BULK_MAX`` ids fits many times over.
MAX_FORM_BYTES = 256 * 1024


class ConsoleSettings(BaseSettings):
    """What an operator of the console may change."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    #: Key that signs session cookies and derives CSRF tokens. Unset: a random key per
    #: process, so every restart signs everybody out (fine for one process, not for several).
    secret_key: SecretStr | None = None
    #: Minutes without a request after which a session ends.
    idle_minutes: float = Field(accounts.IDLE_TIMEOUT.total_seconds() / 60, gt=0)
    #: ``auto``: cookies are Secure when the request came over HTTPS (uvicorn reads
    #: X-Forwarded-Proto from a trusted proxy); ``always`` or ``never`` force it.
    secure_cookies: Literal["auto", "always", "never"] = "auto"

    @property
    def idle(self) -> timedelta:
        return timedelta(minutes=self.idle_minutes)


def load_console_settings() -> ConsoleSettings:
    try:
        return ConsoleSettings()
    except ValidationError as exc:
        problems = [
            f"{ENV_PREFIX}{str(err['loc'][0]).upper()}: {err['msg']}" for err in exc.errors()
        ]
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None
