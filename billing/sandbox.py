"""A stateful fake Klik & Pay on loopback, for tests, the demo and benchmarks.

The real gateway runs duplicates, deferred payments and cancellations only on real cards,
so this sandbox is the only place those paths can be exercised. It speaks what the
project assumes the gateway speaks (``gateway-notes.md``): form POSTs to the four scripts,
answers ``RESPONSE=..&TX=..&ALIAS=..&MONTANT=..&MESSAGE=..`` with ``RESPONSE=00`` for
success, plus ``veriftransaction.pl``. It keeps money state per merchant and can misbehave
on demand (declines, slowness, dropped connections, 500s, garbage, 503s, outages, and
hostile answers: a real answer behind a 503 or 429, a message wider than any column, a TX
that is no transaction number, a MONTANT that is not the amount charged) through a JSON
control API under ``/_sandbox/``; each call in its log names the random fault it met.

Semantics chosen where the guide is silent:

- A deferred transaction is validated once: ``validedifferee.pl`` captures the amount
  asked (at most what remains authorized) and releases the rest, as card schemes do with
  a single capture per authorization.
- ``cancel_transaction.pl`` on a pending authorization releases part or all of what
  remains authorized; on collected money it refunds part or all of what remains
  refundable. Partial cancellations add up; asking more than remains is declined
  ``AMOUNT``.
- ``slow`` records the operation at once and answers late, which is what makes a read
  timeout ``Unknown``: the money moved.
- ``hold`` records the operation at once and keeps the answer until ``/_sandbox/release``
  lets it go (oldest first, per alias), so a test decides exactly when a late answer
  arrives; ``drip`` sends the answer one byte every so many seconds (a stalled gateway
  that a per-read timeout never catches).
- Totals per merchant: ``collected`` is captured money (direct non-deferred approvals,
  duplicates, validations), ``authorized`` what is held now awaiting validation or
  cancellation, ``refunded`` cancellations of collected money, ``released`` authorizations
  given back (cancelled, or the rest after a partial validation).

Card numbers, CVVs, expiries and private keys are never stored, logged or echoed.
"""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import hmac
import ipaddress
import itertools
import json
import logging
import random
import secrets
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from billing import defaults
from billing.errors import ConfigError, InvalidInput
from billing.money import format_amount, parse_amount

log = logging.getLogger(__name__)

#: The guide's test cards: only they are approved by ``server_server.pl``.
TEST_CARDS = frozenset({"4012888888881881", "5555555555554444"})
TEST_CVV = "111"
#: Accounts of ``billing sandbox`` when none is given (one merchant ID per currency).
DEMO_ACCOUNTS = {"1234567": "test-key-eur", "7654321": "test-key-usd"}

SCRIPTS = {
    "server_server.pl": "server_server",
    "duplicate.pl": "duplicate",
    "validedifferee.pl": "validedifferee",
    "cancel_transaction.pl": "cancel_transaction",
    "veriftransaction.pl": "veriftransaction",
}
MANDATORY = {
    "server_server": (
        "ID",
        "IP",
        "NOM",
        "PRENOM",
        "ADRESSE",
        "CODEPOSTAL",
        "VILLE",
        "PAYS",
        "EMAIL",
        "TEL",
        "MONTANT",
        "NUMCARTE",
        "EXPMOIS",
        "EXPANNEE",
        "CVV",
    ),
    "duplicate": ("ID", "IP", "MONTANT", "ALIAS", "PRIVATE_KEY"),
    "validedifferee": ("ID", "TX", "MONTANT", "PRIVATE_KEY"),
    "cancel_transaction": ("ID", "TX", "MONTANT", "PRIVATE_KEY"),
}
#: Behaviours that decide a call's fate; at most one per alias, optionally with ``slow``.
OUTCOME_BEHAVIOURS = (
    "decline",
    "unavailable",
    "drop_after_record",
    "error_500_after_record",
    "garbage",
)
#: Behaviours that rewrite an answer after the operation ran (the money moved as asked):
#: ``answer_status`` the HTTP status, ``answer_message``/``answer_tx`` those fields, and
#: ``answer_amount`` the MONTANT (``+1.00`` adds to the amount charged, else replaces it).
ANSWER_REWRITES = ("answer_status", "answer_message", "answer_tx", "answer_amount")
#: Random fault kinds of ``/_sandbox/faults``, drawn in this order from one number.
FAULT_KINDS = (
    "refuse",
    "soft_decline",
    "error_500_after_record",
    "drop_after_record",
    "garbage",
    # Hostile answers after the operation ran (issue 14): the real answer behind an HTTP
    # 503, a message wider than any column, a TX that is no transaction number, a MONTANT
    # that is not the amount charged.
    "answer_in_503",
    "long_message",
    "bad_tx",
    "amount_lie",
)
#: What each hostile fault does to an approval's answer (the behaviour keys of the same
#: effect); ``answer_in_503`` also puts declines behind its status, drawn per call.
HOSTILE_FAULTS: dict[str, dict[str, Any]] = {
    "answer_in_503": {"answer_status": 503},  # or 429: see BUSY_STATUSES
    "long_message": {"answer_message": "Transaction acceptee " + "x" * 400},
    "bad_tx": {"answer_tx": "<b>TX</b>&ID=1"},
    "amount_lie": {"answer_amount": "+1.00"},
}
SOFT_FAULT_CODES = ("05", "51", "91")
#: The statuses ``answer_in_503`` answers a real answer with: what a rate limiter or a
#: maintenance page answers, so what a careless client takes for "never sent".
BUSY_STATUSES = (503, 429)
#: Share of ``answer_in_503`` calls the script declines softly first, so that a decline is
#: seen behind a busy status too (it is a decline, never a call to send again at once).
BUSY_DECLINE_SHARE = 1 / 3
GARBAGE_BODY = "<html><body><h1>Erreur</h1><p>Le service a rencontr\u00e9 un probl\u00e8me"
MAX_BODY_BYTES = 1_000_000
#: Seconds a held answer (behaviour ``hold``) waits for ``/_sandbox/release`` at most.
HOLD_LIMIT = 120.0
ZERO = Decimal("0.00")


def is_loopback(host: str) -> bool:
    """``localhost`` and loopback IP literals; any other name counts as public."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Reply:
    """What the HTTP layer sends: ``body=None`` closes the connection without an answer."""

    status: int
    body: str | None
    delay: float = 0.0
    content_type: str = "text/plain; charset=utf-8"
    #: Set by ``hold``: the answer waits until the control API releases it.
    hold: threading.Event | None = None
    #: Set by ``drip``: seconds between two bytes of the answer (a gateway that stalls).
    drip: float = 0.0


@dataclass
class Transaction:
    tx: str
    merchant_id: str
    alias: str
    script: str
    amount: Decimal
    deferred: bool
    status: str
    created_at: datetime
    created_mono: float
    authorized: Decimal = ZERO
    collected: Decimal = ZERO
    refunded: Decimal = ZERO
    released: Decimal = ZERO
    operations: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "tx": self.tx,
            "merchant_id": self.merchant_id,
            "alias": self.alias,
            "script": self.script,
            "amount": format_amount(self.amount),
            "deferred": self.deferred,
            "status": self.status,
            "authorized": format_amount(self.authorized),
            "collected": format_amount(self.collected),
            "refunded": format_amount(self.refunded),
            "released": format_amount(self.released),
            "created_at": self.created_at.isoformat(),
            "operations": list(self.operations),
        }


@dataclass
class Totals:
    collected: Decimal = ZERO
    authorized: Decimal = ZERO
    refunded: Decimal = ZERO
    released: Decimal = ZERO

    def as_json(self) -> dict[str, str]:
        return {
            "collected": format_amount(self.collected),
            "authorized": format_amount(self.authorized),
            "refunded": format_amount(self.refunded),
            "released": format_amount(self.released),
        }


def validate_behaviour(behaviour: Mapping[str, Any]) -> dict[str, Any]:
    """Check a behaviour and return a clean copy; ``ValueError`` names what is wrong."""
    if not isinstance(behaviour, Mapping):
        raise ValueError("behaviour must be a JSON object")
    known = {*OUTCOME_BEHAVIOURS, *ANSWER_REWRITES, "slow", "times", "hold", "drip"}
    unknown = sorted(set(behaviour) - known)
    if unknown:
        raise ValueError(f"unknown behaviour key(s) {unknown}; known: {sorted(known)}")
    outcomes = [key for key in OUTCOME_BEHAVIOURS if key in behaviour]
    if len(outcomes) > 1:
        raise ValueError(f"only one of {list(OUTCOME_BEHAVIOURS)} per alias, got {outcomes}")
    if not outcomes and not {"slow", "hold", "drip", *ANSWER_REWRITES} & set(behaviour):
        raise ValueError("behaviour needs one of decline, slow, hold, drip, unavailable, ...")
    clean: dict[str, Any] = {}
    if "decline" in behaviour:
        code = behaviour["decline"]
        if not isinstance(code, str) or not code.strip() or code.strip() == "00":
            raise ValueError("decline: must be a decline code other than 00")
        clean["decline"] = code.strip()[:20]
    for flag in ("drop_after_record", "error_500_after_record", "garbage", "hold"):
        if flag in behaviour:
            if behaviour[flag] is not True:
                raise ValueError(f"{flag}: must be true")
            clean[flag] = True
    for counter in ("unavailable", "times"):
        if counter in behaviour:
            value = behaviour[counter]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{counter}: must be a whole number of calls, at least 1")
            clean[counter] = value
    if "slow" in behaviour:
        value = behaviour["slow"]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 600:
            raise ValueError("slow: must be a number of seconds between 0 and 600")
        clean["slow"] = float(value)
    if "answer_status" in behaviour:
        value = behaviour["answer_status"]
        if isinstance(value, bool) or not isinstance(value, int) or not 100 <= value <= 599:
            raise ValueError("answer_status: must be an HTTP status from 100 to 599")
        clean["answer_status"] = value
    for text in ("answer_message", "answer_tx", "answer_amount"):
        if text in behaviour:
            value = behaviour[text]
            if not isinstance(value, str) or len(value) > 2000:
                raise ValueError(f"{text}: must be a string of at most 2000 characters")
            clean[text] = value
    if "drip" in behaviour:
        value = behaviour["drip"]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 60:
            raise ValueError("drip: must be a number of seconds per byte, above 0 and at most 60")
        clean["drip"] = float(value)
    return clean


class SandboxState:
    """Accounts, aliases, transactions, call log and misbehaviours, behind one lock."""

    def __init__(self, accounts: Mapping[str, str] | None = None, latency: float = 0.0) -> None:
        self._lock = threading.Lock()
        self._accounts: dict[str, str] = dict(accounts or {})
        # Transaction numbers never restart, so a client holding one from before a reset
        # cannot hit another transaction.
        self._tx_numbers = itertools.count(100_000_001)
        self.latency = float(latency)
        self._clear()

    def _clear(self) -> None:
        self._aliases: dict[str, str] = {}
        self._txs: dict[str, Transaction] = {}
        self._calls: list[dict[str, Any]] = []
        self._seq = itertools.count(1)
        self._behaviours: dict[str, dict[str, Any]] = {}
        self._totals: dict[str, Totals] = {}
        self._fault_rates: dict[str, float] = {}
        self._fault_seed: int | None = None
        self._rng = random.Random()
        # Answers waiting for ``release``, oldest first, per alias; a reset releases them.
        for waiting in getattr(self, "_held", {}).values():
            for held in waiting:
                held.set()
        self._held: dict[str, list[threading.Event]] = {}

    # --- control --------------------------------------------------------------------

    def reset(self) -> None:
        """Forget calls, transactions, aliases, behaviours, faults and latency; keep accounts."""
        with self._lock:
            self._clear()
            self.latency = 0.0

    def add_account(self, merchant_id: str, private_key: str) -> None:
        if not isinstance(merchant_id, str) or not merchant_id.strip():
            raise ValueError("merchant_id: must be a non-empty string")
        if not isinstance(private_key, str) or not private_key:
            raise ValueError("private_key: must be a non-empty string")
        with self._lock:
            self._accounts[merchant_id.strip()] = private_key

    def merchants(self) -> list[str]:
        with self._lock:
            return sorted(self._accounts)

    def seed_aliases(
        self, merchant_id: str, *, count: int | None = None, aliases: Iterable[str] | None = None
    ) -> list[str]:
        """Register aliases as if a first payment had issued them; returns them in order."""
        if count is not None and (isinstance(count, bool) or not isinstance(count, int)):
            raise ValueError("count: must be a whole number")
        if count is not None and not 0 <= count <= 10_000_000:
            raise ValueError("count: must be between 0 and 10000000")
        given = list(aliases or [])
        if not all(isinstance(alias, str) and alias.strip() for alias in given):
            raise ValueError("aliases: must be non-empty strings")
        with self._lock:
            if merchant_id not in self._accounts:
                raise ValueError(f"merchant_id {merchant_id!r} is not a sandbox account")
            taken = [a for a in given if self._aliases.get(a, merchant_id) != merchant_id]
            if taken:
                raise ValueError(f"{len(taken)} alias(es) belong to another merchant")
            new = given + [self._new_alias_locked() for _ in range(count or 0)]
            for alias in new:
                self._aliases[alias] = merchant_id
            return new

    def set_latency(self, seconds: float) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
            raise ValueError("latency must be a non-negative number")
        self.latency = float(seconds)

    def set_behaviour(self, alias: str, behaviour: Mapping[str, Any]) -> None:
        if not isinstance(alias, str) or not alias:
            raise ValueError("alias: must be a non-empty string")
        clean = validate_behaviour(behaviour)
        with self._lock:
            self._behaviours[alias] = clean

    def clear_behaviours(self, alias: str | None = None) -> None:
        with self._lock:
            if alias is None:
                self._behaviours.clear()
            else:
                self._behaviours.pop(alias, None)

    def behaviours(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {alias: dict(b) for alias, b in self._behaviours.items()}

    def set_faults(self, rates: Mapping[str, float], seed: int | None = None) -> None:
        """Random faults per script call, as probabilities that add up to at most 1."""
        unknown = sorted(set(rates) - set(FAULT_KINDS))
        if unknown:
            raise ValueError(f"unknown fault kind(s) {unknown}; known: {list(FAULT_KINDS)}")
        clean: dict[str, float] = {}
        for kind, rate in rates.items():
            if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
                raise ValueError(f"{kind}: must be a probability between 0 and 1")
            clean[kind] = float(rate)
        if sum(clean.values()) > 1 + 1e-9:
            raise ValueError("fault rates add up to more than 1")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError("seed: must be an integer")
        with self._lock:
            self._fault_rates = clean
            self._fault_seed = seed
            self._rng = random.Random(seed)

    def faults(self) -> dict[str, Any]:
        with self._lock:
            return {**self._fault_rates, "seed": self._fault_seed}

    def release(self, alias: str, count: int = 1) -> int:
        """Let the ``count`` oldest held answers of ``alias`` go; returns how many were held."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError("count: must be a whole number, at least 1")
        with self._lock:
            waiting = self._held.get(alias, [])
            released, self._held[alias] = waiting[:count], waiting[count:]
        for held in released:
            held.set()
        return len(released)

    def held(self) -> dict[str, int]:
        """How many answers wait for ``release``, per alias."""
        with self._lock:
            return {alias: len(waiting) for alias, waiting in self._held.items() if waiting}

    def calls(
        self, *, alias: str | None = None, script: str | None = None, since: int = 0
    ) -> list[dict[str, Any]]:
        """Every script call received, in order; ``since`` skips sequence numbers up to it."""
        name = script[:-3] if script and script.endswith(".pl") else script
        with self._lock:
            return [
                dict(call)
                for call in self._calls
                if call["seq"] > since
                and (alias is None or call["alias"] == alias)
                and (name is None or call["script"] == name)
            ]

    def totals(self) -> dict[str, dict[str, str]]:
        with self._lock:
            return {mid: totals.as_json() for mid, totals in sorted(self._totals.items())}

    def transaction(self, tx: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._txs.get(tx)
            return found.as_json() if found else None

    # --- scripts --------------------------------------------------------------------

    def handle(self, script: str, fields: Mapping[str, str]) -> Reply:
        """Run one script call (``script`` like ``duplicate.pl``) and say what to answer."""
        with self._lock:
            return self._handle_locked(SCRIPTS[script], fields)

    def _handle_locked(self, name: str, fields: Mapping[str, str]) -> Reply:
        tx_number = fields.get("TX") or fields.get("NUMXKP") or None
        known_tx = self._txs.get(tx_number) if tx_number else None
        call: dict[str, Any] = {
            "seq": next(self._seq),
            "script": name,
            "merchant_id": fields.get("ID") or None,
            "alias": fields.get("ALIAS") or (known_tx.alias if known_tx else None),
            "tx": tx_number,
            "amount": fields.get("MONTANT") or None,
            "deferred": fields.get("DIFFERE", "").strip() == "1",
            "result": "",
            "code": "",
            "recorded": False,
            "fault": None,
            "at": _now().isoformat(),
        }
        self._calls.append(call)
        if name == "veriftransaction":
            return self._verify(call, known_tx)

        behaviour = self._take_behaviour(call["alias"])
        fault = self._roll_fault()
        # The random fault this call met, in the call log: the chaos run's judge holds each
        # call's outcome to what its fault defines (``chaos.reconcile``).
        call["fault"] = fault
        delay = float(behaviour.get("slow", 0.0))
        if behaviour.get("unavailable") or fault == "refuse":
            call.update(result="unavailable", code="503")
            return Reply(503, "Service temporarily unavailable, try again later", delay)

        forced = behaviour.get("decline")
        busy_decline = fault == "answer_in_503" and self._rng.random() < BUSY_DECLINE_SHARE
        if forced is None and (fault == "soft_decline" or busy_decline):
            forced = self._rng.choice(SOFT_FAULT_CODES)
        reply = self._run(name, fields, call, forced)

        after = next(
            (
                key
                for key in ("drop_after_record", "error_500_after_record", "garbage")
                if behaviour.get(key)
            ),
            fault if fault in ("drop_after_record", "error_500_after_record", "garbage") else None,
        )
        if after == "drop_after_record":
            call["result"] = "dropped"
            reply = Reply(0, None)
        elif after == "error_500_after_record":
            call["result"] = "error_500"
            reply = Reply(500, "Internal Server Error")
        elif after == "garbage":
            call["result"] = "garbage"
            reply = Reply(200, GARBAGE_BODY, content_type="text/html; charset=utf-8")
        rewrites = {k: v for k, v in behaviour.items() if k in ANSWER_REWRITES}
        hostile = self._hostile_rewrites(fault, call["result"])
        if hostile is not None:
            rewrites = {**hostile, **rewrites}
        elif fault in HOSTILE_FAULTS:
            call["fault"] = None  # nothing to rewrite (an input error): no fault met
        if rewrites and reply.body is not None and after is None:
            reply = _rewritten(reply, rewrites)
            call["rewritten"] = sorted(rewrites)
        reply.delay = delay
        reply.drip = float(behaviour.get("drip", 0.0))
        if behaviour.get("hold") and call["alias"]:
            reply.hold = threading.Event()
            self._held.setdefault(call["alias"], []).append(reply.hold)
        return reply

    def _take_behaviour(self, alias: str | None) -> dict[str, Any]:
        """The alias's behaviour for this call, counting down ``unavailable``/``times``."""
        if not alias or alias not in self._behaviours:
            return {}
        stored = self._behaviours[alias]
        active = dict(stored)
        for counter in ("unavailable", "times"):
            if counter in stored:
                stored[counter] -= 1
                if stored[counter] <= 0:
                    del self._behaviours[alias]
                    break
        return active

    def _hostile_rewrites(self, fault: str | None, result: str) -> dict[str, Any] | None:
        """What a hostile fault rewrites in this call's answer, or None when it has nothing
        to rewrite: an approval's answer, or for ``answer_in_503`` a decline's as well."""
        if fault not in HOSTILE_FAULTS:
            return None
        if result != "approved" and not (fault == "answer_in_503" and result == "declined"):
            return None
        rewrites = dict(HOSTILE_FAULTS[fault])
        if fault == "answer_in_503":
            rewrites["answer_status"] = self._rng.choice(BUSY_STATUSES)
        return rewrites

    def _roll_fault(self) -> str | None:
        if not self._fault_rates:
            return None
        draw = self._rng.random()
        threshold = 0.0
        for kind in FAULT_KINDS:
            threshold += self._fault_rates.get(kind, 0.0)
            if draw < threshold:
                return kind
        return None

    def _run(
        self, name: str, fields: Mapping[str, str], call: dict[str, Any], forced: str | None
    ) -> Reply:
        missing = [key for key in MANDATORY[name] if not fields.get(key, "").strip()]
        if missing:
            return self._decline(call, "INPUT", f"Champ manquant : {missing[0]}")
        merchant_id = fields["ID"].strip()
        key = self._accounts.get(merchant_id)
        if key is None:
            return self._decline(call, "AUTH", "Identifiant marchand inconnu")
        if name != "server_server" and not hmac.compare_digest(
            fields["PRIVATE_KEY"].encode(), key.encode()
        ):
            return self._decline(call, "AUTH", "Cle privee incorrecte")
        try:
            amount = parse_amount(fields["MONTANT"], field="MONTANT")
        except InvalidInput:
            return self._decline(call, "INPUT", "Montant invalide")
        if name == "server_server":
            return self._direct(fields, call, merchant_id, amount, forced)
        if name == "duplicate":
            return self._duplicate(fields, call, merchant_id, amount, forced)
        tx = self._txs.get(fields["TX"].strip())
        if tx is None or tx.merchant_id != merchant_id:
            return self._decline(call, "TX", "Transaction inconnue")
        if name == "validedifferee":
            return self._validate(call, tx, amount, forced)
        return self._cancel(call, tx, amount, forced)

    def _direct(
        self,
        fields: Mapping[str, str],
        call: dict[str, Any],
        merchant_id: str,
        amount: Decimal,
        forced: str | None,
    ) -> Reply:
        card = "".join(ch for ch in fields["NUMCARTE"] if ch.isdigit())
        month, year = fields["EXPMOIS"].strip(), fields["EXPANNEE"].strip()
        if forced:
            return self._decline(call, forced, "Transaction refusee")
        if card not in TEST_CARDS:
            return self._decline(call, "14", "Carte refusee en mode test")
        if fields["CVV"].strip() != TEST_CVV:
            return self._decline(call, "N7", "Cryptogramme incorrect")
        today = _now()
        if not (month.isdigit() and year.isdigit() and 1 <= int(month) <= 12 and len(year) == 4):
            return self._decline(call, "INPUT", "Date d'expiration invalide")
        if (int(year), int(month)) < (today.year, today.month):
            return self._decline(call, "54", "Carte expiree")
        alias = self._new_alias_locked()
        self._aliases[alias] = merchant_id
        return self._charge(call, merchant_id, alias, "server_server", amount)

    def _duplicate(
        self,
        fields: Mapping[str, str],
        call: dict[str, Any],
        merchant_id: str,
        amount: Decimal,
        forced: str | None,
    ) -> Reply:
        alias = fields["ALIAS"].strip()
        if self._aliases.get(alias) != merchant_id:
            return self._decline(call, "ALIAS", "Alias inconnu")
        if forced:
            return self._decline(call, forced, "Transaction refusee")
        return self._charge(call, merchant_id, alias, "duplicate", amount)

    def _charge(
        self, call: dict[str, Any], merchant_id: str, alias: str, script: str, amount: Decimal
    ) -> Reply:
        deferred = bool(call["deferred"])
        now = _now()
        tx = Transaction(
            tx=str(next(self._tx_numbers)),
            merchant_id=merchant_id,
            alias=alias,
            script=script,
            amount=amount,
            deferred=deferred,
            status="authorized" if deferred else "collected",
            created_at=now,
            created_mono=time.monotonic(),
        )
        totals = self._totals.setdefault(merchant_id, Totals())
        if deferred:
            tx.authorized = amount
            totals.authorized += amount
        else:
            tx.collected = amount
            totals.collected += amount
        tx.operations.append(
            {
                "op": "authorize" if deferred else "collect",
                "amount": format_amount(amount),
                "at": now.isoformat(),
            }
        )
        self._txs[tx.tx] = tx
        message = "Transaction autorisee" if deferred else "Transaction acceptee"
        return self._approve(call, tx, amount, message, alias=alias)

    def _validate(
        self, call: dict[str, Any], tx: Transaction, amount: Decimal, forced: str | None
    ) -> Reply:
        if tx.status != "authorized":
            return self._decline(call, "STATE", "Transaction non differee ou deja traitee")
        if amount > tx.authorized:
            return self._decline(call, "AMOUNT", "Montant superieur au montant autorise")
        if forced:
            return self._decline(call, forced, "Validation refusee")
        rest = tx.authorized - amount
        totals = self._totals.setdefault(tx.merchant_id, Totals())
        totals.authorized -= tx.authorized
        totals.collected += amount
        totals.released += rest
        tx.collected += amount
        tx.released += rest
        tx.authorized = ZERO
        tx.status = "collected"
        tx.operations.append(
            {
                "op": "validate",
                "amount": format_amount(amount),
                "released": format_amount(rest),
                "at": _now().isoformat(),
            }
        )
        return self._approve(call, tx, amount, "Transaction validee")

    def _cancel(
        self, call: dict[str, Any], tx: Transaction, amount: Decimal, forced: str | None
    ) -> Reply:
        totals = self._totals.setdefault(tx.merchant_id, Totals())
        if tx.status == "authorized":
            if amount > tx.authorized:
                return self._decline(call, "AMOUNT", "Montant superieur au montant restant")
            if forced:
                return self._decline(call, forced, "Annulation refusee")
            tx.authorized -= amount
            tx.released += amount
            totals.authorized -= amount
            totals.released += amount
            tx.status = "authorized" if tx.authorized > 0 else "released"
            op = "release"
        else:
            if amount > tx.collected - tx.refunded:
                return self._decline(call, "AMOUNT", "Montant superieur au montant remboursable")
            if forced:
                return self._decline(call, forced, "Annulation refusee")
            tx.refunded += amount
            totals.refunded += amount
            tx.status = "refunded" if tx.refunded == tx.collected else "partially_refunded"
            op = "refund"
        tx.operations.append({"op": op, "amount": format_amount(amount), "at": _now().isoformat()})
        return self._approve(call, tx, amount, "Annulation effectuee")

    def _verify(self, call: dict[str, Any], tx: Transaction | None) -> Reply:
        if tx is None or tx.merchant_id != call["merchant_id"]:
            call.update(result="not_found", code="VALIDATIONNO")
            return Reply(200, "VALIDATIONNO")
        call.update(result="found", code="VALIDATIONYES")
        age = int(time.monotonic() - tx.created_mono)
        return Reply(200, f"VALIDATIONYES|{format_amount(tx.amount)}|{age}")

    def _approve(
        self,
        call: dict[str, Any],
        tx: Transaction,
        amount: Decimal,
        message: str,
        alias: str | None = None,
    ) -> Reply:
        call.update(result="approved", code="00", recorded=True, tx=tx.tx, alias=tx.alias)
        answer = {"RESPONSE": "00", "TX": tx.tx}
        if alias:
            answer["ALIAS"] = alias
        answer.update(MONTANT=format_amount(amount), MESSAGE=message)
        return Reply(200, urlencode(answer, quote_via=quote))

    def _decline(self, call: dict[str, Any], code: str, message: str) -> Reply:
        call.update(result="declined", code=code)
        answer = {"RESPONSE": code, "MESSAGE": message}
        if call["amount"]:
            with contextlib.suppress(InvalidInput):
                answer["MONTANT"] = format_amount(parse_amount(call["amount"]))
        return Reply(200, urlencode(answer, quote_via=quote))

    def _new_alias_locked(self) -> str:
        while True:
            alias = secrets.token_hex(10)
            if alias not in self._aliases:
                return alias


def _rewritten(reply: Reply, rewrites: Mapping[str, Any]) -> Reply:
    """The answer with its status or fields replaced (a lying or hostile gateway)."""
    fields = dict(parse_qsl(reply.body or "", keep_blank_values=True))
    if "answer_message" in rewrites:
        fields["MESSAGE"] = rewrites["answer_message"]
    if "answer_tx" in rewrites:
        fields["TX"] = rewrites["answer_tx"]
    if "answer_amount" in rewrites:
        said = str(rewrites["answer_amount"])
        if said.startswith("+") and fields.get("MONTANT"):
            with contextlib.suppress(InvalidInput):
                said = format_amount(parse_amount(fields["MONTANT"]) + parse_amount(said[1:]))
        fields["MONTANT"] = said
    status = int(rewrites.get("answer_status", reply.status))
    return Reply(status, urlencode(fields, quote_via=quote), reply.delay, reply.content_type)


# --- HTTP -------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "KlikAndPaySandbox/1.0"
    sys_version = ""
    disable_nagle_algorithm = True
    server: _Server

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # The path only: query strings of the control API carry aliases.
        log.debug("sandbox %s %s -> %s", self.command, urlsplit(self.path).path, code)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("sandbox http: " + format, *args)

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        body = self._read_body()
        if body is None:
            return
        path = url.path.rstrip("/") or "/"
        if path == "/_sandbox" or path.startswith("/_sandbox/"):
            self._control(method, path, url.query, body)
            return
        script = path.rsplit("/", 1)[-1]
        if script not in SCRIPTS or path not in (f"/{script}", f"/paiement/{script}"):
            self._send(404, "Not Found")
            return
        if method != "POST" and not (method == "GET" and script == "veriftransaction.pl"):
            self._send(405, "Method Not Allowed", headers={"Allow": "POST"})
            return
        fields = _form_fields(body, self.headers.get("Content-Type", ""))
        if script == "veriftransaction.pl":
            for key, value in parse_qsl(url.query, keep_blank_values=True):
                fields.setdefault(key.upper(), value)
        if self.server.sandbox.state.latency:
            time.sleep(self.server.sandbox.state.latency)
        reply = self.server.sandbox.state.handle(script, fields)
        if reply.hold is not None:
            reply.hold.wait(HOLD_LIMIT)
        if reply.delay:
            time.sleep(reply.delay)
        if reply.body is None:
            self.close_connection = True
            return
        if reply.drip:
            self._drip(reply)
            return
        self._send(reply.status, reply.body, content_type=reply.content_type)

    def _drip(self, reply: Reply) -> None:
        """Send the answer one byte at a time: each read sees data, none sees the whole."""
        data = reply.body.encode("utf-8") if reply.body is not None else b""
        head = (
            f"HTTP/1.1 {reply.status} OK\r\nContent-Type: {reply.content_type}\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
        ).encode()
        self.close_connection = True
        try:
            for byte in head + data:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(reply.drip)
        except OSError:  # the client gave up: that is the point
            return

    def _read_body(self) -> bytes | None:
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            if self.headers.get("Transfer-Encoding"):
                self._send(411, "Length Required", close=True)
                return None
            return b""
        try:
            length = int(length_header)
        except ValueError:
            self._send(400, "Bad Content-Length", close=True)
            return None
        if not 0 <= length <= MAX_BODY_BYTES:
            self._send(413, "Payload Too Large", close=True)
            return None
        return self.rfile.read(length)

    def _send(
        self,
        status: int,
        body: str,
        *,
        content_type: str = "text/plain; charset=utf-8",
        headers: Mapping[str, str] | None = None,
        close: bool = False,
    ) -> None:
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def _json(self, status: int, payload: object, *, close: bool = False) -> None:
        self._send(status, json.dumps(payload), content_type="application/json", close=close)

    def _control(self, method: str, path: str, query: str, body: bytes) -> None:
        try:
            data = json.loads(body) if body.strip() else {}
        except ValueError:
            self._json(400, {"error": "body is not JSON"})
            return
        if not isinstance(data, dict):
            self._json(400, {"error": "body must be a JSON object"})
            return
        params = dict(parse_qsl(query, keep_blank_values=True))
        route = path.removeprefix("/_sandbox").strip("/")
        try:
            result = _control_route(self.server.sandbox, method, route, params, data)
        except ValueError as exc:
            self._json(400, {"error": str(exc)})
            return
        except LookupError as exc:
            self._json(404, {"error": str(exc.args[0]) if exc.args else "not found"})
            return
        if isinstance(result, _Outage):
            self.server.sandbox.outage(result.seconds, keep=self.connection)
            self._json(200, {"ok": True, "seconds": result.seconds}, close=True)
            return
        self._json(200, result)


@dataclass(frozen=True)
class _Outage:
    seconds: float


def _number(data: Mapping[str, Any], key: str) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{key}: must be a non-negative number")
    return float(value)


def _control_route(
    sandbox: Sandbox, method: str, route: str, params: Mapping[str, str], data: dict[str, Any]
) -> Any:
    """Run one control call; ``ValueError`` -> 400, ``LookupError`` -> 404."""
    state = sandbox.state
    call = (method, route)
    if call == ("GET", "health"):
        return {"ok": True}
    if call == ("POST", "reset"):
        state.reset()
        return {"ok": True}
    if call == ("GET", "accounts"):
        return {"merchants": state.merchants()}
    if call == ("POST", "accounts"):
        state.add_account(data.get("merchant_id", ""), data.get("private_key", ""))
        return {"ok": True}
    if call == ("POST", "aliases"):
        aliases = state.seed_aliases(
            data.get("merchant_id", ""), count=data.get("count"), aliases=data.get("aliases")
        )
        return {"aliases": aliases}
    if call == ("POST", "latency"):
        state.set_latency(_number(data, "ms") / 1000)
    if route == "latency" and method in ("GET", "POST"):
        return {"ms": state.latency * 1000}
    if call == ("POST", "behaviours"):
        state.set_behaviour(data.get("alias", ""), data.get("behaviour", {}))
        return {"ok": True}
    if call in (("DELETE", "behaviours"), ("POST", "behaviours/clear")):
        state.clear_behaviours(params.get("alias") or data.get("alias") or None)
        return {"ok": True}
    if call == ("GET", "behaviours"):
        return {"behaviours": state.behaviours()}
    if call == ("POST", "faults"):
        state.set_faults({k: v for k, v in data.items() if k != "seed"}, data.get("seed"))
    if route == "faults" and method in ("GET", "POST"):
        return {"faults": state.faults()}
    if call == ("POST", "outage"):
        return _Outage(_number(data, "seconds"))
    if call == ("GET", "calls"):
        try:
            since = int(params.get("since") or 0)
        except ValueError:
            raise ValueError("since: must be a whole number") from None
        calls = state.calls(
            alias=params.get("alias") or None, script=params.get("script") or None, since=since
        )
        return {"calls": calls}
    if call == ("GET", "totals"):
        return {"merchants": state.totals()}
    if call == ("POST", "release"):
        return {"released": state.release(data.get("alias", ""), data.get("count", 1))}
    if call == ("GET", "held"):
        return {"held": state.held()}
    if method == "GET" and route.startswith("transactions/"):
        found = state.transaction(route.removeprefix("transactions/"))
        if found is None:
            raise LookupError("unknown transaction")
        return found
    if route in _CONTROL_ROUTES:
        raise ValueError(f"{method} not allowed on /_sandbox/{route}")
    raise LookupError(f"no control endpoint /_sandbox/{route}")


_CONTROL_ROUTES = frozenset(
    {
        "health",
        "reset",
        "accounts",
        "aliases",
        "latency",
        "behaviours",
        "behaviours/clear",
        "faults",
        "outage",
        "calls",
        "totals",
        "release",
        "held",
    }
)


def _form_fields(body: bytes, content_type: str) -> dict[str, str]:
    """Form fields (urlencoded or multipart, as PHP's curl sends arrays), keys upper-case."""
    fields: dict[str, str] = {}
    if content_type.lower().startswith("multipart/form-data"):
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
        )
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            if isinstance(name, str) and isinstance(payload, bytes):
                fields.setdefault(name.upper(), payload.decode("utf-8", "replace"))
        return fields
    for key, value in parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True):
        fields.setdefault(key.upper(), value)
    return fields


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    #: Pending connections the kernel queues. socketserver's default of 5 reset connections
    #: when a worker with 64 threads opened its pool at once (a false "unknown" in a test).
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self, keep: socket.socket | None = None) -> None:
        """Cut every open client connection (except ``keep``) so that none outlives us."""
        with self._connections_lock:
            connections = [conn for conn in self._connections if conn is not keep]
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("sandbox connection ended with an error", exc_info=True)


class Sandbox:
    """The fake gateway in this process: ``Sandbox(...).start()`` returns once it listens.

    ``latency`` is in seconds (the control API and the CLI take milliseconds). A host
    that is not loopback is refused unless ``allow_public`` is set: the sandbox approves
    anything with a test card and has no authentication on its control API.
    """

    def __init__(
        self,
        host: str = defaults.BIND_HOST,
        port: int = 0,
        *,
        accounts: Mapping[str, str] | None = None,
        latency: float = 0.0,
        allow_public: bool = False,
    ) -> None:
        if not allow_public and not is_loopback(host):
            raise ConfigError(
                f"sandbox host {host!r} is not a loopback address; pass --allow-public to expose it"
            )
        self.host = host.strip("[]")
        self._port = port
        self.state = SandboxState(accounts, latency)
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._stopped = False
        self._reopen_timer: threading.Timer | None = None

    def __repr__(self) -> str:
        return f"Sandbox({self.url!r})"

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}"

    @property
    def listening(self) -> bool:
        return self._server is not None

    def start(self) -> Sandbox:
        with self._lock:
            self._stopped = False
            if self._server is None:
                self._listen_locked()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            if self._reopen_timer is not None:
                self._reopen_timer.cancel()
            server, self._server = self._server, None
        if server is not None:
            _close(server)

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def outage(self, seconds: float, *, keep: socket.socket | None = None) -> None:
        """Stop listening now and cut open connections; listen again after ``seconds``.

        Connection attempts meanwhile are refused, control calls included. ``keep`` is
        the connection of the control call that asked, so it can still be answered.
        """
        with self._lock:
            if self._reopen_timer is not None:
                self._reopen_timer.cancel()
            server, self._server = self._server, None
            timer = threading.Timer(seconds, self._reopen)
            timer.daemon = True
            self._reopen_timer = timer
        if server is not None:
            _close(server, keep)
        timer.start()

    def _reopen(self) -> None:
        for _ in range(50):
            with self._lock:
                if self._stopped or self._server is not None:
                    return
                try:
                    self._listen_locked()
                    return
                except OSError:
                    pass
            time.sleep(0.1)
        log.error("sandbox could not listen again on %s", self.url)

    def _listen_locked(self) -> None:
        server = _Server((self.host, self._port), self)
        self._port = server.server_address[1]
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"sandbox-{self._port}",
            daemon=True,
        )
        thread.start()
        self._server = server


def _close(server: _Server, keep: socket.socket | None = None) -> None:
    server.shutdown()
    server.server_close()
    server.close_connections(keep)
