"""Driving an engine directly (no server) for the benchmarks: submit a batch, step it to the end."""

from __future__ import annotations

import time

from moe_serve.engine.core.llm_engine import LLMEngine
from moe_serve.engine.core.request import EngineRequest
from moe_serve.engine.core.sampling_params import SamplingParams
from moe_serve.engine.offload.provider import OffloadedExperts


def run_to_completion(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams,
                      prefix: str = "r") -> tuple[int, float]:
    """Submit every prompt at once and step until all finish: (tokens generated, seconds)."""
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(EngineRequest(f"{prefix}{i}", prompt, params))
    generated = 0
    while engine.has_unfinished:
        generated += sum(len(o.new_token_ids) for o in engine.step())
    return generated, time.perf_counter() - start


def offload_counters(engine: LLMEngine) -> dict[str, float]:
    """Expert-cache totals so far (all zero when every expert is resident); subtract two
    snapshots to measure one phase of a run."""
    experts = engine.runner.model.experts
    if not isinstance(experts, OffloadedExperts):
        return dict.fromkeys(("hits", "misses", "stall_s", "prefetch_issued", "prefetch_used", "prefetch_late"), 0)
    stats = experts.cache.stats()
    return {"hits": sum(stats.hits.values()), "misses": sum(stats.misses.values()),
            "stall_s": sum(stats.stall_seconds.values()), "prefetch_issued": stats.prefetch_issued,
            "prefetch_used": stats.prefetch_used, "prefetch_late": stats.prefetch_late}


def counters_since(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Per-counter difference, plus the phase's hit rate (1.0 when nothing was looked up)."""
    delta = {key: after[key] - before[key] for key in after}
    lookups = delta["hits"] + delta["misses"]
    delta["hit_rate"] = delta["hits"] / lookups if lookups else 1.0
    return delta
