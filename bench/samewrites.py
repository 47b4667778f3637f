"""The second floor, "same writes": the product's own rows per charge, in raw SQL.

The raw floor (``bench.floor``) writes one row of a table of its own before the call and
updates it after: the least any program must do. The worker writes more because of what
it promises (a charge claimed once, an attempt committed before the call, an append-only
ledger, an outbox event and its delivery in the transaction that makes the change). This
yardstick writes exactly those rows, in the real schema (the bench database is migrated
to head), with psycopg and nothing else, at the same concurrency, with the same sandbox
call in between, so that the table separates what the guarantees cost from what the
implementation adds:

- transaction 1, the claim (one statement): the conditional ``UPDATE`` of the charge row
  (``queued`` -> ``in_flight``, attempt number + 1) and the ``INSERT`` of its attempt, one
  CTE, returning what the call needs (alias, IP, amount);
- the ``POST duplicate.pl`` over a pooled keep-alive connection;
- transaction 2, the record (one statement): ``UPDATE`` the attempt, the charge (only if
  still this attempt's) and the subscription's next period, ``INSERT`` the ledger row (the
  answer with the private key removed, the alias masked), the ``charge.approved`` event with
  its JSON payload and its ``default`` delivery.

The due charges are created before the clock starts (``prepare``, in the bench process, as
the sweep would): this measures charging, like the raw floor.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

import psycopg
import requests
from dateutil.relativedelta import relativedelta

from bench.floor import TIMEOUT, Target, YardstickResult, run_threads

#: The attempt's ``worker`` and the ledger's ``actor``, as a worker names itself.
ACTOR = "worker:bench-writes"

CLAIM = """
WITH claimed AS (
    UPDATE charges SET state = 'in_flight', attempts = attempts + 1, claimed_at = now(),
        updated_at = now()
    WHERE id = %(charge)s AND state = 'queued'
    RETURNING id, subscription_id, attempts, amount, currency, merchant_id, plan, period
), attempt AS (
    INSERT INTO attempts (charge_id, number, operation, amount, worker, started_at)
    SELECT id, attempts, 'duplicate', amount, %(actor)s, now() FROM claimed
    RETURNING id
)
SELECT c.id, c.subscription_id, c.attempts, c.amount, c.currency, c.merchant_id, c.plan,
    c.period, s.alias, s.customer_ip, s.external_ref, attempt.id
FROM claimed c JOIN subscriptions s ON s.id = c.subscription_id CROSS JOIN attempt
"""

RECORD = """
WITH attempt AS (
    UPDATE attempts SET finished_at = now(), outcome = %(outcome)s, code = %(code)s
    WHERE id = %(attempt)s
    RETURNING id
), charge AS (
    UPDATE charges SET state = %(state)s, tx = %(tx)s, last_code = %(code)s,
        last_message = %(message)s, collected_amount = %(collected)s, updated_at = now()
    WHERE id = %(charge)s AND state = 'in_flight' AND attempts = %(number)s
    RETURNING id
), subscription AS (
    UPDATE subscriptions SET next_period = %(period)s + 1, next_charge_at = %(next_at)s,
        last_charged_at = now(), status = 'active', updated_at = now()
    WHERE id = %(subscription)s
    RETURNING id
), ledger_row AS (
    INSERT INTO ledger (at, outcome, operation, actor, charge_id, attempt_id,
        subscription_id, external_ref, plan, period, amount, currency, merchant_id, tx,
        alias_masked, code, message, raw, http_status, details)
    SELECT now(), %(outcome)s, 'duplicate', %(actor)s, charge.id, %(attempt)s,
        %(subscription)s, %(external_ref)s, %(plan)s, %(period)s, %(collected)s,
        %(currency)s, %(merchant)s, %(tx)s, %(alias_masked)s, %(code)s, %(message)s,
        %(raw)s, %(http_status)s, %(details)s::json
    FROM charge
    RETURNING id
), event AS (
    INSERT INTO events (event_id, type, subscription_id, external_ref, charge_id, payload,
        created_at, status, next_attempt_at, attempts)
    SELECT %(event_id)s, 'charge.approved', %(subscription)s, %(external_ref)s, charge.id,
        %(payload)s::json, now(), 'pending', now(), 0
    FROM charge
    RETURNING id
)
INSERT INTO event_deliveries (event_id, endpoint, subscription_id, status, next_attempt_at,
    attempts)
SELECT event.id, 'default', %(subscription)s, 'pending', now(), 0 FROM event
"""

#: The due charges of ``prepare``: one per subscription of the plan, queued.
QUEUE_CHARGES = """
INSERT INTO charges (subscription_id, period, due_at, plan, plan_version, amount, currency,
    merchant_id, deferred, manual, state, attempts, declines, queued_at, created_at,
    updated_at)
SELECT id, next_period, next_charge_at, plan, 1, %(amount)s, 'EUR', %(merchant)s, false,
    false, 'queued', 0, 0, now(), now(), now()
FROM subscriptions WHERE plan = %(plan)s
"""


def prepare(url: str, plan: str, amount: str, merchant_id: str) -> None:
    """Queue one charge per subscription of ``plan`` (what the sweep does, untimed)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(QUEUE_CHARGES, {"plan": plan, "amount": amount, "merchant": merchant_id})
        conn.execute("ANALYZE charges")


def _mask(alias: str) -> str:
    return f"{alias[:4]}…{alias[-2:]}"


def charge_once(
    conn: psycopg.Connection[Any], session: requests.Session, target: Target, charge_id: int
) -> bool:
    """Claim, call, record: the product's rows for one charge, two transactions."""
    row = conn.execute(CLAIM, {"charge": charge_id, "actor": ACTOR}).fetchone()
    if row is None:
        raise RuntimeError(f"charge {charge_id} was not queued")
    _, sub_id, number, amount, currency, merchant, plan, period, alias, ip, ref, attempt = row
    form = {**target.form(alias), "MONTANT": f"{amount:.2f}", "IP": ip}
    response = session.post(target.url, data=form, timeout=TIMEOUT)
    answer = parse_qs(response.text)
    code = answer.get("RESPONSE", [""])[0]
    tx = answer.get("TX", [None])[0]
    message = answer.get("MESSAGE", [None])[0]
    approved = response.status_code == 200 and code == "00"
    now = datetime.now(UTC)
    event_id = str(uuid.uuid4())
    state = "approved" if approved else "failed"
    payload = {
        "id": event_id,
        "type": "charge.approved",
        "created_at": now.isoformat().replace("+00:00", "Z"),
        "subscription": {"external_ref": ref, "plan": plan, "status": "active"},
        "charge": {
            "id": charge_id, "period": period, "amount": f"{amount:.2f}", "currency": currency,
            "state": state, "tx": tx, "code": code, "message": message,
        },
        "data": {"attempt": number},
    }  # fmt: skip
    conn.execute(
        RECORD,
        {
            "attempt": attempt, "charge": charge_id, "number": number, "subscription": sub_id,
            "outcome": state, "state": state, "code": code, "tx": tx, "message": message,
            "collected": amount if approved else None, "period": period,
            "next_at": now + relativedelta(months=1), "actor": ACTOR, "external_ref": ref,
            "plan": plan, "currency": currency, "merchant": merchant,
            "alias_masked": _mask(alias), "http_status": response.status_code,
            "raw": response.text.replace(target.private_key, "[private key]"),
            "details": json.dumps({"attempt": number, "script": "duplicate"}),
            "event_id": event_id, "payload": json.dumps(payload),
        },
    )  # fmt: skip
    return approved


def run(
    url: str,
    target: Target,
    plan: str,
    n: int,
    concurrency: int,
    sandbox_pid: int | None = None,
) -> YardstickResult:
    """The plan's ``n`` queued charges (``prepare``), C threads."""
    with psycopg.connect(url, autocommit=True) as conn:
        ids = [
            int(row[0])
            for row in conn.execute(
                "SELECT id FROM charges WHERE plan = %s AND state = 'queued' ORDER BY id LIMIT %s",
                (plan, n),
            )
        ]

    def charge(conn: psycopg.Connection[Any], session: requests.Session, charge_id: Any) -> bool:
        return charge_once(conn, session, target, int(charge_id))

    return run_threads("writes", url, target.gateway_url, ids, concurrency, charge, sandbox_pid)
