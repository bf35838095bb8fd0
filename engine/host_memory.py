"""Host buffers for weights the CPU kernels stream: anonymous memory advised for huge pages.

`advised_buffer` maps anonymous memory with MADV_HUGEPAGE (honoured where transparent huge
pages are `always` or `madvise`; plain memory elsewhere); `Arena` carves many aligned tensors
out of one such buffer. Why and what it gained: docs/operations.md.
"""

from __future__ import annotations

import logging
import math
import mmap

import torch

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 * 2**20
ALIGNMENT = 64  # bytes: a cache line, and what the kernels' vector loads like


def advised_buffer(nbytes: int) -> torch.Tensor:
    """A zero-filled uint8 CPU tensor of `nbytes` bytes, huge-page advised where possible. The
    tensor keeps its mapping alive."""
    if nbytes <= 0:
        return torch.empty(0, dtype=torch.uint8)
    size = math.ceil(nbytes / HUGE_PAGE) * HUGE_PAGE
    try:
        region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, AttributeError, ValueError) as exc:  # no anonymous maps here
        logger.debug("plain host buffer (%s)", exc)
        return torch.zeros(nbytes, dtype=torch.uint8)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            region.madvise(advice)
        except OSError as exc:  # THP disabled or unsupported: plain pages
            logger.debug("no huge-page advice (%s)", exc)
    return torch.frombuffer(region, dtype=torch.uint8)[:nbytes]


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
