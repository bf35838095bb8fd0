"""Trace replay with next-layer expert prefetching over one host->device link, and its timing.

Timing model (`TimingModel`): one expert copy takes expert_bytes / link bandwidth on a single
link shared by demand copies and prefetches; a MoE layer computes for `compute_ms_per_layer`
per token once all of its experts are on the device. Per token and layer l, at the layer's
start `now` (its router has just run):

1. the link starts queued prefetches, oldest first, while it frees up before `now` (a
   started copy is never preempted);
2. prefetches issued for layer l are settled: used if layer l routes to them (late if their
   copy is in flight or not started), wasted otherwise (cancelled, slot freed, if not started);
3. demand: resident experts hit (an unstarted prefetch among them becomes a demand copy);
   misses take a slot through the eviction policy (never one of this token's experts nor one
   still loading) and queue their copies ahead of every unstarted prefetch;
4. the compute waits for the layer's last expert (the stall), then runs compute_s while the
   link carries the prefetches for layer l+1 issued at `now` (at most cache_experts - top_k
   loading per layer; they take slots through the same policy, so they may evict).

One cache of `cache_experts` slots and one policy per layer, as in `trace_sim.replay`; with
no prefetch the hits equal `replay`'s. Layer 0 gets no prefetch. No torch import.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum

import numpy as np

from moe_serve.cache_policies import CachePolicy, make_policy
from moe_serve.engine.prefetch.logistic_predictor import LOGISTIC_MIN_PROBABILITY, LogisticPredictor
from moe_serve.engine.prefetch.predictors import AFFINITY_MIN_SCORE, online_affinity_predictions
from moe_serve.engine.progress import progress
from moe_serve.engine.traces.replay import validate_cache_size
from moe_serve.engine.traces.trace_file import RoutingTrace

logger = logging.getLogger(__name__)

PCIE4_X16_EFFECTIVE_GBPS = 25.0
DEEPSEEK_V2_LITE_EXPERT_BYTES = 2048 * 1408 * 3  # 8-bit gate, up and down projections
RTX_24GB_COMPUTE_MS_PER_LAYER = 0.5


class Prefetcher(str, Enum):
    """Where next-layer predictions come from."""

    NONE = "none"
    AFFINITY = "affinity"  # AffinityPredictor learned on the learning prompts, updated per prompt
    LOGISTIC = "logistic"  # LogisticPredictor trained on the learning prompts, then frozen
    PREVIOUS = "previous"  # the previous token's experts of layer l+1
    ORACLE = "oracle"  # the true experts of layer l+1: the ceiling on the same link and cache (but for
    # order effects: LRU ranks a step's hits before its misses, so a prefetch can reorder evictions)


def available_prefetchers() -> list[str]:
    """Every name `Prefetcher` accepts."""
    return [p.value for p in Prefetcher]


@dataclass(frozen=True)
class TimingModel:
    """Link and compute speeds; defaults: PCIe 4.0 x16 and a 24 GB card (RTX 4090 class)."""

    link_gbps: float = PCIE4_X16_EFFECTIVE_GBPS
    compute_ms_per_layer: float = RTX_24GB_COMPUTE_MS_PER_LAYER
    expert_bytes: int = DEEPSEEK_V2_LITE_EXPERT_BYTES

    def __post_init__(self) -> None:
        if self.link_gbps <= 0 or self.compute_ms_per_layer < 0 or self.expert_bytes < 0:
            raise ValueError("link_gbps must be > 0, compute_ms_per_layer and expert_bytes >= 0")

    @property
    def copy_s(self) -> float:
        """Seconds to copy one expert over the link."""
        return self.expert_bytes / (self.link_gbps * 1e9)

    @property
    def compute_s(self) -> float:
        return self.compute_ms_per_layer / 1e3


@dataclass(frozen=True)
class PrefetchResult:
    """Outcome of one (policy, prefetcher, cache size) replay with timing."""

    policy: str
    prefetch: str
    cache_experts: int
    tokens: int
    hits: int
    misses: int
    stall_s: float
    issued: int
    used: int
    late: int
    wasted: int
    cancelled: int
    timing: TimingModel

    @property
    def hit_rate(self) -> float:
        """Accesses whose expert was resident (loaded, in flight or reserved) at the layer's start."""
        accesses = self.hits + self.misses
        return self.hits / accesses if accesses else 0.0

    @property
    def stall_ms_per_token(self) -> float:
        return 1e3 * self.stall_s / self.tokens if self.tokens else 0.0

    def as_dict(self) -> dict[str, float | int | str]:
        return {
            "policy": self.policy,
            "prefetch": self.prefetch,
            "cache_experts": self.cache_experts,
            "tokens": self.tokens,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hit_rate,
            "stall_ms_per_token": self.stall_ms_per_token,
            **{f"prefetches_{name}": getattr(self, name) for name in ("issued", "used", "late", "wasted", "cancelled")},
            **asdict(self.timing),
        }


def predictions(
    trace: RoutingTrace,
    prefetcher: Prefetcher,
    learn: RoutingTrace | None = None,
    width: int | None = None,
    min_score: float | None = None,
    show_progress: bool = False,
) -> np.ndarray | None:
    """[T, L, W] int64 experts to prefetch for layer l of token t (-1: none); None for `none`.

    Row [t, l] is issued at the start of layer l-1 of token t; row [t, 0] is empty. The
    affinity predictor learns on `learn`, then on each replayed prompt once it is served; the
    logistic one is trained on `learn` and frozen. Each keeps its `width` best guesses scoring
    at least `min_score` (default: AFFINITY_MIN_SCORE, or LOGISTIC_MIN_PROBABILITY).
    """
    if prefetcher is Prefetcher.NONE:
        return None
    ids = trace.expert_ids.astype(np.int64)  # T tokens, L layers, K active
    learned = prefetcher in (Prefetcher.AFFINITY, Prefetcher.LOGISTIC)
    width = trace.top_k if not learned or width is None else width
    planned = np.full((trace.num_tokens, trace.num_layers, width), -1, dtype=np.int64)
    if prefetcher is Prefetcher.ORACLE:
        planned[:, 1:] = ids[:, 1:]
    elif prefetcher is Prefetcher.PREVIOUS:
        planned[1:, 1:] = ids[:-1, 1:]
        if trace.present is not None:
            planned[1:][~trace.present[:-1]] = -1
    elif prefetcher is Prefetcher.LOGISTIC:
        if learn is None or not learn.num_tokens:
            raise ValueError("the logistic prefetcher is trained on the learning prompts: give --learn-prompts")
        model = LogisticPredictor(trace.num_layers, trace.num_experts).fit(learn, show_progress=show_progress)
        threshold = LOGISTIC_MIN_PROBABILITY if min_score is None else min_score
        planned[:, 1:, : min(width, trace.num_experts)] = model.predict_tokens(trace, width, threshold)
    else:
        threshold = AFFINITY_MIN_SCORE if min_score is None else min_score
        planned[:, 1:] = online_affinity_predictions(trace, learn, width, threshold, show_progress)
    if trace.present is not None:  # no guess from, nor for, a missing record
        planned[:, 1:][~trace.present[:, :-1]] = -1
        planned[~trace.present] = -1
    return planned


@dataclass
class _LayerCache:
    """One layer's cache during a prefetch replay."""

    policy: CachePolicy
    ready: dict[int, float] = field(default_factory=dict)  # resident expert -> copy done (inf: not started)
    evictable: set[int] = field(default_factory=set)  # resident, loaded, not used by the current token
    loading: set[int] = field(default_factory=set)  # prefetched and not yet evictable
    unsettled: set[int] = field(default_factory=set)  # prefetches not yet checked against this layer's use
    queued: dict[int, float] = field(default_factory=dict)  # unstarted prefetch -> when it was issued

    def evict_one(self, candidates: set[int]) -> None:
        out = self.policy.victim(candidates)
        candidates.discard(out)
        self.evictable.discard(out)
        del self.ready[out]
        self.policy.on_evict(out)


def replay_prefetch(
    trace: RoutingTrace,
    policy_factory: Callable[[], CachePolicy],
    cache_experts: int,
    timing: TimingModel,
    planned: np.ndarray | None = None,
    policy_name: str = "",
    prefetch_name: str = Prefetcher.NONE.value,
    show_progress: bool = False,
) -> PrefetchResult:
    """Replay `trace` with a fresh policy per layer, prefetching `planned` (see `predictions`)."""
    validate_cache_size(trace, cache_experts)
    copy_s, compute_s = timing.copy_s, timing.compute_s
    layers = [_LayerCache(policy_factory()) for _ in range(trace.num_layers)]
    pending: deque[tuple[int, int, float]] = deque()  # unstarted prefetches (layer, expert, issued at)
    now = link_free = stall = 0.0
    hits = misses = issued = used = late = cancelled = 0
    present = trace.present.tolist() if trace.present is not None else None
    tokens = progress(trace.expert_ids.tolist(), show=show_progress,
                      desc=f"{policy_name}+{prefetch_name} @ {cache_experts}", unit="token")
    for token, rows in enumerate(tokens):
        plan = planned[token].tolist() if planned is not None else None
        for layer, row in enumerate(rows):
            while pending and max(link_free, pending[0][2]) < now:
                target, expert, issued_at = pending.popleft()
                if layers[target].queued.get(expert) == issued_at:
                    del layers[target].queued[expert]
                    link_free = max(link_free, issued_at) + copy_s
                    layers[target].ready[expert] = link_free
            state = layers[layer]
            policy, cache, free_now, loading = state.policy, state.ready, state.evictable, state.loading
            if present is not None and not present[token][layer]:
                policy.on_step()
                now += compute_s
                continue
            for expert in state.unsettled:
                if expert in row:
                    used += 1
                    late += cache[expert] > now
                elif expert in state.queued:
                    cancelled += 1
                    del cache[expert], state.queued[expert]
                    loading.discard(expert)
                    policy.on_evict(expert)
            state.unsettled.clear()
            for expert in list(loading):
                if expert in row or cache[expert] <= now:
                    loading.discard(expert)
                    if expert not in row:
                        free_now.add(expert)
            for expert in row:
                if expert in cache:
                    hits += 1
                    free_now.discard(expert)
                    policy.on_access(expert)
                    if state.queued.pop(expert, None) is not None:
                        link_free = max(link_free, now) + copy_s
                        cache[expert] = link_free
            for expert in row:
                if expert in cache:
                    continue
                misses += 1
                if len(cache) >= cache_experts:
                    state.evict_one(free_now)
                link_free = max(link_free, now) + copy_s
                cache[expert] = link_free
                policy.on_insert(expert)
                policy.on_access(expert)
            start = max(now, max(cache[expert] for expert in row))
            stall += start - now
            free_now.update(row)
            policy.on_step()
            if plan is not None and layer + 1 < len(layers):
                issued += _issue(layers[layer + 1], layer + 1, plan[layer + 1], pending, now, cache_experts,
                                 cache_experts - trace.top_k)
            now = start + compute_s
    return PrefetchResult(policy_name, prefetch_name, cache_experts, trace.num_tokens, hits, misses, stall,
                          issued, used, late, issued - used, cancelled, timing)


def _issue(
    state: _LayerCache, layer: int, experts: list[int], pending: deque[tuple[int, int, float]], now: float,
    cache_experts: int, max_loading: int,
) -> int:
    """Reserve slots for the non-resident `experts` of `layer` and queue their copies; returns how many."""
    count = 0
    candidates = state.evictable.difference(experts)  # a predicted resident expert is not evicted for another
    for expert in experts:
        if expert < 0 or expert in state.ready:
            continue
        if len(state.loading) >= max_loading or (len(state.ready) >= cache_experts and not candidates):
            break
        if len(state.ready) >= cache_experts:
            state.evict_one(candidates)
        state.ready[expert] = math.inf
        state.queued[expert] = now
        state.policy.on_insert(expert)
        state.loading.add(expert)
        state.unsettled.add(expert)
        pending.append((layer, expert, now))
        count += 1
    return count


def simulate_prefetch(
    trace: RoutingTrace,
    policies: Sequence[str],
    prefetchers: Sequence[Prefetcher],
    cache_sizes: Sequence[int],
    timing: TimingModel,
    learn: RoutingTrace | None = None,
    width: int | None = None,
    min_score: float | None = None,
    show_progress: bool = False,
) -> list[PrefetchResult]:
    """Every (cache size, policy, prefetcher) over `trace`; predictors learn on `learn` first.
    With `show_progress`, training and each replay draw a bar on a terminal (`engine.progress`)."""
    plans = {p: predictions(trace, p, learn, width, min_score, show_progress) for p in prefetchers}
    results = []
    for cache_experts in cache_sizes:
        for name in policies:
            for prefetcher in prefetchers:
                result = replay_prefetch(trace, lambda: make_policy(name), cache_experts, timing,
                                         plans[prefetcher], name, prefetcher.value, show_progress)
                logger.info("%s+%s @ %d: hit rate %.4f, stall %.3f ms/token", name, prefetcher.value,
                            cache_experts, result.hit_rate, result.stall_ms_per_token)
                results.append(result)
    return results
