"""One policy per MoE layer over a slot pool that every layer shares.

The engine keeps a single pool of expert slots and visits the layers in order every step.
A policy that ranks all keys in one list compares keys whose next uses are at very
different distances: while layer l evicts, a key of layer l+1 is needed a moment later and
a key of layer l-1 a whole step later, so recency-like scores evict exactly the keys about
to be used and the layer cycle becomes LRU's worst case (a cache shorter than the cycle
hits nothing). `PartitionedPolicy` gives each group of keys (the MoE layer: the first
element of a tuple key; other keys form one group) its own policy instance, as trace replay
does (N slots per layer), and an equal share of the slots. An eviction takes its victim
from the group most over its share; among groups equally far over, from the one whose
next use is furthest away in the layer cycle (the layer just used first, then the one
before it). Inside the group the group's own policy picks the victim.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable

from moe_serve.cache_policies.base import CachePolicy, group_of


class PartitionedPolicy(CachePolicy):
    """Per-group policies from `factory`, each with `capacity / num_groups` of the slots."""

    name = "partitioned"

    def __init__(self, factory: Callable[[], CachePolicy], capacity: int, num_groups: int) -> None:
        if capacity < 1 or num_groups < 1:
            raise ValueError("capacity and num_groups must be >= 1")
        self._factory = factory
        self._share = capacity / num_groups
        self._num_groups = num_groups
        self._policies: dict[Hashable, CachePolicy] = {}
        self._resident: Counter[Hashable] = Counter()
        self._current: Hashable = None  # group of the last access: the layer being computed

    def policy(self, group: Hashable) -> CachePolicy:
        """The policy of one group (created on first use)."""
        policy = self._policies.get(group)
        if policy is None:
            policy = self._policies[group] = self._factory()
        return policy

    def on_insert(self, key: Hashable) -> None:
        group = group_of(key)
        self._resident[group] += 1
        self.policy(group).on_insert(key)

    def on_access(self, key: Hashable) -> None:
        group = self._current = group_of(key)
        self.policy(group).on_access(key)

    def on_evict(self, key: Hashable) -> None:
        group = group_of(key)
        self._resident[group] -= 1
        self.policy(group).on_evict(key)

    def on_step(self) -> None:
        for policy in self._policies.values():
            policy.on_step()

    def _distance(self, group: Hashable) -> int:
        """Layers until `group` is next visited, counting from the current one (itself: a full cycle)."""
        if not isinstance(group, int) or not isinstance(self._current, int):
            return 0
        return (group - self._current - 1) % self._num_groups + 1

    def victim(self, candidates: Iterable[Hashable]) -> Hashable:
        by_group: dict[Hashable, list[Hashable]] = defaultdict(list)
        for key in candidates:
            by_group[group_of(key)].append(key)
        share, resident = self._share, self._resident
        group = max(by_group, key=lambda g: (resident[g] - share, self._distance(g)))
        return self.policy(group).victim(by_group[group])
