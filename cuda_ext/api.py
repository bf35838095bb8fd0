"""The copy engine's Python contract: priorities, backends, tickets and the engine ABC.

Every backend (CUDA extension, CPU extension, pure-torch fallback) implements `CopyEngine`
with the same semantics: `submit` queues one copy per (src, dst) pair of contiguous uint8
tensors; a DEMAND copy starts before every PREFETCH copy still queued; each copy has its
own `CopyTicket`; `cancel` drops a still-queued copy; sources are only ever read. The CPU backends
can throttle the link they stand in for (`set_link_gbps`: every worker together moves at most that
many bytes per second; the CPU-only machine's stand-in for PCIe), and every backend reports how
long its link was busy (`link_busy_seconds`). A copy that
fails on the engine's own thread fails only its ticket: `done`, `wait` and `synchronize` raise
`CopyError` with the reason, and the engine goes on with the other copies.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from enum import Enum, IntEnum

import torch

CopyPair = tuple[torch.Tensor, torch.Tensor]


class CopyError(RuntimeError):
    """A copy failed on the copy engine's thread (a failing copy, a CUDA error); says why."""


class CopyPriority(IntEnum):
    """Queue level of a copy; lower runs first."""

    DEMAND = 0
    PREFETCH = 1


class CopyBackend(str, Enum):
    """Which implementation moves the bytes."""

    CUDA = "cuda"
    CPU_EXTENSION = "cpu"
    TORCH = "torch"


class CopyTicket(ABC):
    """Completion handle ("event") of one submitted copy."""

    @abstractmethod
    def done(self) -> bool:
        """True once the destination holds every byte of the source, False while it is pending
        (or cancelled); raises CopyError if the copy failed."""

    @abstractmethod
    def failed(self) -> bool:
        """True if the copy failed (its done, wait and synchronize raise CopyError)."""

    @abstractmethod
    def cancelled(self) -> bool:
        """True if the copy was dropped before it started."""

    @abstractmethod
    def wait(self) -> None:
        """Order later work after the copy.

        CPU: blocks until the bytes landed. CUDA: makes the current stream wait on the copy's
        event (the host blocks at most until a still-queued copy is handed to a copy stream).
        A queued copy is promoted to DEMAND first. Returns at once for a cancelled copy;
        raises CopyError if the copy failed.
        """

    @abstractmethod
    def synchronize(self) -> None:
        """Blocks the host until the copy finished (or was cancelled); raises CopyError if it failed."""


class CopyEngine(ABC):
    """Moves byte ranges with a two-level priority queue; see the module docstring."""

    backend: CopyBackend

    @abstractmethod
    def submit(self, copies: Sequence[CopyPair], priority: CopyPriority) -> list[CopyTicket]:
        """Queues one copy per (src, dst) pair, in order, and returns their tickets."""

    @abstractmethod
    def cancel(self, ticket: CopyTicket) -> bool:
        """Drops a copy that has not started; False if it started, ended or was cancelled."""

    @abstractmethod
    def promote(self, ticket: CopyTicket) -> bool:
        """Moves a still-queued copy to DEMAND priority; False if it already started or ended."""

    @abstractmethod
    def set_link_gbps(self, gbps: float | None) -> None:
        """Throttle every later copied byte to `gbps` GB/s shared by all workers (None: unthrottled).
        Only the CPU backends can; a CUDA engine raises ValueError (its link is the real one)."""

    @abstractmethod
    def link_gbps(self) -> float | None:
        """The throttle now in force (None: unthrottled)."""

    @abstractmethod
    def link_busy_seconds(self) -> float:
        """Seconds the link carried a copy since the engine started (the union over workers; a
        throttled copy counts its paced time). The CUDA backend does not measure it: 0."""

    @abstractmethod
    def shutdown(self) -> None:
        """Cancels queued copies, lets running ones finish and stops the workers (idempotent)."""


def check_copies(copies: Sequence[CopyPair]) -> None:
    """Raises ValueError unless each pair is two distinct contiguous uint8 tensors of one size."""
    for index, (src, dst) in enumerate(copies):
        if src.dtype != torch.uint8 or dst.dtype != torch.uint8:
            raise ValueError(f"copy {index}: tensors must be uint8, got {src.dtype} -> {dst.dtype}")
        if not (src.is_contiguous() and dst.is_contiguous()):
            raise ValueError(f"copy {index}: tensors must be contiguous")
        if src.numel() != dst.numel():
            raise ValueError(f"copy {index}: source has {src.numel()} bytes, destination {dst.numel()}")
        if src.numel() > 0 and src.data_ptr() == dst.data_ptr():
            raise ValueError(f"copy {index}: source and destination are the same buffer")


def link_bytes_per_s(gbps: float | None) -> float:
    """A throttle in GB/s as the engines' bytes per second (0: unthrottled); refuses a rate <= 0."""
    if gbps is None:
        return 0.0
    if not gbps > 0:
        raise ValueError(f"the link rate must be > 0 GB/s (None: unthrottled), got {gbps}")
    return gbps * 1e9
