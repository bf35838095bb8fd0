"""Host buffers: anonymous memory advised for huge pages, optionally page-locked for DMA.

`advised_buffer` maps anonymous memory with MADV_HUGEPAGE (honoured where transparent huge
pages are `always` or `madvise`; plain memory elsewhere); `Arena` carves many aligned tensors
out of one such buffer (why and what it gained: docs/operations.md). `pinned_buffer` is such a
buffer registered with CUDA as page-locked memory at its own size (torch's caching host
allocator would round it up to a power of two), pageable with one WARNING when pinning fails
(docs/offload.md).
"""

from __future__ import annotations

import logging
import math
import mmap
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 * 2**20
ALIGNMENT = 64  # bytes: a cache line, and what the kernels' vector loads like
CUDA_HOST_REGISTER_PORTABLE = 1  # pinned for every CUDA context, not only the current device's


class PinningError(RuntimeError):
    """Host memory could not be page-locked (a memlock limit, no CUDA driver, an error from it)."""


Register = Callable[[int, int], None]  # (address, nbytes): page-locks the range or raises PinningError
Unregister = Callable[[int], None]  # (address): undoes Register


class _Mapping(mmap.mmap):
    """An anonymous mapping that, when pinned, is unregistered before it is unmapped (`__del__` runs
    before the mapping's own deallocation, once the last tensor over it is gone)."""

    unregister: Unregister | None = None
    address = 0

    def __del__(self) -> None:
        if self.unregister is not None:
            self.unregister(self.address)


def _advised_mapping(nbytes: int) -> _Mapping | None:
    """An anonymous mapping of `nbytes` rounded up to a huge page, advised for huge pages (None: no
    anonymous maps on this platform)."""
    size = math.ceil(nbytes / HUGE_PAGE) * HUGE_PAGE
    try:
        region = _Mapping(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, AttributeError, ValueError) as exc:  # no anonymous maps here
        logger.debug("plain host buffer (%s)", exc)
        return None
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            region.madvise(advice)
        except OSError as exc:  # THP disabled or unsupported: plain pages
            logger.debug("no huge-page advice (%s)", exc)
    return region


def advised_buffer(nbytes: int) -> torch.Tensor:
    """A zero-filled uint8 CPU tensor of `nbytes` bytes, huge-page advised where possible. The
    tensor keeps its mapping alive."""
    if nbytes <= 0:
        return torch.empty(0, dtype=torch.uint8)
    region = _advised_mapping(nbytes)
    if region is None:
        return torch.zeros(nbytes, dtype=torch.uint8)
    return torch.frombuffer(region, dtype=torch.uint8)[:nbytes]


def cuda_host_register(address: int, nbytes: int) -> None:
    """Page-locks [address, address + nbytes) for the CUDA driver (cudaHostRegister)."""
    try:
        error = int(torch.cuda.cudart().cudaHostRegister(address, nbytes, CUDA_HOST_REGISTER_PORTABLE))
    except (RuntimeError, AttributeError, AssertionError) as exc:  # no CUDA runtime in this torch
        raise PinningError(str(exc)) from exc
    if error != 0:
        raise PinningError(f"cudaHostRegister of {nbytes} bytes failed with cudaError {error}")


def cuda_host_unregister(address: int) -> None:
    """Undoes `cuda_host_register` (cudaHostUnregister); an error is logged, not raised (it runs in a
    finalizer, possibly while the interpreter shuts down)."""
    try:
        error = int(torch.cuda.cudart().cudaHostUnregister(address))
    except (RuntimeError, AttributeError) as exc:  # CUDA already torn down at exit: the driver frees it
        logger.debug("cudaHostUnregister skipped: %s", exc)
        return
    if error != 0:
        logger.warning("cudaHostUnregister failed with cudaError %d", error)


def pinned_buffer(nbytes: int, register: Register | None = None, unregister: Unregister | None = None,
                  what: str = "host buffer") -> torch.Tensor:
    """A uint8 CPU tensor of `nbytes` bytes in page-locked memory of its own size (rounded up to a
    huge page, not to a power of two), unregistered when the last tensor over it goes. If pinning
    fails the same buffer stays pageable, with one WARNING naming `what` and the reason.
    `register`/`unregister` default to cudaHostRegister/cudaHostUnregister."""
    register = register or cuda_host_register
    unregister = unregister or cuda_host_unregister
    region = _advised_mapping(max(nbytes, 1))
    if region is None:
        raise PinningError("anonymous memory maps are unavailable on this platform")
    buffer = torch.frombuffer(region, dtype=torch.uint8)
    try:
        register(buffer.data_ptr(), buffer.numel())
    except PinningError as exc:
        logger.warning("could not pin the %s (%.2f GiB): %s; it stays in pageable memory, so copies from it to the "
                       "GPU are staged by the driver and slower (raise the locked-memory limit: ulimit -l, "
                       "docker --ulimit memlock=-1)", what, nbytes / 2**30, exc)
        return buffer[:nbytes]
    region.address, region.unregister = buffer.data_ptr(), unregister
    return buffer[:nbytes]



def aligned(nbytes: int) -> int:
    """nbytes rounded up to `ALIGNMENT`."""
    return (nbytes + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


class Arena:
    """Tensors carved in order out of one advised buffer of `nbytes` bytes (each start aligned)."""

    def __init__(self, nbytes: int) -> None:
        self._buffer = advised_buffer(nbytes)
        self._offset = 0

    @staticmethod
    def bytes_for(shapes_and_dtypes: list[tuple[tuple[int, ...], torch.dtype]]) -> int:
        """The arena size that holds tensors of these shapes and dtypes."""
        return sum(aligned(math.prod(shape) * dtype.itemsize) for shape, dtype in shapes_and_dtypes)

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The next contiguous tensor of `shape` and `dtype` (uninitialised contents)."""
        nbytes = math.prod(shape) * dtype.itemsize
        end = self._offset + nbytes
        if end > self._buffer.numel():
            raise ValueError(f"arena of {self._buffer.numel()} bytes cannot hold {nbytes} more at {self._offset}")
        view = self._buffer[self._offset:end].view(dtype).view(shape)
        self._offset = aligned(end)
        return view
