"""A form POST to the gateway straight through urllib3, on the pool of a requests session.

Why not ``session.post``: requests does a great deal per call that a client calling one
host with one configuration does not need — it merges the session's settings, cookies and
hooks into a new ``PreparedRequest``, encodes the form through several generic layers,
resolves the connection pool and the proxy anew, and wraps the answer in a ``Response``.
Measured on a charge (cProfile of the engine, sandbox latency 0), that work cost more CPU
than the call's whole urllib3 part: the single largest item of a charge.

So the session stays what configures the connection (its adapter with the deadline's
connection classes and no retries, its proxies and CA bundle read once from the
environment: ``billing.gateway._new_session``), and this module resolves, **once per base
URL**, what requests would resolve at every call: the connection pool (through the
adapter's own ``get_connection_with_tls_context``: the same pool, TLS verification and
proxy as ``session.post``) and the URL to put on the request line (``request_url``: the
path, or the whole URL through a plain HTTP proxy). Each call is then one
``urlopen`` with the form encoded as requests encodes it, requests' default headers and
the session's, no retries and no redirects.

Errors are urllib3's own, unwrapped (``retries=False`` raises the first one as it is):
``billing.gateway.transport_outcome`` classifies them by walking their causes, as it does
requests' wrappers of the same errors.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlencode

import requests
from urllib3 import BaseHTTPResponse, HTTPConnectionPool, Timeout

#: Bytes asked of the socket per read of an answer.
READ_CHUNK = 65536


@dataclass(frozen=True)
class Route:
    """Where one script's POSTs go: the pool, what goes on the request line, the headers."""

    pool: HTTPConnectionPool
    target: str
    headers: Mapping[str, str]


class FormPoster:
    """POSTs forms to the scripts of one base URL over ``session``'s connection pool."""

    def __init__(self, session: requests.Session, base_url: str) -> None:
        self.session = session
        self.base_url = base_url
        headers = requests.utils.default_headers()
        for name, value in session.headers.items():
            headers[name] = value if isinstance(value, str) else value.decode("latin-1")
        headers["Content-Type"] = "application/x-www-form-urlencoded"
        self.headers: Mapping[str, str] = dict(headers)
        self._routes: dict[str, Route] = {}
        self._lock = threading.Lock()

    def route(self, script: str) -> Route:
        """The pool, request-line target and headers of ``script``, resolved as requests
        would, on the first call only. Raises what requests raises for a URL it cannot use."""
        found = self._routes.get(script)
        if found is not None:
            return found
        with self._lock:
            found = self._routes.get(script)
            if found is None:
                found = self._routes[script] = self._resolve(f"{self.base_url}/{script}")
        return found

    def _resolve(self, url: str) -> Route:
        prepared = requests.Request("POST", url).prepare()  # credentials in the URL: auth
        adapter = self.session.get_adapter(url)
        if not isinstance(adapter, requests.adapters.HTTPAdapter):
            raise TypeError(f"no HTTP adapter mounted for {self.base_url}")
        proxies, verify = self.session.proxies, self.session.verify
        pool = adapter.get_connection_with_tls_context(prepared, verify, proxies)
        if not isinstance(pool, HTTPConnectionPool):
            raise TypeError(f"no HTTP connection pool for {self.base_url}")
        # What ``session.post`` does on every call: the CA bundle requests trusts (certifi,
        # or the environment's), never only the operating system's store.
        adapter.cert_verify(pool, url, verify, self.session.cert)  # type: ignore[no-untyped-call]
        headers = dict(self.headers)
        if "Authorization" in prepared.headers:
            headers["Authorization"] = prepared.headers["Authorization"]
        return Route(pool, adapter.request_url(prepared, proxies), headers)

    def post(
        self, script: str, form: Mapping[str, str], timeout: tuple[float, float]
    ) -> BaseHTTPResponse:
        """Send ``form`` to ``script``; the answer is left unread (``read_answer``).

        Never retried and never redirected: whether a failed call may be sent again is
        decided by its outcome, upstream.
        """
        route = self.route(script)
        body = urlencode(list(form.items()))
        return route.pool.urlopen(
            "POST",
            route.target,
            body=body,
            headers=route.headers,
            retries=False,
            redirect=False,
            assert_same_host=False,
            timeout=Timeout(connect=timeout[0], read=timeout[1]),
            preload_content=False,
            decode_content=True,
        )


def read_answer(response: BaseHTTPResponse, limit: int) -> bytes:
    """The answer's body, at most ``limit`` bytes (a longer one is cut: ``reusable``).

    An interim answer (``1xx``: http.client takes a 102 or 103 for the answer) is not read:
    reading it to its end would hand its connection back to the pool at once, with the
    script's real answer still to come on it."""
    if response.status < 200:
        return b""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.stream(READ_CHUNK, decode_content=True):
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]


def reusable(response: BaseHTTPResponse, body: bytes, limit: int) -> bool:
    """Whether the connection may serve another call: its answer was final (an interim
    ``1xx`` is read by http.client as the answer, and the real one would then be read by
    the next call on the connection) and read to its end (not cut at ``limit``)."""
    return response.status >= 200 and len(body) < limit


def release(response: BaseHTTPResponse, *, reuse: bool) -> None:
    """Give the connection back to the pool, closed unless ``reuse``: bytes left on it (an
    answer cut, failed half-way, or still to come after an interim one) would be read as
    the next call's answer. The pool opens a new connection in its place."""
    if not reuse:
        response.close()
    response.release_conn()


__all__ = ["READ_CHUNK", "FormPoster", "Route", "read_answer", "release", "reusable"]
