"""A rate limit per merchant account that holds across every worker on every machine.

Each caller reserves the next free slot in Redis (one atomic script, Redis's own clock)
and sleeps until it: slots are ``1 / rate`` seconds apart, whoever asks.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Protocol

import redis

from billing.errors import ConfigError

#: Keys live under this prefix; each expires once no slot is reserved far ahead.
KEY_PREFIX = "klikandpay-billing:rate:"

_RESERVE = """
local now = redis.call('TIME')
local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
local interval = tonumber(ARGV[1])
local nxt = tonumber(redis.call('GET', KEYS[1]) or '0')
local slot = math.max(now_us, nxt)
local ttl_ms = math.ceil((slot - now_us + interval) / 1000) + 1000
redis.call('SET', KEYS[1], tostring(slot + interval), 'PX', ttl_ms)
return slot - now_us
"""


class _Limited(Protocol):
    @property
    def max_charges_per_second(self) -> float | None: ...


def require_redis(accounts: Mapping[str, _Limited], redis_url: str | None) -> None:
    """Refuse to run a plans file with rate limits and no Redis to hold them in.

    On Redis the broker's server holds the limit; on RabbitMQ nothing does unless
    ``BILLING_REDIS_URL`` is set, and a limit that holds in no process is worse than none:
    the plans file says the gateway is protected when it is not.
    """
    limited = sorted(name for name, account in accounts.items() if account.max_charges_per_second)
    if limited and not redis_url:
        raise ConfigError(
            f"accounts.{limited[0]}: max_charges_per_second needs a Redis shared by every "
            "worker: set BILLING_REDIS_URL (the broker is not Redis)"
        )


class RateLimiter:
    """Spaces calls per key; ``acquire`` blocks until the caller's slot comes."""

    def __init__(self, redis_url: str) -> None:
        self._redis = redis.Redis.from_url(redis_url)
        self._script = self._redis.register_script(_RESERVE)

    def acquire(self, key: str, per_second: float) -> float:
        """Wait for this call's slot under ``per_second``; return the seconds waited."""
        interval_us = max(1, int(1_000_000 / per_second))
        wait_us = int(self._script(keys=[KEY_PREFIX + key], args=[interval_us]))
        if wait_us > 0:
            time.sleep(wait_us / 1_000_000)
        return wait_us / 1_000_000
