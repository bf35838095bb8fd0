"""The native `context` policy against its oracle, `PartitionedPolicy` over numpy `ContextPolicy`
instances: the same victim at every eviction of an engine-like cache (hits first, then each miss's
victim among the evictable keys, or every miss's victim at once, pinned and requested keys excluded,
prefetches never used, candidate lists as well as sets, layers idle for whole steps, history rings
that wrap)."""

from __future__ import annotations

import random
from collections.abc import Hashable, Set

import pytest

from moe_serve.cache_policies import make_layered_policy
from moe_serve.cache_policies.context import ContextPolicy
from moe_serve.cache_policies.native_build import LoadOnce
from moe_serve.cache_policies.native_context import NativeContextPolicy, native_library
from moe_serve.cache_policies.partitioned import PartitionedPolicy
from moe_serve.engine.offload.slot_pool import EvictableKeys

pytestmark = pytest.mark.skipif(native_library() is None, reason="no C compiler for the native policy")


class Key(tuple):
    """An `ExpertKey`-like key: a (layer, expert) tuple."""

    def __new__(cls, layer: int, expert: int) -> Key:
        return super().__new__(cls, (layer, expert))


def drive(policies: list, layers: int, experts: int, top_k: int, capacity: int, steps: int, seed: int) -> int:
    """Runs the same engine-like calls into every policy and checks that they pick the same victims
    (asked one at a time, or a miss batch's at once where a policy offers `victims`); returns how many
    evictions were compared."""
    rng = random.Random(seed)
    patterns = [rng.sample(range(experts), top_k) for _ in range(6)]  # recurring routing, as real traces have
    resident: dict[Hashable, None] = {}
    evictions = 0

    def view(excluded: set[Hashable], pinned: set[Hashable]) -> Set:
        """The cache's view of its evictable keys (pinned ones left out of its idle keys); now and then a
        plain set of them, which names no protected keys."""
        keys = EvictableKeys({key: None for key in resident if key not in pinned}, excluded)
        return frozenset(keys) if rng.random() < 0.2 else keys

    def evict(candidates, ahead: dict) -> Hashable:
        victims = [ahead[i].pop(0) if ahead.get(i) else policy.victim(candidates) for i, policy in enumerate(policies)]
        assert all(victim == victims[0] for victim in victims), (evictions, victims)
        for policy in policies:
            policy.on_evict(victims[0])
        del resident[victims[0]]
        return victims[0]

    for _ in range(steps):
        pattern = rng.choice(patterns)
        for layer in range(layers):
            if rng.random() < 0.05:  # a layer no token reached this step
                continue
            chosen = {(e + layer * rng.choice((0, 1))) % experts if rng.random() < 0.8 else rng.randrange(experts)
                      for e in pattern}
            routed = [Key(layer, e) for e in sorted(chosen)][:top_k]
            pinned = {key for key in resident if rng.random() < 0.03}  # e.g. still held by a copy
            for key in routed:
                if key in resident:
                    for policy in policies:
                        policy.on_access(key)
            misses = [key for key in routed if key not in resident]
            protected = set(routed)
            incoming = misses[max(0, capacity - len(resident)):]
            ahead = {}  # victims chosen at once for every miss that finds no free slot, where a policy offers it
            if len(incoming) >= 2 and rng.random() < 0.5:
                candidates = view(protected, pinned)
                ahead = {i: policy.victims(candidates, incoming) for i, policy in enumerate(policies)}
            for key in misses:
                if len(resident) >= capacity:
                    if not ahead and rng.random() < 0.2:  # a candidate list, as `_claim_slot` passes with preloads
                        evict([key for key in resident if key not in protected and key not in pinned], ahead)
                    else:
                        evict(view(protected, pinned), ahead)
                    evictions += 1
                resident[key] = None
                for policy in policies:
                    policy.on_insert(key)
            for key in misses:
                for policy in policies:
                    policy.on_access(key)
            if rng.random() < 0.1 and len(resident) < capacity:  # a prefetch that is never used
                key = Key((layer + 1) % layers, rng.randrange(experts))
                if key not in resident:
                    resident[key] = None
                    for policy in policies:
                        policy.on_insert(key)
        for policy in policies:
            policy.on_step()
    return evictions


@pytest.mark.parametrize(("layers", "experts", "top_k", "capacity", "history", "neighbours", "max_keys"), [
    (4, 64, 6, 64, 2048, 16, 8),    # the defaults, DeepSeek-like layer width
    (3, 100, 4, 60, 12, 3, 8),      # two words per key set, a ring that wraps, few neighbours
    (5, 16, 2, 12, 30, 2, 3),       # steps over the context's key limit on some layers
])
def test_native_context_makes_the_numpy_policys_decisions(layers, experts, top_k, capacity, history, neighbours,
                                                           max_keys) -> None:
    kwargs = {"history_steps": history, "neighbours": neighbours, "max_context_keys": max_keys}
    native = NativeContextPolicy(native_library(), capacity, layers, experts, **kwargs)
    numpy = PartitionedPolicy(lambda: ContextPolicy(**kwargs), capacity, layers)
    evictions = drive([native, numpy], layers, experts, top_k, capacity, steps=300, seed=layers * experts)
    assert evictions > 300


def test_the_engine_gets_the_native_context_policy_and_numpy_elsewhere(monkeypatch) -> None:
    assert isinstance(make_layered_policy("context", 8, 2, 4), NativeContextPolicy)
    assert isinstance(make_layered_policy("lru", 8, 2, 4), PartitionedPolicy)
    with pytest.raises(ValueError, match="unknown cache policy"):
        make_layered_policy("mru", 8, 2, 4)


def test_keys_outside_the_layers_and_experts_are_refused() -> None:
    policy = NativeContextPolicy(native_library(), 4, 2, 8)
    with pytest.raises(ValueError, match="outside 2 layers x 8 experts"):
        policy.on_access(Key(2, 0))
    with pytest.raises(ValueError, match="outside"):
        policy.on_insert(Key(0, 8))
    with pytest.raises(ValueError, match="at least one candidate"):
        policy.victim([])
    with pytest.raises(ValueError, match="max_context_keys must be <= 254"):
        NativeContextPolicy(native_library(), 4, 2, 8, max_context_keys=255)


def test_without_a_compiler_the_engine_gets_the_numpy_policy_and_a_warning(monkeypatch, tmp_path, caplog) -> None:
    from moe_serve.cache_policies import native_context

    monkeypatch.setattr(native_context, "_library", LoadOnce(native_context._open_library))
    monkeypatch.setenv("MOE_SERVE_EXT_DIR", str(tmp_path))  # nothing cached: it must compile
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with caplog.at_level("WARNING", logger="moe_serve.cache_policies.native_context"):
        policy = make_layered_policy("context", 8, 2, 4)
    assert isinstance(policy, PartitionedPolicy)
    assert "numpy implementation (the native one: unavailable" in caplog.text
