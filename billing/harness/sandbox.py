"""``billing sandbox`` as a process of its own, and the one client of its control API.

The sandbox is driven over HTTP (``/_sandbox/``) whether it runs in the test process
(``billing.sandbox.Sandbox``) or in another one, so the same ``SandboxControl`` serves the
tests, the bench, chaos and the demo. ``SandboxProcess`` starts the command a user runs,
on port 0, reads the URL it prints, and waits until the control API answers before it
hands the sandbox over: a caller never races the server's start.

Where its output goes: to ``log`` (stdout and stderr, appended) when one is given, which
is what runs do, so that the secrets scan can read it afterwards; without one, stdout is a
pipe the caller may read once the sandbox has stopped (the tests check what it printed)
and stderr is discarded.
"""

from __future__ import annotations

import os
import selectors
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from subprocess import DEVNULL, PIPE, STDOUT, Popen
from types import TracebackType
from typing import Any

import requests

from billing.harness.base import HarnessError, billing_command, stop, tail, wait_for

#: Seconds a control call may take (seeding 100,000 aliases takes a few; callers that
#: seed more pass a longer one).
CONTROL_TIMEOUT = 10.0
#: Seconds the sandbox gets to print its URL and answer its control API.
START_TIMEOUT = 30.0
#: Seconds it gets to stop after SIGTERM before SIGKILL.
STOP_TIMEOUT = 10.0
#: What the sandbox prints once it listens, before its URL.
LISTENING = "listening on "
#: The longest error text of a failed control call quoted in the exception.
ERROR_CHARS = 200


class SandboxControl:
    """Client of ``/_sandbox/``; an HTTP error status raises ``HarnessError``."""

    def __init__(self, url: str, *, timeout: float = CONTROL_TIMEOUT) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.http = requests.Session()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(
            method, f"{self.url}/_sandbox/{path}", timeout=self.timeout, **kwargs
        )
        if response.status_code != 200:
            try:
                detail = str(response.json().get("error", ""))[:ERROR_CHARS]
            except (ValueError, AttributeError):
                detail = ""
            raise HarnessError(
                f"sandbox {method} /_sandbox/{path}: HTTP {response.status_code}"
                + (f": {detail}" if detail else "")
            )
        return response.json()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Wait until the sandbox answers (after a start or an outage)."""

        def answers() -> bool:
            try:
                self._call("GET", "health")
            except requests.RequestException:
                return False
            return True

        wait_for(answers, timeout, f"sandbox at {self.url}", step=0.05)

    def reset(self) -> None:
        self._call("POST", "reset")

    def add_account(self, merchant_id: str, private_key: str) -> None:
        self._call(
            "POST", "accounts", json={"merchant_id": merchant_id, "private_key": private_key}
        )

    def seed_aliases(self, merchant_id: str, n: int) -> list[str]:
        """``n`` new aliases of the merchant (cards a first payment would have registered)."""
        result: list[str] = self._call(
            "POST", "aliases", json={"merchant_id": merchant_id, "count": n}
        )["aliases"]
        return result

    def add_aliases(self, merchant_id: str, aliases: list[str]) -> list[str]:
        result: list[str] = self._call(
            "POST", "aliases", json={"merchant_id": merchant_id, "aliases": aliases}
        )["aliases"]
        return result

    def set_behaviour(self, alias: str, **behaviour: Any) -> None:
        self._call("POST", "behaviours", json={"alias": alias, "behaviour": behaviour})

    def clear_behaviours(self, alias: str | None = None) -> None:
        self._call("DELETE", "behaviours", params={"alias": alias} if alias else None)

    def calls(self, alias: str | None = None, script: str | None = None) -> list[dict[str, Any]]:
        params = {key: value for key, value in (("alias", alias), ("script", script)) if value}
        result: list[dict[str, Any]] = self._call("GET", "calls", params=params)["calls"]
        return result

    def totals(self) -> dict[str, dict[str, str]]:
        """merchant ID -> ``collected`` and ``refunded``, as decimal strings."""
        result: dict[str, dict[str, str]] = self._call("GET", "totals")["merchants"]
        return result

    def transaction(self, tx: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"transactions/{tx}")
        return result

    def release(self, alias: str, count: int = 1) -> int:
        """Let the oldest ``count`` held answers of ``alias`` go (behaviour ``hold``)."""
        released: int = self._call("POST", "release", json={"alias": alias, "count": count})[
            "released"
        ]
        return released

    def held(self) -> dict[str, int]:
        result: dict[str, int] = self._call("GET", "held")["held"]
        return result

    def wait_held(self, alias: str, count: int = 1, timeout: float = 10.0) -> None:
        """Wait until ``count`` answers of ``alias`` are held (the calls have arrived)."""
        wait_for(
            lambda: self.held().get(alias, 0) >= count,
            timeout,
            f"{count} held call(s) of {alias}",
            step=0.02,
        )

    def set_latency(self, ms: float) -> None:
        self._call("POST", "latency", json={"ms": ms})

    def outage(self, seconds: float) -> None:
        """Stop listening for ``seconds``: connections are refused meanwhile."""
        self._call("POST", "outage", json={"seconds": seconds})

    def faults(self, seed: int | None = None, **rates: float) -> dict[str, Any]:
        """Random faults at these rates, drawn from ``seed``; the sandbox's resulting setting."""
        body: dict[str, Any] = dict(rates)
        if seed is not None:
            body["seed"] = seed
        result: dict[str, Any] = self._call("POST", "faults", json=body)["faults"]
        return result


def sandbox_command(
    accounts: Mapping[str, str], latency_ms: float = 0.0, extra: Sequence[str] = ()
) -> list[str]:
    """``billing sandbox --port 0`` with the accounts (none: the sandbox's demo accounts)."""
    args = billing_command("sandbox", "--port", "0")
    if latency_ms:
        args += ["--latency-ms", f"{latency_ms:g}"]
    for merchant_id, key in accounts.items():
        args += ["--account", f"{merchant_id}={key}"]
    return args + list(extra)


class SandboxProcess:
    """``billing sandbox`` in a process of its own; ``start()`` it (or use ``with``)."""

    def __init__(
        self,
        accounts: Mapping[str, str],
        *,
        latency_ms: float = 0.0,
        extra: Sequence[str] = (),
        log: Path | None = None,
        control_timeout: float = CONTROL_TIMEOUT,
    ) -> None:
        self.args = sandbox_command(accounts, latency_ms, extra)
        self.log = log
        self.control_timeout = control_timeout
        self._process: Popen[str] | None = None
        self._control: SandboxControl | None = None

    @property
    def started(self) -> bool:
        return self._process is not None

    @property
    def process(self) -> Popen[str]:
        if self._process is None:
            raise HarnessError("the sandbox process has not been started")
        return self._process

    @property
    def control(self) -> SandboxControl:
        if self._control is None:
            raise HarnessError("the sandbox process has not been started")
        return self._control

    @property
    def url(self) -> str:
        return self.control.url

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self, timeout: float = START_TIMEOUT) -> SandboxProcess:
        """Start it, read the URL it prints, wait until its control API answers."""
        if self._process is not None and self._process.poll() is None:
            raise HarnessError(f"the sandbox at {self.url} is running already")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.log is None:
            self._process = Popen(
                self.args, stdout=PIPE, stderr=DEVNULL, text=True, env=env, start_new_session=True
            )
            url = self._url_from_pipe(timeout)
        else:
            offset = self.log.stat().st_size if self.log.exists() else 0
            with open(self.log, "a") as out:
                self._process = Popen(
                    self.args, stdout=out, stderr=STDOUT, text=True, env=env,
                    start_new_session=True,
                )  # fmt: skip
            url = self._url_from_log(self.log, offset, timeout)
        self._control = SandboxControl(url, timeout=self.control_timeout)
        try:
            self._control.wait_ready(timeout)
        except HarnessError:
            self.stop()
            raise
        return self

    def _failed(self, seen: str) -> HarnessError:
        self.stop()
        return HarnessError(f"billing sandbox did not start:\n{seen}")

    def _url_from_pipe(self, timeout: float) -> str:
        process = self.process
        assert process.stdout is not None
        line, lines = "", list[str]()
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + timeout
            while LISTENING not in line:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or process.poll() is not None or not selector.select(remaining):
                    raise self._failed("".join(lines) or "(it printed nothing)")
                line = process.stdout.readline()
                lines.append(line)
        return line.split(LISTENING, 1)[1].strip()

    def _url_from_log(self, log: Path, offset: int, timeout: float) -> str:
        """The URL from what this start appended to ``log`` (not an earlier start's line)."""
        found: list[str] = []

        def listening() -> bool:
            with open(log, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
            for line in text.splitlines():
                if LISTENING in line:
                    found.append(line.split(LISTENING, 1)[1].strip())
                    return True
            if self.process.poll() is not None:
                raise self._failed(tail(log))
            return False

        try:
            wait_for(listening, timeout, "billing sandbox")
        except HarnessError as exc:
            if self.process.poll() is None:
                raise self._failed(f"{exc}\n{tail(log)}") from None
            raise
        return found[0]

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, SIGKILL after ``timeout``; the exit status (0 after a clean stop)."""
        return stop(self.process, timeout)

    def __enter__(self) -> SandboxProcess:
        return self if self.started else self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.started:
            self.stop()
