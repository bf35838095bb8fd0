"""The host expert tier: every routed expert packed into one read-only uint8 slab.

Owns the slab (pinned RAM, or a file-backed map when the experts exceed the host budget), each
expert's aligned byte range (`source`), the typed views over a copy of it (`unpack`), and the
helpers that size the device tier. Layout and the file-backed tier: docs/offload.md.
"""

from __future__ import annotations

import enum
import errno
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch

from moe_serve.engine.errors import ModelLoadError
from moe_serve.engine.host_memory import pinned_buffer
from moe_serve.engine.types import ExpertKey

ALIGNMENT = 64
_NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_ZEROS_CHUNK = 2**20


class Precision(enum.Enum):
    """Which host-tier copy of an expert a slot holds: the full-precision one, or its low-bit copy."""

    FULL = "full"
    LOW = "low"


class HostTierSpaceError(ModelLoadError):
    """The file system under the host-tier directory cannot hold the host tier."""


def _align(offset: int) -> int:
    return (offset + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


@dataclass(frozen=True)
class TensorLayout:
    """Where one of an expert's tensors sits inside the expert's byte range."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    nbytes: int


def layout_for(tensors: Sequence[torch.Tensor]) -> tuple[tuple[TensorLayout, ...], int]:
    """Aligned layouts of `tensors` packed back to back, and the padded total size in bytes."""
    layouts = []
    offset = 0
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        layouts.append(TensorLayout(tuple(tensor.shape), tensor.dtype, offset, nbytes))
        offset = _align(offset + nbytes)
    return tuple(layouts), max(offset, ALIGNMENT)


def size_text(nbytes: float, digits: int = 1) -> str:
    """`nbytes` in the largest binary unit that keeps it at least 1, e.g. 288.0 KiB."""
    value, unit = float(nbytes), "bytes"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{value:.{digits}f} {unit}"


def _allocate(fd: int, size: int) -> None:
    """Give the file `size` bytes of allocated blocks (not a sparse hole a later write could fail on)."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)
        return
    zeros = bytes(min(size, _ZEROS_CHUNK))  # no fallocate on this platform: write the zeros
    for offset in range(0, size, len(zeros)):
        os.pwrite(fd, zeros[: min(len(zeros), size - offset)], offset)


def _file_backed_slab(directory: Path, size: int) -> torch.Tensor:
    """A `size`-byte uint8 tensor mapping a new file in `directory` (MAP_SHARED), its blocks
    allocated first; the file is unlinked at once, so its blocks are freed when the mapping goes.
    Raises HostTierSpaceError when the file system cannot hold `size` bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="experts-", suffix=".bin", dir=directory)
    try:
        try:
            _allocate(fd, size)
        except OSError as exc:
            if exc.errno not in _NO_SPACE:
                raise
            if exc.errno == errno.EFBIG:
                room = "a file that large is not allowed there"
            else:
                free = shutil.disk_usage(directory).free
                room = f"only {free} bytes ({size_text(free)}) are available there"
            raise HostTierSpaceError(
                f"the file-backed host tier needs {size} bytes ({size_text(size)}) in {directory} "
                f"(host_tier_dir) but {room} ({exc.strerror or exc}); free space, choose another "
                f"host_tier_dir or raise host_memory_gb"
            ) from exc
        slab = torch.from_file(name, shared=True, size=size, dtype=torch.uint8)
    finally:
        os.close(fd)
        os.unlink(name)
    return slab


class HostExpertStore:
    """All experts' weights in one host slab, addressed by `ExpertKey`."""

    def __init__(self, slab: torch.Tensor, keys: Sequence[ExpertKey], layouts: Sequence[TensorLayout],
                 expert_nbytes: int, file_backed: bool = False) -> None:
        if slab.dtype != torch.uint8 or slab.dim() != 1 or slab.numel() != len(keys) * expert_nbytes:
            raise ValueError("slab must be a 1-D uint8 tensor of len(keys) * expert_nbytes bytes")
        self._slab = slab
        self._keys = tuple(keys)
        self._index = {key: i for i, key in enumerate(self._keys)}
        self.experts_per_layer: Mapping[int, int] = MappingProxyType(Counter(key.layer for key in self._keys))
        self.layouts = tuple(layouts)
        self.expert_nbytes = expert_nbytes
        self.file_backed = file_backed

    @classmethod
    def from_tensors(cls, experts: Mapping[ExpertKey, Sequence[torch.Tensor]], pin: bool,
                     backing_dir: Path | None = None,
                     transform: Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]] | None = None,
                     ) -> HostExpertStore:
        """Packs `experts` (same shapes and dtypes for every expert) in key order.

        `pin` pins the slab when CUDA is available (pinning needs a CUDA runtime), at its exact size
        (`host_memory.pinned_buffer`; pageable with a WARNING if pinning fails). With
        `backing_dir` the slab is a file-backed memory map in that directory (never pinned).
        `transform` maps each expert's tensors to what is stored (e.g. a packed layout), one
        expert at a time, so no second full copy of the experts is ever held.
        """
        if not experts:
            raise ValueError("no experts to store")

        def stored(key: ExpertKey) -> tuple[torch.Tensor, ...]:
            tensors = tuple(experts[key])
            return tuple(transform(tensors)) if transform is not None else tensors

        keys = sorted(experts)
        layouts, expert_nbytes = layout_for(stored(keys[0]))
        signature = [(tuple(t.shape), t.dtype) for t in experts[keys[0]]]
        for key in keys:
            found = [(tuple(t.shape), t.dtype) for t in experts[key]]
            if found != signature:
                raise ValueError(f"expert {key} has tensors {found}; expected {signature} like {keys[0]}")
        size = len(keys) * expert_nbytes
        if backing_dir is not None:
            slab = _file_backed_slab(backing_dir, size)
        elif pin and torch.cuda.is_available():
            slab = pinned_buffer(size, what="host expert tier")
        else:
            slab = torch.empty(size, dtype=torch.uint8)
        store = cls(slab, keys, layouts, expert_nbytes, file_backed=backing_dir is not None)
        for key in keys:
            for view, tensor in zip(store.unpack(store.source(key)), stored(key), strict=True):
                view.copy_(tensor.detach())
        return store

    @property
    def keys(self) -> tuple[ExpertKey, ...]:
        """Every stored expert, sorted by (layer, expert)."""
        return self._keys

    @property
    def nbytes(self) -> int:
        """Size of the whole slab."""
        return self._slab.numel()

    @property
    def is_pinned(self) -> bool:
        return self._slab.is_pinned()

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._keys)

    def source(self, key: ExpertKey) -> torch.Tensor:
        """The expert's `expert_nbytes` bytes: a uint8 view of the slab, to be read only."""
        try:
            index = self._index[key]
        except KeyError:
            raise KeyError(f"expert {key} is not in the store") from None
        start = index * self.expert_nbytes
        return self._slab[start:start + self.expert_nbytes]

    def unpack(self, buf: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Typed views, with the original shapes, into a uint8 buffer holding one expert."""
        if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() < self.expert_nbytes:
            raise ValueError(f"buffer must be 1-D uint8 of at least {self.expert_nbytes} bytes")
        views = []
        for layout in self.layouts:
            raw = buf[layout.offset:layout.offset + layout.nbytes]
            views.append(raw.view(layout.dtype).view(layout.shape))
        return tuple(views)


def min_slots_for_step(num_experts: int, top_k: int, max_tokens_per_step: int) -> int:
    """Expert-cache slots one layer of one step may pin at once (keys are released before the next layer)."""
    if min(num_experts, top_k, max_tokens_per_step) < 1:
        raise ValueError("num_experts, top_k and max_tokens_per_step must be >= 1")
    return min(num_experts, top_k * max_tokens_per_step)


def slots_for_budget(budget_bytes: int, expert_nbytes: int) -> int:
    """How many expert slots fit in `budget_bytes`."""
    if expert_nbytes < 1:
        raise ValueError(f"expert_nbytes must be >= 1, got {expert_nbytes}")
    return max(budget_bytes, 0) // expert_nbytes
