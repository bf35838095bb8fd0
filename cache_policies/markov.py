"""Markov policy: a next-step predictor learned online from consecutive steps.

A key's priority = P(used next step | keys of this step) from sparse transition counts
+ a decayed use count (popularity) + a recency term (reuse within a request); the transition
sums are brought up to date lazily, so a step without evictions costs nothing.
Details and measurements: docs/cache_policies.md.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable

from moe_serve.cache_policies.base import CachePolicy


class MarkovPolicy(CachePolicy):
    """Transition + decayed-frequency + recency priority; evict the lowest."""

    name = "markov"

    def __init__(
        self,
        frequency_weight: float = 0.1,
        frequency_half_life: float = 32.0,
        recency_weight: float = 0.3,
        recency_half_life: float = 2.0,
    ) -> None:
        if frequency_half_life <= 0 or recency_half_life <= 0:
            raise ValueError("half lives must be positive")
        self._frequency_weight = frequency_weight
        self._frequency_decay = math.log(2.0) / frequency_half_life
        self._recency_weight = recency_weight
        self._recency_half_life = recency_half_life
        self._step = 0
        self._last_step: dict[Hashable, int] = {}
        self._frequency: dict[Hashable, float] = {}
        self._previous: list[Hashable] = []
        self._current: list[Hashable] = []
        self._followers: dict[Hashable, dict[Hashable, int]] = {}
        self._transitions_from: dict[Hashable, int] = {}
        # key -> sum of P(key next | source) over this step's keys added so far (`_unscored` are not yet)
        self._transition: dict[Hashable, float] = {}
        self._unscored: list[Hashable] = []
        self._fallback: dict[Hashable, float] | None = None  # the same over the last step's keys, once asked for

    def _add_source(self, scores: dict[Hashable, float], source: Hashable) -> None:
        row = self._followers.get(source)
        if row is not None:
            total = self._transitions_from[source]
            for target, count in row.items():
                scores[target] = scores.get(target, 0.0) + count / total

    def on_access(self, key: Hashable) -> None:
        last = self._last_step.get(key)
        if last == self._step:
            return
        decayed = self._frequency[key] * math.exp(-self._frequency_decay * (self._step - last)) if last is not None else 0.0
        self._frequency[key] = decayed + 1.0
        self._last_step[key] = self._step
        self._current.append(key)
        self._unscored.append(key)

    def on_step(self) -> None:
        if self._current:
            followers, counts = self._followers, self._transitions_from
            for source in self._previous:
                row = followers.get(source)
                if row is None:
                    row = followers[source] = {}
                for target in self._current:
                    row[target] = row.get(target, 0) + 1
                counts[source] = counts.get(source, 0) + 1
            self._previous, self._current = self._current, []
            self._transition, self._unscored, self._fallback = {}, [], None
        self._step += 1

    def priority(self, key: Hashable) -> float:
        """Estimated chance that `key` is needed soon (higher is kept longer)."""
        step = self._step
        last = self._last_step.get(key)
        if last is None:
            return 0.0
        age = step - last
        score = self._frequency_weight * self._frequency[key] * math.exp(-self._frequency_decay * age)
        score += self._recency_weight * 0.5 ** (age / self._recency_half_life)
        return score + self._transitions().get(key, 0.0)

    def _transitions(self) -> dict[Hashable, float]:
        """key -> sum over this step's keys (or, while there are none, the last step's) of P(key next | source)."""
        if self._current:
            for source in self._unscored:
                self._add_source(self._transition, source)
            self._unscored.clear()
            return self._transition
        if self._fallback is None:
            self._fallback = {}
            for source in self._previous:
                self._add_source(self._fallback, source)
        return self._fallback

    def victim(self, candidates: Iterable[Hashable]) -> Hashable:
        return min(candidates, key=self.priority)
