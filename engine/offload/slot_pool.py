"""The device slot pool: a fixed number of equal-size slots and the copies that fill them.

Owns one record per slot (state, the expert key it holds, pins, its pending copy ticket, the
CUDA event of its last use), the key -> slot map, the free list and the eviction candidates
(resident and unpinned). It moves bytes but never decides: which key goes where, and what is
evicted, is the ExpertCache's choice. Owned by the engine thread: not thread-safe.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence, Set
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import NamedTuple

import torch

from moe_serve.cuda_ext.api import CopyEngine, CopyError, CopyPriority, CopyTicket
from moe_serve.engine.host_memory import advised_buffer
from moe_serve.engine.offload.expert_store import Precision
from moe_serve.engine.types import ExpertKey

logger = logging.getLogger(__name__)
# the residency map is rebuilt at most this often after a change: ~60 us at 400 slots, too much per step
RESIDENCY_REFRESH_S = 0.25

__all__ = ["EvictableKeys", "ExpertSlot", "SlotPool", "SlotState"]


class SlotState(Enum):
    FREE = "free"
    LOADING = "loading"  # a copy from the host store is pending
    RESIDENT = "resident"


class ExpertSlot(NamedTuple):
    """Handle on a pinned slot: valid until the matching release."""

    index: int
    key: ExpertKey


@dataclass
class _Slot:
    buffer: torch.Tensor
    state: SlotState = SlotState.FREE
    key: ExpertKey | None = None
    refcount: int = 0
    ticket: CopyTicket | None = None
    last_use: torch.cuda.Event | None = None
    precision: Precision = Precision.FULL  # which copy of its key the slot holds (or is loading)
    # the buffer's typed weight views, built once per slot and precision
    views: dict[Precision, tuple[torch.Tensor, ...]] = field(default_factory=dict)


class EvictableKeys(Set[ExpertKey]):
    """The resident unpinned keys not in `protected`, oldest unpinned first, as a set view over the
    pool's live candidates (valid until the pool changes)."""

    def __init__(self, idle: dict[ExpertKey, None], protected: Set[ExpertKey]) -> None:
        self._idle, self._protected = idle, protected

    @property
    def protected(self) -> Set[ExpertKey]:
        """The keys excluded besides the pinned ones (the same object for every view built with it)."""
        return self._protected

    def __contains__(self, key: object) -> bool:
        return key in self._idle and key not in self._protected

    def __iter__(self) -> Iterator[ExpertKey]:
        return (key for key in self._idle if key not in self._protected)

    def __len__(self) -> int:  # O(len(protected)), not a walk over every idle key
        return len(self._idle) - sum(1 for key in self._protected if key in self._idle)


class SlotPool:
    """`num_slots` device buffers of `slot_nbytes` bytes, filled through a CopyEngine.

    A slot is FREE (on the free list), LOADING (holds a key, its copy pending) or RESIDENT.
    Pins count per occurrence; only RESIDENT slots with no pin are eviction candidates. A slot
    holds its key's full-precision copy or, with `low_unpack`, its low-bit one (`Precision`).
    """

    def __init__(self, num_slots: int, slot_nbytes: int, device: torch.device, copy_engine: CopyEngine,
                 unpack: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
                 low_unpack: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None = None) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.device, self.copy_engine, self.num_slots = torch.device(device), copy_engine, num_slots
        self._unpack = {Precision.FULL: unpack}
        if low_unpack is not None:
            self._unpack[Precision.LOW] = low_unpack
        if self.device.type == "cpu":  # the CPU kernels stream the slots: huge-page advised RAM
            buffers = advised_buffer(num_slots * slot_nbytes).view(num_slots, slot_nbytes)
        else:
            buffers = torch.empty((num_slots, slot_nbytes), dtype=torch.uint8, device=self.device)
        self._slots = [_Slot(buffer=buffers[i]) for i in range(num_slots)]
        self._slot_of: dict[ExpertKey, int] = {}
        self._free = list(range(num_slots - 1, -1, -1))
        self._loading: set[int] = set()
        # keys whose slot is RESIDENT with refcount 0 (the eviction candidates), in the order they became so
        self._idle: dict[ExpertKey, None] = {}
        self._residency: Mapping[int, tuple[int, ...]] = MappingProxyType({})
        self._residency_at, self._residency_stale = float("-inf"), False
        logger.info("expert slot pool: %d slots x %d bytes on %s", num_slots, slot_nbytes, self.device)

    # -- reading -------------------------------------------------------------------------------

    def __contains__(self, key: object) -> bool:
        """Whether `key` holds a slot (loading or resident)."""
        return key in self._slot_of

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_occupied(self) -> int:
        """Slots holding a key (resident or loading); safe to read from another thread."""
        return len(self._slot_of)

    def residency(self) -> Mapping[int, tuple[int, ...]]:
        """MoE layer -> sorted expert ids holding a slot (resident or loading), read-only; after a
        change it is rebuilt at most every RESIDENCY_REFRESH_S, so it may lag by that much."""
        now = time.monotonic()
        if self._residency_stale and now - self._residency_at >= RESIDENCY_REFRESH_S:
            by_layer: dict[int, list[int]] = defaultdict(list)
            for key in self._slot_of:
                by_layer[key.layer].append(key.expert)
            self._residency = MappingProxyType({layer: tuple(sorted(by_layer[layer])) for layer in sorted(by_layer)})
            self._residency_at, self._residency_stale = now, False
        return self._residency

    @property
    def num_loading(self) -> int:
        return len(self._loading)

    @property
    def num_pinned(self) -> int:
        return sum(1 for record in self._slots if record.refcount > 0)

    def pinned_keys(self) -> set[ExpertKey]:
        return {record.key for record in self._slots if record.refcount > 0 and record.key is not None}

    def state_of(self, key: ExpertKey) -> SlotState:
        """`key`'s slot state (FREE if it holds none), after polling its copy."""
        index = self._slot_of.get(key)
        if index is None:
            return SlotState.FREE
        self._refresh(index)
        return self._slots[index].state

    def precision_of(self, key: ExpertKey) -> Precision:
        """Which copy `key`'s slot holds or is loading (it must hold a slot)."""
        return self._slots[self._slot_of[key]].precision

    def is_loading(self, key: ExpertKey) -> bool:
        """Whether `key`'s copy was still pending when last polled (does not poll)."""
        index = self._slot_of.get(key)
        return index is not None and self._slots[index].state is SlotState.LOADING

    def evictable_keys(self, protected: Set[ExpertKey] = frozenset()) -> EvictableKeys:
        """A live set view of `evictable(protected)`: O(1) membership, no list built."""
        return EvictableKeys(self._idle, protected)

    def evictable(self, protected: Set[ExpertKey] = frozenset()) -> list[ExpertKey]:
        """Resident unpinned keys not in `protected`, oldest-unpinned first."""
        if not protected:
            return list(self._idle)
        return [key for key in self._idle if key not in protected]

    def unpinned_loading(self, excluded: Set[ExpertKey]) -> list[ExpertKey]:
        """Keys whose copy is pending, holding no pin and not in `excluded`."""
        slots = self._slots
        return [key for index in self._loading
                if slots[index].refcount == 0 and (key := slots[index].key) is not None and key not in excluded]

    # -- handles -------------------------------------------------------------------------------

    def ready(self, slot: ExpertSlot) -> bool:
        """True once `slot`'s bytes are in place (no pending copy)."""
        index = self._checked(slot)
        self._refresh(index)
        return self._slots[index].state is SlotState.RESIDENT

    def take_ready(self, slot: ExpertSlot) -> tuple[torch.Tensor, ...] | None:
        """The pinned slot's weight views if its bytes are already in place (never blocks), else None."""
        record = self._slots[self._pinned(slot)]
        if record.state is SlotState.LOADING:
            self._refresh(slot.index)
            if record.state is SlotState.LOADING:
                return None
        return self._views(record)

    def needs_wait(self, slot: ExpertSlot) -> bool:
        """Whether the pinned slot's copy is still pending (polls it first)."""
        index = self._pinned(slot)
        self._refresh(index)
        return self._slots[index].state is SlotState.LOADING

    def wait_copy(self, slot: ExpertSlot) -> None:
        """Orders later work after this pinned slot's pending copy only (CPU: blocks until it lands)."""
        index = self._pinned(slot)
        ticket = self._slots[index].ticket
        if ticket is None:
            return
        ticket.wait()
        if ticket.cancelled():
            raise RuntimeError(f"the copy of {slot.key} was cancelled (copy engine shut down?)")
        self._refresh(index)

    def views(self, slot: ExpertSlot) -> tuple[torch.Tensor, ...]:
        """The pinned slot's typed weight views (built once per slot)."""
        return self._views(self._slots[self._pinned(slot)])

    # -- pins ----------------------------------------------------------------------------------

    def pin(self, keys: Sequence[ExpertKey]) -> list[ExpertSlot]:
        """Pins every key's slot once per occurrence (every key must hold one); handles in order."""
        slot_of, slots, idle, handles = self._slot_of, self._slots, self._idle, []
        for key in keys:
            index = slot_of[key]
            slots[index].refcount += 1
            idle.pop(key, None)
            handles.append(ExpertSlot(index, key))
        return handles

    def unpin(self, keys: Sequence[ExpertKey]) -> None:
        """Unpins every key once per occurrence; raises ValueError, changing nothing, on an unpinned key.
        On CUDA a slot's last pin records an event that its next fill waits for."""
        slot_of, slots = self._slot_of, self._slots
        for key, count in Counter(keys).items():
            if key not in slot_of or slots[slot_of[key]].refcount < count:
                raise ValueError(f"release of {key} x{count}, more than it is acquired")
        on_cuda, idle = self.device.type == "cuda", self._idle
        for key in keys:
            record = slots[slot_of[key]]
            record.refcount -= 1
            if record.refcount == 0:
                if record.state is SlotState.RESIDENT:
                    idle[key] = None
                if on_cuda:
                    record.last_use = torch.cuda.Event()
                    record.last_use.record(torch.cuda.current_stream(self.device))

    # -- filling and emptying ------------------------------------------------------------------

    def claim_free(self) -> int:
        """Takes a slot off the free list (one must be free)."""
        return self._free.pop()

    def begin_load(self, index: int, key: ExpertKey, precision: Precision = Precision.FULL) -> None:
        """Gives the claimed slot `index` to `key`'s `precision` copy as LOADING (after the compute
        that last read it)."""
        if precision not in self._unpack:
            raise ValueError(f"no {precision.value}-precision copy of the experts in this pool")
        record = self._slots[index]
        if record.last_use is not None:
            record.last_use.synchronize()  # compute that read the previous expert must finish first
            record.last_use = None
        record.state, record.key, record.precision = SlotState.LOADING, key, precision
        self._slot_of[key] = index
        self._residency_stale = True
        self._loading.add(index)

    def begin_reload(self, key: ExpertKey, precision: Precision) -> None:
        """Makes `key`'s resident unpinned slot LOADING its `precision` copy in place (an upgrade,
        after the compute that last read it); the caller submits the copy."""
        if precision not in self._unpack:
            raise ValueError(f"no {precision.value}-precision copy of the experts in this pool")
        index = self._slot_of[key]
        record = self._slots[index]
        if record.state is not SlotState.RESIDENT or record.refcount:
            raise ValueError(f"reload of {key}: only a resident unpinned slot is reloaded in place")
        if record.last_use is not None:
            record.last_use.synchronize()
            record.last_use = None
        self._idle.pop(key, None)
        record.state, record.precision = SlotState.LOADING, precision
        self._loading.add(index)

    def submit(self, keys: Sequence[ExpertKey], sources: Sequence[torch.Tensor], priority: CopyPriority) -> None:
        """Queues one copy per LOADING key from its source, in one submit. If the copy engine
        raises, nothing was queued: the caller empties the slots."""
        if not keys:
            return
        slot_of, slots = self._slot_of, self._slots
        # a low-bit copy fills the start of its (full-size) slot
        tickets = self.copy_engine.submit([(source, slots[slot_of[key]].buffer[:source.numel()])
                                           for key, source in zip(keys, sources, strict=True)], priority)
        for key, ticket in zip(keys, tickets):
            slots[slot_of[key]].ticket = ticket

    def promote(self, key: ExpertKey) -> None:
        """Moves `key`'s still queued copy ahead of prefetches (a no-op once it landed)."""
        record = self._slots[self._slot_of[key]]
        if record.state is SlotState.LOADING and record.ticket is not None:
            self.copy_engine.promote(record.ticket)

    def cancel(self, key: ExpertKey) -> bool:
        """Drops `key`'s still queued copy; True if it was dropped (its slot stays LOADING until freed)."""
        ticket = self._slots[self._slot_of[key]].ticket
        return ticket is not None and self.copy_engine.cancel(ticket)

    def settle(self, key: ExpertKey) -> bool:
        """Blocks until `key`'s pending copy lands; False if it holds no slot or no pending copy."""
        index = self._slot_of.get(key)
        if index is None:
            return False
        record = self._slots[index]
        if record.state is not SlotState.LOADING or record.ticket is None or record.ticket.failed():
            return False
        record.ticket.synchronize()
        self._refresh(index)
        return True

    def refresh_loading(self) -> list[ExpertKey]:
        """Polls every pending copy; landed ones become RESIDENT. Returns the keys of unpinned slots
        whose copy failed: the cache frees them, so a later use copies again."""
        return [self._slots[index].key for index in list(self._loading) if self._refresh(index)]

    def free(self, key: ExpertKey) -> None:
        """Empties `key`'s unpinned slot (evicted or cancelled) back onto the free list."""
        index = self._slot_of.pop(key)
        self._residency_stale = True
        record = self._slots[index]
        assert record.refcount == 0
        self._idle.pop(key, None)
        self._loading.discard(index)
        record.state, record.key, record.ticket = SlotState.FREE, None, None
        self._free.append(index)

    # -- checks --------------------------------------------------------------------------------

    def problems(self) -> list[str]:
        """Inconsistencies between the slot records and the indexes over them (empty when sound)."""
        problems = [f"{len(self._slot_of)} keys hold slots, budget {self.num_slots}"] \
            if len(self._slot_of) > len(self._slots) or len(set(self._slot_of.values())) != len(self._slot_of) else []
        for index, record in enumerate(self._slots):
            occupied, loading = record.state is not SlotState.FREE, record.state is SlotState.LOADING
            consistent = (record.refcount >= 0 and occupied == (record.key is not None) == (index not in self._free)
                          and (occupied or record.refcount == 0) and loading == (record.ticket is not None)
                          and loading == (index in self._loading)
                          and (not occupied or self._slot_of.get(record.key) == index))
            if not consistent:
                problems.append(f"slot {index}: {record.state} key={record.key} refcount={record.refcount} "
                                f"ticket={record.ticket} free-listed={index in self._free}")
        idle = {r.key for r in self._slots if r.state is SlotState.RESIDENT and r.refcount == 0}
        if set(self._idle) != idle:
            problems.append(f"eviction candidates {sorted(self._idle)} != resident unpinned {sorted(idle)}")
        return problems

    # -- internals -----------------------------------------------------------------------------

    def _checked(self, slot: ExpertSlot) -> int:
        if self._slot_of.get(slot.key) != slot.index:
            raise ValueError(f"stale slot handle {slot}: the key no longer holds that slot")
        return slot.index

    def _pinned(self, slot: ExpertSlot) -> int:
        index = self._checked(slot)
        if self._slots[index].refcount < 1:
            raise ValueError(f"wait on {slot.key} which is not acquired")
        return index

    def _refresh(self, index: int) -> bool:
        """A landed copy makes its slot RESIDENT. A failed one raises CopyError while the slot is
        pinned (its user cannot go on) and otherwise stays LOADING: True then, for the cache to free."""
        record = self._slots[index]
        ticket = record.ticket
        if record.state is not SlotState.LOADING or ticket is None:
            return False
        try:
            landed = ticket.done()
        except CopyError:
            if record.refcount:
                raise
            return True
        if landed:
            record.state, record.ticket = SlotState.RESIDENT, None
            self._loading.discard(index)
            if record.refcount == 0:
                self._idle[record.key] = None
        return False

    def _views(self, record: _Slot) -> tuple[torch.Tensor, ...]:
        """The typed weight views of a loaded slot (built once per slot and precision)."""
        views = record.views.get(record.precision)
        if views is None:
            views = record.views[record.precision] = self._unpack[record.precision](record.buffer)
        return views
