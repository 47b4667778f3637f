"""A task that kills the worker process running it, for the tests of poison messages.

Loaded only when ``BILLING_POISON_TASKS=1`` is in a worker's environment (tests set it):
a shop can send any task name to the queue, and in production this name is unregistered,
so such a message is discarded, never run.
"""

from __future__ import annotations

import os
from pathlib import Path

from tasks.app import app
from tasks.base import BillingTask

#: The task that kills the worker process running it, on every delivery: a poison message.
EXIT_PROCESS = "diagnostics.exit_process"


@app.task(base=BillingTask, bind=True, name=EXIT_PROCESS)
def exit_process(self: BillingTask, marker: str) -> None:
    """Append this process's ID to ``marker`` (one line per delivery), then die at once,
    like a process killed for memory or by a segfault in a driver: no cleanup, no ack."""
    with Path(marker).open("a") as out:
        out.write(f"{os.getpid()}\n")
    os._exit(70)
