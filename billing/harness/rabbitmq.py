"""RabbitMQ for a run: a virtual host of its own on the machine's RabbitMQ, or a node of
its own when the run must restart the broker.

Why a virtual host first: RabbitMQ takes seconds to start and a node name of its own,
while a vhost is created in one ``rabbitmqctl`` call and holds everything a run declares —
the quorum queue, the dead-letter queue, and the 28 queues of Celery's native delayed
delivery, whose names are fixed (``celery_delayed_0`` …) and so would be shared by every
run on ``/``. Deleting the vhost at the end removes them all, messages included.

Why a node of its own (:class:`RabbitNode`) for chaos and the restart tests: restarting
the machine's RabbitMQ would disturb everyone else on it. A private node has its own name,
ports, data and log folder, and no plugins; it is killed and started again like the
private Redis. One thing about a crash of RabbitMQ 3.10 (Debian's): a quorum queue's
registration is kept in a file Ra writes lazily, so a SIGKILL within moments of the
queue's first declaration loses the queue itself (it comes back empty, under a new
identity, refusing every publish) — rabbitmq/ra#443, fixed in later releases. A broker
in production declared its queues long before it crashes; :meth:`RabbitNode.settle`
gives a fresh node the same footing (one clean stop and start after the queues exist).

The machine's RabbitMQ is the one ``.ci/run`` starts (``rabbitmq-server -detached``);
``rabbitmqctl`` must be allowed to talk to it (same host, same Erlang cookie). Debian's
``rabbitmq-server`` runs the node as the ``rabbitmq`` user, so a private node needs root
(or that user) to be started, and its folder belongs to that user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from billing.defaults import BIND_HOST
from billing.harness.base import HarnessError, reap, stop, tail, wait_for
from billing.harness.ports import free_port

#: Where the machine's RabbitMQ listens, and the account tests and CI use (RabbitMQ's
#: default ``guest``, which RabbitMQ accepts on loopback only).
PORT = 5672
USER = "guest"
PASSWORD = "guest"  # RabbitMQ's loopback-only default account, not a secret
RABBITMQCTL = "rabbitmqctl"
RABBITMQ_SERVER = "rabbitmq-server"
#: The account Debian's ``rabbitmq-server`` runs a node as.
RABBITMQ_USER = "rabbitmq"
#: Seconds a private node gets to accept connections (about 5 s on this machine).
NODE_START_TIMEOUT = 90.0
#: Seconds a killed node stays down before it is started again.
NODE_DOWN_FOR = 1.0
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


def rabbitmqctl(*args: str, node: str | None = None) -> str:
    """Run ``rabbitmqctl ARGS`` (on ``node``, else the machine's); its output, or
    ``HarnessError`` with what it said."""
    binary = shutil.which(RABBITMQCTL)
    if binary is None:
        raise HarnessError(f"{RABBITMQCTL} is not installed")
    target = ["-n", node] if node else []
    done = subprocess.run(
        [binary, "-q", *target, *args],
        capture_output=True, text=True, timeout=CTL_TIMEOUT, check=False,
    )  # fmt: skip
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


def can_start_nodes() -> bool:
    """Whether this process may start a private node (Debian's script needs root or the
    ``rabbitmq`` user, and both programs installed)."""
    if shutil.which(RABBITMQ_SERVER) is None or shutil.which(RABBITMQCTL) is None:
        return False
    try:
        user = pwd.getpwnam(RABBITMQ_USER)
    except KeyError:
        return False
    return os.geteuid() in (0, user.pw_uid)


@dataclass
class RabbitNode:
    """A RabbitMQ node of a run's own: own name, ports, data and log folder, no plugins.

    Its folder is made apart from the run's (the node runs as the ``rabbitmq`` user, who
    cannot enter a folder private to root) and removed by :meth:`stop`; the node's log is
    copied into ``logdir`` first, for the secrets scan and for whoever reads the run.
    """

    logdir: Path
    name: str = field(default_factory=lambda: f"kpb-{uuid.uuid4().hex[:8]}@localhost")
    port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    home: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    #: The node's Erlang VM, checked at start (the pid :meth:`kill` sends SIGKILL to).
    vm: int | None = None

    @property
    def url(self) -> str:
        return f"amqp://{USER}:{PASSWORD}@{BIND_HOST}:{self.port}//"

    @property
    def log(self) -> Path:
        return self.logdir / "rabbitmq.log"

    def _prepare(self) -> Path:
        if self.home is not None:
            return self.home
        home = Path(tempfile.mkdtemp(prefix="kpb-rabbit-"))
        (home / "rabbitmq.conf").write_text(f"listeners.tcp.1 = {BIND_HOST}:{self.port}\n")
        (home / "enabled_plugins").write_text("[].\n")
        user = pwd.getpwnam(RABBITMQ_USER)
        for path in (home, home / "rabbitmq.conf", home / "enabled_plugins"):
            os.chown(path, user.pw_uid, user.pw_gid)
        self.home = home
        return home

    def _env(self, home: Path) -> dict[str, str]:
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": BIND_HOST,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(home / "mnesia"),
            "RABBITMQ_LOG_BASE": str(home / "log"),
            "RABBITMQ_CONFIG_FILE": str(home / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(home / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(home / "pid"),
            # Erlang distribution on loopback too (the AMQP listener is in rabbitmq.conf).
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def start(self, timeout: float = NODE_START_TIMEOUT) -> RabbitNode:
        """Start the node and return once it accepts AMQP connections."""
        if self._vm_alive():
            raise HarnessError(f"RabbitMQ node {self.name} is running already")
        if not can_start_nodes():
            raise HarnessError(
                f"a RabbitMQ node of the run's own needs {RABBITMQ_SERVER} and root (or the"
                f" {RABBITMQ_USER} user)"
            )
        home = self._prepare()
        self.logdir.mkdir(parents=True, exist_ok=True)
        with open(self.logdir / "rabbitmq-server.out", "ab") as out:
            self.proc = subprocess.Popen(
                [RABBITMQ_SERVER], stdout=out, stderr=subprocess.STDOUT, env=self._env(home),
                start_new_session=True,
            )  # fmt: skip
        try:
            wait_for(self._answers, timeout, f"RabbitMQ node {self.name} on port {self.port}", 0.2)
            rabbitmqctl("await_startup", node=self.name)
            self.vm = self._verified_vm()
        except BaseException:
            self._abandon()  # a node that did not start must not outlive the run
            raise
        return self

    def _verified_vm(self) -> int:
        """The node's Erlang VM, found by its environment (``HarnessError`` if none)."""
        pid = self._find_vm()
        if pid is None:
            raise HarnessError(f"RabbitMQ node {self.name}: its Erlang VM was not found")
        return pid

    def _node_pids(self) -> dict[int, str]:
        """Every process started with this node's name in its environment (its starting
        script, ``su``, the Erlang VM and the VM's helpers), by pid, with its name."""
        wanted = f"RABBITMQ_NODENAME={self.name}".encode()
        found: dict[int, str] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if wanted in (entry / "environ").read_bytes().split(b"\0"):
                    found[int(entry.name)] = (entry / "comm").read_text().strip()
            except OSError:
                continue
        return found

    def _find_vm(self) -> int | None:
        """The node's ``beam.smp`` (RabbitMQ 3.10 passes the node's name in the environment,
        not on the command line; the pid file is written late in the boot, so a node
        failing to boot has none)."""
        return next((pid for pid, name in self._node_pids().items() if name == "beam.smp"), None)

    def _vm_alive(self) -> bool:
        if self.vm is None:
            return False
        try:
            os.kill(self.vm, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _abandon(self) -> None:
        """SIGKILL every process of the node (its VM, the starting script and ``su``) and
        remove its folder: after a failed start nothing of it may be left running."""
        for pid in self._node_pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            stop(self.proc, timeout=10, sig=signal.SIGKILL)
        with contextlib.suppress(HarnessError):
            wait_for(lambda: not self._node_pids(), 10, f"{self.name} to die")
        self.vm = None
        self.stop()

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise HarnessError(
                f"RabbitMQ node {self.name} exited ({self.proc.returncode}):\n"
                f"{tail(self.logdir / 'rabbitmq-server.out')}"
            )
        return answers(port=self.port, timeout=0.5)

    def process_groups(self) -> list[int]:
        """The process groups the node runs in: its starting script's and its VM's."""
        groups = [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []
        pid = self.vm
        if pid is not None:
            with contextlib.suppress(OSError):
                groups.append(os.getpgid(pid))
        return groups

    def kill(self) -> None:
        """SIGKILL the node's VM: a crash, with whatever it had not yet written to disk.

        Never a clean stop in disguise: the VM is the one checked at start, and a node
        whose VM cannot be killed is an error, not a quiet SIGTERM to its script."""
        if self.vm is None or not self._vm_alive():
            raise HarnessError(f"RabbitMQ node {self.name} is not running: nothing to kill")
        try:
            os.kill(self.vm, signal.SIGKILL)
        except OSError as exc:
            raise HarnessError(f"RabbitMQ node {self.name}: SIGKILL failed: {exc}") from None
        wait_for(lambda: not self._vm_alive(), 30, f"{self.name} to die")
        self.vm = None
        if self.proc is not None:
            reap(self.proc, timeout=30)

    def shutdown(self) -> None:
        """A clean stop (``rabbitmqctl stop``): the node writes everything and exits."""
        if not self._vm_alive():
            return
        try:
            rabbitmqctl("stop", node=self.name)
            wait_for(lambda: not self._vm_alive(), 30, f"{self.name} to stop")
        except (HarnessError, subprocess.TimeoutExpired):
            self.kill()
            return
        self.vm = None
        if self.proc is not None:
            reap(self.proc, timeout=30)

    def restart(self, down_for: float = NODE_DOWN_FOR) -> None:
        """Kill the node (SIGKILL) and start it again on the same ports and data."""
        self.kill()
        time.sleep(down_for)
        self.start()

    def settle(self) -> None:
        """One clean stop and start, so that the queues declared so far are registered on
        disk as a long-running broker's are (see the module's note on rabbitmq/ra#443)."""
        self.shutdown()
        self.start()

    def stop(self) -> None:
        """Stop the node cleanly, keep its log, remove its folder."""
        self.shutdown()
        if self.home is not None:
            for log in sorted((self.home / "log").glob("*.log")):
                with contextlib.suppress(OSError), open(self.log, "ab") as out:
                    out.write(log.read_bytes())
            shutil.rmtree(self.home, ignore_errors=True)
            self.home = None

    def __enter__(self) -> RabbitNode:
        return self if self._vm_alive() else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
