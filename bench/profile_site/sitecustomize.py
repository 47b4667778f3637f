"""``BENCH_PROFILE=1``: cProfile inside one Celery worker process of ``billing worker``.

Python imports ``sitecustomize`` at start-up from ``PYTHONPATH``; the bench puts this folder
there only for the worker it profiles, with ``BENCH_PROFILE_OUT`` naming the file to write.
The supervisor and the other Python processes ignore it: only a process started as
``celery ... worker`` takes part, and only the first one (it claims ``<out>.claimed``).

It profiles every thread, each with its own ``cProfile.Profile`` timed by that thread's
CPU clock (``time.thread_time``), so ``tottime`` is CPU, not waiting on the gateway. The
profilers start once the bench creates ``<out>.start`` (just before it sends the sweep,
so the worker's start-up is not in the profile) and are merged into ``<out>`` (pstats) when
the process exits after its warm shutdown.
"""

from __future__ import annotations

import os
import sys
from types import FrameType
from typing import Any


def _install(out: str) -> None:
    import atexit
    import cProfile
    import threading
    import time

    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()
    go = threading.Event()

    def hook(_frame: FrameType, _event: str, _arg: Any) -> None:
        # Called on every call of this thread until the start: cheap until then, and
        # replaced by a C profiler of the thread's own afterwards.
        if not go.is_set():
            return
        sys.setprofile(None)
        profile = cProfile.Profile(time.thread_time)
        with lock:
            profiles.append(profile)
        profile.enable()

    def wait_for_start() -> None:
        while not os.path.exists(f"{out}.start"):
            time.sleep(0.05)
        go.set()

    def dump() -> None:
        import pstats

        with lock:
            taken = list(profiles)
        if taken:
            stats = pstats.Stats(taken[0])
            for profile in taken[1:]:
                stats.add(profile)
            stats.dump_stats(out)

    threading.Thread(target=wait_for_start, name="bench-profile", daemon=True).start()
    threading.setprofile(hook)
    sys.setprofile(hook)
    atexit.register(dump)


def _claimed(out: str) -> bool:
    try:
        fd = os.open(f"{out}.claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except OSError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def _main() -> None:
    out = os.environ.get("BENCH_PROFILE_OUT", "")
    argv = getattr(sys, "orig_argv", sys.argv)
    if out and "celery" in argv and "worker" in argv and _claimed(out):
        _install(out)


_main()
