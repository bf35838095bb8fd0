"""Host expert store, device slot pool and expert cache: layout, accounting, errors, and a stateful model check."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Hashable, Iterable, Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from moe_serve.cache_policies import make_policy
from moe_serve.cache_policies.recency import LRUPolicy
from moe_serve.cuda_ext import CopyBackend, CopyEngine, load_copy_engine
from moe_serve.cuda_ext.api import CopyPriority
from moe_serve.engine.core.stats import ExpertCacheSnapshot
from moe_serve.engine.offload import slot_pool
from moe_serve.engine.offload.expert_cache import (
    ExpertCache,
    ExpertCacheFullError,
    ExpertSlot,
    SlotState,
    min_slots_for_step,
    slots_for_budget,
)
from moe_serve.engine.offload.expert_store import ALIGNMENT, HostExpertStore
from moe_serve.engine.offload.slot_pool import SlotPool
from moe_serve.engine.types import ExpertKey
from tests.helpers import mounted_tmpfs

NUM_LAYERS, NUM_EXPERTS = 2, 6
REPO_ROOT = Path(__file__).resolve().parents[3]


def file_backed_store_in_subprocess(directory: Path,
                                    file_size_limit: int | None = None) -> subprocess.CompletedProcess[str]:
    """Build a file-backed store of `make_experts()` in `directory` in a child process (a SIGBUS
    there cannot take the tests down); with a file size limit (RLIMIT_FSIZE) set first if given.
    The child prints the HostTierSpaceError and exits 3, or exits 0 when the store was built."""
    code = textwrap.dedent("""
        import resource, sys
        from pathlib import Path
        from moe_serve.engine.offload.expert_store import HostExpertStore, HostTierSpaceError
        from tests.engine.offload.test_expert_cache import make_experts
        experts = make_experts()
        if sys.argv[2] != "none":
            resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
        try:
            store = HostExpertStore.from_tensors(experts, pin=False, backing_dir=Path(sys.argv[1]))
        except HostTierSpaceError as exc:
            print(exc)
            sys.exit(3)
        print(store.nbytes)
    """)
    limit = "none" if file_size_limit is None else str(file_size_limit)
    return subprocess.run([sys.executable, "-c", code, str(directory), limit], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)


def make_experts(hidden: int = 24, ffn: int = 40, seed: int = 0) -> dict[ExpertKey, list[torch.Tensor]]:
    """gate [F, D], up [F, D] in fp32 and down [D, F] in bf16 for every (layer, expert)."""
    generator = torch.Generator().manual_seed(seed)
    return {ExpertKey(layer, expert): [torch.randn(ffn, hidden, generator=generator),
                                       torch.randn(ffn, hidden, generator=generator),
                                       torch.randn(hidden, ffn, generator=generator).to(torch.bfloat16)]
            for layer in range(NUM_LAYERS) for expert in range(NUM_EXPERTS)}


@pytest.fixture
def engine() -> Iterator[CopyEngine]:
    engine = load_copy_engine(torch.device("cpu"), num_workers=2, backend=CopyBackend.TORCH)
    yield engine
    engine.shutdown()


def make_cache(engine: CopyEngine, num_slots: int, experts: dict | None = None) -> ExpertCache:
    store = HostExpertStore.from_tensors(experts or make_experts(), pin=True)
    return ExpertCache(store, num_slots, torch.device("cpu"), make_policy("lru"), engine)


def test_store_packs_each_expert_in_one_aligned_range() -> None:
    experts = make_experts()
    store = HostExpertStore.from_tensors(experts, pin=True)
    assert store.keys == tuple(sorted(experts))
    assert store.expert_nbytes % ALIGNMENT == 0
    assert all(layout.offset % ALIGNMENT == 0 for layout in store.layouts)
    base = store.source(store.keys[0]).data_ptr()
    for index, key in enumerate(store.keys):
        source = store.source(key)
        assert source.dtype == torch.uint8 and source.numel() == store.expert_nbytes
        assert source.data_ptr() == base + index * store.expert_nbytes
        views = store.unpack(source.clone())
        for view, original in zip(views, experts[key], strict=True):
            assert view.shape == original.shape and view.dtype == original.dtype
            assert torch.equal(view, original)


def test_store_rejects_mismatched_experts() -> None:
    experts = make_experts()
    experts[ExpertKey(1, 2)] = [torch.zeros(3, 3)] * 3
    with pytest.raises(ValueError, match=r"ExpertKey\(layer=1, expert=2\)"):
        HostExpertStore.from_tensors(experts, pin=False)


def _store_nbytes() -> int:
    experts = make_experts()
    return len(experts) * HostExpertStore.from_tensors(dict(list(experts.items())[:1]), pin=False).expert_nbytes


def test_a_file_backed_store_over_the_file_size_limit_is_a_clear_error(tmp_path) -> None:
    size = _store_nbytes()
    result = file_backed_store_in_subprocess(tmp_path, file_size_limit=size // 2)
    assert result.returncode == 3, result.stderr[-2000:]
    message = result.stdout.strip()
    assert "\n" not in message
    assert f"needs {size} bytes" in message and str(tmp_path) in message and "host_tier_dir" in message
    assert "File too large" in message
    assert not list(tmp_path.iterdir())  # the unlinked file is gone


def test_a_file_backed_store_on_a_full_file_system_is_a_clear_error_not_a_sigbus(tmp_path) -> None:
    size = _store_nbytes()
    with mounted_tmpfs(tmp_path / "small", size // 2) as small:
        result = file_backed_store_in_subprocess(small)
        assert result.returncode == 3, (result.returncode, result.stderr[-2000:])
        message = result.stdout.strip()
        assert f"needs {size} bytes" in message and str(small) in message
        assert "available there" in message and "No space left on device" in message
        assert not list(small.iterdir())
    with mounted_tmpfs(tmp_path / "roomy", 4 * size) as roomy:
        result = file_backed_store_in_subprocess(roomy)
        assert result.returncode == 0 and int(result.stdout) == size, result.stderr[-2000:]


def test_sizing_helpers() -> None:
    assert min_slots_for_step(num_experts=64, top_k=8, max_tokens_per_step=1) == 8
    assert min_slots_for_step(num_experts=64, top_k=8, max_tokens_per_step=256) == 64
    assert slots_for_budget(10 * 1024, expert_nbytes=3000) == 3
    with pytest.raises(ValueError):
        min_slots_for_step(0, 2, 1)


def test_slot_pool_fills_pins_and_frees_a_slot(engine: CopyEngine) -> None:
    experts = make_experts()
    store = HostExpertStore.from_tensors(experts, pin=True)
    pool = SlotPool(2, store.expert_nbytes, torch.device("cpu"), engine, store.unpack)
    key = ExpertKey(1, 3)
    pool.begin_load(pool.claim_free(), key)
    pool.submit([key], [store.source(key)], CopyPriority.DEMAND)
    (handle,) = pool.pin([key])
    if pool.needs_wait(handle):
        pool.wait_copy(handle)
    assert all(torch.equal(view, original) for view, original in zip(pool.views(handle), experts[key], strict=True))
    assert (pool.num_occupied, pool.num_pinned, pool.evictable()) == (1, 1, [])
    with pytest.raises(ValueError, match="more than it is acquired"):
        pool.unpin([key, key])
    pool.unpin([key])
    assert pool.evictable() == [key] and pool.state_of(key) is SlotState.RESIDENT
    pool.free(key)
    assert pool.state_of(key) is SlotState.FREE and pool.num_free == 2 and not pool.problems()
    with pytest.raises(ValueError, match="stale slot handle"):
        pool.ready(handle)


def test_hits_misses_evictions_and_bytes(engine: CopyEngine) -> None:
    cache = make_cache(engine, num_slots=3)
    keys = [ExpertKey(0, e) for e in range(4)]
    slots = cache.acquire(keys[:2])
    assert [cache.wait(slot)[0].shape for slot in slots] == [(40, 24), (40, 24)]
    cache.release(keys[:2])
    cache.acquire([keys[0]])
    cache.release([keys[0]])
    cache.acquire(keys[2:4])  # fills the third slot, then evicts the LRU key: keys[1]
    cache.release(keys[2:4])
    stats = cache.stats()
    assert (stats.hits[0], stats.misses[0], stats.evictions[0]) == (1, 4, 1)
    assert stats.bytes_copied[0] == 4 * cache.store.expert_nbytes
    assert cache.state_of(keys[1]) is SlotState.FREE
    assert stats.hit_rate == pytest.approx(1 / 5)
    cache.check_invariants()


def test_snapshot_residency_follows_the_slots_at_most_every_refresh_period(engine: CopyEngine, monkeypatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(slot_pool.time, "monotonic", lambda: clock[0])
    cache = make_cache(engine, num_slots=3)
    keys = [ExpertKey(0, 2), ExpertKey(1, 3), ExpertKey(0, 0)]
    cache.acquire(keys)
    cache.release(keys)
    snapshot = ExpertCacheSnapshot.of(cache)
    assert snapshot.resident_experts == {0: (0, 2), 1: (3,)}
    assert snapshot.num_experts == {layer: NUM_EXPERTS for layer in range(NUM_LAYERS)}
    cache.acquire([ExpertKey(1, 5)])  # evicts the least recent key, ExpertKey(0, 2)
    assert ExpertCacheSnapshot.of(cache).resident_experts == {0: (0, 2), 1: (3,)}  # within the period
    clock[0] += slot_pool.RESIDENCY_REFRESH_S
    assert ExpertCacheSnapshot.of(cache).resident_experts == {0: (0,), 1: (3, 5)}


def test_step_needing_more_slots_than_exist_is_a_clear_error(engine: CopyEngine) -> None:
    cache = make_cache(engine, num_slots=2)
    with pytest.raises(ExpertCacheFullError, match="needs 3 new expert slots.*min_slots_for_step"):
        cache.acquire([ExpertKey(0, 0), ExpertKey(0, 1), ExpertKey(0, 2)])
    cache.check_invariants()
    cache.acquire([ExpertKey(0, 0), ExpertKey(0, 1)])
    with pytest.raises(ExpertCacheFullError, match="2 pinned or requested"):
        cache.acquire([ExpertKey(1, 0)])
    cache.release([ExpertKey(0, 0), ExpertKey(0, 1)])
    assert len(cache.acquire([ExpertKey(1, 0)])) == 1
    cache.check_invariants()


def test_acquire_waits_for_in_flight_prefetches_instead_of_failing() -> None:
    # one worker, 16 MiB experts: prefetches occupy every slot (queued or being copied); a step
    # that needs all slots for other keys must cancel or wait for them, never fail
    slow = load_copy_engine(torch.device("cpu"), num_workers=1, backend=CopyBackend.TORCH)
    try:
        big = {key: [torch.ones(16 * 2**20, dtype=torch.uint8)] for key in make_experts()}  # 16 MiB each
        cache = make_cache(slow, num_slots=NUM_EXPERTS, experts=big)
        assert cache.prefetch([ExpertKey(1, e) for e in range(NUM_EXPERTS)]) == NUM_EXPERTS
        wanted = [ExpertKey(0, e) for e in range(NUM_EXPERTS)]
        slots = cache.acquire(wanted)  # needs every slot: cancels the queued, waits for the in-flight
        for slot in slots:
            cache.wait(slot)
        cache.check_invariants()
        assert all(cache.state_of(key) is SlotState.RESIDENT for key in wanted)
    finally:
        slow.shutdown()


def test_prefetch_used_wasted_and_late(engine: CopyEngine) -> None:
    cache = make_cache(engine, num_slots=3)
    assert cache.prefetch([ExpertKey(0, 0), ExpertKey(0, 1), ExpertKey(0, 0)]) == 2
    assert cache.prefetch([ExpertKey(0, 0)]) == 0
    slot = cache.acquire([ExpertKey(0, 0)])[0]
    late = cache.stats().prefetch_late
    cache.wait(slot)
    cache.release([ExpertKey(0, 0)])
    deadline = time.monotonic() + 10
    while cache.state_of(ExpertKey(0, 1)) is SlotState.LOADING and time.monotonic() < deadline:
        time.sleep(0.001)  # an in-flight prefetch is not evictable: let it land first
    cache.acquire([ExpertKey(1, 0), ExpertKey(1, 1)])  # evicts the unused prefetch of (0, 1)
    stats = cache.stats()
    assert (stats.prefetch_issued, stats.prefetch_used, stats.prefetch_wasted) == (2, 1, 1)
    assert stats.prefetch_late == late <= 1
    assert stats.hits[0] == 1 and stats.misses[1] == 2
    cache.acquire([ExpertKey(0, 0)])
    assert cache.prefetch([ExpertKey(0, 2)]) == 0, "every slot is pinned"
    cache.check_invariants()


def test_release_more_than_acquired_is_an_error(engine: CopyEngine) -> None:
    cache = make_cache(engine, num_slots=2)
    cache.acquire([ExpertKey(0, 0), ExpertKey(0, 0)])
    with pytest.raises(ValueError, match="more than it is acquired"):
        cache.release([ExpertKey(0, 0)] * 3)
    cache.release([ExpertKey(0, 0)] * 2)
    with pytest.raises(ValueError):
        cache.release([ExpertKey(0, 1)])


class GuardedLRU(LRUPolicy):
    """LRU that checks, at each eviction decision, that no candidate is pinned or still loading."""

    def __init__(self, machine: ExpertCacheMachine) -> None:
        super().__init__()
        self.machine = machine

    def victim(self, candidates: Iterable[Hashable]) -> Hashable:
        candidates = list(candidates)
        pinned = self.machine.pinned()
        for key in candidates:
            assert isinstance(key, ExpertKey)
            assert not pinned[key] and key not in self.machine.requested, f"pinned {key} offered for eviction"
            assert self.machine.cache.state_of(key) is SlotState.RESIDENT, f"{key} offered while not resident"
        return super().victim(candidates)


class ExpertCacheMachine(RuleBasedStateMachine):
    """Random acquire/release/prefetch/wait/on_step against a model of who holds what."""

    backend = CopyBackend.TORCH
    num_slots = 5

    def __init__(self) -> None:
        super().__init__()
        self.experts = make_experts(hidden=64, ffn=256, seed=7)  # ~130 KiB per expert: copies take a while
        store = HostExpertStore.from_tensors(self.experts, pin=True)
        self.engine = load_copy_engine(torch.device("cpu"), num_workers=1, backend=self.backend)
        self.cache = ExpertCache(store, self.num_slots, torch.device("cpu"), GuardedLRU(self), self.engine)
        self.held: list[list[ExpertSlot]] = []
        self.requested: set[ExpertKey] = set()  # the keys of the acquire in progress

    def teardown(self) -> None:
        self.engine.shutdown()

    def pinned(self) -> Counter[ExpertKey]:
        return Counter(slot.key for group in self.held for slot in group)

    def occupied(self) -> dict[ExpertKey, SlotState]:
        states = {key: self.cache.state_of(key) for key in self.cache.store.keys}
        return {key: state for key, state in states.items() if state is not SlotState.FREE}

    @rule(layer=st.integers(0, NUM_LAYERS - 1),
          experts=st.lists(st.integers(0, NUM_EXPERTS - 1), min_size=1, max_size=4))
    def acquire(self, layer: int, experts: list[int]) -> None:
        keys = [ExpertKey(layer, expert) for expert in experts]
        before = self.occupied()
        pinned = self.pinned()
        blocked = {key for key, state in before.items()
                   if key in keys or pinned[key] or state is SlotState.LOADING}
        misses = {key for key in keys if key not in before}
        surely_fits = len(misses) <= self.num_slots - len(blocked)
        self.requested = set(keys)
        try:
            slots = self.cache.acquire(keys)
        except ExpertCacheFullError:
            assert not surely_fits
            assert self.pinned() == pinned
            for key in pinned:
                assert self.cache.state_of(key) is not SlotState.FREE
            return
        finally:
            self.requested = set()
        assert [slot.key for slot in slots] == keys
        self.held.append(slots)
        for key, state in before.items():
            if pinned[key]:
                assert self.cache.state_of(key) is not SlotState.FREE, "a pinned expert was evicted"

    # Draws never depend on `held` (which copy timing shapes), so hypothesis replays stay stable.
    @rule(pick=st.integers(0, 63), member=st.integers(0, 3))
    def wait(self, pick: int, member: int) -> None:
        if not self.held:
            return
        group = self.held[pick % len(self.held)]
        slot = group[member % len(group)]
        views = self.cache.wait(slot)
        assert self.cache.ready(slot)
        for view, original in zip(views, self.experts[slot.key], strict=True):
            assert torch.equal(view, original)

    @rule(pick=st.integers(0, 63))
    def release(self, pick: int) -> None:
        if self.held:
            group = self.held.pop(pick % len(self.held))
            self.cache.release([slot.key for slot in group])

    @rule(layer=st.integers(0, NUM_LAYERS - 1),
          experts=st.lists(st.integers(0, NUM_EXPERTS - 1), min_size=1, max_size=4))
    def prefetch(self, layer: int, experts: list[int]) -> None:
        started = self.cache.prefetch([ExpertKey(layer, expert) for expert in experts])
        assert 0 <= started <= len(set(experts))
        assert set(self.pinned()) <= set(self.occupied()), "prefetch evicted a pinned expert"

    @rule()
    def on_step(self) -> None:
        self.cache.on_step()

    @invariant()
    def consistent(self) -> None:
        self.cache.check_invariants()
        occupied = self.occupied()
        assert len(occupied) <= self.num_slots
        for group in self.held:
            for slot in group:
                assert self.cache.state_of(slot.key) is not SlotState.FREE
                self.cache.ready(slot)  # raises if the handle went stale (the key moved)


class ExpertCacheMachineCpuExtension(ExpertCacheMachine):
    backend = CopyBackend.CPU_EXTENSION


machine_settings = settings(max_examples=25, stateful_step_count=30, deadline=None,
                            suppress_health_check=[HealthCheck.too_slow])
TestExpertCacheStatefulTorch = ExpertCacheMachine.TestCase
TestExpertCacheStatefulTorch.settings = machine_settings
TestExpertCacheStatefulCpuExtension = ExpertCacheMachineCpuExtension.TestCase
TestExpertCacheStatefulCpuExtension.settings = machine_settings


def test_preload_skips_resident_experts(engine: CopyEngine) -> None:
    cache = make_cache(engine, num_slots=3)
    cache.acquire([ExpertKey(0, 0)])
    cache.release([ExpertKey(0, 0)])
    scores = {ExpertKey(0, 0): 0.9, ExpertKey(0, 1): 0.8}
    assert cache.prefetch(list(scores), scores) == 1
    assert cache.stats().prefetch_issued == 1
    cache.check_invariants()


def test_preload_evicts_only_lower_scored_unpinned_experts_and_demand_keeps_it(engine: CopyEngine) -> None:
    cache = make_cache(engine, num_slots=3)
    pinned, likely, unlikely = ExpertKey(0, 0), ExpertKey(0, 1), ExpertKey(0, 2)
    for slot in cache.acquire([pinned, likely, unlikely]):
        cache.wait(slot)
    cache.release([likely, unlikely])
    scores = {ExpertKey(1, 0): 0.5, ExpertKey(1, 1): 0.5, likely: 0.9}
    assert cache.prefetch([ExpertKey(1, 0), ExpertKey(1, 1)], scores) == 1  # only `unlikely` may go
    assert cache.state_of(unlikely) is SlotState.FREE
    assert cache.state_of(likely) is SlotState.RESIDENT and cache.state_of(pinned) is not SlotState.FREE
    assert cache.state_of(ExpertKey(1, 1)) is SlotState.FREE
    cache.wait(cache.acquire([ExpertKey(1, 0)])[0])  # the preload is used (a hit), then unpinned
    cache.release([ExpertKey(1, 0)])
    assert cache.prefetch([ExpertKey(1, 2)], {ExpertKey(1, 2): 1.0}) == 1  # evicts `likely` (LRU)
    deadline = time.monotonic() + 10
    while cache.state_of(ExpertKey(1, 2)) is not SlotState.RESIDENT and time.monotonic() < deadline:
        time.sleep(0.001)
    cache.acquire([ExpertKey(1, 3)])  # demand: evicts the used (1, 0), not the fresh unused preload
    assert cache.state_of(ExpertKey(1, 2)) is SlotState.RESIDENT
    assert cache.state_of(ExpertKey(1, 0)) is SlotState.FREE and cache.state_of(likely) is SlotState.FREE
    cache.check_invariants()


def test_demand_copies_overtake_queued_preloads() -> None:
    slow = load_copy_engine(torch.device("cpu"), num_workers=1, backend=CopyBackend.TORCH)
    try:
        big = {key: [torch.ones(16 * 2**20, dtype=torch.uint8)] for key in make_experts()}  # 16 MiB each
        cache = make_cache(slow, num_slots=NUM_EXPERTS, experts=big)
        preloads = [ExpertKey(1, e) for e in range(NUM_EXPERTS - 1)]
        assert cache.prefetch(preloads, {key: 0.9 for key in preloads}) == len(preloads)
        slot = cache.acquire([ExpertKey(0, 0)])[0]
        cache.wait(slot)
        landed = sum(cache.state_of(key) is SlotState.RESIDENT for key in preloads)
        assert landed <= 2, "the demand copy waited behind the queued preloads"
        cache.check_invariants()
    finally:
        slow.shutdown()


def test_evictable_keys_count_what_they_iterate() -> None:
    """`len` of the set view counts its keys without walking the idle ones (protected keys may or may
    not be idle), and agrees with iterating it."""
    idle = {ExpertKey(0, e): None for e in range(6)}
    for protected in (frozenset(), {ExpertKey(0, 1), ExpertKey(0, 4)}, {ExpertKey(0, 2), ExpertKey(1, 2), ExpertKey(3, 0)},
                      set(idle)):
        view = slot_pool.EvictableKeys(idle, protected)
        assert len(view) == len(list(view)) == sum(1 for key in idle if key not in protected)
