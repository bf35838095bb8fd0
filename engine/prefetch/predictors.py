"""Expert predictors: which experts a request or the next layer will need, learned online.

- `AffinityPredictor`: inter-layer co-activation counts (layer l's chosen experts ->
  layer l+1's), [L-1, E, E]; predicts layer l+1's top-k from layer l's set by the mean of
  the conditional frequencies P(j at l+1 | i at l) over i in the set.
- `TaskProfilePredictor`: the eMoE idea; per-task expert popularity [L, E] learned from
  served requests, a prediction per task refreshed only every few prompts of that task,
  none for tasks configured as insensitive.
- `score` and `PredictorStats`: precision/recall bookkeeping of issued predictions.

numpy only (no torch): used both by the live engine and by trace replay.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from moe_serve.engine.core.tasks import TaskLru
from moe_serve.engine.progress import progress
from moe_serve.engine.traces.trace_file import RoutingTrace

_RESCALE_ABOVE = 1e100
# a guess is worth a copy when it is more likely used than not; score 0.25 is where the affinity
# score's calibration crosses P(used) = 0.5 (DeepSeek-V2-Lite prompts 250-499, docs/prefetching.md)
AFFINITY_MIN_SCORE = 0.25


def multi_hot(ids: np.ndarray, num_experts: int, dtype: type = np.float64) -> np.ndarray:
    """[N, K] expert ids (-1: none) -> [N, E] indicator rows."""
    ids = np.asarray(ids, dtype=np.int64)
    hot = np.zeros((ids.shape[0], num_experts), dtype=dtype)
    rows, columns = np.nonzero(ids >= 0)
    hot[rows, ids[rows, columns]] = 1.0
    return hot


def top_k_ids(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the `k` largest scores along the last axis, best first (ties: lower index)."""
    k = min(k, scores.shape[-1])
    order = np.argsort(-scores, axis=-1, kind="stable")
    return order[..., :k]


class AffinityPredictor:
    """Co-activation statistics from layer l's experts to layer l+1's, learned online.

    With `decay` (0 < decay < 1) every observed token multiplies older counts by `decay`
    (stored scaled, rescaled lazily), so the statistics follow drifting routing.
    """

    def __init__(self, num_layers: int, num_experts: int, decay: float | None = None) -> None:
        if num_layers < 2 or num_experts < 1:
            raise ValueError("an affinity predictor needs at least 2 layers and 1 expert")
        if decay is not None and not 0.0 < decay < 1.0:
            raise ValueError("decay must be in (0, 1)")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self._decay = decay
        self._weight = 1.0
        self._pairs = np.zeros((num_layers - 1, num_experts, num_experts))  # L-1, E source, E target
        self._sources = np.zeros((num_layers - 1, num_experts))  # L-1, E: weight of tokens routing to i
        self._targets = np.zeros((num_layers - 1, num_experts))  # L-1, E: popularity at l+1 (tie-break)

    def _advance(self) -> float:
        """Weight of the token being observed now (grows by 1/decay per token when decaying)."""
        if self._decay is None:
            return 1.0
        self._weight /= self._decay
        if self._weight > _RESCALE_ABOVE:
            for counts in (self._pairs, self._sources, self._targets):
                counts /= self._weight
            self._weight = 1.0
        return self._weight

    def observe(self, layer: int, expert_ids: Sequence[int], next_expert_ids: Sequence[int]) -> None:
        """One token routed to `expert_ids` at `layer` and `next_expert_ids` at `layer + 1`."""
        if not 0 <= layer < self.num_layers - 1:
            raise ValueError(f"layer {layer} has no next layer")
        weight = self._advance()
        source = np.unique(np.asarray(expert_ids, dtype=np.int64))
        target = np.unique(np.asarray(next_expert_ids, dtype=np.int64))
        self._pairs[layer, source[:, None], target[None, :]] += weight
        self._sources[layer, source] += weight
        self._targets[layer, target] += weight

    def observe_layer(self, layer: int, expert_ids: np.ndarray, next_expert_ids: np.ndarray) -> None:
        """Many tokens of one layer pair: [T, K] ids at `layer` and [T, K] at `layer + 1`, row by row."""
        if self._decay is not None:
            for src, dst in zip(expert_ids, next_expert_ids):
                self.observe(layer, src, dst)
            return
        if not 0 <= layer < self.num_layers - 1:
            raise ValueError(f"layer {layer} has no next layer")
        source = multi_hot(expert_ids, self.num_experts)  # T, E
        target = multi_hot(next_expert_ids, self.num_experts)  # T, E
        self._pairs[layer] += source.T @ target
        self._sources[layer] += source.sum(axis=0)
        self._targets[layer] += target.sum(axis=0)

    def observe_token(self, routing: np.ndarray) -> None:
        """One token's routing, [L, K] expert ids (each row a set of distinct experts)."""
        routing = np.asarray(routing, dtype=np.int64)
        weight = self._advance()
        layers = np.arange(self.num_layers - 1)[:, None, None]
        source, target = routing[:-1, :, None], routing[1:, None, :]  # L-1, K, 1 and L-1, 1, K
        self._pairs[layers, source, target] += weight
        self._sources[layers[:, :, 0], routing[:-1]] += weight
        self._targets[layers[:, :, 0], routing[1:]] += weight

    def observe_tokens(self, routing: np.ndarray) -> None:
        """Many tokens at once, [T, L, K]; equal to observe_token per row when not decaying."""
        routing = np.asarray(routing)
        if self._decay is not None:
            for row in routing:
                self.observe_token(row)
            return
        for layer in range(self.num_layers - 1):
            self.observe_layer(layer, routing[:, layer], routing[:, layer + 1])

    def fit(self, trace: RoutingTrace) -> AffinityPredictor:
        """Learn from every token of `trace` (rows with a missing layer record are skipped)."""
        routing = trace.expert_ids
        if trace.present is not None:
            routing = routing[trace.present.all(axis=1)]
        self.observe_tokens(routing)
        return self

    def affinity(self, layers: slice = slice(None)) -> np.ndarray:
        """[L-1, E, E] conditional frequencies P(j at l+1 | i at l), plus a 1e-3 popularity tie-break."""
        conditional = self._pairs[layers] / np.maximum(self._sources[layers], 1e-300)[:, :, None]
        targets = self._targets[layers]
        popularity = targets / np.maximum(targets.sum(axis=1, keepdims=True), 1e-300)
        return conditional + 1e-3 * popularity[:, None, :]

    def scores(self, layer: int, expert_ids: Sequence[int]) -> np.ndarray:
        """[E] score of each expert of layer+1 given layer's set: the mean of P(j | i) over i."""
        ids = np.unique(np.asarray(expert_ids, dtype=np.int64))
        return self.affinity(slice(layer, layer + 1))[0, ids].mean(axis=0)

    def predict(self, layer: int, expert_ids: Sequence[int], k: int, min_score: float = 0.0) -> list[int]:
        """The top-k experts of layer+1 given layer's set, best first, scoring at least `min_score`."""
        if not 0 <= layer < self.num_layers - 1:
            raise ValueError(f"layer {layer} has no next layer")
        scores = self.scores(layer, expert_ids)
        return [int(e) for e in top_k_ids(scores, k) if scores[e] >= min_score]

    def predict_tokens(self, routing: np.ndarray, k: int, min_score: float = 0.0) -> np.ndarray:
        """[T, L-1, k] predictions for many tokens ([T, L, K] routing), counts frozen meanwhile;
        guesses scoring below `min_score` read -1."""
        routing = np.asarray(routing, dtype=np.int64)
        table = self.affinity()  # L-1, E, E
        layers = np.arange(self.num_layers - 1)[None, :, None]
        scores = table[layers, routing[:, :-1, :]].mean(axis=2)  # T, L-1, E
        best = top_k_ids(scores, k)
        return np.where(np.take_along_axis(scores, best, axis=-1) >= min_score, best, -1)


def online_affinity_predictions(
    trace: RoutingTrace, learn: RoutingTrace | None, k: int, min_score: float = 0.0, show_progress: bool = False
) -> np.ndarray:
    """[T, L-1, k] affinity predictions of layer l+1 from layer l for every token of `trace`.

    The predictor learns on `learn` first, then on each prompt of `trace` once it has been
    served: a prompt's tokens are predicted only from earlier prompts (-1: no prediction).
    `show_progress`: a bar on a terminal.
    """
    predictor = AffinityPredictor(trace.num_layers, trace.num_experts)
    if learn is not None and learn.num_tokens:
        predictor.fit(learn)
    predicted = np.full((trace.num_tokens, trace.num_layers - 1, k), -1, dtype=np.int64)
    for prompt in progress(range(trace.num_prompts), show=show_progress, desc="affinity", unit="prompt"):
        lo, hi = int(trace.offsets[prompt]), int(trace.offsets[prompt + 1])
        guesses = predictor.predict_tokens(trace.expert_ids[lo:hi], k, min_score)  # k may exceed E
        predicted[lo:hi, :, : guesses.shape[-1]] = guesses
        predictor.fit(trace.slice_prompts(prompt, prompt + 1))
    if trace.present is not None:
        predicted[~trace.present[:, :-1]] = -1
    return predicted


def affinity_recall(trace: RoutingTrace, learn: RoutingTrace | None, ks: Sequence[int],
                    show_progress: bool = False) -> np.ndarray:
    """[L-1, len(ks)] recall@k per layer pair (l -> l+1) of online affinity predictions on `trace`."""
    return recall_at(online_affinity_predictions(trace, learn, max(ks), show_progress=show_progress), trace, ks)


def recall_at(predicted: np.ndarray, trace: RoutingTrace, ks: Sequence[int]) -> np.ndarray:
    """[L-1, len(ks)] recall@k per layer pair of `predicted` ([T, L-1, >= max(ks)] guesses of
    layer l+1, best first, -1 for none) against `trace`'s routing."""
    actual = trace.expert_ids[:, 1:, :].astype(np.int64)  # T, L-1, K
    valid = np.ones(actual.shape[:2], dtype=bool)  # T, L-1: both layers' records present
    if trace.present is not None:
        valid = trace.present[:, :-1] & trace.present[:, 1:]
    recall = np.zeros((trace.num_layers - 1, len(ks)))
    for column, k in enumerate(ks):
        found = (predicted[:, :, :k, None] == actual[:, :, None, :]).any(axis=2)  # T, L-1, K
        hits = (found.sum(axis=2) * valid).sum(axis=0)
        recall[:, column] = hits / np.maximum(valid.sum(axis=0) * trace.top_k, 1)
    return recall


@dataclass
class PredictorStats:
    """Running precision/recall of issued predictions against what was then used."""

    issued: int = 0
    hits: int = 0
    actual: int = 0

    def update(self, predicted: Iterable[int], actual: Iterable[int]) -> None:
        """Account one prediction (a set of experts) against the experts actually used."""
        predicted_set, actual_set = set(predicted), set(actual)
        self.issued += len(predicted_set)
        self.hits += len(predicted_set & actual_set)
        self.actual += len(actual_set)

    @property
    def precision(self) -> float:
        return self.hits / self.issued if self.issued else 0.0

    @property
    def recall(self) -> float:
        return self.hits / self.actual if self.actual else 0.0


def score(predicted: set[int], actual: set[int]) -> tuple[float, float]:
    """(precision, recall) of one prediction; 0.0 where the denominator is empty."""
    hits = len(predicted & actual)
    precision = hits / len(predicted) if predicted else 0.0
    recall = hits / len(actual) if actual else 0.0
    return precision, recall


@dataclass
class _TaskProfile:
    counts: np.ndarray  # L, E expert uses summed over the task's requests
    used: np.ndarray  # L, E how many of the task's requests used the expert at least once
    prompts: int = 0
    refreshed_at: int = 0
    prediction: dict[int, list[int]] | None = None  # layer -> every used expert, most used first
    ranked: dict[int, list[tuple[int, float]]] | None = None  # layer -> (expert, share of requests using it)


class TaskProfilePredictor:
    """Per-task expert popularity (eMoE): experts to preload before a task's prefill.

    The prediction of a task is recomputed only every `refresh_every` observed prompts of
    that task and served from a cache in between; tasks in `insensitive_tasks` get none.
    `predict_scores` adds each expert's probability of being used by a request of the task
    (the share of its observed requests that used it), so a preload can keep to the likely
    experts and skip a flat (uninformative) profile. At most `max_tasks` tasks keep a profile
    (None: no bound); the least recently used one is dropped first.
    """

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        refresh_every: int = 8,
        insensitive_tasks: frozenset[str] = frozenset(),
        max_tasks: int | None = None,
    ) -> None:
        if refresh_every < 1:
            raise ValueError("refresh_every must be >= 1")
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.refresh_every = refresh_every
        self.insensitive_tasks = frozenset(insensitive_tasks)
        self._profiles: TaskLru[_TaskProfile] = TaskLru(max_tasks)

    @property
    def num_tasks(self) -> int:
        """Tasks with a profile."""
        return len(self._profiles)

    def observe_routing(self, request_id: str, task: str, routing: np.ndarray) -> None:
        """A finished request's routing, as the live routing recorder hands it to its consumers."""
        self.observe_request(task, routing)

    def observe_request(self, task: str, routing: np.ndarray) -> None:
        """A served request of `task` routed as `routing` ([T, L, K] expert ids)."""
        routing = np.asarray(routing, dtype=np.int64)
        if routing.ndim != 3 or routing.shape[1] != self.num_layers:
            raise ValueError(f"routing must be [T, {self.num_layers}, K], got {routing.shape}")
        shape = (self.num_layers, self.num_experts)
        profile = self._profiles.get_or_add(task, lambda: _TaskProfile(np.zeros(shape), np.zeros(shape)))
        layers = np.broadcast_to(np.arange(self.num_layers)[None, :, None], routing.shape)
        np.add.at(profile.counts, (layers.ravel(), routing.ravel()), 1.0)
        used = np.zeros((self.num_layers, self.num_experts), dtype=bool)
        used[layers.ravel(), routing.ravel()] = True
        profile.used += used
        profile.prompts += 1

    def predict(self, task: str, per_layer: int) -> dict[int, list[int]]:
        """Layer -> the task's `per_layer` most used experts (only experts seen at least once)."""
        profile = self._refreshed(task)
        if profile is None or profile.prediction is None:
            return {}
        return {layer: experts[:per_layer] for layer, experts in profile.prediction.items()}

    def predict_scores(self, task: str, per_layer: int, min_probability: float = 0.0) -> dict[int, list[tuple[int, float]]]:
        """Layer -> up to `per_layer` (expert, probability a request of the task uses it) pairs, most
        likely first, keeping only experts at or above `min_probability` (layers left empty are omitted)."""
        profile = self._refreshed(task)
        if profile is None or profile.ranked is None:
            return {}
        out: dict[int, list[tuple[int, float]]] = {}
        for layer, ranked in profile.ranked.items():
            scored = [(e, p) for e, p in ranked[:per_layer] if p >= min_probability]
            if scored:
                out[layer] = scored
        return out

    def _refreshed(self, task: str) -> _TaskProfile | None:
        """The task's profile with its cached prediction refreshed when stale; None if there is none."""
        profile = self._profiles.get(task)
        if task in self.insensitive_tasks or profile is None or profile.prompts == 0:
            return None
        stale = profile.prompts - profile.refreshed_at >= self.refresh_every
        if profile.prediction is None or stale:
            profile.prediction = {
                layer: [int(e) for e in top_k_ids(counts, self.num_experts) if counts[e] > 0]
                for layer, counts in enumerate(profile.counts)
            }
            shares = profile.used / profile.prompts
            profile.ranked = {  # stable sort: ties keep the most used first
                layer: sorted(((e, float(shares[layer, e])) for e in experts), key=lambda pair: -pair[1])
                for layer, experts in profile.prediction.items()
            }
            profile.refreshed_at = profile.prompts
        return profile
