"""The numpy `markov` and `context` policies against plain-Python references of their definitions
(docs/cache_policies.md): the same victim at every eviction of a replayed cache."""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Iterable

from moe_serve.cache_policies import CachePolicy
from moe_serve.cache_policies.context import ContextPolicy
from moe_serve.cache_policies.markov import MarkovPolicy


class ReferenceMarkov(CachePolicy):
    """P(used next | this step's keys) + 0.1 x frequency (half-life 32) + 0.3 x recency (half-life 2), in dicts."""

    name = "reference_markov"

    def __init__(self) -> None:
        self.step, self.last, self.frequency = 0, {}, {}
        self.previous, self.current = [], []
        self.followers: dict[Hashable, dict[Hashable, int]] = {}
        self.totals: dict[Hashable, int] = {}

    def on_access(self, key: Hashable) -> None:
        last = self.last.get(key)
        if last == self.step:
            return
        decayed = self.frequency[key] * math.exp(-math.log(2.0) / 32.0 * (self.step - last)) if last is not None else 0.0
        self.frequency[key], self.last[key] = decayed + 1.0, self.step
        self.current.append(key)

    def on_step(self) -> None:
        if self.current:
            for source in self.previous:
                row = self.followers.setdefault(source, {})
                for target in self.current:
                    row[target] = row.get(target, 0) + 1
                self.totals[source] = self.totals.get(source, 0) + 1
            self.previous, self.current = self.current, []
        self.step += 1

    def priority(self, key: Hashable) -> float:
        last = self.last.get(key)
        if last is None:
            return 0.0
        age = self.step - last
        score = 0.1 * self.frequency[key] * math.exp(-math.log(2.0) / 32.0 * age) + 0.3 * 0.5 ** (age / 2.0)
        transition = 0.0
        for source in self.current or self.previous:
            count = self.followers.get(source, {}).get(key, 0)
            if count:
                transition += count / self.totals[source]
        return score + transition

    def victim(self, candidates: Iterable[Hashable]) -> Hashable:
        return min(candidates, key=self.priority)


class ReferenceContext(ReferenceMarkov):
    """+ 2.0 x share of the 16 most similar past steps (sharing ceil(2/3 k) of their k keys; more shared
    key subsets first, then the most recent) whose next 4 steps used the key; the last 2048 such steps."""

    name = "reference_context"

    def __init__(self, history: int = 2048) -> None:
        super().__init__()
        self.history = history
        self.steps: list[set[Hashable]] = []  # every finished non-empty step
        self.keys_now: list[Hashable] = []

    def on_access(self, key: Hashable) -> None:
        if self.last.get(key) != self.step:
            self.keys_now.append(key)
        super().on_access(key)

    def on_step(self) -> None:
        if self.keys_now:
            self.steps.append(set(self.keys_now))
            self.keys_now = []
        super().on_step()

    def similar_shares(self, query: set[Hashable]) -> dict[Hashable, float]:
        matchable = range(max(0, len(self.steps) - 4 - self.history), len(self.steps) - 4)
        ranked = []
        for index in matchable:
            step = self.steps[index]
            need = max(1, -(-2 * len(step) // 3))
            overlap = len(step & query)
            if len(step) <= 8 and overlap >= need:
                ranked.append((math.comb(overlap, need), index))
        best = sorted(ranked, reverse=True)[:16]
        counts: dict[Hashable, int] = {}
        for _, index in best:
            for key in set().union(*self.steps[index + 1 : index + 5]):
                counts[key] = counts.get(key, 0) + 1
        return {key: count * (1.0 / len(best)) for key, count in counts.items()}

    def context(self) -> dict[Hashable, float]:
        last_size = len(self.steps[-1]) if self.steps else 0
        if self.keys_now and max(1, -(-2 * last_size // 3)) <= len(self.keys_now) <= 8:
            shares = self.similar_shares(set(self.keys_now))
            if shares:
                return shares
        previous = self.steps[-1] if self.steps and len(self.steps[-1]) <= 8 else set()
        return self.similar_shares(previous) if previous else {}

    def victim(self, candidates: Iterable[Hashable]) -> Hashable:
        shares = self.context()
        return min(candidates, key=lambda key: self.priority(key) + 2.0 * shares.get(key, 0.0))


def replayed_victims(policy: CachePolicy, steps: list[list[int]], capacity: int) -> list[Hashable]:
    """The cache of `engine/traces/replay.py`: hits first, then each miss evicts among the unused keys."""
    resident: set[int] = set()
    victims = []
    for step in steps:
        for key in step:
            if key in resident:
                policy.on_access(key)
        for key in step:
            if key in resident:
                continue
            if len(resident) >= capacity:
                victims.append(policy.victim(sorted(resident - set(step))))
                resident.remove(victims[-1])
                policy.on_evict(victims[-1])
            resident.add(key)
            policy.on_insert(key)
            policy.on_access(key)
        policy.on_step()
    return victims


def routing_like(num_steps: int, seed: int) -> list[list[int]]:
    """Top-6 of 24 experts with strong reuse (a few hot experts, half of a step repeated), and empty steps."""
    rng = random.Random(seed)
    steps, previous = [], rng.sample(range(24), 6)
    for _ in range(num_steps):
        if rng.random() < 0.02:
            steps.append([])
            continue
        kept = rng.sample(previous, 3)
        rest = [e for e in rng.sample(range(24), 12) if e not in kept][:3]
        previous = kept + rest
        steps.append(previous)
    return steps


def test_markov_matches_its_reference() -> None:
    steps = routing_like(1500, seed=1)
    assert replayed_victims(MarkovPolicy(), steps, 10) == replayed_victims(ReferenceMarkov(), steps, 10)


def test_context_matches_its_reference() -> None:
    steps = routing_like(700, seed=2)
    expected = replayed_victims(ReferenceContext(history=300), steps, 10)
    assert len(expected) > 1000
    assert replayed_victims(ContextPolicy(history_steps=300), steps, 10) == expected
