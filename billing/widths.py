"""How wide each stored text is, defined once, and cutting a value to fit.

What the gateway, a shop or a person sends may be longer than its column. A value that
does not fit would make the database refuse the whole transaction (PostgreSQL raises;
SQLite would keep it whole, so the two would disagree), and the answer it belonged to
would be recorded nowhere. So every outside value is cut to its width *before* it reaches
the database, with a visible marker saying it was cut; the models take their widths from
here, so the parser and the column can never disagree again.
"""

from __future__ import annotations

#: Marker ending a value that was cut to fit its column.
CUT_MARKER = "…[cut]"

#: Klik & Pay transaction number (``TX``/``NUMXKP``).
TX = 64
#: Gateway result code (``RESPONSE``).
CODE = 32
#: Gateway message kept on the charge (the ledger keeps up to ``LEDGER_TEXT``).
MESSAGE = 255
#: Why a charge waits for a person, or why it was discarded.
REASON = 64
#: A charge's review flags (``billing.vocabulary.Review`` values, comma-separated).
REVIEW = 128
#: A ledger row's outcome (``resolved_validate_declined`` is the longest today).
OUTCOME = 40
#: Charge state, subscription status, attempt outcome, settlement operation.
STATE = 16
#: Who did something (``--by``, a console user, ``worker:host:pid``).
ACTOR = 128
#: Shop reference of a subscription.
EXTERNAL_REF = 128
#: Card alias.
ALIAS = 128
#: Plan name.
PLAN = 64
#: Merchant ID.
MERCHANT_ID = 32
#: Free texts of the ledger (message, raw body, reason): ``Text`` columns, still bounded.
LEDGER_TEXT = 4000


#: What stands in for a NUL character, which PostgreSQL's text types cannot hold.
NUL_MARK = "\ufffd"


def fit(value: str | None, width: int) -> str | None:
    """``value`` as it can be stored: NUL characters replaced, and cut with ``CUT_MARKER``
    at the end when it is longer than ``width`` characters."""
    if value is None:
        return None
    value = value.replace("\x00", NUL_MARK)
    if len(value) <= width:
        return value
    return value[: max(width - len(CUT_MARKER), 0)] + CUT_MARKER


def was_cut(value: str | None) -> bool:
    """Whether ``fit`` cut this value."""
    return bool(value) and str(value).endswith(CUT_MARKER)
