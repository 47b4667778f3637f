"""``billing web`` as a real process: loopback by default, a public address refused without
``--allow-public``, the console answering, and SIGTERM stopping it cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from billing import migrate
from billing.harness.ports import free_port

BILLING = str(Path(sys.executable).with_name("billing"))
ROOT = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path) -> dict[str, str]:
    url = f"sqlite:///{tmp_path / 'billing.db'}"
    migrate.upgrade(url)
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("BILLING_")},
        "BILLING_DATABASE_URL": url,
        "BILLING_PLANS_FILE": str(ROOT / "tests" / "data" / "engine_plans.toml"),
    }


def test_a_public_address_is_refused_without_the_flag(tmp_path: Path) -> None:
    done = subprocess.run(
        [BILLING, "web", "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60,
        env=_env(tmp_path),
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--allow-public" in lines[0] and "Traceback" not in done.stderr


def test_the_console_serves_on_loopback_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [BILLING, "web", "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=_env(tmp_path),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).text == "ok":
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.2)
        login = requests.get(f"http://127.0.0.1:{port}/login", timeout=5)
        assert login.status_code == 200 and "Sign in" in login.text
        assert "server" not in {k.lower() for k in login.headers}  # no version banner
        listening = _listeners(process.pid)
        assert listening and all(addr.startswith("127.") for addr in listening), listening
    finally:
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=30)
    assert process.returncode == 0, out.decode(errors="replace")[-2000:]
    assert b"BILLING_CONSOLE_SECRET_KEY is not set" in out  # said, once, at start-up


def _listeners(pid: int) -> list[str]:
    """Addresses the process listens on (IPv4, from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
            raw = fields[1].split(":")[0]
            found.append(".".join(str(int(raw[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def test_a_database_without_the_console_tables_is_named_at_start(tmp_path: Path) -> None:
    env = {**_env(tmp_path), "BILLING_DATABASE_URL": f"sqlite:///{tmp_path / 'empty.db'}"}
    done = subprocess.run(
        [BILLING, "web", "--port", str(free_port())], capture_output=True, text=True,
        timeout=60, env=env,
    )  # fmt: skip
    assert done.returncode == 1
    assert "billing db upgrade" in done.stderr and "Traceback" not in done.stderr


def test_the_screenshots_command_says_how_it_is_used_in_one_line(tmp_path: Path) -> None:
    for args in ([], ["a", "b"], ["--help"]):
        done = subprocess.run(
            [sys.executable, "-m", "billing.web.screenshots", *args], capture_output=True,
            text=True, timeout=60, cwd=tmp_path,
        )  # fmt: skip
        assert done.returncode == 2, args
        assert done.stderr.strip() == "error: usage: python -m billing.web.screenshots OUTDIR"
    assert list(tmp_path.iterdir()) == []
