"""The device expert tier: a fixed pool of equal-size slots holding the experts in use.

Slots are FREE, LOADING (a copy from the host store is pending) or RESIDENT. `acquire` pins
keys for one layer (starting DEMAND copies for misses), `wait` orders compute after one
slot's copy only, `release` unpins; `prefetch` starts PREFETCH copies without pinning.
Only RESIDENT slots with refcount 0 are evicted, chosen by the CachePolicy. A scored prefetch
(a preload) only evicts experts scored lower than the one it loads, and demand evicts an unused
preload of this or the previous step only when nothing else can go. Owned by the
engine thread: not thread-safe. On a CPU machine the pool is a separate RAM tensor.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

import torch

from moe_serve.cache_policies.base import CachePolicy
from moe_serve.cuda_ext.api import CopyEngine, CopyPair, CopyPriority, CopyTicket
from moe_serve.engine.host_memory import advised_buffer
from moe_serve.engine.offload.expert_store import HostExpertStore, min_slots_for_step, slots_for_budget
from moe_serve.engine.types import ExpertKey

logger = logging.getLogger(__name__)

__all__ = ["ExpertCache", "ExpertCacheFullError", "ExpertCacheStats", "ExpertSlot", "SlotState",
           "min_slots_for_step", "slots_for_budget"]


class SlotState(Enum):
    FREE = "free"
    LOADING = "loading"
    RESIDENT = "resident"


class ExpertCacheFullError(RuntimeError):
    """A layer needs more slots than are free or evictable."""


class ExpertSlot(NamedTuple):
    """Handle on a pinned slot: valid until the matching `release`."""

    index: int
    key: ExpertKey


@dataclass
class _Slot:
    buffer: torch.Tensor
    state: SlotState = SlotState.FREE
    key: ExpertKey | None = None
    refcount: int = 0
    ticket: CopyTicket | None = None
    prefetched_unused: bool = False
    preload_step: int | None = None  # step a still unused scored prefetch was issued in
    last_use: torch.cuda.Event | None = None
    views: tuple[torch.Tensor, ...] | None = None  # the buffer's typed weight views (fixed per slot)


@dataclass
class ExpertCacheStats:
    """Counters since construction; per-layer dicts are keyed by MoE layer index."""

    hits: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    misses: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    evictions: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    bytes_copied: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    stall_seconds: dict[int, float] = field(default_factory=lambda: defaultdict(float))
    prefetch_issued: int = 0
    prefetch_used: int = 0  # acquired before eviction (includes late ones)
    prefetch_wasted: int = 0  # evicted or cancelled before any use
    prefetch_late: int = 0  # acquired while its copy was still pending

    @property
    def hit_rate(self) -> float:
        hits, lookups = sum(self.hits.values()), sum(self.hits.values()) + sum(self.misses.values())
        return hits / lookups if lookups else 0.0


class ExpertCache:
    """Slot pool over a HostExpertStore, filled through a CopyEngine."""

    def __init__(self, store: HostExpertStore, num_slots: int, device: torch.device, policy: CachePolicy,
                 copy_engine: CopyEngine) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.store, self.policy, self.copy_engine = store, policy, copy_engine
        self.device = torch.device(device)
        self.num_slots = num_slots
        # S slots, B expert_nbytes
        if self.device.type == "cpu":  # the CPU kernels stream the slots: huge-page advised RAM
            pool = advised_buffer(num_slots * store.expert_nbytes).view(num_slots, store.expert_nbytes)
        else:
            pool = torch.empty((num_slots, store.expert_nbytes), dtype=torch.uint8, device=self.device)
        self._slots = [_Slot(buffer=pool[i]) for i in range(num_slots)]
        self._slot_of: dict[ExpertKey, int] = {}
        self._free = list(range(num_slots - 1, -1, -1))
        self._loading: set[int] = set()
        # keys whose slot is RESIDENT with refcount 0 (the eviction candidates), in the order they became so
        self._idle: dict[ExpertKey, None] = {}
        self._preloads: set[ExpertKey] = set()  # keys holding a still unused scored prefetch (preload_step set)
        self._stats = ExpertCacheStats()
        self._step = 0
        logger.info("expert cache: %d slots x %d bytes on %s", num_slots, store.expert_nbytes, self.device)

    def state_of(self, key: ExpertKey) -> SlotState:
        """The state of `key`'s slot (FREE if the key holds none), after polling its copy."""
        index = self._slot_of.get(key)
        if index is not None:
            self._refresh(index)
        return SlotState.FREE if index is None else self._slots[index].state

    def acquire(self, keys: Sequence[ExpertKey]) -> list[ExpertSlot]:
        """Pins every key (once per occurrence) and returns its slot, in order.

        Misses start DEMAND copies in one submit; raises ExpertCacheFullError, changing
        nothing, when the misses need more slots than are free or evictable.
        """
        unique = list(dict.fromkeys(keys))
        slot_of = self._slot_of
        misses = [key for key in unique if key not in slot_of]
        for key in misses:  # a key holding a slot is known
            self._check_known(key)
        if self._loading:
            self._refresh_loading()
        if misses:
            self._ensure_capacity(len(misses), requested=set(unique))
        for key in unique:
            if key in slot_of:
                self._record_hit(key)
        if misses:
            protected = set(unique)
            copies = [self._start_load(self._claim_slot(protected), key, prefetched=False) for key in misses]
            self._submit(misses, copies, CopyPriority.DEMAND)
            for key in misses:
                self._stats.misses[key.layer] += 1
                self.policy.on_access(key)
        slots, idle, handles = self._slots, self._idle, []
        for key in keys:
            index = slot_of[key]
            slots[index].refcount += 1
            idle.pop(key, None)
            handles.append(ExpertSlot(index, key))
        return handles

    def take_ready(self, slot: ExpertSlot) -> tuple[torch.Tensor, ...] | None:
        """`wait(slot)` if its bytes are already in place (never blocks), else None."""
        index = self._checked(slot)
        record = self._slots[index]
        if record.refcount < 1:
            raise ValueError(f"wait on {slot.key} which is not acquired")
        if record.state is SlotState.LOADING:
            self._refresh(index)
            if record.state is SlotState.LOADING:
                return None
        return self._views(record)

    def ready(self, slot: ExpertSlot) -> bool:
        """True once `slot`'s bytes are in place (no pending copy)."""
        index = self._checked(slot)
        self._refresh(index)
        return self._slots[index].state is SlotState.RESIDENT

    def wait(self, slot: ExpertSlot) -> tuple[torch.Tensor, ...]:
        """Orders later work after this slot's copy only; returns the expert's weight views."""
        index = self._checked(slot)
        record = self._slots[index]
        if record.refcount < 1:
            raise ValueError(f"wait on {slot.key} which is not acquired")
        self._refresh(index)
        if record.state is SlotState.LOADING:
            assert record.ticket is not None
            started = time.perf_counter()
            record.ticket.wait()
            self._stats.stall_seconds[slot.key.layer] += time.perf_counter() - started
            if record.ticket.cancelled():
                raise RuntimeError(f"the copy of {slot.key} was cancelled (copy engine shut down?)")
            self._refresh(index)
        return self._views(record)

    def _views(self, record: _Slot) -> tuple[torch.Tensor, ...]:
        """The typed weight views of a loaded slot (built once per slot)."""
        if record.views is None:
            record.views = self.store.unpack(record.buffer)
        return record.views

    def release(self, keys: Sequence[ExpertKey]) -> None:
        """Unpins every key once per occurrence (the inverse of `acquire`)."""
        slot_of, slots = self._slot_of, self._slots
        counts = Counter(keys)
        for key, count in counts.items():
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

    def prefetch(self, keys: Sequence[ExpertKey], scores: Mapping[ExpertKey, float] | None = None) -> int:
        """Starts PREFETCH copies (never pinning, never evicting pinned or loading slots) for keys
        not present, into free or evictable slots; returns how many started.

        Without `scores` it stops when no slot is free or evictable. With `scores` (a preload:
        each key's probability of being needed, unlisted keys count 0) a key may only evict an
        expert scored strictly lower and not itself an unused preload of this or the previous
        step; a key with no such victim is skipped. Queued copies run after every DEMAND copy.
        """
        self._refresh_loading()
        started: list[ExpertKey] = []
        copies = []
        for key in dict.fromkeys(keys):
            self._check_known(key)
            if key in self._slot_of:
                continue
            if scores is None:
                if not self._free and not self._evictable():
                    break
                index = self._claim_slot()
            else:
                claimed = self._claim_slot_below(scores.get(key, 0.0), scores)
                if claimed is None:
                    continue
                index = claimed
            copies.append(self._start_load(index, key, prefetched=True))
            if scores is not None:
                self._slots[index].preload_step = self._step
                self._preloads.add(key)
            started.append(key)
        self._submit(started, copies, CopyPriority.PREFETCH)
        self._stats.prefetch_issued += len(started)
        return len(started)

    @property
    def num_pinned_slots(self) -> int:
        """Slots pinned by an `acquire` not yet released (0 between engine steps)."""
        return sum(1 for record in self._slots if record.refcount > 0)

    @property
    def num_occupied_slots(self) -> int:
        """Slots holding an expert (resident or loading); safe to read from another thread."""
        return len(self._slot_of)

    def on_step(self) -> None:
        """End of one engine step: forwarded to the policy."""
        self._step += 1
        self.policy.on_step()

    def stats(self) -> ExpertCacheStats:
        """A snapshot of the counters."""
        return copy.deepcopy(self._stats)

    def check_invariants(self) -> None:
        """Raises AssertionError if the slot bookkeeping is inconsistent."""
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
        if self._preloads != {r.key for r in self._slots if r.preload_step is not None}:
            problems.append(f"preload set {sorted(self._preloads)} out of date")
        if problems:
            raise AssertionError("; ".join(problems))

    def _check_known(self, key: ExpertKey) -> None:
        if key not in self.store:
            raise KeyError(f"expert {key} is not in the host store")

    def _checked(self, slot: ExpertSlot) -> int:
        if self._slot_of.get(slot.key) != slot.index:
            raise ValueError(f"stale slot handle {slot}: the key no longer holds that slot")
        return slot.index

    def _refresh(self, index: int) -> None:
        record = self._slots[index]
        if record.state is SlotState.LOADING and record.ticket is not None and record.ticket.done():
            record.state, record.ticket = SlotState.RESIDENT, None
            self._loading.discard(index)
            if record.refcount == 0:
                self._idle[record.key] = None

    def _refresh_loading(self) -> None:
        for index in list(self._loading):
            self._refresh(index)

    def _evictable(self, protected: set[ExpertKey] | frozenset[ExpertKey] = frozenset()) -> list[ExpertKey]:
        if not protected:
            return list(self._idle)
        return [key for key in self._idle if key not in protected]

    def _ensure_capacity(self, needed: int, requested: set[ExpertKey]) -> None:
        """Makes `needed` slots claimable or raises: first cancels queued unused prefetches, then
        waits for in-flight unused prefetches to land (they become evictable)."""
        available = len(self._free) + len(self._evictable(requested))
        unused = [i for i in self._loading if self._slots[i].refcount == 0 and self._slots[i].key not in requested]
        for index in unused:
            if available >= needed:
                return
            record = self._slots[index]
            if record.ticket is not None and self.copy_engine.cancel(record.ticket):
                self._stats.bytes_copied[record.key.layer] -= self.store.expert_nbytes
                self._drop(index, wasted=True)
                available += 1
        for index in unused:
            if available >= needed:
                return
            record = self._slots[index]
            if record.state is SlotState.LOADING and record.ticket is not None:
                record.ticket.synchronize()
                self._refresh(index)
                available += 1
        if available < needed:
            pinned = sum(1 for record in self._slots if record.refcount > 0 or record.key in requested)
            raise ExpertCacheFullError(
                f"this layer needs {needed} new expert slots but only {available} of {self.num_slots} are free or "
                f"evictable ({pinned} pinned or requested, {len(self._loading)} loading); raise the expert cache budget to at "
                f"least min_slots_for_step(num_experts, top_k, max_tokens_per_step) slots")

    def _record_hit(self, key: ExpertKey) -> None:
        record = self._slots[self._slot_of[key]]
        self._stats.hits[key.layer] += 1
        if record.preload_step is not None:
            record.preload_step = None
            self._preloads.discard(key)
        if record.prefetched_unused:
            record.prefetched_unused = False
            self._stats.prefetch_used += 1
            if record.state is SlotState.LOADING:
                self._stats.prefetch_late += 1
        if record.state is SlotState.LOADING and record.ticket is not None:
            self.copy_engine.promote(record.ticket)
        self.policy.on_access(key)

    def _claim_slot(self, protected: set[ExpertKey] | frozenset[ExpertKey] = frozenset()) -> int:
        if self._free:
            return self._free.pop()
        candidates = self._evictable(protected)
        settled = [key for key in candidates if not self._fresh_preload(key)] if self._preloads else candidates
        return self._evict(self.policy.victim(settled or candidates))

    def _claim_slot_below(self, score: float, scores: Mapping[ExpertKey, float]) -> int | None:
        """A free slot, or one freed by evicting an expert scored below `score` (None if none)."""
        if self._free:
            return self._free.pop()
        candidates = [key for key in self._idle if scores.get(key, 0.0) < score and not self._fresh_preload(key)]
        return self._evict(self.policy.victim(candidates)) if candidates else None

    def _fresh_preload(self, key: ExpertKey) -> bool:
        """An unused preload issued in this or the previous step (its request may not have reached it yet)."""
        if key not in self._preloads:
            return False
        step = self._slots[self._slot_of[key]].preload_step
        return step is not None and step >= self._step - 1

    def _evict(self, victim: ExpertKey) -> int:
        index = self._slot_of[victim]
        self._stats.evictions[victim.layer] += 1
        self._drop(index, wasted=self._slots[index].prefetched_unused)
        return self._free.pop()

    def _drop(self, index: int, wasted: bool) -> None:
        """Empties an unpinned slot (evicted or cancelled) back onto the free list."""
        record = self._slots[index]
        assert record.key is not None and record.refcount == 0
        self.policy.on_evict(record.key)
        self._stats.prefetch_wasted += int(wasted)
        self._idle.pop(record.key, None)
        self._preloads.discard(record.key)
        del self._slot_of[record.key]
        self._loading.discard(index)
        record.state, record.key, record.ticket, record.prefetched_unused = SlotState.FREE, None, None, False
        record.preload_step = None
        self._free.append(index)

    def _start_load(self, index: int, key: ExpertKey, prefetched: bool) -> CopyPair:
        record = self._slots[index]
        if record.last_use is not None:
            record.last_use.synchronize()  # compute that read the previous expert must finish first
            record.last_use = None
        record.state, record.key, record.prefetched_unused = SlotState.LOADING, key, prefetched
        self._slot_of[key] = index
        self._loading.add(index)
        self._stats.bytes_copied[key.layer] += self.store.expert_nbytes
        self.policy.on_insert(key)
        return self.store.source(key), record.buffer

    def _submit(self, keys: list[ExpertKey], copies: list[CopyPair], priority: CopyPriority) -> None:
        if not copies:
            return
        try:
            tickets = self.copy_engine.submit(copies, priority)
        except BaseException:  # nothing was queued: the claimed (still unpinned) slots go back to the free list
            for key in keys:
                self._stats.bytes_copied[key.layer] -= self.store.expert_nbytes
                self._drop(self._slot_of[key], wasted=False)
            raise
        for key, ticket in zip(keys, tickets):
            self._slots[self._slot_of[key]].ticket = ticket
