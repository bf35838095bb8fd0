"""Mixed-precision misses (`--miss-precision`): which copy a miss loads, upgrades, and the layer over
experts of two formats, against plain oracles (the all-resident model in each format)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import pytest
import torch

from moe_serve.cache_policies import make_policy
from moe_serve.cuda_ext import load_copy_engine
from moe_serve.cuda_ext.api import CopyBackend
from moe_serve.engine.builder import build_engine
from moe_serve.engine.config import EngineConfig, MissPrecision
from moe_serve.engine.model.experts import ExpertFetch, ResidentExperts
from moe_serve.engine.model.quant import parse_expert_dtype
from moe_serve.engine.offload.expert_cache import ExpertCache
from moe_serve.engine.offload.expert_store import ALIGNMENT, HostExpertStore, Precision
from moe_serve.engine.offload.provider import UPGRADE_GATE, MixedPrecision, OffloadedExperts
from moe_serve.engine.offload.slot_pool import SlotState
from moe_serve.engine.types import ExpertKey
from tests.engine.offload.test_expert_cache import make_experts
from tests.helpers import MIN_FRACTION, engine_logits, parity_prompts, run_to_completion, run_workload, workload

NUM_LAYERS = 4


@pytest.fixture(scope="module")
def mixtral(checkpoint_factory):
    return checkpoint_factory("mixtral", num_hidden_layers=NUM_LAYERS)


def _offloaded(path, **overrides):
    """An offloaded engine and the keys of every copy it starts (full, low-bit and upgrades)."""
    overrides.setdefault("dtype", "float32")
    engine = build_engine(EngineConfig(model=str(path), max_num_batched_tokens=16, expert_cache_fraction=MIN_FRACTION,
                                       prefetch="none", **overrides), show_progress=False)
    experts = engine.runner.model.experts
    assert isinstance(experts, OffloadedExperts)
    loaded: list[tuple[ExpertKey, Precision]] = []
    pool = experts.cache.pool
    begin_load, begin_reload = pool.begin_load, pool.begin_reload

    def spy_load(index: int, key: ExpertKey, precision: Precision = Precision.FULL) -> None:
        loaded.append((key, precision))
        begin_load(index, key, precision)

    def spy_reload(key: ExpertKey, precision: Precision) -> None:
        loaded.append((key, precision))
        begin_reload(key, precision)

    pool.begin_load, pool.begin_reload = spy_load, spy_reload
    return engine, loaded


def test_full_keeps_the_all_resident_tokens_and_loads_only_full_copies(mixtral) -> None:
    reference, _ = run_workload(mixtral, offload="off")
    engine, loaded = _offloaded(mixtral, miss_precision="full")
    assert run_to_completion(engine, workload()) == reference
    cache = engine.runner.model.experts.cache
    assert cache.low_store is None and {precision for _, precision in loaded} == {Precision.FULL}
    stats = cache.stats()
    assert set(stats.loads) == {"full"} and stats.load_bytes["full"] == sum(stats.bytes_copied.values())


@pytest.mark.parametrize("dtype", ["float32", "float16"])  # the C kernels' path, and torch's (no fp16 kernels)
@pytest.mark.parametrize("low_dtype", ["int4-g32", "int8"])
def test_low_equals_the_all_resident_model_in_the_low_dtype(mixtral, dtype: str, low_dtype: str) -> None:
    reference, _ = run_workload(mixtral, offload="off", expert_dtype=low_dtype, dtype=dtype)
    engine, loaded = _offloaded(mixtral, miss_precision="low", miss_low_dtype=low_dtype, dtype=dtype)
    assert run_to_completion(engine, workload()) == reference
    cache = engine.runner.model.experts.cache
    assert {precision for _, precision in loaded} == {Precision.LOW}
    assert {key for key, _ in loaded} == set(cache.store.keys)  # every expert was missed at least once
    stats = cache.stats()
    assert sum(stats.evictions.values()) > 0
    # bytes moved follow the formats' sizes: each low load moves the low-bit expert's bytes
    assert set(stats.loads) == {"low"} and stats.loads["low"] == len(loaded)
    assert sum(stats.bytes_copied.values()) == stats.load_bytes["low"] == len(loaded) * cache.low_store.expert_nbytes
    spec = engine.runner.model.spec
    low_format = parse_expert_dtype(low_dtype)
    itemsize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    exact = sum(low_format.matrix_nbytes(rows, cols, getattr(torch, dtype)) for rows, cols in
                ((2 * spec.moe_intermediate_size, spec.hidden_size), (spec.hidden_size, spec.moe_intermediate_size)))
    assert exact <= cache.low_store.expert_nbytes < exact + 2 * low_format.tensors_per_matrix * ALIGNMENT
    full_exact = 3 * spec.moe_intermediate_size * spec.hidden_size * itemsize
    assert cache.low_store.expert_nbytes / cache.store.expert_nbytes == pytest.approx(exact / full_exact, rel=0.05)
    cache.check_invariants()


def test_adaptive_counts_loads_by_precision_and_upgrades_hot_experts(mixtral) -> None:
    engine, loaded = _offloaded(mixtral, miss_precision="adaptive", miss_low_gate=1.0)
    run_to_completion(engine, workload())
    cache = engine.runner.model.experts.cache
    stats = cache.stats()
    assert stats.loads["full"] > 0 and stats.loads["low"] > 0 and stats.loads["upgrade"] > 0
    assert sum(stats.loads.values()) == len(loaded)
    low_nbytes, full_nbytes = cache.low_store.expert_nbytes, cache.store.expert_nbytes
    assert stats.load_bytes == {"full": stats.loads["full"] * full_nbytes, "low": stats.loads["low"] * low_nbytes,
                                "upgrade": stats.loads["upgrade"] * full_nbytes}
    assert sum(stats.load_bytes.values()) == sum(stats.bytes_copied.values())
    cache.check_invariants()


def test_adaptive_at_gate_zero_without_a_cap_is_full_precision(mixtral) -> None:
    reference, _ = run_workload(mixtral, offload="off")
    engine, loaded = _offloaded(mixtral, miss_precision="adaptive", miss_low_gate=0.0, miss_full_per_token=None)
    assert run_to_completion(engine, workload()) == reference
    assert {precision for _, precision in loaded} == {Precision.FULL}


def test_adaptive_spends_the_steps_full_copy_budget_on_the_hottest_misses_then_upgrades() -> None:
    _, _, store, low_store = _twin_stores()
    copy_engine = load_copy_engine(torch.device("cpu"), num_workers=1, backend=CopyBackend.TORCH)
    try:
        cache = ExpertCache(store, 6, torch.device("cpu"), make_policy("lru"), copy_engine, low_store)
        precision = MixedPrecision(MissPrecision.ADAPTIVE, parse_expert_dtype("int4-g32"), low_gate=1.0,
                                   full_per_token=1.0, top_k=2)
        provider = OffloadedExperts(cache, precision=precision)

        def step(expert_ids: list[int], gates: list[float]) -> None:
            """One layer-step of len(expert_ids) / 2 tokens (top-2, a row each), its fetch consumed."""
            fetch = provider.fetch(0, expert_ids, [1] * len(expert_ids), gates)
            for _ in fetch.ready:
                pass
            provider.done(0, expert_ids)
            provider.end_step()

        # two tokens: a budget of two full copies, taken by the two hottest misses at or above the gate
        step([0, 1, 2, 3], [1.5, 0.5, 1.2, 1.3])
        assert [cache.is_low(ExpertKey(0, e)) for e in range(4)] == [False, True, True, False]
        # one token: its miss at the gate takes the budget, so the hot low-bit hit is not upgraded
        step([2, 4], [1.5, 1.0])
        assert not cache.is_low(ExpertKey(0, 4)) and cache.is_low(ExpertKey(0, 2))
        # no miss: the budget upgrades the hottest low-bit hit at or above UPGRADE_GATE only
        step([1, 2], [UPGRADE_GATE, 2.0])
        assert not cache.is_low(ExpertKey(0, 2)) and cache.is_low(ExpertKey(0, 1))
        assert dict(cache.stats().loads) == {"full": 3, "low": 2, "upgrade": 1}
        # no cap: every miss at or above the gate loads full
        provider.precision = MixedPrecision(MissPrecision.ADAPTIVE, precision.low_format, low_gate=1.0, top_k=2)
        step([5, 0], [1.1, 1.2])
        assert not cache.is_low(ExpertKey(0, 5)) and cache.stats().loads["full"] == 4
        cache.check_invariants()
    finally:
        copy_engine.shutdown()


# -- the cache: a slot holds either copy; an upgrade is a background copy -------------------------

def _twin_stores() -> tuple[dict, dict, HostExpertStore, HostExpertStore]:
    full = make_experts()
    low = {key: [t[: t.shape[0] // 2].to(torch.bfloat16) for t in tensors] for key, tensors in full.items()}
    return full, low, HostExpertStore.from_tensors(full, pin=False), HostExpertStore.from_tensors(low, pin=False)


def test_an_upgrade_never_blocks_the_step_and_later_hits_compute_at_full_precision() -> None:
    full, low, store, low_store = _twin_stores()
    # a slow link: one full expert takes ~0.4 s to copy
    copy_engine = load_copy_engine(torch.device("cpu"), num_workers=1, backend=CopyBackend.TORCH,
                                   link_gbps=store.expert_nbytes / 0.4 / 1e9)
    try:
        cache = ExpertCache(store, 4, torch.device("cpu"), make_policy("lru"), copy_engine, low_store)
        key = ExpertKey(1, 2)
        (slot,) = cache.acquire([key], low={key})
        assert cache.is_low(key)
        assert all(torch.equal(v, t) for v, t in zip(cache.wait(slot), low[key], strict=True))
        cache.release([key])
        cache.request_upgrade(key)
        started = time.perf_counter()
        cache.on_step()  # starts the upgrade copy and returns at once
        assert time.perf_counter() - started < 0.1
        assert cache.state_of(key) is SlotState.LOADING and not cache.is_low(key)
        (slot,) = cache.acquire([key])  # a hit: the full copy once it lands
        assert all(torch.equal(v, t) for v, t in zip(cache.wait(slot), full[key], strict=True))
        cache.release([key])
        stats = cache.stats()
        assert dict(stats.loads) == {"low": 1, "upgrade": 1}
        assert dict(stats.load_bytes) == {"low": low_store.expert_nbytes, "upgrade": store.expert_nbytes}
        cache.check_invariants()
    finally:
        copy_engine.shutdown()


def test_an_upgrade_skips_pinned_and_evicted_keys() -> None:
    _, _, store, low_store = _twin_stores()
    copy_engine = load_copy_engine(torch.device("cpu"), num_workers=1, backend=CopyBackend.TORCH)
    try:
        cache = ExpertCache(store, 2, torch.device("cpu"), make_policy("lru"), copy_engine, low_store)
        pinned, evicted = ExpertKey(0, 0), ExpertKey(0, 1)
        cache.acquire([pinned, evicted], low={pinned, evicted})
        cache.release([evicted])
        for key in (pinned, evicted):
            cache.request_upgrade(key)
        cache.acquire([ExpertKey(0, 2)])  # evicts `evicted` (its slot is the only one free to take)
        cache.on_step()
        assert cache.is_low(pinned) and evicted not in cache.pool and "upgrade" not in cache.stats().loads
        cache.check_invariants()
    finally:
        copy_engine.shutdown()


# -- the layer: a group of mixed formats -----------------------------------------------------------

class MixedResident:
    """Resident experts in two formats: `low_ids(layer)` come from `low`, the rest from `full`, handed over
    one expert a group in reverse order (`split`) or all in one group."""

    def __init__(self, full: ResidentExperts, low: ResidentExperts, low_format, low_ids: Callable[[int], set[int]],
                 split: bool) -> None:
        self.full, self.low, self.low_format, self.low_ids, self.split = full, low, low_format, low_ids, split

    @property
    def needs_gates(self) -> bool:
        return False

    def fetch(self, layer: int, expert_ids: Sequence[int], rows: Sequence[int], gates=None) -> ExpertFetch:
        low = self.low_ids(layer) & set(expert_ids)
        pairs = [(e, (self.low if e in low else self.full)._experts[ExpertKey(layer, e)]) for e in expert_ids]
        groups = [[pair] for pair in reversed(pairs)] if self.split else [pairs]
        return ExpertFetch(iter(groups), low=frozenset(low), low_format=self.low_format)

    def run_on_host(self, layer: int, work: Callable[[], None]) -> Future[float]:
        return self.full.run_on_host(layer, work)

    def done(self, layer: int, expert_ids: Sequence[int]) -> None:
        """Nothing held."""

    def hint(self, layer: int, expert_ids: Sequence[int]) -> None:
        """Nothing to prefetch."""

    def end_step(self) -> None:
        """No per-step state."""


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_layer_computes_mixed_formats_by_format_in_a_fixed_order(mixtral, dtype: str) -> None:
    def engine(expert_dtype: str):
        return build_engine(EngineConfig(model=str(mixtral), dtype=dtype, offload="off", expert_dtype=expert_dtype,
                                         max_num_batched_tokens=64), show_progress=False)

    full_engine, low_engine = engine("model"), engine("int4-g32")
    prompts = parity_prompts(full_engine.runner.model.spec.vocab_size)
    full_logits, low_logits = engine_logits(full_engine, prompts), engine_logits(low_engine, prompts)
    model = full_engine.runner.model
    full, low, low_format = model.experts, low_engine.runner.model.experts, low_engine.runner.model.expert_format

    def logits(low_ids: Callable[[int], set[int]], split: bool) -> tuple[torch.Tensor, ...]:
        model.experts = MixedResident(full, low, low_format, low_ids, split)
        return engine_logits(full_engine, prompts)

    everything, nothing = set(range(model.spec.num_experts)), set()
    assert all(torch.equal(a, b) for a, b in zip(logits(lambda _: everything, True), low_logits))
    assert all(torch.equal(a, b) for a, b in zip(logits(lambda _: nothing, True), full_logits))
    mixed = logits(lambda layer: {e for e in everything if (e + layer) % 2}, False)
    assert all(torch.equal(a, b) for a, b in zip(logits(lambda layer: {e for e in everything if (e + layer) % 2}, True),
                                                 mixed))
    assert not any(torch.equal(a, b) for a, b in zip(mixed, full_logits))
    assert not any(torch.equal(a, b) for a, b in zip(mixed, low_logits))
