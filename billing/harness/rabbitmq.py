"""A RabbitMQ virtual host of a run's own, on the machine's RabbitMQ.

Why a virtual host and not a server: RabbitMQ takes seconds to start and a node name of
its own, while a vhost is created in one ``rabbitmqctl`` call and holds everything a run
declares — the quorum queue, the dead-letter queue, and the 28 queues of Celery's native
delayed delivery, whose names are fixed (``celery_delayed_0`` …) and so would be shared by
every run on ``/``. Deleting the vhost at the end removes them all, messages included.

The machine's RabbitMQ is the one ``.ci/run`` starts (``rabbitmq-server -detached``);
``rabbitmqctl`` must be allowed to talk to it (same host, same Erlang cookie).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import uuid
from dataclasses import dataclass, field
from types import TracebackType

from billing.defaults import BIND_HOST
from billing.harness.base import HarnessError

#: Where the machine's RabbitMQ listens, and the account tests and CI use (RabbitMQ's
#: default ``guest``, which RabbitMQ accepts on loopback only).
PORT = 5672
USER = "guest"
PASSWORD = "guest"  # RabbitMQ's loopback-only default account, not a secret
RABBITMQCTL = "rabbitmqctl"
#: Seconds a ``rabbitmqctl`` call may take (each starts an Erlang VM: about one second).
CTL_TIMEOUT = 60.0


def answers(host: str = BIND_HOST, port: int = PORT, timeout: float = 1.0) -> bool:
    """Whether something accepts connections on RabbitMQ's port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def available() -> bool:
    """Whether RabbitMQ answers and ``rabbitmqctl`` is installed (tests skip otherwise)."""
    return shutil.which(RABBITMQCTL) is not None and answers()


def rabbitmqctl(*args: str) -> str:
    """Run ``rabbitmqctl ARGS``; its output, or ``HarnessError`` with what it said."""
    binary = shutil.which(RABBITMQCTL)
    if binary is None:
        raise HarnessError(f"{RABBITMQCTL} is not installed")
    done = subprocess.run(
        [binary, "-q", *args], capture_output=True, text=True, timeout=CTL_TIMEOUT, check=False
    )
    if done.returncode != 0:
        raise HarnessError(f"{RABBITMQCTL} {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


@dataclass
class RabbitVhost:
    """A fresh vhost on the machine's RabbitMQ, ``guest`` allowed everything in it."""

    name: str = field(default_factory=lambda: f"kpb-{uuid.uuid4().hex[:10]}")
    created: bool = False

    @property
    def url(self) -> str:
        return f"amqp://{USER}:{PASSWORD}@{BIND_HOST}:{PORT}/{self.name}"

    def create(self) -> RabbitVhost:
        rabbitmqctl("add_vhost", self.name)
        self.created = True
        rabbitmqctl("set_permissions", "-p", self.name, USER, ".*", ".*", ".*")
        return self

    def delete(self) -> None:
        if self.created:
            rabbitmqctl("delete_vhost", self.name)
            self.created = False

    def messages(self, queue: str) -> int:
        """Messages ready in ``queue`` of this vhost (0 when it does not exist)."""
        out = rabbitmqctl("list_queues", "-p", self.name, "--no-table-headers", "name", "messages")
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == queue:
                return int(parts[1])
        return 0

    def __enter__(self) -> RabbitVhost:
        return self.create()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.delete()
