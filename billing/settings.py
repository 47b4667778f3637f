"""Configuration from the environment (prefix ``BILLING_``), validated once at start-up.

A bad value stops the process with a message naming the variable, not a traceback.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from billing import defaults
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
    #: Overrides of the decline-code table, e.g. ``{"05": "hard"}`` (JSON in the environment).
    decline_codes: dict[str, Literal["soft", "hard"]] = Field(default_factory=dict)
    visibility_timeout: int = Field(defaults.VISIBILITY_TIMEOUT, gt=0)
    engine_sweep_seconds: float = Field(defaults.ENGINE_SWEEP_SECONDS, gt=0)
    max_in_flight: int = Field(defaults.MAX_IN_FLIGHT, gt=0)
    sweep_batch_size: int = Field(defaults.SWEEP_BATCH_SIZE, gt=0)
    stuck_margin_seconds: float = Field(defaults.STUCK_MARGIN_SECONDS, ge=0)
    requeue_after_seconds: float = Field(defaults.REQUEUE_AFTER_SECONDS, gt=0)
    not_sent_max_retries: int = Field(defaults.NOT_SENT_MAX_RETRIES, ge=0)
    not_sent_backoff_base: float = Field(defaults.NOT_SENT_BACKOFF_BASE, gt=0)
    not_sent_backoff_cap: float = Field(defaults.NOT_SENT_BACKOFF_CAP, gt=0)
    queue: str = defaults.QUEUE
    min_charge_gap_hours: float = Field(defaults.MIN_CHARGE_GAP_HOURS, ge=0)
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"
    metrics_host: str = defaults.BIND_HOST
    metrics_port: int = Field(defaults.METRICS_PORT, gt=0, lt=65536)

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        if not value.startswith(("sqlite", "postgresql", "postgres")):
            raise ValueError("must be a sqlite:/// or postgresql:// URL")
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
