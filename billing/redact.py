"""Keeping secrets out of logs, errors, reprs and stored answers.

Card numbers, CVVs and private keys never leave the request they travel in; aliases are
shown masked. Everything that stores or prints a gateway body passes it through here.
"""

from __future__ import annotations

import re

#: Request or answer fields whose values are secret, in any case.
SECRET_FIELDS = frozenset({"NUMCARTE", "CVV", "PRIVATE_KEY", "EXPMOIS", "EXPANNEE"})

_FIELD = re.compile(
    r"(?P<key>\b(?:"
    + "|".join(sorted(SECRET_FIELDS))
    # An optional quote after the key: JSON bodies write "CVV": "111".
    + r")\b)(?P<sep>\"?\s*[=:]\s*\"?)(?P<val>[^&\n\",}]*)",
    re.IGNORECASE,
)
# A run of 13 to 19 digits, possibly grouped by spaces or dashes, not part of a decimal
# number, is a card number when its Luhn check holds (as every card number's does).
_PAN = re.compile(r"(?<!\d)(?<!\d\.)(?:\d[ -]?){12,18}\d(?!\d|\.\d)")


def luhn_valid(digits: str) -> bool:
    """The check every card number passes (ISO/IEC 7812)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _pan_or_not(match: re.Match[str]) -> str:
    digits = re.sub(r"[ -]", "", match.group(0))
    return "[redacted-pan]" if luhn_valid(digits) else match.group(0)


def mask_alias(alias: str | None) -> str:
    """``ab12cd34ef9f`` -> ``ab12…9f``: enough for a person to match, not to reuse."""
    if not alias:
        return ""
    if len(alias) <= 6:
        return "…"
    return f"{alias[:4]}…{alias[-2:]}"


def redact(text: str | None, *, secrets: tuple[str, ...] = ()) -> str:
    """Return ``text`` with secret fields, card-number-like runs and given secrets blanked."""
    if not text:
        return ""
    out = _FIELD.sub(lambda m: f"{m.group('key')}{m.group('sep')}[redacted]", text)
    out = _PAN.sub(_pan_or_not, out)
    for secret in secrets:
        if secret and len(secret) >= 4:
            out = out.replace(secret, "[redacted]")
    return out
