"""The host's expert worker: computes missed experts from the host tier while the engine thread
computes the device's resident ones.

One thread (the kernels it calls parallelise inside), so a layer's host experts run one job after
the other as the cost model assumes (`miss_cost.choose_handling`); each job's seconds are measured
on the worker itself. The work is the model's (`MoEModel._moe` builds it over its own output
rows); this module only runs and times it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor


class HostExpertWorker:
    """Runs host expert jobs on one worker thread; each job's future holds its seconds."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="host-experts")

    def submit(self, work: Callable[[], None]) -> Future[float]:
        """Queues `work`; its future's result is the seconds it ran (or its exception)."""
        return self._executor.submit(_timed, work)

    def shutdown(self) -> None:
        """Lets queued jobs finish and stops the thread (idempotent)."""
        self._executor.shutdown(wait=True)


def _timed(work: Callable[[], None]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start
