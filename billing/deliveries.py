"""Deliveries of one message that never finished, counted in Redis, for a broker that
counts nothing itself.

Why: with ``task_acks_late`` and ``task_reject_on_worker_lost`` a message whose task kills
its worker process (out of memory, a segfault in a driver) goes back to the queue and is
delivered again, for ever. RabbitMQ bounds that with the quorum queue's ``x-delivery-limit``
(``billing.broker``); Redis has no delivery count, so the task base class counts here.

Only redeliveries are counted: Kombu marks every message Redis hands out again
(``redelivered``: a rejected message requeued after its worker process died, one
restored after the visibility timeout, or one a worker had reserved but not started when
it shut down — counted too, a slight over-count), so a first delivery — every message of
a healthy run — costs no Redis call at all. A redelivery increments the message's counter before the
task runs and a finish (success, failure or retry) deletes it; past the limit the message
is dead-lettered (a row in ``dead_letters``) instead of run again.

A message is its task ID *and* its retry number: Celery keeps the task ID across
``self.retry``, and each retry is a new message with its own deliveries.

Nothing is lost by giving up on a message: a charge's state in the database says what
happened. Still ``queued`` (the worker died before the claim), it goes to the failed-charge
queue with the letter (``poison``, ``billing.broker.record_poison``), rather than being sent
again by the engine sweep to die again; ``in_flight``: the stuck sweep makes it
``unknown`` for a person.
"""

from __future__ import annotations

import redis

#: Keys live under this prefix, one per message with unfinished deliveries.
KEY_PREFIX = "klikandpay-billing:deliveries:"
#: Seconds a counter outlives its last delivery: far longer than any redelivery takes
#: (a restored message comes back within the visibility timeout), short enough that the
#: counters of messages that vanished (a Redis restart) do not pile up.
KEY_TTL = 7 * 24 * 3600


def dead_letters_after(redeliveries: int, limit: int) -> bool:
    """Whether a message delivered again for the ``redeliveries``-th time is past
    ``limit``: more than ``limit`` earlier deliveries of it died unfinished, the point where
    RabbitMQ's quorum queue (``x-delivery-limit``) dead-letters too."""
    return redeliveries > limit


class DeliveryCounter:
    """Counts the redeliveries of each message in Redis, until its task finishes."""

    def __init__(self, redis_url: str, limit: int) -> None:
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
        self.limit = limit

    @staticmethod
    def key(task_id: str, retries: int) -> str:
        return f"{KEY_PREFIX}{task_id}:{retries}"

    def redelivered(self, task_id: str, retries: int) -> int:
        """Count a redelivery of the message; how many were counted (1: the first)."""
        pipe = self._redis.pipeline()
        pipe.incr(self.key(task_id, retries))
        pipe.expire(self.key(task_id, retries), KEY_TTL)
        count, _ = pipe.execute()
        return int(count)

    def finished(self, task_id: str, retries: int) -> None:
        """The message's task ended (any way but a dead process): forget its count."""
        self._redis.delete(self.key(task_id, retries))

    def counted(self, task_id: str, retries: int) -> int:
        """Redeliveries counted and not finished (for tests and a person's look)."""
        return int(self._redis.get(self.key(task_id, retries)) or 0)


class PoisonMessage(Exception):
    """A message given up on after the delivery limit (stored as its dead letter's error)."""

    def __init__(self, deliveries: int, limit: int, by: str) -> None:
        self.deliveries = deliveries
        self.limit = limit
        super().__init__(
            f"{deliveries} deliveries ended without the task finishing (its worker process "
            f"died each time); dead-lettered by {by} past the delivery limit of {limit} "
            "(BILLING_DELIVERY_LIMIT) instead of being delivered again"
        )


class BrokerDeadLetter(Exception):
    """A message the broker dead-lettered for another reason than the delivery limit."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(
            f"dead-lettered by RabbitMQ ({reason}), not past the delivery limit: not a poison "
            "message, so the charges it names are left as they are"
        )
