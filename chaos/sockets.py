"""Which processes listen where: read from ``/proc`` (Linux), without any extra tool.

Used to check the promise that nothing listens on an address other machines can reach
unless someone configured it: the sandbox, the metrics endpoint, workers and beats.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
_LISTEN = "0A"


@dataclass(frozen=True)
class Listener:
    pid: int
    address: str
    port: int

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.address).is_loopback

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"pid {self.pid} listens on {host}:{self.port}"


def available() -> bool:
    return (PROC / "net" / "tcp").exists()


def _address(hex_address: str) -> str:
    """``0100007F`` -> ``127.0.0.1``; IPv6 comes as four little-endian 32-bit words."""
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    address = ipaddress.IPv6Address(words)
    mapped = address.ipv4_mapped
    return str(mapped) if mapped is not None else str(address)


def _listening_inodes() -> dict[str, tuple[str, int]]:
    """Socket inode -> (address, port) of every TCP socket in LISTEN state."""
    found: dict[str, tuple[str, int]] = {}
    for name in ("tcp", "tcp6"):
        table = PROC / "net" / name
        if not table.exists():
            continue
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _LISTEN:
                continue
            hex_address, hex_port = fields[1].split(":")
            found[fields[9]] = (_address(hex_address), int(hex_port, 16))
    return found


def _socket_inodes(pid: int) -> set[str]:
    inodes: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in (PROC / str(pid) / "fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    return inodes


def group_members(groups: Iterable[int]) -> list[int]:
    """Every live process whose process group is one of ``groups``."""
    wanted = set(groups)
    members = []
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            # Fields after the command name (in parentheses, which may hold spaces).
            rest = stat[stat.rindex(")") + 2 :].split()
            if int(rest[2]) in wanted:
                members.append(int(entry.name))
    return sorted(members)


def listeners(pids: Iterable[int]) -> list[Listener]:
    """The TCP sockets the processes ``pids`` listen on."""
    listening = _listening_inodes()
    found = []
    for pid in pids:
        for inode in _socket_inodes(pid):
            if inode in listening:
                address, port = listening[inode]
                found.append(Listener(pid, address, port))
    return sorted(found, key=lambda item: (item.pid, item.port, item.address))


def public_listeners(pids: Iterable[int]) -> list[Listener]:
    """The listeners among ``pids`` that other machines could reach."""
    return [item for item in listeners(pids) if not item.loopback]
