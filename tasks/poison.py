"""A task that kills the worker process running it, for the tests of poison messages.

Loaded only when ``BILLING_POISON_TASKS=1`` is in a worker's environment (tests set it):
a shop can send any task name to the queue, and in production this name is unregistered,
so such a message is discarded, never run.

Also, with ``BILLING_POISON_CHARGES`` naming a file of charge IDs (one a line), the real
``billing.charge`` task kills its worker the same way for those charges, after the task
base's ``before_start`` (the Redis delivery count) and before the charge is claimed: a
poison *charge* message, whose charge stays ``queued``. Every other charge runs the real
task unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

from tasks import charges
from tasks.app import app
from tasks.base import BillingTask

#: The task that kills the worker process running it, on every delivery: a poison message.
EXIT_PROCESS = "diagnostics.exit_process"
#: A file of charge IDs whose ``billing.charge`` kills its worker (unset: none). Each death
#: appends ``<charge ID> <process ID>`` to the same path with ``.runs`` added.
POISON_CHARGES_ENV = "BILLING_POISON_CHARGES"


@app.task(base=BillingTask, bind=True, name=EXIT_PROCESS)
def exit_process(self: BillingTask, marker: str) -> None:
    """Append this process's ID to ``marker`` (one line per delivery), then die at once,
    like a process killed for memory or by a segfault in a driver: no cleanup, no ack."""
    with Path(marker).open("a") as out:
        out.write(f"{os.getpid()}\n")
    os._exit(70)


def _poison_charges(path: Path) -> None:
    """Make ``billing.charge`` die before its claim for the charges listed in ``path``."""
    real = charges.charge.run

    def run(charge_id: int) -> str:
        if str(charge_id) in path.read_text().split():
            with path.with_name(path.name + ".runs").open("a") as out:
                out.write(f"{charge_id} {os.getpid()}\n")
            os._exit(70)
        result: str = real(charge_id)
        return result

    # The tracer calls ``task.run`` (built after this module is imported with the app).
    setattr(charges.charge, "run", run)  # noqa: B010


if os.environ.get(POISON_CHARGES_ENV):
    _poison_charges(Path(os.environ[POISON_CHARGES_ENV]))
