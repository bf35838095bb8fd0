"""Nearest-context policy: the Markov priority plus "what followed the most similar past steps".

Each key gets `MarkovPolicy`'s priority + context_weight x (share of the `neighbours` most
similar past steps after which it was used within `horizon` steps), similar meaning sharing at
least two thirds of the step's keys. One bounded history per key group (the engine's MoE
layer). Algorithm, memory and measurements: docs/cache_policies.md.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from heapq import nlargest
from itertools import combinations

from moe_serve.cache_policies.base import group_of
from moe_serve.cache_policies.markov import MarkovPolicy


def _needed_overlap(size: int) -> int:
    """Shared keys that make a past step similar to a step of `size` keys (ceil(2/3 size))."""
    return max(1, -(-2 * size // 3))


class _GroupHistory:
    """Step sets of one key group, an index from key subsets to the steps containing them,
    and per indexed step the keys used in the `horizon` steps after it (bit masks)."""

    def __init__(self, horizon: int, neighbours: int, bucket: int, history_steps: int, max_keys: int) -> None:
        self.horizon = horizon
        self.neighbours = neighbours
        self.bucket = bucket
        self.history_steps = history_steps
        self.max_keys = max_keys
        self.bit: dict[Hashable, int] = {}  # key -> bit position
        self.keys: list[Hashable] = []  # bit position -> key
        self.masks: dict[int, int] = {}  # step -> keys used (bit mask)
        self.future: dict[int, int] = {}  # indexed step -> keys used in the next `horizon` steps
        # subset mask -> the step containing it, or the steps (oldest first) when several do
        self.index: dict[int, int | list[int]] = {}
        self.subset_sizes: set[int] = set()  # sizes of the indexed subsets
        self.steps = 0
        self.last_size = 0
        self.current: list[Hashable] = []
        self.previous_bits: list[int] = []  # the last finished step, if matchable
        self._previous_scores: dict[int, float] | None = {}
        self.query_key: tuple[int, ...] | None = None
        self.query_scores: dict[int, float] | None = None

    def bits_of(self, keys: Iterable[Hashable]) -> list[int]:
        bit, known = self.bit, self.keys
        out = []
        for key in keys:
            position = bit.get(key)
            if position is None:
                position = bit[key] = len(known)
                known.append(key)
            out.append(position)
        out.sort()
        return out

    def finish_step(self) -> None:
        """Record the finished step, index the step whose future is now complete, forget the oldest."""
        if not self.current:
            return
        bits = self.bits_of(self.current)
        self.current = []
        mask = 0
        for position in bits:
            mask |= 1 << position
        step = self.steps
        self.steps += 1
        self.masks[step] = mask
        self.last_size = len(bits)
        if len(bits) <= self.max_keys:
            self.subset_sizes.add(_needed_overlap(len(bits)))
        source = step - self.horizon
        subsets = self._subsets(source)
        if subsets:
            future = 0
            for later in range(source + 1, step + 1):
                future |= self.masks.get(later, 0)
            self.future[source] = future
            index, bucket = self.index, self.bucket
            for subset in subsets:
                steps = index.get(subset)
                if steps is None:
                    index[subset] = source
                elif isinstance(steps, int):
                    index[subset] = [steps, source] if bucket > 1 else source
                else:
                    steps.append(source)
                    if len(steps) > bucket:
                        del steps[0]
        self._forget(step - self.horizon - self.history_steps)
        self.previous_bits = bits if len(bits) <= self.max_keys else []
        self._previous_scores = None  # matched when first asked for: steps without evictions cost nothing
        self.query_key = None
        self.query_scores = None

    def _subsets(self, step: int) -> list[int]:
        """Index entries of a recorded step: the masks of its ceil(2/3 k)-key subsets (none when
        the step is unknown or has more than `max_keys` keys). Recomputed from the step's mask
        rather than stored, which keeps the history a few KiB per step smaller."""
        mask = self.masks.get(step)
        if mask is None or mask.bit_count() > self.max_keys:
            return []
        bits = []
        while mask:
            low = mask & -mask
            bits.append(low.bit_length() - 1)
            mask ^= low
        return [sum(1 << b for b in combo) for combo in combinations(bits, _needed_overlap(len(bits)))]

    def _forget(self, step: int) -> None:
        index = self.index
        if step in self.future:
            for subset in self._subsets(step):
                steps = index.get(subset)
                if steps == step:
                    del index[subset]
                elif isinstance(steps, list) and steps[0] == step:
                    del steps[0]
                    if len(steps) == 1:
                        index[subset] = steps[0]
        self.masks.pop(step, None)
        self.future.pop(step, None)

    def previous_scores(self) -> dict[int, float]:
        """`scores` of the last finished step (computed once, on first use)."""
        if self._previous_scores is None:
            self._previous_scores = self.scores(self.previous_bits) if self.previous_bits else {}
        return self._previous_scores

    def scores(self, bits: list[int]) -> dict[int, float]:
        """Bit position -> share of the most similar indexed steps whose future used it.

        A past step of k keys is similar when it shares ceil(2/3 k) of them with `bits`;
        the ones sharing more rank first, then the most recent."""
        size = len(bits)
        index = self.index
        shared: dict[int, int] = {}  # step -> index buckets it shares with the query (grows with overlap)
        for need in self.subset_sizes:
            if need > size:
                continue
            for combo in combinations(bits, need):
                steps = index.get(sum(1 << b for b in combo))
                if steps is None:
                    continue
                if isinstance(steps, int):
                    shared[steps] = shared.get(steps, 0) + 1
                else:
                    for step in steps:
                        shared[step] = shared.get(step, 0) + 1
        if not shared:
            return {}
        best = nlargest(self.neighbours, shared, key=lambda step: (shared[step] << 40) | step)
        counts: dict[int, int] = {}
        future = self.future
        for step in best:
            rest = future[step]
            while rest:
                low = rest & -rest
                position = low.bit_length() - 1
                counts[position] = counts.get(position, 0) + 1
                rest ^= low
        share = 1.0 / len(best)
        return {position: count * share for position, count in counts.items()}


class ContextPolicy(MarkovPolicy):
    """Markov priority + context_weight x P(used soon | most similar past steps); evict the lowest."""

    name = "context"

    def __init__(
        self,
        context_weight: float = 2.0,
        horizon: int = 4,
        neighbours: int = 16,
        bucket: int = 32,
        history_steps: int = 2048,
        max_context_keys: int = 8,
        frequency_weight: float = 0.1,
        frequency_half_life: float = 32.0,
        recency_weight: float = 0.3,
        recency_half_life: float = 2.0,
    ) -> None:
        super().__init__(frequency_weight, frequency_half_life, recency_weight, recency_half_life)
        if horizon < 1 or neighbours < 1 or bucket < 1 or history_steps < 1 or max_context_keys < 1:
            raise ValueError("horizon, neighbours, bucket, history_steps and max_context_keys must be >= 1")
        self._context_weight = context_weight
        self._group_args = (horizon, neighbours, bucket, history_steps, max_context_keys)
        self._groups: dict[Hashable, _GroupHistory] = {}

    def _group(self, key: Hashable) -> _GroupHistory:
        name = group_of(key)
        group = self._groups.get(name)
        if group is None:
            group = self._groups[name] = _GroupHistory(*self._group_args)
        return group

    def on_access(self, key: Hashable) -> None:
        if self._last_step.get(key) != self._step:
            self._group(key).current.append(key)
        super().on_access(key)

    def on_step(self) -> None:
        for group in self._groups.values():
            group.finish_step()
        super().on_step()

    def _scores(self, group: _GroupHistory) -> dict[int, float]:
        """Bit position -> context share, for this step's known keys or the last finished step."""
        current = group.current
        if current and _needed_overlap(group.last_size) <= len(current) <= group.max_keys:
            bits = group.bits_of(current)
            query = tuple(bits)
            if query != group.query_key:
                group.query_key = query
                group.query_scores = group.scores(bits)
            if group.query_scores:
                return group.query_scores
        return group.previous_scores()

    def context(self, key: Hashable) -> float:
        """Share of the most similar past steps (to this step, or the last one while too
        little of this step is known) after which `key` was used within the horizon."""
        group = self._group(key)
        position = group.bit.get(key)
        return self._scores(group).get(position, 0.0) if position is not None else 0.0

    def priority(self, key: Hashable) -> float:
        return super().priority(key) + self._context_weight * self.context(key)

    def victim(self, candidates: Iterable[Hashable]) -> Hashable:
        weight, groups, by_group = self._context_weight, self._groups, {}
        markov = super().priority

        def score(key: Hashable) -> float:
            name = group_of(key)
            bonus = by_group.get(name)
            if bonus is None:
                group = groups.get(name)
                if group is None:
                    bonus = by_group[name] = {}
                else:
                    keys = group.keys
                    bonus = by_group[name] = {keys[p]: weight * v for p, v in self._scores(group).items()}
            return markov(key) + bonus.get(key, 0.0)

        return min(candidates, key=score)
