"""The expert cache: which experts occupy the device slot pool, and the counters over it.

Owns the eviction policy, the demand/prefetch/preload rules and the hit, miss, eviction, copy
and prefetch counters; the slots, their pins and copies are the SlotPool's (`slot_pool`).
`acquire` pins one layer's keys (misses start DEMAND copies), `wait` orders compute after one
slot's copy, `release` unpins, `prefetch` starts PREFETCH copies without pinning; the rules are
in docs/offload.md. With a low-bit host copy (`low_store`) a miss may load it instead, the cache
remembers each slot's precision and upgrades the keys asked for to full precision between steps
(docs/mixed_precision.md). Owned by the engine thread: not thread-safe.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field, fields, replace

import torch

from moe_serve.cache_policies.base import CachePolicy
from moe_serve.cuda_ext.api import CopyEngine, CopyPriority
from moe_serve.engine.offload.expert_store import HostExpertStore, Precision, min_slots_for_step, slots_for_budget
from moe_serve.engine.offload.slot_pool import ExpertSlot, SlotPool, SlotState
from moe_serve.engine.types import ExpertKey

logger = logging.getLogger(__name__)

__all__ = ["ExpertCache", "ExpertCacheFullError", "ExpertCacheStats", "ExpertSlot", "SlotState",
           "min_slots_for_step", "slots_for_budget"]


class ExpertCacheFullError(RuntimeError):
    """A layer needs more slots than are free or evictable."""


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
    # misses computed from the host tier instead of copied (counted in `misses` too), the host
    # worker's seconds computing them, and the seconds the copy engine's link was busy
    host_misses: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    host_compute_seconds: float = 0.0
    link_busy_seconds: float = 0.0
    # per task: (row, MoE layer, routed expert) lookups and those that missed (`TaskHitCounter`)
    lookups_by_task: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    misses_by_task: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    # copies into slots by what they load (LOAD_KINDS: full, low, upgrade = a low-bit resident expert
    # reloaded at full precision) and their bytes (their sum over kinds is the sum of `bytes_copied`)
    loads: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    load_bytes: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    @property
    def hit_rate(self) -> float:
        hits, lookups = sum(self.hits.values()), sum(self.hits.values()) + sum(self.misses.values())
        return hits / lookups if lookups else 0.0


LOAD_KINDS = ("full", "low", "upgrade")


class ExpertCache:
    """Keys of a HostExpertStore cached in a SlotPool under a CachePolicy; with `low_store` (the same
    keys in a low-bit format, each no larger than the full one) a slot holds either copy."""

    def __init__(self, store: HostExpertStore, num_slots: int, device: torch.device, policy: CachePolicy,
                 copy_engine: CopyEngine, low_store: HostExpertStore | None = None) -> None:
        self.store, self.low_store, self.policy = store, low_store, policy
        if low_store is not None and (low_store.keys != store.keys or low_store.expert_nbytes > store.expert_nbytes):
            raise ValueError("the low-bit store must hold the same experts, each in at most a full slot's bytes")
        self.pool = SlotPool(num_slots, store.expert_nbytes, device, copy_engine, store.unpack,
                             None if low_store is None else low_store.unpack)
        self._load_kind: dict[ExpertKey, str] = {}  # key holding a slot -> what its last copy loaded
        self._upgrades: dict[ExpertKey, None] = {}  # low-bit keys to reload at full precision after this step
        self._prefetched_unused: set[ExpertKey] = set()  # prefetched keys not acquired since they were loaded
        self._preloads: dict[ExpertKey, int] = {}  # key of a still unused scored prefetch -> step it was issued in
        self._stats = ExpertCacheStats()
        self._step = 0
        self._step_misses: list[ExpertKey] = []  # demand misses since `take_step_misses` last ran

    @property
    def device(self) -> torch.device:
        return self.pool.device

    @property
    def num_slots(self) -> int:
        return self.pool.num_slots

    @property
    def num_pinned_slots(self) -> int:
        """Slots pinned by an `acquire` not yet released (0 between engine steps)."""
        return self.pool.num_pinned

    @property
    def num_occupied_slots(self) -> int:
        """Slots holding an expert (resident or loading); safe to read from another thread."""
        return self.pool.num_occupied

    def state_of(self, key: ExpertKey) -> SlotState:
        """The state of `key`'s slot (FREE if the key holds none), after polling its copy."""
        return self.pool.state_of(key)

    def acquire(self, keys: Sequence[ExpertKey], low: Set[ExpertKey] = frozenset()) -> list[ExpertSlot]:
        """Pins every key (once per occurrence) and returns its slot, in order.

        Misses start DEMAND copies in one submit (of the low-bit copy for keys in `low`); raises
        ExpertCacheFullError, changing nothing, when the misses need more slots than are free or evictable.
        """
        pool = self.pool
        unique = list(dict.fromkeys(keys))
        misses = [key for key in unique if key not in pool]
        for key in misses:  # a key holding a slot is known
            self._check_known(key)
        if pool.num_loading:
            self._refresh_loading()
        misses = [key for key in unique if key not in pool]  # a dropped failed copy is a miss again
        if misses:
            self._ensure_capacity(len(misses), requested=set(unique))
        for key in unique:
            if key in pool:
                self._record_hit(key)
        if misses:
            protected = set(unique)
            victims = self._victims_ahead(misses, protected)
            for key in misses:
                index = self._evict(victims.popleft()) if victims and not pool.num_free else self._claim_slot(protected)
                self._start_load(index, key, prefetched=False,
                                 precision=Precision.LOW if key in low else Precision.FULL)
            self._submit(misses, CopyPriority.DEMAND)
            for key in misses:
                self._stats.misses[key.layer] += 1
                self.policy.on_access(key)
            self._step_misses.extend(misses)
        return pool.pin(keys)

    def holds(self, key: ExpertKey) -> bool:
        """Whether `key` holds a slot (resident or loading): acquiring it would be a hit."""
        return key in self.pool

    def is_low(self, key: ExpertKey) -> bool:
        """Whether `key` holds a slot with its low-bit copy (resident or loading)."""
        return key in self.pool and self.pool.precision_of(key) is Precision.LOW

    def request_upgrade(self, key: ExpertKey) -> None:
        """Reload `key`'s low-bit resident copy at full precision after this step (a PREFETCH copy that
        no step waits for; a key evicted or already full by then is skipped)."""
        self._upgrades[key] = None

    def expert_nbytes(self, precision: Precision) -> int:
        """Bytes one expert's `precision` copy moves."""
        store = self.store if precision is Precision.FULL else self.low_store
        assert store is not None, "no low-bit copy in this cache"
        return store.expert_nbytes

    def claimable_slots(self, requested: Set[ExpertKey]) -> int:
        """Slots free or evictable without touching `requested`: how many misses `acquire` can take
        without waiting for in-flight prefetches."""
        return self.pool.num_free + len(self.pool.evictable_keys(requested))

    def record_host_misses(self, keys: Sequence[ExpertKey]) -> None:
        """Counts misses computed from the host tier (no slot taken, nothing copied): in `misses`,
        in `host_misses`, and among the step's misses (`take_step_misses`)."""
        for key in keys:
            self._check_known(key)
            self._stats.misses[key.layer] += 1
            self._stats.host_misses[key.layer] += 1
        self._step_misses.extend(keys)

    def record_host_compute(self, seconds: float) -> None:
        """Adds the host worker's seconds computing missed experts."""
        self._stats.host_compute_seconds += seconds

    def take_ready(self, slot: ExpertSlot) -> tuple[torch.Tensor, ...] | None:
        """`wait(slot)` if its bytes are already in place (never blocks), else None."""
        return self.pool.take_ready(slot)

    def ready(self, slot: ExpertSlot) -> bool:
        """True once `slot`'s bytes are in place (no pending copy)."""
        return self.pool.ready(slot)

    def wait(self, slot: ExpertSlot) -> tuple[torch.Tensor, ...]:
        """Orders later work after this slot's copy only; returns the expert's weight views."""
        if self.pool.needs_wait(slot):
            started = time.perf_counter()
            try:
                self.pool.wait_copy(slot)
            finally:
                self._stats.stall_seconds[slot.key.layer] += time.perf_counter() - started
        return self.pool.views(slot)

    def release(self, keys: Sequence[ExpertKey]) -> None:
        """Unpins every key once per occurrence (the inverse of `acquire`)."""
        self.pool.unpin(keys)

    def prefetch(self, keys: Sequence[ExpertKey], scores: Mapping[ExpertKey, float] | None = None,
                 precision: Precision = Precision.FULL) -> int:
        """Starts PREFETCH copies (never pinning, never evicting pinned or loading slots) for keys
        not present, into free or evictable slots; returns how many started.

        Without `scores` it stops when no slot is free or evictable. With `scores` (a preload:
        each key's probability of being needed, unlisted keys count 0) a key may only evict an
        expert scored strictly lower and not itself an unused preload of this or the previous
        step; a key with no such victim is skipped. Queued copies run after every DEMAND copy.
        """
        pool = self.pool
        self._refresh_loading()
        started: list[ExpertKey] = []
        for key in dict.fromkeys(keys):
            self._check_known(key)
            if key in pool:
                continue
            if scores is None:
                if not pool.num_free and not pool.evictable():
                    break
                index = self._claim_slot()
            else:
                claimed = self._claim_slot_below(scores.get(key, 0.0), scores)
                if claimed is None:
                    continue
                index = claimed
            self._start_load(index, key, prefetched=True, precision=precision)
            if scores is not None:
                self._preloads[key] = self._step
            started.append(key)
        self._submit(started, CopyPriority.PREFETCH)
        self._stats.prefetch_issued += len(started)
        return len(started)

    def clear(self) -> None:
        """Empties every unpinned slot once its pending copy landed (not counted as evictions), so the
        next steps start from a cold cache (benchmarks comparing settings on one engine). Between steps."""
        for key in self.pool.unpinned_loading(excluded=frozenset()):
            self.pool.settle(key)
        self._refresh_loading()
        for key in self.pool.evictable():
            self._drop(key, wasted=key in self._prefetched_unused)

    def on_step(self) -> None:
        """End of one engine step: forwarded to the policy; starts the upgrades asked for in it."""
        self._step += 1
        self.policy.on_step()
        if self._upgrades:
            self._start_upgrades()

    def _start_upgrades(self) -> None:
        """Reloads in place, at full precision, each asked-for key still resident low-bit and unpinned."""
        pool, started = self.pool, []
        if pool.num_loading:
            self._refresh_loading()
        for key in self._upgrades:
            if key in pool and pool.precision_of(key) is Precision.LOW and key in pool.evictable_keys():
                pool.begin_reload(key, Precision.FULL)
                self._count_load(key, "upgrade", Precision.FULL)
                started.append(key)
        self._upgrades.clear()
        self._submit(started, CopyPriority.PREFETCH)

    def take_step_misses(self) -> list[ExpertKey]:
        """The keys that missed in `acquire` since the last call (and forgets them)."""
        misses, self._step_misses = self._step_misses, []
        return misses

    def record_task_lookups(self, lookups: dict[str, int], misses: dict[str, int]) -> None:
        """Adds a step's per-task lookups and misses (`TaskHitCounter`) to the counters."""
        for task, count in lookups.items():
            self._stats.lookups_by_task[task] += count
        for task, count in misses.items():
            self._stats.misses_by_task[task] += count

    def stats(self) -> ExpertCacheStats:
        """A snapshot of the counters (its per-layer dicts are copies; the engine thread takes one
        every step, so no generic deep copy)."""
        live = self._stats
        return replace(live, **{f.name: defaultdict(counts.default_factory, counts) for f in fields(live)
                                if isinstance(counts := getattr(live, f.name), defaultdict)},
                       link_busy_seconds=self.pool.copy_engine.link_busy_seconds())

    def check_invariants(self) -> None:
        """Raises AssertionError if the slot bookkeeping is inconsistent."""
        problems = self.pool.problems()
        for name, keys in (("preload", self._preloads), ("unused prefetch", self._prefetched_unused)):
            stray = sorted(key for key in keys if key not in self.pool)
            if stray:
                problems.append(f"{name} entries {stray} hold no slot")
        if problems:
            raise AssertionError("; ".join(problems))

    def _check_known(self, key: ExpertKey) -> None:
        if key not in self.store:
            raise KeyError(f"expert {key} is not in the host store")

    def _ensure_capacity(self, needed: int, requested: Set[ExpertKey]) -> None:
        """Makes `needed` slots claimable or raises: first cancels queued unused prefetches, then
        waits for in-flight unused prefetches to land (they become evictable)."""
        pool = self.pool
        available = pool.num_free + len(pool.evictable_keys(requested))
        unused = pool.unpinned_loading(excluded=requested)
        for key in unused:
            if available >= needed:
                return
            if pool.cancel(key):
                self._uncount_load(key)
                self._drop(key, wasted=True)
                available += 1
        for key in unused:
            if available >= needed:
                return
            if pool.settle(key):
                available += 1
        if available < needed:
            pinned = len(pool.pinned_keys() | {key for key in requested if key in pool})
            raise ExpertCacheFullError(
                f"this layer needs {needed} new expert slots but only {available} of {self.num_slots} are free or "
                f"evictable ({pinned} pinned or requested, {pool.num_loading} loading); raise the expert cache budget "
                f"to at least min_slots_for_step(num_experts, top_k, max_tokens_per_step) slots")

    def _record_hit(self, key: ExpertKey) -> None:
        self._stats.hits[key.layer] += 1
        self._preloads.pop(key, None)
        if key in self._prefetched_unused:
            self._prefetched_unused.discard(key)
            self._stats.prefetch_used += 1
            if self.pool.is_loading(key):
                self._stats.prefetch_late += 1
        self.pool.promote(key)
        self.policy.on_access(key)

    def _victims_ahead(self, misses: Sequence[ExpertKey], protected: Set[ExpertKey]) -> deque[ExpertKey] | None:
        """The victims of the misses that will find no free slot, in one policy call where the policy
        offers it (`CachePolicy.victims`) and no fresh preload must be spared; else None."""
        incoming = misses[self.pool.num_free:]
        if len(incoming) < 2 or self._preloads:
            return None
        chosen = self.policy.victims(self.pool.evictable_keys(protected), incoming)
        return None if chosen is None else deque(chosen)

    def _claim_slot(self, protected: Set[ExpertKey] = frozenset()) -> int:
        if self.pool.num_free:
            return self.pool.claim_free()
        if not self._preloads:
            return self._evict(self.policy.victim(self.pool.evictable_keys(protected)))
        candidates = self.pool.evictable(protected)
        settled = [key for key in candidates if not self._fresh_preload(key)]
        return self._evict(self.policy.victim(settled or candidates))

    def _claim_slot_below(self, score: float, scores: Mapping[ExpertKey, float]) -> int | None:
        """A free slot, or one freed by evicting an expert scored below `score` (None if none)."""
        if self.pool.num_free:
            return self.pool.claim_free()
        candidates = [key for key in self.pool.evictable()
                      if scores.get(key, 0.0) < score and not self._fresh_preload(key)]
        return self._evict(self.policy.victim(candidates)) if candidates else None

    def _fresh_preload(self, key: ExpertKey) -> bool:
        """An unused preload issued in this or the previous step (its request may not have reached it yet)."""
        step = self._preloads.get(key)
        return step is not None and step >= self._step - 1

    def _refresh_loading(self) -> None:
        """Polls the pending copies and frees the slots of failed ones nobody holds (the failure
        already failed the step that waited on it, see `SlotPool._refresh`); the next use of such an
        expert copies it again."""
        for key in self.pool.refresh_loading():
            logger.warning("the copy of expert %s failed; its slot is freed and its next use copies it again", key)
            self._uncount_load(key)
            self._drop(key, wasted=key in self._prefetched_unused)

    def _evict(self, victim: ExpertKey) -> int:
        self._stats.evictions[victim.layer] += 1
        self._drop(victim, wasted=victim in self._prefetched_unused)
        return self.pool.claim_free()

    def _drop(self, key: ExpertKey, wasted: bool) -> None:
        """Empties an unpinned key's slot (evicted or cancelled) back onto the free list."""
        self.policy.on_evict(key)
        self._stats.prefetch_wasted += int(wasted)
        self._preloads.pop(key, None)
        self._prefetched_unused.discard(key)
        self._load_kind.pop(key, None)
        self.pool.free(key)

    def _start_load(self, index: int, key: ExpertKey, prefetched: bool, precision: Precision = Precision.FULL) -> None:
        self.pool.begin_load(index, key, precision)
        if prefetched:
            self._prefetched_unused.add(key)
        self._count_load(key, precision.value, precision)
        self.policy.on_insert(key)

    def _count_load(self, key: ExpertKey, kind: str, precision: Precision) -> None:
        nbytes = self.expert_nbytes(precision)
        self._load_kind[key] = kind
        self._stats.bytes_copied[key.layer] += nbytes
        self._stats.loads[kind] += 1
        self._stats.load_bytes[kind] += nbytes

    def _uncount_load(self, key: ExpertKey) -> None:
        """Takes back the counts of `key`'s pending copy (cancelled, failed or never queued)."""
        kind = self._load_kind.pop(key)
        nbytes = self.expert_nbytes(self.pool.precision_of(key))
        self._stats.bytes_copied[key.layer] -= nbytes
        self._stats.loads[kind] -= 1
        self._stats.load_bytes[kind] -= nbytes

    def _source(self, key: ExpertKey) -> torch.Tensor:
        """The host bytes of the copy `key`'s slot is loading."""
        if self.pool.precision_of(key) is Precision.LOW:
            assert self.low_store is not None
            return self.low_store.source(key)
        return self.store.source(key)

    def _submit(self, keys: list[ExpertKey], priority: CopyPriority) -> None:
        try:
            self.pool.submit(keys, [self._source(key) for key in keys], priority)
        except BaseException:  # nothing was queued: the claimed (still unpinned) slots go back to the free list
            for key in keys:
                self._uncount_load(key)
                self._drop(key, wasted=False)
            raise
