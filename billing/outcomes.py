"""The four outcomes of a gateway call. Every call ends in exactly one of them.

Callers branch on the type, never on strings: an ``Unknown`` cannot be mistaken for a
``NotSent`` and retried by accident.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

from billing.redact import mask_alias

OutcomeKind = Literal["approved", "declined", "not_sent", "unknown"]


@dataclass(frozen=True)
class Approved:
    """``RESPONSE=00``: the gateway accepted the transaction."""

    tx: str
    #: ``MONTANT`` as answered, when it reads as an amount.
    amount: Decimal | None = None
    alias: str | None = field(default=None, repr=False)
    raw: str = field(default="", repr=False)
    http_status: int = 200
    code: str = "00"
    message: str = ""
    #: ``MONTANT`` exactly as answered (redacted, cut), kept as evidence even when it does
    #: not read as an amount (``1E+30``); None when the answer had no ``MONTANT``.
    amount_text: str | None = None
    kind: OutcomeKind = field(default="approved", init=False)
    #: A later retry of the same request is never wanted: the money moved.
    retry_safe: bool = field(default=False, init=False)

    def __repr__(self) -> str:
        return f"Approved(tx={self.tx!r}, amount={self.amount}, alias={mask_alias(self.alias)!r})"


@dataclass(frozen=True)
class Declined:
    """Any other ``RESPONSE`` code: the gateway refused; ``soft`` says a later try may pass."""

    code: str
    message: str = ""
    soft: bool = True
    raw: str = field(default="", repr=False)
    http_status: int = 200
    tx: str | None = None
    kind: OutcomeKind = field(default="declined", init=False)
    #: A soft decline may be tried again later (by the ladder), never in a tight loop.
    retry_safe: bool = field(default=False, init=False)


@dataclass(frozen=True)
class NotSent:
    """The request provably never reached the script: retrying cannot charge twice."""

    reason: str
    http_status: int | None = None
    code: str = ""
    message: str = ""
    raw: str = field(default="", repr=False)
    kind: OutcomeKind = field(default="not_sent", init=False)
    retry_safe: bool = field(default=True, init=False)


@dataclass(frozen=True)
class Unknown:
    """The card may or may not have been charged. Never retried without a person."""

    reason: str
    http_status: int | None = None
    raw: str = field(default="", repr=False)
    code: str = ""
    message: str = ""
    tx: str | None = None
    kind: OutcomeKind = field(default="unknown", init=False)
    retry_safe: bool = field(default=False, init=False)


Outcome = Approved | Declined | NotSent | Unknown
