"""Frequency policies: plain LFU, LFU with dynamic aging (LFUDA) and exponentially decayed LFU."""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable

from moe_serve.cache_policies.base import CachePolicy


class LFUPolicy(CachePolicy):
    """Evict the least frequently used candidate; ties go to the least recently used.

    Counts are kept for the whole run, also while a key is not resident (the expert's
    popularity, as the MoE-offloading study proposes), unless `forget_on_evict` is set.
    """

    name = "lfu"

    def __init__(self, forget_on_evict: bool = False) -> None:
        self._forget_on_evict = forget_on_evict
        self._clock = 0
        self._count: dict[Hashable, int] = {}
        self._last_access: dict[Hashable, int] = {}

    def on_access(self, key: Hashable) -> None:
        self._clock += 1
        self._count[key] = self._count.get(key, 0) + 1
        self._last_access[key] = self._clock

    def on_evict(self, key: Hashable) -> None:
        if self._forget_on_evict:
            self._count.pop(key, None)
            self._last_access.pop(key, None)

    def victim(self, candidates: Iterable[Hashable]) -> Hashable:
        count, last = self._count, self._last_access
        return min(candidates, key=lambda key: (count.get(key, 0), last.get(key, 0)))


class LFUDAPolicy(CachePolicy):
    """LFU with dynamic aging: a key's priority is its hit count plus the cache age at its
    last access; the age rises to each victim's priority, so stale popular keys age out."""

    name = "lfuda"

    def __init__(self) -> None:
        self._age = 0.0
        self._clock = 0
        self._count: dict[Hashable, int] = {}
        self._priority: dict[Hashable, float] = {}
        self._last_access: dict[Hashable, int] = {}

    def on_insert(self, key: Hashable) -> None:
        self._count[key] = 0

    def on_access(self, key: Hashable) -> None:
        self._clock += 1
        count = self._count.get(key, 0) + 1
        self._count[key] = count
        self._priority[key] = count + self._age
        self._last_access[key] = self._clock

    def on_evict(self, key: Hashable) -> None:
        self._age = max(self._age, self._priority.pop(key, self._age))
        self._count.pop(key, None)
        self._last_access.pop(key, None)

    def victim(self, candidates: Iterable[Hashable]) -> Hashable:
        priority, last = self._priority, self._last_access
        return min(candidates, key=lambda key: (priority.get(key, 0.0), last.get(key, 0)))


class DecayedLFUPolicy(CachePolicy):
    """Exponentially decayed frequency: score = sum over accesses of decay**(steps since).

    Scores decay once per `on_step`; they are stored scaled by decay**-step and
    rescaled lazily, so on_step is O(1).
    """

    name = "decayed_lfu"

    def __init__(self, half_life_steps: float = 64.0) -> None:
        if half_life_steps <= 0:
            raise ValueError("half_life_steps must be positive")
        self._log_growth = math.log(2.0) / half_life_steps
        self._step = 0
        self._scaled: dict[Hashable, float] = {}

    def _weight(self) -> float:
        return math.exp(self._log_growth * self._step)

    def on_access(self, key: Hashable) -> None:
        self._scaled[key] = self._scaled.get(key, 0.0) + self._weight()

    def on_step(self) -> None:
        self._step += 1
        if self._log_growth * self._step > 600.0:
            shrink = self._weight()
            self._scaled = {key: value / shrink for key, value in self._scaled.items()}
            self._step = 0

    def victim(self, candidates: Iterable[Hashable]) -> Hashable:
        scaled = self._scaled
        return min(candidates, key=lambda key: scaled.get(key, 0.0))
