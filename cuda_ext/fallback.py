"""Pure-torch copy engine: Python worker threads doing `dst.copy_(src)`; the reference backend.

Same queue semantics as the extension: two FIFO levels (DEMAND before PREFETCH), one ticket
per copy, cancel of queued copies, a failing copy fails only its ticket (CopyError), the same
link throttle and busy time (`LinkPacer`, whole copies instead of chunks). With a
CUDA destination each worker copies on its own side stream and the ticket carries a CUDA event,
so `wait()` never blocks the host on the copy.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from enum import Enum

import torch

from moe_serve.cuda_ext.api import (
    CopyBackend,
    CopyEngine,
    CopyError,
    CopyPair,
    CopyPriority,
    CopyTicket,
    check_copies,
    link_bytes_per_s,
)


class _Status(Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"


class TorchCopyTicket(CopyTicket):
    """Ticket of the torch fallback; its state changes under the engine's lock."""

    def __init__(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.src: torch.Tensor | None = src
        self.dst: torch.Tensor | None = dst
        self.status = _Status.QUEUED
        self.finished = threading.Event()
        self.cuda_event: torch.cuda.Event | None = None
        self.error = ""

    def done(self) -> bool:
        if not self.finished.is_set():
            return False
        self._raise_if_failed()
        return self.status is _Status.DONE and (self.cuda_event is None or self.cuda_event.query())

    def failed(self) -> bool:
        return self.status is _Status.FAILED

    def cancelled(self) -> bool:
        return self.status is _Status.CANCELLED

    def wait(self) -> None:
        self.finished.wait()
        self._raise_if_failed()
        if self.cuda_event is not None:
            torch.cuda.current_stream().wait_event(self.cuda_event)

    def synchronize(self) -> None:
        self.finished.wait()
        self._raise_if_failed()
        if self.cuda_event is not None:
            self.cuda_event.synchronize()

    def _raise_if_failed(self) -> None:
        if self.status is _Status.FAILED:
            raise CopyError(f"copy failed: {self.error}")


class LinkPacer:
    """The link the workers share (as the extension's LinkThrottle): a copy reserves the link for
    nbytes / rate after the previous reservation ends, and its worker sleeps until then; busy time
    is the union of the reservations (unthrottled: of the copies' own intervals)."""

    def __init__(self, bytes_per_s: float = 0.0) -> None:
        self._lock = threading.Lock()
        self.bytes_per_s = bytes_per_s
        self._free_at = 0.0
        self._busy = 0.0

    def pace(self, nbytes: int, start: float) -> None:
        """A copy of `nbytes` ran from `start` (time.monotonic) until now: book it, sleep while throttled."""
        now = time.monotonic()
        with self._lock:
            begin = max(start, self._free_at)
            finish = begin + nbytes / self.bytes_per_s if self.bytes_per_s > 0 else max(now, begin)
            self._busy += finish - begin
            self._free_at = max(self._free_at, finish)
        if finish > now:
            time.sleep(finish - now)

    def busy_seconds(self) -> float:
        with self._lock:
            return self._busy


class TorchCopyEngine(CopyEngine):
    """`num_workers` Python threads pop a two-level queue and run `dst.copy_(src)`."""

    backend = CopyBackend.TORCH

    def __init__(self, num_workers: int = 2, link_gbps: float | None = None) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self._link = LinkPacer(link_bytes_per_s(link_gbps))
        self._cond = threading.Condition()
        self._levels: tuple[deque[TorchCopyTicket], ...] = tuple(deque() for _ in CopyPriority)
        self._closed = False
        self._inject: tuple[int, str] = (0, "")
        self._workers = [
            threading.Thread(target=self._run, name=f"torch-copy-{i}", daemon=True) for i in range(num_workers)
        ]
        for worker in self._workers:
            worker.start()

    def submit(self, copies: Sequence[CopyPair], priority: CopyPriority) -> list[CopyTicket]:
        check_copies(copies)
        tickets = [TorchCopyTicket(src, dst) for src, dst in copies]
        with self._cond:
            if self._closed:
                raise RuntimeError("copy engine is shut down")
            self._levels[CopyPriority(priority)].extend(tickets)
            self._cond.notify_all()
        return list(tickets)

    def cancel(self, ticket: CopyTicket) -> bool:
        assert isinstance(ticket, TorchCopyTicket)
        with self._cond:
            if ticket.status is not _Status.QUEUED:
                return False
            self._finish(ticket, _Status.CANCELLED)
            return True

    def promote(self, ticket: CopyTicket) -> bool:
        assert isinstance(ticket, TorchCopyTicket)
        with self._cond:
            if ticket.status is not _Status.QUEUED or self._closed:
                return False
            self._levels[CopyPriority.DEMAND].append(ticket)
            self._cond.notify()
            return True

    def inject_failures(self, count: int, message: str) -> None:
        """Test hook: the next `count` copies to run fail with `message` on a worker thread."""
        with self._cond:
            self._inject = (count, message)

    def set_link_gbps(self, gbps: float | None) -> None:
        self._link.bytes_per_s = link_bytes_per_s(gbps)

    def link_gbps(self) -> float | None:
        return self._link.bytes_per_s / 1e9 or None

    def link_busy_seconds(self) -> float:
        return self._link.busy_seconds()

    def shutdown(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            for level in self._levels:
                for ticket in level:
                    if ticket.status is _Status.QUEUED:
                        self._finish(ticket, _Status.CANCELLED)
                level.clear()
            self._cond.notify_all()
        for worker in self._workers:
            worker.join()

    @staticmethod
    def _finish(ticket: TorchCopyTicket, status: _Status) -> None:
        ticket.status = status
        ticket.src = ticket.dst = None
        ticket.finished.set()

    def _injected_failure(self) -> None:
        with self._cond:
            count, message = self._inject
            if count > 0:
                self._inject = (count - 1, message)
                raise RuntimeError(message)

    def _pop(self) -> TorchCopyTicket | None:
        """Next queued ticket (marked RUNNING), or None once shut down; holds the lock."""
        with self._cond:
            while True:
                for level in self._levels:
                    while level:
                        ticket = level.popleft()
                        if ticket.status is _Status.QUEUED:
                            ticket.status = _Status.RUNNING
                            return ticket
                if self._closed:
                    return None
                self._cond.wait()

    def _run(self) -> None:
        stream = None
        while (ticket := self._pop()) is not None:
            src, dst = ticket.src, ticket.dst
            assert src is not None and dst is not None
            try:
                self._injected_failure()
                if dst.is_cuda or src.is_cuda:
                    device = dst.device if dst.is_cuda else src.device
                    stream = stream or torch.cuda.Stream(device=device)
                    with torch.cuda.stream(stream):
                        dst.copy_(src, non_blocking=True)
                        ticket.cuda_event = torch.cuda.Event()
                        ticket.cuda_event.record(stream)
                else:
                    start = time.monotonic()
                    dst.copy_(src)
                    self._link.pace(src.numel(), start)
            except Exception as error:  # fails this ticket only; the worker goes on
                ticket.error = f"{type(error).__name__}: {error}"
                status = _Status.FAILED
            else:
                status = _Status.DONE
            with self._cond:
                self._finish(ticket, status)
