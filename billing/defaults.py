"""Every tunable default in one place, each next to the reason for its value.

Settings (``billing.settings``) read these as their defaults, so changing a value here
changes it everywhere a user did not override it through ``BILLING_*`` variables.
"""

from __future__ import annotations

#: Where the gateway's scripts live. The four server-to-server scripts hang off it.
GATEWAY_URL = "https://www.klikandpay.com/paiement"

#: Seconds to open a TCP/TLS connection to the gateway. A connect timeout proves the
#: request never reached the script, so it is retried safely: keep it short.
CONNECT_TIMEOUT = 5.0

#: Seconds to wait for the gateway's answer once the request is sent. Past it the
#: outcome is UNKNOWN (the card may be charged), so it is generous.
READ_TIMEOUT = 30.0

#: What a Klik & Pay transaction number looks like: 1 to 40 letters, digits, dots, dashes
#: or underscores (the guide publishes none; see ``billing.answers``). An approval whose TX
#: does not match is an unknown outcome: what came back is not trusted as a TX.
TX_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,39}"

#: The embedded default: a SQLite file in the working folder, so that one command runs.
DATABASE_URL = "sqlite:///billing.db"

#: Celery's broker. Redis is what the tests and the compose file run.
BROKER_URL = "redis://localhost:6379/0"

#: Plans file, relative to the working folder.
PLANS_FILE = "schedules/plans.toml"

#: Seconds a message may stay unacknowledged in Redis before it is handed to another
#: worker. Every countdown and every task's run time stays well below it; long waits
#: (retry ladders, deferred captures) live in the database instead.
VISIBILITY_TIMEOUT = 3600

#: How often the engine sweep runs (seconds): due retries, captures, stuck charges.
ENGINE_SWEEP_SECONDS = 60.0

#: Charge messages allowed in the broker or in workers at once. The sweep sends no more,
#: so broker memory depends on this number, not on how many subscriptions are due.
MAX_IN_FLIGHT = 500

#: Charge IDs per message at most. A message of several charges is claimed, called and
#: recorded charge by charge, all at once (``Engine.charge_many``): the broker's and
#: Celery's cost is paid once per message, not once per charge (``make bench``'s no-op
#: row: Celery spends about 1 ms of CPU on each message, sending it as much again, on a
#: 2-core machine; a charge costs about 2). 32 measured best there (``make bench``, N =
#: 10,000: 2.46 ms of CPU per charge at 8, 2.25 at 16, 2.00 at 32 with the refill below).
CHARGE_BATCH = 32

#: Calls one worker process makes at once for several-charge messages (threads started
#: only when needed); the charges beyond wait, still queued and unclaimed, for a thread.
CALLS_PER_PROCESS = 32

#: Subscriptions read and charge rows written per database round trip during a sweep.
SWEEP_BATCH_SIZE = 1000

#: Seconds added to the read timeout before an in-flight charge is declared stuck
#: (its worker died mid-call) and marked UNKNOWN.
STUCK_MARGIN_SECONDS = 60.0

#: Seconds a charge may sit as ``queued`` (message sent) before the engine sweep sends
#: its message again, in case the broker lost it. Re-sending is safe: a charge task
#: claims its charge atomically and does nothing if another message already did.
REQUEUE_AFTER_SECONDS = 600.0

#: Celery retries of a charge whose request provably never reached the gateway.
NOT_SENT_MAX_RETRIES = 6

#: First backoff (seconds) after a NOT SENT outcome; it doubles each time, with jitter.
NOT_SENT_BACKOFF_BASE = 2.0

#: Cap of that backoff (seconds), far below the visibility timeout.
NOT_SENT_BACKOFF_CAP = 300.0

#: Queue the charge tasks travel on.
QUEUE = "billing"

#: Deliveries of one message that may end without its task finishing (the worker process
#: died: out of memory, a segfault in a driver) before the message is dead-lettered
#: instead of delivered again. RabbitMQ counts them itself (``x-delivery-limit`` of the
#: quorum queue; RabbitMQ 4 defaults to 20 and drops without a dead-letter exchange); on
#: Redis the task base class counts them. A worker killed by a deploy or a crash counts
#: once, so 5 is far above what a healthy message meets and low enough that a poison
#: message kills six worker processes (the first delivery and five more), not hundreds.
DELIVERY_LIMIT = 5

#: Minimum hours between two successful engine charges of one subscription.
MIN_CHARGE_GAP_HOURS = 20.0

#: Where ``billing metrics`` and ``billing sandbox`` listen unless told otherwise.
BIND_HOST = "127.0.0.1"
METRICS_PORT = 9108
SANDBOX_PORT = 8999

#: Seconds to wait for the shop's webhook endpoint (connect, then answer). A slow shop
#: only delays its own events: the post is retried later like any failed one.
WEBHOOK_TIMEOUT = 10.0

#: Waits before each retry of an event the endpoint did not take (anything but 2xx).
#: Spread over about 16 hours so a shop's night-long outage loses nothing; after the last
#: try the event is dead until ``billing events redeliver``. Kept in the database, not in
#: broker countdowns, so they outlive restarts and the broker's visibility timeout.
WEBHOOK_BACKOFF = (
    "30 seconds",
    "2 minutes",
    "10 minutes",
    "30 minutes",
    "1 hour",
    "2 hours",
    "4 hours",
    "8 hours",
)

#: How often beat asks a worker to post due events (seconds): the shop hears of a change
#: within about this long.
WEBHOOK_DELIVER_SECONDS = 10.0

#: Events posted per delivery task at most, so one task never runs for long.
WEBHOOK_BATCH = 100

#: Seconds after which a delivery task claims no further event: against a shop whose
#: endpoint hangs, 100 posts of up to twice the timeout would hold the task's message for
#: over half an hour (RabbitMQ's consumer_timeout); the next run, 10 s later, goes on.
WEBHOOK_RUN_SECONDS = 60.0
