"""``BENCH_PROFILE=1``: where one worker process spends its CPU while it charges.

The worker is started with ``bench/profile_site`` on ``PYTHONPATH``: its ``sitecustomize``
runs cProfile in the first Celery process of ``billing worker`` (every thread, CPU time),
from the moment the bench says so (``start``, just before the sweep) until the process
exits. ``report`` then writes the top functions by ``tottime`` beside the results JSON,
with the raw pstats file for ``snakeviz`` or ``python -m pstats``.

Profiling slows the worker (a C hook on every call of every thread): a profiled run's
throughput and CPU are the profile's, not the product's; compare them with an unprofiled run.
"""

from __future__ import annotations

import io
import os
import pstats
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.config import ROOT

SITE = ROOT / "bench" / "profile_site"
#: Functions listed in the text file, and in the results JSON.
TOP, TOP_IN_JSON = 40, 10


class WorkerProfile:
    """The files one profiled worker writes, in the run's folder."""

    def __init__(self, workdir: Path) -> None:
        self.out = workdir / "worker.prof"

    def env(self) -> dict[str, str]:
        """What the worker's environment needs for ``sitecustomize`` to profile it."""
        path = os.pathsep.join(p for p in (str(SITE), os.environ.get("PYTHONPATH", "")) if p)
        return {"PYTHONPATH": path, "BENCH_PROFILE_OUT": str(self.out)}

    def start(self) -> None:
        Path(f"{self.out}.start").touch()

    def report(self, results_dir: Path, n: int) -> dict[str, Any]:
        """Top functions by tottime (CPU of the profiled process), written to results_dir."""
        if not self.out.exists():
            return {"error": f"no profile was written ({self.out}): did the worker exit cleanly?"}
        results_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-n{n}-profile"
        raw = results_dir / f"{stem}.prof"
        shutil.copyfile(self.out, raw)
        text = io.StringIO()
        stats = pstats.Stats(str(self.out), stream=text)
        stats.sort_stats("tottime").print_stats(TOP)
        listing = results_dir / f"{stem}.txt"
        pid = Path(f"{self.out}.claimed").read_text().strip()
        listing.write_text(
            f"cProfile of worker process {pid} (all threads, CPU time per thread), "
            f"N={n}, sorted by tottime\n{text.getvalue()}"
        )
        return {
            "text": str(listing),
            "pstats": str(raw),
            "total_cpu_s": stats.total_tt,  # type: ignore[attr-defined]
            "top_by_tottime": [
                {"function": f"{func[0]}:{func[1]}({func[2]})", "calls": nc, "tottime_s": tt}
                for func, (_cc, nc, tt, _ct, _callers) in sorted(
                    stats.stats.items(),  # type: ignore[attr-defined]
                    key=lambda item: item[1][2],
                    reverse=True,
                )[:TOP_IN_JSON]
            ],
        }
