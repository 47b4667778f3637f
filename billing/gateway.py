"""The Klik & Pay server-to-server client: four scripts, each call ending in one outcome.

Every call returns ``Approved``, ``Declined``, ``NotSent`` or ``Unknown`` (``billing.outcomes``)
and never raises for anything the network or the gateway does. Only bad arguments raise
(``InvalidInput``, before anything is sent) and a bad base URL (``ConfigError``).

``NotSent`` is claimed only when the request provably never reached a script: the TCP
connection could not be opened (refused, DNS failure, connect timeout) or the TLS handshake
failed, i.e. before the first byte of the request was written. Once the request may have
been written, any failure (read timeout, connection reset or closed before or during the
answer, truncated answer) is ``Unknown``: the card may have been charged. Requests and
urllib3 2 wrap these errors in several layers (``ConnectionError(MaxRetryError(reason=
NewConnectionError))`` for a refused connection, ``ConnectionError(ProtocolError('Connection
aborted.', RemoteDisconnected))`` for a drop after sending), so the classification walks the
whole cause chain and, for TLS errors, looks at where the error was raised. The scripts'
POSTs go through urllib3 directly, on the session's own pool (``billing.formpost``: requests'
per-call work was a charge's largest CPU cost), and raise the innermost of these errors
unwrapped; the read-only lookup still goes through requests.

Pooled keep-alive connections: urllib3 checks that a pooled connection is still open before
reusing it, but a server closing an idle connection at the very moment a request is written
on it yields an ``Unknown`` that did not charge. It is rare and errs on the safe side.

Every call ends by a total deadline, the connect timeout plus the read timeout
(``billing.deadline``): a gateway that drips its answer a byte at a time cannot keep a call
alive past the stuck-call cutoff. A call cut by the deadline after its request may have
been written is ``Unknown`` and says so; one cut before is ``NotSent``.

Secrets (card number, CVV, expiry, private key) travel only in the form body. No exception
text from requests is ever formatted (it can carry the request); messages are built here.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from types import TracebackType

import requests
import urllib3
from urllib3 import BaseHTTPResponse
from urllib3.exceptions import (
    ConnectTimeoutError,
    LocationValueError,
    NameResolutionError,
    NewConnectionError,
    ReadTimeoutError,
)
from urllib3.exceptions import SSLError as Urllib3SSLError

from billing import __version__, defaults, formpost
from billing.answers import Verification, classify, parse_verification
from billing.deadline import CallDeadline, DeadlineAdapter, deadline
from billing.errors import ConfigError, GatewayAnswerError, InvalidInput
from billing.money import format_amount, parse_amount
from billing.outcomes import NotSent, Outcome, Unknown
from billing.redact import mask_alias
from billing.settings import Settings, get_settings

log = logging.getLogger(__name__)

SCRIPT_DIRECT = "server_server.pl"
SCRIPT_DUPLICATE = "duplicate.pl"
SCRIPT_VALIDATE = "validedifferee.pl"
SCRIPT_CANCEL = "cancel_transaction.pl"
SCRIPT_VERIFY = "veriftransaction.pl"

USER_AGENT = f"klikandpay-billing/{__version__}"
#: Connections kept per host: one per concurrent thread of a worker process is plenty.
POOL_MAXSIZE = 100
#: Bytes of an answer read at most; a real answer is a few hundred bytes.
MAX_ANSWER_BYTES = 1_000_000

#: ISO 3166-1 alpha-2 codes officially assigned (249). The guide's own example "EN" is a
#: language code, not a country, and is refused like "UK" (only exceptionally reserved):
#: the gateway is given real country codes only.
ISO_COUNTRIES = frozenset(
    """
    AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ
    BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM
    DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS
    GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN
    KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ
    MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM
    PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV
    SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI
    VN VU WF WS YE YT ZA ZM ZW
    """.split()  # noqa: SIM905 - a table is easier to check against the standard
)

_MONTH = re.compile(r"0[1-9]|1[0-2]")
_YEAR = re.compile(r"\d{4}")
_CARD = re.compile(r"\d{12,19}")
_CVV = re.compile(r"\d{3,4}")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+")
_CHARSET = re.compile(r"charset\s*=\s*\"?([\w.:\-]+)", re.IGNORECASE)


# --- validation -------------------------------------------------------------------------


def _text(name: str, value: object) -> str:
    """A mandatory text field; the message names the field and never shows its value."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f"{name}: must be a non-empty string")
    return value.strip()


def _optional_text(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput(f"{name}: must be a string")
    return value.strip() or None


def _ip(value: object) -> str:
    text = _text("ip", value)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise InvalidInput(f"ip: {text!r} is not an IPv4 or IPv6 address") from None


def _country(value: object) -> str:
    text = _text("country", value).upper()
    if text not in ISO_COUNTRIES:
        raise InvalidInput(f"country: {text!r} is not an ISO 3166-1 alpha-2 country code")
    return text


def _secret_digits(name: str, value: object, pattern: re.Pattern[str], rule: str) -> str:
    """Card number, CVV, expiry: checked without ever putting the value in a message."""
    if not isinstance(value, str):
        raise InvalidInput(f"{name}: must be a string of digits")
    text = re.sub(r"[\s\-]", "", value)
    if not pattern.fullmatch(text):
        raise InvalidInput(f"{name}: {rule}")
    return text


def _escape_detail(value: str) -> str:
    """Percent-encode the basket separators (``%`` first, then ``|`` and ``:``)."""
    return value.replace("%", "%25").replace("|", "%7C").replace(":", "%3A")


@dataclass(frozen=True)
class BasketLine:
    """One line of the ``DETAIL`` basket: reference, quantity, unit price, product name."""

    ref: str
    quantity: int
    price: Decimal
    product: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "ref", _text("basket.ref", self.ref))
        object.__setattr__(self, "product", _text("basket.product", self.product))
        if isinstance(self.quantity, bool) or not isinstance(self.quantity, int):
            raise InvalidInput("basket.quantity: must be a whole number")
        if self.quantity < 1:
            raise InvalidInput(f"basket.quantity: {self.quantity} must be at least 1")
        object.__setattr__(self, "price", parse_amount(self.price, field="basket.price"))


def encode_basket(lines: Sequence[BasketLine]) -> str:
    """``REF:<ref>%Q:<qty>%PRIX:<price>%PROD:<product>|`` per line.

    ``%``, ``|`` and ``:`` inside a reference or product name would break the format, so
    they are percent-encoded (``%25``, ``%7C``, ``%3A``); a reader splits on the separators
    first and then percent-decodes each value. Prices are sent as ``29.90``.
    """
    return "".join(
        f"REF:{_escape_detail(line.ref)}%Q:{line.quantity}%PRIX:{format_amount(line.price)}"
        f"%PROD:{_escape_detail(line.product)}|"
        for line in lines
    )


@dataclass(frozen=True, repr=False)
class DirectPayment:
    """A first payment with card details (``server_server.pl``), validated on construction.

    Field names are English; the form names of the guide are: merchant_id=ID, ip=IP,
    last_name=NOM, first_name=PRENOM, address=ADRESSE, postcode=CODEPOSTAL, city=VILLE,
    country=PAYS, email=EMAIL, phone=TEL, amount=MONTANT, card_number=NUMCARTE,
    exp_month=EXPMOIS, exp_year=EXPANNEE, cvv=CVV, state=STATE, company=SOCIETE,
    basket=DETAIL, fax=FAX, deferred=DIFFERE.

    ``country`` must be an officially assigned ISO 3166-1 alpha-2 code (see
    ``ISO_COUNTRIES``); the guide's example ``EN`` is not one and is refused. The repr shows
    the last four card digits at most and never the CVV or the expiry.
    """

    merchant_id: str
    ip: str
    last_name: str
    first_name: str
    address: str
    postcode: str
    city: str
    country: str
    email: str
    phone: str
    amount: Decimal
    card_number: str = field(repr=False)
    exp_month: str = field(repr=False)
    exp_year: str = field(repr=False)
    cvv: str = field(repr=False)
    state: str | None = None
    company: str | None = None
    basket: Sequence[BasketLine] = ()
    fax: str | None = None
    deferred: bool = False

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        put("merchant_id", _text("merchant_id", self.merchant_id))
        put("ip", _ip(self.ip))
        for name in ("last_name", "first_name", "address", "postcode", "city", "phone"):
            put(name, _text(name, getattr(self, name)))
        put("country", _country(self.country))
        email = _text("email", self.email)
        if not _EMAIL.fullmatch(email):
            raise InvalidInput(f"email: {email!r} is not an e-mail address")
        put("email", email)
        put("amount", parse_amount(self.amount, field="amount"))
        put(
            "card_number",
            _secret_digits("card_number", self.card_number, _CARD, "must be 12 to 19 digits"),
        )
        put(
            "exp_month",
            _secret_digits("exp_month", self.exp_month, _MONTH, "must be two digits, 01 to 12"),
        )
        put("exp_year", _secret_digits("exp_year", self.exp_year, _YEAR, "must be four digits"))
        put("cvv", _secret_digits("cvv", self.cvv, _CVV, "must be 3 or 4 digits"))
        for name in ("state", "company", "fax"):
            put(name, _optional_text(name, getattr(self, name)))
        basket = tuple(self.basket)
        if not all(isinstance(line, BasketLine) for line in basket):
            raise InvalidInput("basket: every line must be a BasketLine")
        put("basket", basket)
        if not isinstance(self.deferred, bool):
            raise InvalidInput("deferred: must be true or false")

    def __repr__(self) -> str:
        return (
            f"DirectPayment(merchant_id={self.merchant_id!r}, amount={format_amount(self.amount)},"
            f" country={self.country!r}, card=…{self.card_number[-4:]}, deferred={self.deferred})"
        )

    __str__ = __repr__

    def _form(self) -> dict[str, str]:
        """The POST fields. They contain the card: never log or store this."""
        form = {
            "ID": self.merchant_id,
            "IP": self.ip,
            "NOM": self.last_name,
            "PRENOM": self.first_name,
            "ADRESSE": self.address,
            "CODEPOSTAL": self.postcode,
            "VILLE": self.city,
            "PAYS": self.country,
            "EMAIL": self.email,
            "TEL": self.phone,
            "MONTANT": format_amount(self.amount),
            "NUMCARTE": self.card_number,
            "EXPMOIS": self.exp_month,
            "EXPANNEE": self.exp_year,
            "CVV": self.cvv,
        }
        optional = {"STATE": self.state, "SOCIETE": self.company, "FAX": self.fax}
        form.update({key: value for key, value in optional.items() if value})
        if self.basket:
            form["DETAIL"] = encode_basket(self.basket)
        if self.deferred:
            form["DIFFERE"] = "1"
        return form


# --- transport errors -------------------------------------------------------------------

#: Functions that only run while a connection is being opened (TCP connect, TLS handshake).
_CONNECT_FRAMES = frozenset(
    {
        "connect",
        "_new_conn",
        "_validate_conn",
        "create_connection",
        "ssl_wrap_socket",
        "do_handshake",
        "_connect_tls_proxy",
    }
)


def _causes(exc: BaseException) -> list[BaseException]:
    """The exception and everything it wraps: causes, contexts, ``reason`` and ``args``."""
    seen: list[BaseException] = []
    stack: list[object] = [exc]
    while stack and len(seen) < 64:
        item = stack.pop()
        if not isinstance(item, BaseException) or any(item is known for known in seen):
            continue
        seen.append(item)
        stack.extend((item.__cause__, item.__context__, getattr(item, "reason", None)))
        stack.extend(item.args)
    return seen


def _raised_while_connecting(causes: list[BaseException]) -> bool:
    for error in causes:
        tb: TracebackType | None = error.__traceback__
        while tb is not None:
            if tb.tb_frame.f_code.co_name in _CONNECT_FRAMES:
                return True
            tb = tb.tb_next
    return False


def transport_outcome(exc: BaseException) -> NotSent | Unknown:
    """Map an exception of ``requests`` or ``urllib3`` to ``NotSent`` or ``Unknown`` (see
    module docstring)."""
    causes = _causes(exc)

    def has(*kinds: type[BaseException]) -> bool:
        return any(isinstance(error, kinds) for error in causes)

    if has(NameResolutionError):
        return NotSent(reason="gateway host name did not resolve")
    if has(NewConnectionError):
        refused = has(ConnectionRefusedError)
        return NotSent(reason="connection refused" if refused else "could not connect")
    if isinstance(exc, requests.exceptions.ConnectTimeout) or has(ConnectTimeoutError):
        return NotSent(reason="connect timeout")
    if has(LocationValueError) or isinstance(
        exc,
        requests.exceptions.InvalidURL
        | requests.exceptions.MissingSchema
        | requests.exceptions.InvalidSchema,
    ):
        return NotSent(reason="invalid gateway URL")
    if _raised_while_connecting(causes):
        if has(Urllib3SSLError, requests.exceptions.SSLError):
            return NotSent(reason="TLS handshake failed")
        if has(ReadTimeoutError, TimeoutError, requests.exceptions.Timeout):
            return NotSent(reason="connect timeout")
        return NotSent(reason="could not connect")
    if isinstance(exc, requests.exceptions.ReadTimeout) or has(ReadTimeoutError):
        return Unknown(reason="read timeout: request sent, no answer in time")
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return Unknown(reason="answer cut off")
    return Unknown(reason=f"connection lost after the request was sent ({type(exc).__name__})")


def _decode(data: bytes, content_type: str) -> str:
    match = _CHARSET.search(content_type)
    if match:
        try:
            return data.decode(match.group(1), errors="replace")
        except LookupError:
            pass
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _new_session(base_url: str) -> requests.Session:
    session = requests.Session()
    adapter = DeadlineAdapter(pool_connections=4, pool_maxsize=POOL_MAXSIZE, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.headers["User-Agent"] = USER_AGENT
    # requests re-reads every environment variable on each request to find proxies and CA
    # bundles (a measurable share of a charge's CPU); read them once, with the same effect.
    session.proxies = requests.utils.get_environ_proxies(base_url)
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if bundle:
        session.verify = bundle
    session.trust_env = False
    return session


# --- the client -------------------------------------------------------------------------


class KlikAndPayClient:
    """One client per process (see ``get_client``); its session pools connections.

    POSTs are never retried here (``max_retries=0``): whether a failed call may be sent
    again is decided by its outcome, upstream. Every call has an explicit
    (connect, read) timeout and verifies TLS certificates.
    """

    def __init__(
        self,
        base_url: str = defaults.GATEWAY_URL,
        *,
        connect_timeout: float = defaults.CONNECT_TIMEOUT,
        read_timeout: float = defaults.READ_TIMEOUT,
        decline_overrides: Mapping[str, str] | None = None,
        tx_pattern: str = defaults.TX_PATTERN,
        session: requests.Session | None = None,
    ) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"gateway URL {base_url!r} must start with http:// or https://")
        if connect_timeout <= 0 or read_timeout <= 0:
            raise ConfigError("gateway timeouts must be positive numbers of seconds")
        self.base_url = base_url.rstrip("/")
        self.timeout = (float(connect_timeout), float(read_timeout))
        self.decline_overrides: dict[str, str] = dict(decline_overrides or {})
        self.tx_pattern = tx_pattern
        self.session = session if session is not None else _new_session(self.base_url)
        #: The scripts' POSTs, on the session's pool without requests' per-call work.
        self.poster = formpost.FormPoster(self.session, self.base_url)

    def __repr__(self) -> str:
        return f"KlikAndPayClient({self.base_url!r}, timeout={self.timeout})"

    @classmethod
    def from_settings(cls, settings: Settings) -> KlikAndPayClient:
        return cls(
            settings.gateway_url,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            decline_overrides=settings.decline_codes,
            tx_pattern=settings.tx_pattern,
        )

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> KlikAndPayClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # The four scripts. Arguments are validated before anything is sent.

    def direct_payment(self, payment: DirectPayment) -> Outcome:
        """A first payment with the card (``server_server.pl``); approval returns an alias."""
        if not isinstance(payment, DirectPayment):
            raise InvalidInput("payment: must be a DirectPayment")
        return self._call(
            SCRIPT_DIRECT,
            payment._form(),
            secrets=(payment.card_number, payment.cvv),
            merchant_id=payment.merchant_id,
        )

    def duplicate(
        self,
        *,
        merchant_id: str,
        alias: str,
        ip: str,
        amount: Decimal,
        private_key: str,
        deferred: bool = False,
    ) -> Outcome:
        """Charge a card again through its alias (``duplicate.pl``); ``deferred`` authorizes."""
        form = {
            "ID": _text("merchant_id", merchant_id),
            "IP": _ip(ip),
            "MONTANT": format_amount(parse_amount(amount, field="amount")),
            "ALIAS": _text("alias", alias),
            "PRIVATE_KEY": _text("private_key", private_key),
        }
        if deferred:
            form["DIFFERE"] = "1"
        return self._call(
            SCRIPT_DUPLICATE,
            form,
            secrets=(form["PRIVATE_KEY"],),
            merchant_id=form["ID"],
            alias=form["ALIAS"],
        )

    def validate_deferred(
        self, *, merchant_id: str, tx: str, amount: Decimal, private_key: str
    ) -> Outcome:
        """Capture (part of) a deferred authorization (``validedifferee.pl``)."""
        return self._tx_call(SCRIPT_VALIDATE, merchant_id, tx, amount, private_key)

    def cancel(self, *, merchant_id: str, tx: str, amount: Decimal, private_key: str) -> Outcome:
        """Release (part of) a pending authorization or refund (part of) a charge."""
        return self._tx_call(SCRIPT_CANCEL, merchant_id, tx, amount, private_key)

    def verify_transaction(self, *, merchant_id: str, tx: str) -> Verification:
        """Ask ``veriftransaction.pl`` whether the gateway knows ``tx`` (read-only).

        Raises ``GatewayAnswerError`` when no readable answer arrives: unlike a charge, a
        failed lookup has no outcome to record and can simply be asked again.
        """
        params = {"ID": _text("merchant_id", merchant_id), "NUMXKP": _text("tx", tx)}
        try:
            with (
                deadline(self.total_deadline),
                self.session.get(
                    f"{self.base_url}/{SCRIPT_VERIFY}",
                    params=params,
                    timeout=self.timeout,
                    allow_redirects=False,
                    verify=self.session.verify,  # True, or the CA bundle from the environment
                    stream=True,
                ) as response,
            ):
                data = self._read(response)
                status = response.status_code
                content_type = response.headers.get("Content-Type", "")
        except Exception as exc:
            reason = transport_outcome(exc).reason
            raise GatewayAnswerError(f"{SCRIPT_VERIFY}: {reason}") from None
        if not 200 <= status <= 299:
            raise GatewayAnswerError(f"{SCRIPT_VERIFY}: HTTP {status}")
        return parse_verification(_decode(data, content_type))

    # Internals.

    def _tx_call(
        self, script: str, merchant_id: str, tx: str, amount: Decimal, private_key: str
    ) -> Outcome:
        form = {
            "ID": _text("merchant_id", merchant_id),
            "TX": _text("tx", tx),
            "MONTANT": format_amount(parse_amount(amount, field="amount")),
            "PRIVATE_KEY": _text("private_key", private_key),
        }
        return self._call(
            script, form, secrets=(form["PRIVATE_KEY"],), merchant_id=form["ID"], tx=form["TX"]
        )

    def _call(
        self,
        script: str,
        form: dict[str, str],
        *,
        secrets: tuple[str, ...],
        merchant_id: str,
        alias: str | None = None,
        tx: str | None = None,
    ) -> Outcome:
        started = time.monotonic()
        outcome = self._send(script, form, secrets)
        elapsed_ms = (time.monotonic() - started) * 1000
        # An answered call is DEBUG: its caller logs the one line of its outcome (a charge's,
        # a settlement's) with the TX and HTTP status. A call left unanswered or unsent is a
        # warning of its own, whoever made it.
        level = logging.DEBUG if outcome.kind in ("approved", "declined") else logging.WARNING
        if not log.isEnabledFor(level):
            return outcome
        alias = alias or getattr(outcome, "alias", None)
        tx = tx or getattr(outcome, "tx", None)
        log.log(
            level,
            "klikandpay %s merchant=%s alias=%s tx=%s outcome=%s code=%s http=%s reason=%s"
            " duration_ms=%.0f",
            script,
            merchant_id,
            mask_alias(alias) or "-",
            tx or "-",
            outcome.kind,
            outcome.code or "-",
            outcome.http_status if outcome.http_status is not None else "-",
            getattr(outcome, "reason", "-"),
            elapsed_ms,
        )
        return outcome

    @property
    def total_deadline(self) -> float:
        """Seconds a call may take in all: the connect timeout plus the read timeout."""
        return self.timeout[0] + self.timeout[1]

    def _send(self, script: str, form: dict[str, str], secrets: tuple[str, ...]) -> Outcome:
        response: BaseHTTPResponse | None = None
        reuse = False
        with deadline(self.total_deadline) as call:
            try:
                response = self.poster.post(script, form, self.timeout)
                try:
                    data = formpost.read_answer(response, MAX_ANSWER_BYTES)
                except Exception as exc:  # the request was sent and an answer had begun
                    outcome: Outcome = Unknown(
                        reason=f"answer interrupted ({type(exc).__name__})",
                        http_status=response.status,
                    )
                else:
                    reuse = formpost.reusable(response, data, MAX_ANSWER_BYTES)
                    outcome = self._answer(response, data, secrets)
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                outcome = transport_outcome(exc)
            except Exception as exc:  # anything else from the stack: we cannot say what was sent
                outcome = Unknown(
                    reason=f"unexpected {type(exc).__name__} while calling the gateway"
                )
            # Out of the deadline's reach before the connection goes back to the pool.
            call.finish()
        if response is not None:
            formpost.release(response, reuse=reuse and not call.fired)
        if call.fired:
            return _cut(call, outcome)
        return outcome

    def _answer(self, response: BaseHTTPResponse, data: bytes, secrets: tuple[str, ...]) -> Outcome:
        """The outcome of an answer read whole."""
        text = _decode(data, response.headers.get("Content-Type", ""))
        return classify(
            response.status,
            text,
            decline_overrides=self.decline_overrides,
            secrets=secrets,
            tx_pattern=self.tx_pattern,
        )

    @staticmethod
    def _read(response: requests.Response) -> bytes:
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_content(chunk_size=65536):
            chunks.append(chunk)
            size += len(chunk)
            if size >= MAX_ANSWER_BYTES:
                break
        return b"".join(chunks)[:MAX_ANSWER_BYTES]


def _cut(call: CallDeadline, outcome: Outcome) -> Outcome:
    """The outcome of a call the deadline ended: unknown once the request may have gone.

    Even an answer that reads as approved or declined: cut by the deadline, an answer
    without a ``Content-Length`` can look whole (a shortened TX), so none is trusted.
    """
    if not call.may_have_sent:
        return NotSent(reason=f"could not connect within the {call.seconds:g} s deadline")
    return Unknown(
        reason=f"no complete answer within the {call.seconds:g} s deadline (connect + read "
        "timeout): the request was sent, the card may have been charged",
        http_status=outcome.http_status,
    )


# --- one client per process -------------------------------------------------------------

_clients: dict[tuple[object, ...], KlikAndPayClient] = {}
_clients_lock = threading.Lock()


def get_client(settings: Settings | None = None) -> KlikAndPayClient:
    """The process's client for these settings, created on first use.

    A forked child (Celery prefork) starts with no client: sharing the parent's pooled
    sockets between processes would interleave two conversations on one connection.
    """
    settings = settings if settings is not None else get_settings()
    key = (
        settings.gateway_url,
        settings.connect_timeout,
        settings.read_timeout,
        tuple(sorted(settings.decline_codes.items())),
        settings.tx_pattern,
    )
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = KlikAndPayClient.from_settings(settings)
        return client


def _forget_clients_after_fork() -> None:
    global _clients_lock
    _clients_lock = threading.Lock()
    _clients.clear()


os.register_at_fork(after_in_child=_forget_clients_after_fork)
