"""A ``redis-server`` of a run's own, on a free loopback port, without persistence.

Why not the Redis on 6379: the bench's memory figures must hold nobody else's keys, and
chaos and the invariant tests restart Redis to lose every message, which must disturb
nobody else. Without ``--save`` and ``--appendonly`` a restart loses everything, which is
the point; the server's output goes to ``redis.log`` in the run's folder.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import redis

from billing.defaults import BIND_HOST
from billing.harness.base import HarnessError, stop, tail, wait_for
from billing.harness.ports import free_port

#: The program started; looked up on PATH.
REDIS_SERVER = "redis-server"
#: Seconds a new server gets to answer PING.
START_TIMEOUT = 10.0
#: Seconds a restarted server stays down (clients see refused connections meanwhile).
DOWN_FOR = 1.0


def available() -> bool:
    """Whether ``redis-server`` is installed (tests skip without it; runs fail)."""
    return shutil.which(REDIS_SERVER) is not None


@dataclass
class RedisServer:
    """``redis-server`` on ``port`` with its files and log in ``workdir``; ``start()`` it."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{BIND_HOST}:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.workdir / "redis.log"

    def start(self, timeout: float = START_TIMEOUT) -> RedisServer:
        """Start the server and return once it answers PING."""
        if self.proc is not None and self.proc.poll() is None:
            raise HarnessError(f"{REDIS_SERVER} on port {self.port} is running already")
        binary = shutil.which(REDIS_SERVER)
        if binary is None:
            raise HarnessError(f"{REDIS_SERVER} is not installed; the run needs a Redis of its own")
        args = [
            binary, "--port", str(self.port), "--bind", BIND_HOST, "--save", "",
            "--appendonly", "no", "--dir", str(self.workdir),
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_for(self._answers, timeout, f"{REDIS_SERVER} on port {self.port}", step=0.05)
        return self

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise HarnessError(
                f"{REDIS_SERVER} on port {self.port} exited ({self.proc.returncode}):\n"
                f"{tail(self.log)}"
            )
        client = redis.Redis(host=BIND_HOST, port=self.port, socket_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def process_groups(self) -> list[int]:
        """The process groups the server runs in (for a check of what it listens on)."""
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []

    def kill(self) -> None:
        """SIGKILL: the server goes at once, and every message in it with it."""
        if self.proc is not None:
            stop(self.proc, timeout=10, sig=signal.SIGKILL)

    def restart(self, down_for: float = DOWN_FOR) -> None:
        """Kill the server and start it again on the same port after ``down_for`` seconds."""
        self.kill()
        time.sleep(down_for)
        self.start()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers; nothing is saved either way."""
        if self.proc is not None:
            stop(self.proc, timeout=10)

    def __enter__(self) -> RedisServer:
        return self if self.proc is not None else self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
