"""Nearest-context policy: the Markov priority plus "what followed the most similar past steps".

Each key gets `MarkovPolicy`'s priority + context_weight x (share of the `neighbours` most
similar past steps after which it was used within `horizon` steps), similar meaning sharing at
least two thirds of the step's keys. One bounded history per key group (the engine's MoE
layer), held as numpy arrays: a past step's overlap with the current one is one column sum.
Algorithm, memory and measurements: docs/cache_policies.md.
"""

from __future__ import annotations

import math
from collections.abc import Hashable

import numpy as np

from moe_serve.cache_policies.base import group_of
from moe_serve.cache_policies.markov import MarkovPolicy

_UNMATCHABLE = 1 << 30  # the overlap asked of a step that is not matched (future incomplete, forgotten, too big)


def _needed_overlap(size: int) -> int:
    """Shared keys that make a past step similar to a step of `size` keys (ceil(2/3 size))."""
    return max(1, -(-2 * size // 3))


class _GroupHistory:
    """The last `history_steps` finished steps of one key group in a ring: per step its keys (a
    column of `members`), and once its `horizon` next steps are known, the keys they used (a row
    of `future`) and the overlap that makes it similar (`need`). Keys are the policy's positions."""

    def __init__(self, horizon: int, neighbours: int, history_steps: int, max_keys: int, num_positions: int) -> None:
        self.horizon = horizon
        self.neighbours = neighbours
        self.history_steps = history_steps
        self.max_keys = max_keys
        self.ring = history_steps + horizon + 1
        self.members = np.zeros((num_positions, self.ring), dtype=np.uint8)  # [position, slot]
        self.future = np.zeros((self.ring, num_positions), dtype=np.uint8)  # [slot, position]
        self.step_of = np.full(self.ring, -1, dtype=np.int64)
        self.size_of = np.zeros(self.ring, dtype=np.int64)
        self.need = np.full(self.ring, _UNMATCHABLE, dtype=np.int64)
        # matches per overlap and needed overlap: the number of the step's needed-size key subsets it shares
        self.shared = np.array([[math.comb(have, need) for need in range(max_keys + 1)] for have in range(max_keys + 1)],
                               dtype=np.int64)
        self.steps = 0
        self.last_size = 0
        self.current: list[int] = []
        self.previous: list[int] = []  # the last finished step, if matchable
        self._previous_scores: np.ndarray | None = None
        self._previous_known = True
        self.query_key: tuple[int, ...] | None = None
        self.query_scores: np.ndarray | None = None

    def grow(self, num_positions: int) -> None:
        old = self.members.shape[0]
        if num_positions <= old:
            return
        self.members = np.concatenate([self.members, np.zeros((num_positions - old, self.ring), dtype=np.uint8)])
        self.future = np.concatenate([self.future, np.zeros((self.ring, num_positions - old), dtype=np.uint8)], axis=1)

    def finish_step(self) -> None:
        """Record the finished step, make the step whose future is now complete matchable, forget the oldest."""
        if not self.current:
            return
        positions, self.current = self.current, []
        step = self.steps
        self.steps += 1
        slot = step % self.ring
        self.members[:, slot] = 0
        self.members[positions, slot] = 1
        self.step_of[slot] = step
        self.size_of[slot] = len(positions)
        self.need[slot] = _UNMATCHABLE
        self.last_size = len(positions)
        source = step - self.horizon
        if source >= 0:
            source_slot = source % self.ring
            size = int(self.size_of[source_slot])
            if size <= self.max_keys:
                later = [(source + offset) % self.ring for offset in range(1, self.horizon + 1)]
                self.future[source_slot] = self.members[:, later].max(axis=1)
                self.need[source_slot] = _needed_overlap(size)
        forgotten = step - self.horizon - self.history_steps
        if forgotten >= 0:
            self.need[forgotten % self.ring] = _UNMATCHABLE
        self.previous = positions if len(positions) <= self.max_keys else []
        self._previous_scores, self._previous_known = None, False
        self.query_key = None
        self.query_scores = None

    def previous_scores(self) -> np.ndarray | None:
        """`scores` of the last finished step (computed once, on first use)."""
        if not self._previous_known:
            self._previous_scores = self.scores(self.previous) if self.previous else None
            self._previous_known = True
        return self._previous_scores

    def scores(self, positions: list[int]) -> np.ndarray | None:
        """Per position: share of the most similar matchable steps whose future used it (None: no
        similar step). A past step of k keys is similar when it shares ceil(2/3 k) of them with
        `positions`; the ones sharing more subsets of that size rank first, then the most recent."""
        overlap = self.members[positions].sum(axis=0, dtype=np.int64)  # [slot]
        similar = np.flatnonzero(overlap >= self.need)
        if len(similar) == 0:
            return None
        if len(similar) > self.neighbours:
            rank = (self.shared[overlap[similar], self.need[similar]] << 40) | self.step_of[similar]
            similar = similar[np.argpartition(rank, len(similar) - self.neighbours)[-self.neighbours:]]
        counts = self.future[similar].sum(axis=0, dtype=np.int64)
        return counts * (1.0 / len(similar))


class ContextPolicy(MarkovPolicy):
    """Markov priority + context_weight x P(used soon | most similar past steps); evict the lowest."""

    name = "context"

    def __init__(
        self,
        context_weight: float = 2.0,
        horizon: int = 4,
        neighbours: int = 16,
        history_steps: int = 2048,
        max_context_keys: int = 8,
        frequency_weight: float = 0.1,
        frequency_half_life: float = 32.0,
        recency_weight: float = 0.3,
        recency_half_life: float = 2.0,
    ) -> None:
        super().__init__(frequency_weight, frequency_half_life, recency_weight, recency_half_life)
        if horizon < 1 or neighbours < 1 or history_steps < 1 or max_context_keys < 1:
            raise ValueError("horizon, neighbours, history_steps and max_context_keys must be >= 1")
        self._context_weight = context_weight
        self._group_args = (horizon, neighbours, history_steps, max_context_keys)
        self._groups: dict[Hashable, _GroupHistory] = {}
        self._group_of_position: list[_GroupHistory] = []

    def _position_of(self, key: Hashable) -> int:
        position = self._position.get(key)
        if position is None:
            position = super()._position_of(key)
            name = group_of(key)
            group = self._groups.get(name)
            if group is None:
                group = self._groups[name] = _GroupHistory(*self._group_args, len(self._last))
            self._group_of_position.append(group)
            for history in self._groups.values():
                history.grow(len(self._last))
        return position

    def on_access(self, key: Hashable) -> None:
        position = self._position.get(key)
        if position is None:
            position = self._position_of(key)
        if position not in self._in_current:
            self._group_of_position[position].current.append(position)
            self._note_use(position)

    def on_step(self) -> None:
        for group in self._groups.values():
            group.finish_step()
        super().on_step()

    def _scores(self, group: _GroupHistory) -> np.ndarray | None:
        """Per position: context share, for this step's known keys or the last finished step."""
        current = group.current
        if current and _needed_overlap(group.last_size) <= len(current) <= group.max_keys:
            query = tuple(sorted(current))
            if query != group.query_key:
                group.query_key = query
                group.query_scores = group.scores(current)
            if group.query_scores is not None:
                return group.query_scores
        return group.previous_scores()

    def context(self, key: Hashable) -> float:
        """Share of the most similar past steps (to this step, or the last one while too
        little of this step is known) after which `key` was used within the horizon."""
        position = self._position.get(key)
        if position is None:
            return 0.0
        scores = self._scores(self._group_of_position[position])
        return float(scores[position]) if scores is not None else 0.0

    def _priority_vector(self) -> np.ndarray:
        if self._priorities is None:
            scores = self._markov_priorities()
            weight = self._context_weight
            if len(self._groups) == 1:
                context = self._scores(next(iter(self._groups.values())))
                if context is not None:  # cached before a new key got a position: shorter
                    size = min(len(scores), len(context))
                    scores[:size] += weight * context[:size]
            else:
                for group in self._groups.values():
                    context = self._scores(group)
                    if context is not None:
                        size = min(len(scores), len(context))
                        mine = np.array([g is group for g in self._group_of_position[:size]], dtype=bool)
                        scores[:size][mine] += weight * context[:size][mine]
            self._priorities = scores
        return self._priorities
