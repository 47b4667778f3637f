"""Configuration from the environment (prefix ``BILLING_``), validated once at start-up.

A bad value stops the process with a message naming the variable, not a traceback.
"""

from __future__ import annotations

import functools
import re
from datetime import timedelta
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from billing import defaults
from billing.durations import parse_delay
from billing.errors import ConfigError

ENV_PREFIX = "BILLING_"


class Settings(BaseSettings):
    """Every knob of the worker, the beat, the CLI and the sandbox."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    database_url: str = defaults.DATABASE_URL
    broker_url: str = defaults.BROKER_URL
    #: Redis for the cross-process rate limit; defaults to the broker when it is Redis.
    redis_url: str | None = None
    plans_file: Path = Path(defaults.PLANS_FILE)
    gateway_url: str = defaults.GATEWAY_URL
    connect_timeout: float = Field(defaults.CONNECT_TIMEOUT, gt=0)
    read_timeout: float = Field(defaults.READ_TIMEOUT, gt=0)
    #: What a transaction number looks like (a regular expression the whole TX must match).
    tx_pattern: str = defaults.TX_PATTERN
    #: Overrides of the decline-code table, e.g. ``{"05": "hard"}`` (JSON in the environment).
    decline_codes: dict[str, Literal["soft", "hard"]] = Field(default_factory=dict)
    visibility_timeout: int = Field(defaults.VISIBILITY_TIMEOUT, gt=0)
    engine_sweep_seconds: float = Field(defaults.ENGINE_SWEEP_SECONDS, gt=0)
    max_in_flight: int = Field(defaults.MAX_IN_FLIGHT, gt=0)
    charge_batch: int = Field(defaults.CHARGE_BATCH, ge=1, le=64)
    calls_per_process: int = Field(defaults.CALLS_PER_PROCESS, ge=1, le=1024)
    sweep_batch_size: int = Field(defaults.SWEEP_BATCH_SIZE, gt=0)
    stuck_margin_seconds: float = Field(defaults.STUCK_MARGIN_SECONDS, ge=0)
    requeue_after_seconds: float = Field(defaults.REQUEUE_AFTER_SECONDS, gt=0)
    not_sent_max_retries: int = Field(defaults.NOT_SENT_MAX_RETRIES, ge=0)
    not_sent_backoff_base: float = Field(defaults.NOT_SENT_BACKOFF_BASE, gt=0)
    not_sent_backoff_cap: float = Field(defaults.NOT_SENT_BACKOFF_CAP, gt=0)
    queue: str = defaults.QUEUE
    delivery_limit: int = Field(defaults.DELIVERY_LIMIT, gt=0)
    min_charge_gap_hours: float = Field(defaults.MIN_CHARGE_GAP_HOURS, ge=0)
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"
    metrics_host: str = defaults.BIND_HOST
    metrics_port: int = Field(defaults.METRICS_PORT, gt=0, lt=65536)
    #: The shop's webhook endpoint; unset: events are recorded and listed, never posted.
    webhook_url: str | None = None
    #: HMAC-SHA256 key of the ``Klikandpay-Billing-Signature`` header. Never printed.
    webhook_secret: SecretStr | None = Field(None, validate_default=True)
    webhook_timeout: float = Field(defaults.WEBHOOK_TIMEOUT, gt=0)
    #: Waits before each retry, e.g. ``["30 seconds", "2 minutes"]`` (JSON in the environment).
    webhook_backoff: tuple[timedelta, ...] = Field(
        default_factory=lambda: tuple(parse_delay(text) for text in defaults.WEBHOOK_BACKOFF)
    )
    webhook_deliver_seconds: float = Field(defaults.WEBHOOK_DELIVER_SECONDS, gt=0)
    webhook_batch: int = Field(defaults.WEBHOOK_BATCH, gt=0)

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        if not value.startswith(("sqlite", "postgresql", "postgres")):
            raise ValueError("must be a sqlite:/// or postgresql:// URL")
        return value

    @field_validator("tx_pattern")
    @classmethod
    def _a_pattern(cls, value: str) -> str:
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"is not a regular expression ({exc})") from None
        if compiled.fullmatch(""):
            raise ValueError("matches an empty transaction number")
        return value

    @field_validator("broker_url")
    @classmethod
    def _known_broker(cls, value: str) -> str:
        if "://" not in value:
            raise ValueError("must be a URL such as redis://localhost:6379/0")
        return value

    @field_validator("gateway_url")
    @classmethod
    def _http_gateway(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("webhook_url")
    @classmethod
    def _http_webhook(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            return None
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _secret_with_url(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            value = None
        if info.data.get("webhook_url") and value is None:
            raise ValueError("must be set when BILLING_WEBHOOK_URL is: events are always signed")
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters (a random string, kept secret)")
        return value

    @field_validator("webhook_backoff", mode="before")
    @classmethod
    def _delays(cls, value: object) -> object:
        """Durations as the plans file writes them ("2 minutes"), or seconds."""
        if isinstance(value, list | tuple):
            return tuple(parse_delay(item) if isinstance(item, str) else item for item in value)
        return value

    @property
    def effective_redis_url(self) -> str | None:
        """Redis for shared state (rate limit): explicit, else the broker if it is Redis."""
        if self.redis_url:
            return self.redis_url
        if self.broker_url.startswith(("redis://", "rediss://")):
            return self.broker_url
        return None


def load_settings() -> Settings:
    """Read the environment; raise ``ConfigError`` naming each bad variable."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = ENV_PREFIX + "_".join(str(p) for p in err["loc"][:1]).upper()
            problems.append(f"{name}: {err['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
