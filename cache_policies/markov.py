"""Markov policy: a next-step predictor learned online from consecutive steps.

A key's priority = P(used next step | keys of this step) from transition counts + a decayed use
count (popularity) + a recency term (reuse within a request). Each key gets a position in numpy
arrays; an access only notes the position, and the priorities of every key are computed at once
when a victim is asked for (kept until the next access or step). Details and measurements:
docs/cache_policies.md.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from functools import lru_cache

import numpy as np

from moe_serve.cache_policies.base import CachePolicy


@lru_cache(maxsize=32)
def _age_tables(frequency_decay: float, recency_half_life: float, length: int) -> tuple[np.ndarray, np.ndarray]:
    """exp(-decay x age) and 0.5 ** (age / half life) for ages 0..length-1, computed by the same scalar
    formulas the priority is defined by (read-only, shared by every policy with these settings)."""
    decay = np.array([math.exp(-frequency_decay * age) for age in range(length)])
    recency = np.array([0.5 ** (age / recency_half_life) for age in range(length)])
    decay.flags.writeable = recency.flags.writeable = False
    return decay, recency


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
        self._position: dict[Hashable, int] = {}  # key -> its index in the arrays below
        self._keys: list[Hashable] = []
        capacity = 16
        self._last = np.full(capacity, -1, dtype=np.int64)  # step of the last use, -1: never used
        self._frequency = np.zeros(capacity)  # decayed use count as of the last use
        self._counts = np.zeros((capacity, capacity))  # [source, target]: steps where target followed source
        self._sources = np.zeros(capacity)  # steps counted from each source (its row's total)
        self._with_row: set[int] = set()  # positions counted as a source at least once
        self._current: list[int] = []  # positions used this step, in first-use order
        self._in_current: set[int] = set()
        self._updated = 0  # how many of `_current` have their use counted in `_last` / `_frequency`
        self._previous: list[int] = []
        # sum of P(target next | source) over this step's sources (the first `_summed` of `_current`)
        self._transition = np.zeros(capacity)
        self._summed = 0
        self._fallback: np.ndarray | None = None  # the same over the last step's keys, once asked for
        self._ages = _age_tables(self._frequency_decay, recency_half_life, 64)
        self._priorities: np.ndarray | None = None  # every position's priority until the next change

    def _position_of(self, key: Hashable) -> int:
        position = self._position.get(key)
        if position is None:
            position = self._position[key] = len(self._keys)
            self._keys.append(key)
            if position == len(self._last):
                self._grow(2 * position)
        return position

    def _grow(self, capacity: int) -> None:
        old = len(self._last)
        self._last = np.concatenate([self._last, np.full(capacity - old, -1, dtype=np.int64)])
        self._frequency = np.concatenate([self._frequency, np.zeros(capacity - old)])
        counts = np.zeros((capacity, capacity))
        counts[:old, :old] = self._counts
        self._counts = counts
        self._sources = np.concatenate([self._sources, np.zeros(capacity - old)])
        self._transition = np.concatenate([self._transition, np.zeros(capacity - old)])
        if self._fallback is not None:
            self._fallback = np.concatenate([self._fallback, np.zeros(capacity - old)])

    def on_access(self, key: Hashable) -> None:
        position = self._position_of(key)
        if position not in self._in_current:
            self._note_use(position)

    def _note_use(self, position: int) -> None:
        """First use of `position` in this step (counted lazily, see `_count_uses`)."""
        self._in_current.add(position)
        self._current.append(position)
        self._priorities = None

    def _count_uses(self) -> None:
        """Brings `_frequency` and `_last` up to date with this step's uses so far."""
        if self._updated == len(self._current):
            return
        used = np.array(self._current[self._updated:])
        self._updated = len(self._current)
        decay = np.take(self._age_tables_now()[0], self._step - self._last[used], mode="clip")
        self._frequency[used] = self._frequency[used] * decay + 1.0  # a first use: 0.0 x decay + 1.0
        self._last[used] = self._step

    def _age_table(self, ages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(decay, recency) at `ages`; the tables cover every age up to the current step until both
        reach 0.0 (older ages read the last entry: exactly 0.0)."""
        decay, recency = self._age_tables_now()
        return np.take(decay, ages, mode="clip"), np.take(recency, ages, mode="clip")

    def _age_tables_now(self) -> tuple[np.ndarray, np.ndarray]:
        decay, recency = self._ages
        if len(decay) <= self._step + 1 and (decay[-1] > 0.0 or recency[-1] > 0.0):
            self._ages = decay, recency = _age_tables(self._frequency_decay, self._recency_half_life, 2 * (self._step + 1))
        return decay, recency

    def on_step(self) -> None:
        if self._current:
            self._count_uses()
            if self._previous:
                sources, targets = np.array(self._previous), np.array(self._current)
                self._counts[sources[:, None], targets] += 1.0
                self._sources[sources] += 1.0
                self._with_row.update(self._previous)
            self._previous, self._current, self._in_current = self._current, [], set()
            self._updated = self._summed = 0
            self._transition[:] = 0.0
            self._fallback = None
        self._step += 1
        self._priorities = None

    def _markov_priorities(self) -> np.ndarray:
        """Priority of every known position (0.0 for a key never used)."""
        self._count_uses()
        size = len(self._keys)
        last = self._last[:size]
        decay, recency = self._age_table(self._step - last)
        scores = self._frequency_weight * self._frequency[:size] * decay
        scores += self._recency_weight * recency
        scores += self._transitions()[:size]
        scores[last < 0] = 0.0
        return scores

    def _priority_vector(self) -> np.ndarray:
        """Every known position's priority, kept until the next access or step."""
        if self._priorities is None:
            self._priorities = self._markov_priorities()
        return self._priorities

    def _sum_sources(self, total: np.ndarray, sources: list[int]) -> np.ndarray:
        """`total` + P(. next | source) for each source in order (sequential sums: the same floats
        as adding them one by one)."""
        rows = [source for source in sources if source in self._with_row]
        if not rows:
            return total
        picked = np.array(rows)
        shares = self._counts[picked] / self._sources[picked, None]
        return np.cumsum(np.vstack([total[None], shares]), axis=0)[-1]

    def _transitions(self) -> np.ndarray:
        """Per position: sum over this step's keys (or, while there are none, the last step's) of
        P(position next | source)."""
        if self._current:
            if self._summed < len(self._current):
                self._transition = self._sum_sources(self._transition, self._current[self._summed:])
                self._summed = len(self._current)
            return self._transition
        if self._fallback is None:
            self._fallback = self._sum_sources(np.zeros(len(self._transition)), self._previous)
        return self._fallback

    def priority(self, key: Hashable) -> float:
        """Estimated chance that `key` is needed soon (higher is kept longer)."""
        position = self._position.get(key)
        return float(self._priority_vector()[position]) if position is not None else 0.0

    def victim(self, candidates: Iterable[Hashable]) -> Hashable:
        keys = candidates if isinstance(candidates, list) else list(candidates)
        positions = [self._position_of(key) for key in keys]
        scores = self._priority_vector()
        if len(scores) < len(self._keys):  # a candidate never seen before: priority 0.0
            scores = np.concatenate([scores, np.zeros(len(self._keys) - len(scores))])
        return keys[int(np.argmin(scores[positions]))]
