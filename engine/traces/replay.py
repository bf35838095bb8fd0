"""Replay a routing trace through expert-cache policies, and Belady's MIN as the offline bound.

One cache of `cache_experts` slots per MoE layer, shared by all prompts in trace order
(the cache survives from one request to the next, as in the live engine). For each token
the layer's experts are accessed hits first, then misses; a miss into a full cache evicts
the policy's victim among resident keys the current token does not use. The policy gets
`on_step` after every token. Keys are plain expert indices (one policy per layer).
No torch import.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np

from moe_serve.cache_policies import CachePolicy, make_policy
from moe_serve.engine.progress import progress
from moe_serve.engine.traces.trace_file import RoutingTrace

logger = logging.getLogger(__name__)


class Oracle(str, Enum):
    """Offline policies that read the future of the trace (replay only)."""

    BELADY = "belady"


@dataclass(frozen=True)
class ReplayResult:
    """Outcome of one policy at one cache size over one stretch of a trace."""

    policy: str
    cache_experts: int
    tokens: int
    hits: int
    misses: int
    expert_bytes: int

    @property
    def accesses(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def expert_bytes_per_token(self) -> float:
        return self.misses * self.expert_bytes / self.tokens if self.tokens else 0.0

    def as_dict(self) -> dict[str, float | int | str]:
        return {
            "policy": self.policy,
            "cache_experts": self.cache_experts,
            "tokens": self.tokens,
            "accesses": self.accesses,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hit_rate,
            "expert_bytes_per_token": self.expert_bytes_per_token,
        }


def validate_cache_size(trace: RoutingTrace, cache_experts: int) -> None:
    """Raise ValueError unless top_k <= cache_experts <= num_experts."""
    if not trace.top_k <= cache_experts <= trace.num_experts:
        raise ValueError(
            f"cache size {cache_experts} must be between top-k ({trace.top_k}) "
            f"and the number of experts per layer ({trace.num_experts})"
        )


def layer_rows(trace: RoutingTrace, layer: int) -> list[list[int] | None]:
    """Token rows of one layer as Python lists (None where the record is missing)."""
    rows: list[list[int] | None] = trace.expert_ids[:, layer, :].tolist()
    if trace.present is not None:
        for token in np.flatnonzero(~trace.present[:, layer]).tolist():
            rows[token] = None
    return rows


def _replay_layer(rows: list[list[int] | None], policy: CachePolicy, cache_experts: int) -> int:
    """Replay one layer; returns the number of misses. `evictable` = resident minus current token."""
    on_access, on_insert, on_evict, on_step, victim = (
        policy.on_access, policy.on_insert, policy.on_evict, policy.on_step, policy.victim
    )
    resident: set[int] = set()
    evictable: set[int] = set()
    misses = 0
    for row in rows:
        if row is None:
            on_step()
            continue
        for key in row:
            if key in resident:
                evictable.discard(key)
                on_access(key)
        for key in row:
            if key in resident:
                continue
            misses += 1
            if len(resident) >= cache_experts:
                out = victim(evictable)
                evictable.remove(out)
                resident.remove(out)
                on_evict(out)
            resident.add(key)
            on_insert(key)
            on_access(key)
        evictable.update(row)
        on_step()
    return misses


def replay(
    trace: RoutingTrace,
    policy_factory: Callable[[], CachePolicy],
    cache_experts: int,
    expert_bytes: int = 0,
    name: str = "",
    show_progress: bool = False,
) -> ReplayResult:
    """Replay `trace` with a fresh policy from `policy_factory` for each layer's cache."""
    validate_cache_size(trace, cache_experts)
    misses = 0
    layers = progress(range(trace.num_layers), show=show_progress, desc=f"{name} @ {cache_experts}", unit="layer")
    for layer in layers:
        policy = policy_factory()
        misses += _replay_layer(layer_rows(trace, layer), policy, cache_experts)
        name = name or policy.name
    return _result(trace, name, cache_experts, misses, expert_bytes)


def _result(trace: RoutingTrace, name: str, cache_experts: int, misses: int, expert_bytes: int) -> ReplayResult:
    accesses = trace.num_tokens * trace.num_layers * trace.top_k
    if trace.present is not None:
        accesses = int(trace.present.sum()) * trace.top_k
    return ReplayResult(name, cache_experts, trace.num_tokens, accesses - misses, misses, expert_bytes)


def next_use(trace: RoutingTrace, layer: int) -> np.ndarray:
    """[T, K] int64: the next token after t that routes to expert_ids[t, layer, k] (T if none)."""
    num_tokens = trace.num_tokens
    ids = trace.expert_ids[:, layer, :].astype(np.int64)  # T tokens, K active
    used = np.zeros((num_tokens + 1, trace.num_experts), dtype=bool)  # T+1 tokens, E experts
    rows = np.arange(num_tokens)[:, None]
    if trace.present is None:
        used[rows, ids] = True
    else:
        keep = trace.present[:, layer]
        used[rows[keep], ids[keep]] = True
    used[num_tokens] = True
    when = np.where(used, np.arange(num_tokens + 1)[:, None], num_tokens)
    first_at_or_after = np.minimum.accumulate(when[::-1], axis=0)[::-1]  # T+1, E
    return first_at_or_after[1:][rows, ids]


def _belady_layer(rows: list[list[int] | None], upcoming: list[list[int]], cache_experts: int) -> int:
    """Belady's MIN for one layer: evict the evictable key whose next use is farthest."""
    next_at: dict[int, int] = {}
    evictable: set[int] = set()
    misses = 0
    for row, row_next in zip(rows, upcoming):
        if row is None:
            continue
        for key, when in zip(row, row_next):
            if key in next_at:
                evictable.discard(key)
                next_at[key] = when
        for key, when in zip(row, row_next):
            if key in next_at:
                continue
            misses += 1
            if len(next_at) >= cache_experts:
                out = max(evictable, key=next_at.__getitem__)
                evictable.remove(out)
                del next_at[out]
            next_at[key] = when
        evictable.update(row)
    return misses


def replay_belady(trace: RoutingTrace, cache_experts: int, expert_bytes: int = 0,
                  show_progress: bool = False) -> ReplayResult:
    """Belady's MIN (farthest next use among evictable keys) over `trace`."""
    validate_cache_size(trace, cache_experts)
    misses = 0
    layers = progress(range(trace.num_layers), show=show_progress, desc=f"{Oracle.BELADY.value} @ {cache_experts}",
                      unit="layer")
    for layer in layers:
        upcoming = next_use(trace, layer).tolist()
        misses += _belady_layer(layer_rows(trace, layer), upcoming, cache_experts)
    return _result(trace, Oracle.BELADY.value, cache_experts, misses, expert_bytes)


def simulate(
    trace: RoutingTrace,
    policies: Sequence[str],
    cache_sizes: Sequence[int],
    expert_bytes: int = 0,
    show_progress: bool = False,
) -> list[ReplayResult]:
    """Replay every named policy (registry names or "belady") at every cache size; with
    `show_progress`, each replay draws a bar on a terminal (`engine.progress`)."""
    results = []
    for cache_experts in cache_sizes:
        for name in policies:
            if name == Oracle.BELADY.value:
                results.append(replay_belady(trace, cache_experts, expert_bytes, show_progress))
            else:
                results.append(replay(trace, lambda: make_policy(name), cache_experts, expert_bytes, name,
                                      show_progress))
            logger.info("%s @ %d: hit rate %.4f", name, cache_experts, results[-1].hit_rate)
    return results
