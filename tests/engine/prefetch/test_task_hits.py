"""Expert-cache hits per task (`TaskHitCounter`) on the live engine."""

from __future__ import annotations

from moe_serve.engine.builder import build_engine
from moe_serve.engine.config import EngineConfig
from moe_serve.engine.core.request import EngineRequest
from moe_serve.engine.core.sampling_params import SamplingParams
from moe_serve.engine.core.stats import ExpertCacheSnapshot
from tests.helpers import run_to_completion

LAYERS = 4


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def test_lookups_are_counted_by_task_and_misses_by_the_rows_routed_to_missed_experts(checkpoint_factory) -> None:
    path = checkpoint_factory("mixtral", num_hidden_layers=LAYERS)
    engine = build_engine(EngineConfig(model=str(path), dtype="float32", expert_cache_fraction=0.5,
                                       max_num_batched_tokens=16), show_progress=False)
    spec = engine.runner.model.spec
    requests = [EngineRequest("a", list(range(10, 40)), greedy(6), task="chat"),
                EngineRequest("b", list(range(50, 62)), greedy(9), task="code"),
                EngineRequest("c", list(range(70, 75)), greedy(4), task="chat")]
    run_to_completion(engine, {0: requests[:2], 2: requests[2:]})
    snapshot = ExpertCacheSnapshot.of(engine.runner.model.experts.cache)
    computed = {r.request_id: len(r.prompt_token_ids) + r.sampling.max_tokens - 1 for r in requests}
    per_token = spec.num_moe_layers * spec.top_k
    assert snapshot.lookups_by_task == {"chat": (computed["a"] + computed["c"]) * per_token,
                                        "code": computed["b"] * per_token}
    unique_misses = sum(snapshot.misses.values())
    # every missed expert was routed to by at least one row of the step that missed it
    assert unique_misses <= sum(snapshot.misses_by_task.values()) < sum(snapshot.lookups_by_task.values())
    assert set(snapshot.misses_by_task) == {"chat", "code"}
    engine.close()


def test_a_task_whose_experts_are_all_resident_adds_only_hits(checkpoint_factory) -> None:
    path = checkpoint_factory("olmoe", num_hidden_layers=LAYERS)
    engine = build_engine(EngineConfig(model=str(path), dtype="float32", offload="on", expert_cache_fraction=1.0),
                          show_progress=False)
    cache = engine.runner.model.experts.cache
    prompt = list(range(20, 44))
    run_to_completion(engine, {0: [EngineRequest("warm", prompt, greedy(4), task="t")]})
    before = ExpertCacheSnapshot.of(cache)
    run_to_completion(engine, {0: [EngineRequest("again", prompt, greedy(4), task="t")]})
    after = ExpertCacheSnapshot.of(cache)
    assert after.misses_by_task.get("t", 0) == before.misses_by_task.get("t", 0)
    assert after.lookups_by_task["t"] > before.lookups_by_task["t"]
    engine.close()
