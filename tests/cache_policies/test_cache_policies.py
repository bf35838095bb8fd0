"""Eviction order of each policy on hand-made sequences, and the registry."""

from __future__ import annotations

import pytest

from moe_serve.cache_policies import DEFAULT_POLICY, CachePolicy, PolicyName, available_policies, make_policy
from moe_serve.cache_policies.context import ContextPolicy
from moe_serve.cache_policies.frequency import DecayedLFUPolicy, LFUDAPolicy, LFUPolicy
from moe_serve.cache_policies.markov import MarkovPolicy
from moe_serve.cache_policies.recency import FIFOPolicy, LRUPolicy


def feed(policy: CachePolicy, steps: list[list[str]]) -> CachePolicy:
    """Insert-on-first-sight and access every key of each step, then end the step."""
    seen: set[str] = set()
    for step in steps:
        for key in step:
            if key not in seen:
                seen.add(key)
                policy.on_insert(key)
            policy.on_access(key)
        policy.on_step()
    return policy


def test_lru_evicts_least_recently_used() -> None:
    policy = feed(LRUPolicy(), [["a"], ["b"], ["c"], ["a"]])
    assert policy.victim(["a", "b", "c"]) == "b"
    assert policy.victim(["a", "c"]) == "c"


def test_fifo_ignores_reuse() -> None:
    policy = feed(FIFOPolicy(), [["a"], ["b"], ["c"], ["a"], ["a"]])
    assert policy.victim(["a", "b", "c"]) == "a"
    policy.on_evict("a")
    policy.on_insert("a")
    assert policy.victim(["a", "b", "c"]) == "b"


def test_lfu_counts_and_breaks_ties_by_recency() -> None:
    policy = feed(LFUPolicy(), [["a"], ["a"], ["b"], ["c"], ["b"]])
    assert policy.victim(["a", "b", "c"]) == "c"
    assert policy.victim(["a", "b"]) == "a"  # both used twice; a's last use is older

def test_lfu_tie_goes_to_older_key() -> None:
    policy = feed(LFUPolicy(), [["x"], ["y"], ["z"]])
    assert policy.victim(["z", "y", "x"]) == "x"


def test_lfu_keeps_history_unless_told_to_forget() -> None:
    kept = feed(LFUPolicy(), [["a"], ["a"], ["a"], ["b"], ["b"]])
    kept.on_evict("a")
    kept.on_insert("a")
    kept.on_access("a")
    assert kept.victim(["a", "b"]) == "b"
    forgot = feed(LFUPolicy(forget_on_evict=True), [["a"], ["a"], ["a"], ["b"], ["b"]])
    forgot.on_evict("a")
    forgot.on_insert("a")
    forgot.on_access("a")
    assert forgot.victim(["a", "b"]) == "a"


def test_lfuda_ages_out_stale_popular_keys() -> None:
    policy = LFUDAPolicy()
    feed(policy, [["hot"]] * 3 + [["x"]])
    assert policy.victim(["hot", "x"]) == "x"
    for newcomer in ["y", "z", "w", "v"]:  # each victim raises the age; newcomers enter above it
        policy.on_evict(policy.victim(["x", "y", "z", "w", "v"][: 1 + ["y", "z", "w", "v"].index(newcomer)]))
        policy.on_insert(newcomer)
        policy.on_access(newcomer)
        policy.on_access(newcomer)
    assert policy.victim(["hot", "v"]) == "hot"


def test_decayed_lfu_forgets_old_counts() -> None:
    policy = feed(DecayedLFUPolicy(half_life_steps=1.0), [["old"]] * 4 + [["new"]] * 2)
    # old: 2**-2 + 2**-3 + 2**-4 + 2**-5 < new: 2**0 + 2**-1 (after the last step)
    assert policy.victim(["old", "new"]) == "old"
    slow = feed(DecayedLFUPolicy(half_life_steps=1000.0), [["old"]] * 4 + [["new"]] * 2)
    assert slow.victim(["old", "new"]) == "new"


def test_decayed_lfu_survives_long_runs() -> None:
    policy = DecayedLFUPolicy(half_life_steps=1.0)
    for _ in range(2000):
        policy.on_access("a")
        policy.on_step()
    policy.on_access("b")
    assert policy.victim(["a", "b"]) in {"a", "b"}


def test_markov_keeps_the_learned_follower() -> None:
    # "a" is always followed by "b"; "c" was used just as often but never after "a".
    policy = feed(MarkovPolicy(), [["a"], ["b"], ["c"], ["a"], ["b"], ["c"], ["a"]])
    assert policy.victim(["b", "c"]) == "c"
    assert policy.priority("b") > policy.priority("c")
    assert policy.priority("never-seen") == 0.0


def test_markov_recency_decides_without_transitions() -> None:
    policy = feed(MarkovPolicy(), [["a"], ["b"], ["c"]])
    assert policy.victim(["a", "b"]) == "a"


# Each cycle: context {a, b, c}, then x two steps later, then y (used more recently than x).
CYCLE = [["a", "b", "c"], ["p"], ["x"], ["q"], ["r"], ["y"], ["s"]]


def test_context_keeps_what_followed_a_similar_step() -> None:
    steps = CYCLE * 3 + [["a", "b", "c"]]
    # one-step transitions never link {a, b, c} to x, and y is the more recent: Markov drops x
    assert feed(MarkovPolicy(), steps).victim(["x", "y"]) == "x"
    policy = feed(ContextPolicy(horizon=3), steps)
    assert policy.context("x") == 1.0
    assert policy.context("y") == 0.0
    assert policy.victim(["x", "y"]) == "y"
    assert feed(ContextPolicy(horizon=3, context_weight=0.0), steps).victim(["x", "y"]) == "x"


def test_context_matches_partly_known_steps() -> None:
    # 4 of the 6 keys of the remembered step are enough to recall what followed it
    cycle = [["a", "b", "c", "d", "e", "f"], ["p"], ["x"], ["q"], ["r"], ["y"], ["s"]]
    policy = feed(ContextPolicy(horizon=3), cycle * 3 + [["a", "b", "c", "d", "e", "f"], ["t"]])
    for key in ["a", "b", "c", "d"]:
        policy.on_access(key)
    assert policy.context("x") == 1.0
    assert policy.victim(["x", "y"]) == "y"
    three = feed(ContextPolicy(horizon=3), cycle * 3 + [["a", "b", "c", "d", "e", "f"], ["t"]])
    for key in ["a", "b", "c"]:  # too few shared keys: no match, the last finished step ("t") decides
        three.on_access(key)
    assert three.context("x") == 0.0


def test_context_keeps_one_history_per_layer() -> None:
    # tuple keys (layer, expert): layer 1 repeats the pattern, layer 0 is noise in the same steps
    steps = [[(1, key) for key in step] + [(0, f"n{i}")] for i, step in enumerate(CYCLE * 3 + [["a", "b", "c"]])]
    policy = feed(ContextPolicy(horizon=3), steps)
    assert policy.context((1, "x")) == 1.0
    assert policy.victim([(1, "x"), (1, "y")]) == (1, "y")


def test_context_history_is_a_bounded_ring_and_big_steps_are_safe() -> None:
    import random

    from moe_serve.cache_policies.context import _UNMATCHABLE

    rng = random.Random(0)
    policy = ContextPolicy(history_steps=50, horizon=4)
    feed(policy, [rng.sample(range(64), 6) for _ in range(2000)])
    group = policy._groups[None]
    assert group.members.shape[1] == group.future.shape[0] == 50 + 4 + 1
    assert int((group.need < _UNMATCHABLE).sum()) == 50  # the last 50 steps whose 4 next steps are known
    feed(policy, [list(range(40))])  # a batched step larger than max_context_keys: recorded, never matched
    assert policy.victim(list(range(40, 64))) in range(40, 64)


def test_context_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        ContextPolicy(horizon=0)


def test_registry_builds_every_name() -> None:
    names = available_policies()
    assert names == [name.value for name in PolicyName]
    assert DEFAULT_POLICY in names
    for name in names:
        policy = make_policy(name)
        assert isinstance(policy, CachePolicy)
        assert policy.name == name
    assert isinstance(make_policy("decayed_lfu", half_life_steps=8.0), DecayedLFUPolicy)


def test_registry_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="lru") as info:
        make_policy("mru")
    assert "mru" in str(info.value)
    for name in available_policies():
        assert name in str(info.value)


def test_policies_do_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, moe_serve.cache_policies, moe_serve.engine.traces.trace_file, moe_serve.engine.traces.replay; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def _shared_cache_hits(policy: CachePolicy, capacity: int, steps: int, layers: int, per_layer: int) -> int:
    """One slot pool for every layer; each step uses experts 0..per_layer-1 of each layer, in layer order."""
    resident: set[tuple[int, int]] = set()
    hits = 0
    for _ in range(steps):
        for layer in range(layers):
            wanted = [(layer, e) for e in range(per_layer)]
            for key in wanted:
                if key in resident:
                    hits += 1
                else:
                    if len(resident) >= capacity:
                        victim = policy.victim([k for k in resident if k not in wanted])
                        resident.discard(victim)
                        policy.on_evict(victim)
                    resident.add(key)
                    policy.on_insert(key)
                policy.on_access(key)
        policy.on_step()
    return hits


def test_partitioned_policy_turns_the_layer_cycle_into_hits() -> None:
    from moe_serve.cache_policies.partitioned import PartitionedPolicy

    # 4 layers x 2 experts in a 6-slot pool: one global LRU ranking evicts exactly the next layer's experts
    assert _shared_cache_hits(LRUPolicy(), capacity=6, steps=20, layers=4, per_layer=2) == 0
    partitioned = PartitionedPolicy(LRUPolicy, capacity=6, num_groups=4)
    assert _shared_cache_hits(partitioned, capacity=6, steps=20, layers=4, per_layer=2) >= 19 * 4


def test_partitioned_policy_takes_victims_from_the_group_most_over_its_share() -> None:
    from moe_serve.cache_policies.partitioned import PartitionedPolicy

    policy = PartitionedPolicy(LRUPolicy, capacity=4, num_groups=2)  # a share of 2 slots per layer
    for key in [(1, 0), (0, 0), (0, 1), (0, 2)]:
        policy.on_insert(key)
        policy.on_access(key)
    # (1, 0) is the least recently used overall, but layer 0 holds 3 slots of its 2
    assert policy.victim([(1, 0), (0, 0), (0, 1), (0, 2)]) == (0, 0)
    assert policy.policy(0).victim([(0, 1), (0, 2)]) == (0, 1)  # each layer has its own LRU


def test_partitioned_policy_evicts_the_layer_used_furthest_ahead_on_equal_shares() -> None:
    from moe_serve.cache_policies.partitioned import PartitionedPolicy

    policy = PartitionedPolicy(LRUPolicy, capacity=4, num_groups=4)
    for layer in (2, 3, 0, 1):  # layer 1 was the last computed: layer 2 comes next, layer 1 last
        policy.on_insert((layer, 0))
        policy.on_access((layer, 0))
    candidates = [(layer, 0) for layer in range(4)]
    assert policy.victim(candidates) == (1, 0)
    assert policy.victim([(2, 0), (3, 0), (0, 0)]) == (0, 0)
    with pytest.raises(ValueError):
        PartitionedPolicy(LRUPolicy, capacity=0, num_groups=2)
