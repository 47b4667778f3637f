"""Which decline codes are worth trying again later (soft) and which are final (hard).

Klik & Pay publishes no list of its codes. The table holds the ISO 8583 issuer codes that
card gateways pass through, the word codes seen in public integrations (``REFUSED``), and
the codes of this project's sandbox (``AUTH``, ``ALIAS``, ``AMOUNT``...). A merchant who
learns better overrides single codes with ``BILLING_DECLINE_CODES`` (``Settings.decline_codes``).

A code nobody knows counts as soft: a hard decline ends a subscription's retry ladder for
good, so only a code we have reason to believe final may do that.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

Severity = Literal["soft", "hard"]

DEFAULT_CODES: dict[str, Severity] = {
    # Issuer said no for now: funds, limits, temporary refusals, issuer or network down.
    "05": "soft",  # do not honour
    "51": "soft",  # insufficient funds
    "61": "soft",  # exceeds withdrawal amount limit
    "65": "soft",  # exceeds withdrawal frequency limit
    "91": "soft",  # issuer or switch unavailable
    "96": "soft",  # system malfunction
    "REFUSED": "soft",  # generic refusal of the hosted-page flow
    # The card can never pass again as it is: a person must get new card details.
    "04": "hard",  # pick up card
    "07": "hard",  # pick up card, special condition
    "14": "hard",  # invalid card number
    "15": "hard",  # no such issuer
    "41": "hard",  # lost card
    "43": "hard",  # stolen card
    "54": "hard",  # expired card
    "57": "hard",  # transaction not permitted to cardholder
    "62": "hard",  # restricted card
    "N7": "hard",  # CVV2 mismatch
    # The request itself is wrong: retrying the same request cannot succeed.
    "ALIAS": "hard",  # alias unknown to the gateway for this merchant
    "AUTH": "hard",  # unknown merchant ID or wrong private key
    "AMOUNT": "hard",  # amount exceeds what remains authorized or refundable
    "INPUT": "hard",  # a mandatory field is missing or malformed
    "TX": "hard",  # transaction number unknown for this merchant
    "STATE": "hard",  # transaction not in a state that allows the operation
}


def is_soft(code: str, overrides: Mapping[str, str] | None = None) -> bool:
    """True when a later attempt may pass; overrides win, codes compare case-insensitively.

    Unknown codes are soft (see the module docstring). An override value other than
    ``"hard"`` counts as soft, so a typo never turns a code final by accident.
    """
    key = code.strip().upper()
    if overrides:
        for name, severity in overrides.items():
            if name.strip().upper() == key:
                return str(severity).strip().lower() != "hard"
    return DEFAULT_CODES.get(key, "soft") == "soft"
