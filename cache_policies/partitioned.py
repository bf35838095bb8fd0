"""One policy per MoE layer over a slot pool that every layer shares.

`PartitionedPolicy` gives each key group (the MoE layer) its own policy instance and an equal
share of the slots; an eviction takes its victim from the group most over its share (among
equals, the one next needed furthest ahead in the layer cycle), and that group's policy picks
the key. Why one ranking across layers fails: docs/cache_policies.md, "In the live engine".
With integer groups and a `Set` of candidates the victim is found from the groups' own resident
keys, without a pass over every candidate of every layer.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Set

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
        self._members: dict[Hashable, dict[Hashable, None]] = defaultdict(dict)  # group -> its resident keys
        self._current: Hashable = None  # group of the last access: the layer being computed
        self._layer_groups = True  # every group seen is a layer index in [0, num_groups)

    def policy(self, group: Hashable) -> CachePolicy:
        """The policy of one group (created on first use)."""
        policy = self._policies.get(group)
        if policy is None:
            policy = self._policies[group] = self._factory()
        return policy

    def on_insert(self, key: Hashable) -> None:
        group = group_of(key)
        if group not in self._resident and not (isinstance(group, int) and 0 <= group < self._num_groups):
            self._layer_groups = False
        self._resident[group] += 1
        self._members[group][key] = None
        self.policy(group).on_insert(key)

    def on_access(self, key: Hashable) -> None:
        group = self._current = group_of(key)
        policy = self._policies.get(group)
        (policy if policy is not None else self.policy(group)).on_access(key)

    def on_evict(self, key: Hashable) -> None:
        group = group_of(key)
        self._resident[group] -= 1
        self._members[group].pop(key, None)
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
        if isinstance(candidates, Set):
            found = self._victim_by_group(candidates)
            if found is not None:
                return found
        by_group: dict[Hashable, list[Hashable]] = defaultdict(list)
        for key in candidates:
            by_group[group_of(key)].append(key)
        share, resident = self._share, self._resident
        group = max(by_group, key=lambda g: (resident[g] - share, self._distance(g)))
        return self.policy(group).victim(by_group[group])

    def _victim_by_group(self, candidates: Set[Hashable]) -> Hashable | None:
        """The same choice as the full pass when every group is a layer index: groups in order of
        residency, then distance (the current layer first, then the one before it, ...); the first
        one holding a candidate gives the victim. None when that cannot be decided this way."""
        current, num_groups, resident, members = self._current, self._num_groups, self._resident, self._members
        if not self._layer_groups or not isinstance(current, int) or not 0 <= current < num_groups:
            return None
        for level in sorted({count for count in resident.values() if count > 0}, reverse=True):
            for back in range(num_groups):  # distance num_groups (the current layer), num_groups - 1, ...
                group = (current - back) % num_groups
                if resident[group] == level:
                    keys = [key for key in members[group] if key in candidates]
                    if keys:
                        return self.policy(group).victim(keys)
        return None
