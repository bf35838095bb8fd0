"""Live routing capture: trace files in the shared npz schema, eMoE task preloading."""

from __future__ import annotations

import numpy as np

from moe_serve.engine.builder import build_engine
from moe_serve.engine.config import EngineConfig
from moe_serve.engine.core.request import EngineRequest
from moe_serve.engine.core.sampling_params import SamplingParams
from moe_serve.engine.prefetch.predictors import TaskProfilePredictor
from moe_serve.engine.prefetch.routing import TaskExpertCost
from moe_serve.engine.traces.trace_file import load_trace
from tests.helpers import run_to_completion

LAYERS = 4


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def test_record_trace_writes_rotated_npz_with_tasks(tmp_path, checkpoint_factory) -> None:
    path = checkpoint_factory("olmoe", num_hidden_layers=LAYERS)
    engine = build_engine(EngineConfig(model=str(path), dtype="float32", record_trace=str(tmp_path / "traces"),
                                       max_num_batched_tokens=16), show_progress=False)
    engine.trace_writer.tokens_per_file = 40  # rotate within this short run
    requests = [EngineRequest(f"r{i}", list(range(10 + i, 30 + 2 * i)), greedy(6 + i), task=task)
                for i, task in enumerate(["chat", "code", "chat"])]
    run_to_completion(engine, {0: requests[:2], 3: requests[2:]})
    engine.close()
    files = sorted((tmp_path / "traces").glob("*.npz"))
    assert len(files) >= 2  # rotated after 40 tokens
    traces = [load_trace(f) for f in files]
    by_id = {rid: (t, i) for t in traces for i, rid in enumerate(t.request_ids)}
    assert set(by_id) == {"r0", "r1", "r2"}
    for i, request in enumerate(requests):
        trace, p = by_id[request.request_id]
        rows = trace.expert_ids[trace.offsets[p] : trace.offsets[p + 1]]
        # every computed token: the prompt and each generated token except the last
        assert rows.shape == (len(request.prompt_token_ids) + request.sampling.max_tokens - 1, LAYERS, 2)
        assert trace.tasks[p] == request.task
        assert np.all(rows < 8) and all(len(set(r)) == 2 for r in rows.reshape(-1, 2))


def test_recorded_routing_is_reproducible_and_independent_of_batching(tmp_path, checkpoint_factory) -> None:
    path = checkpoint_factory("olmoe", num_hidden_layers=LAYERS)
    prompt = list(range(50, 80))

    def record(directory, extra: list[EngineRequest], chunk: int) -> np.ndarray:
        engine = build_engine(EngineConfig(model=str(path), dtype="float32", record_trace=str(directory),
                                           max_num_batched_tokens=chunk), show_progress=False)
        run_to_completion(engine, {0: [EngineRequest("x", prompt, greedy(5))] + extra})
        engine.close()
        trace = load_trace(next(directory.glob("*.npz")))
        p = trace.request_ids.index("x")
        return np.sort(trace.expert_ids[trace.offsets[p] : trace.offsets[p + 1]], axis=-1)

    alone = record(tmp_path / "a", [], 512)
    batched = record(tmp_path / "b", [EngineRequest("y", list(range(3, 9)), greedy(9))], 16)
    assert np.array_equal(alone, batched)


def test_task_preload_prefetches_a_tasks_experts_and_keeps_tokens(checkpoint_factory) -> None:
    path = checkpoint_factory("mixtral", num_hidden_layers=LAYERS)
    prompts = [list(range(20 + i, 45 + i)) for i in range(6)]

    def serve(**overrides):
        engine = build_engine(EngineConfig(model=str(path), dtype="float32", **overrides), show_progress=False)
        out = {}
        for i, prompt in enumerate(prompts):  # one request after the other, like a repeating task
            out.update(run_to_completion(engine, {0: [EngineRequest(f"r{i}", prompt, greedy(8), task="chat")]}))
        return out, engine

    reference, _ = serve(offload="off")
    tokens, engine = serve(expert_cache_fraction=0.5, prefetch="none", task_preload="on")
    assert tokens == reference
    assert engine.preloader is not None and engine.preloader.num_preloads == len(prompts) - 1
    assert engine.preloader.num_experts_preloaded > 0


def test_task_profiles_and_expert_costs_keep_at_most_max_tasks_names() -> None:
    predictor = TaskProfilePredictor(num_layers=2, num_experts=4, refresh_every=1, max_tasks=5)
    cost = TaskExpertCost(predictor, per_layer=2, is_resident=lambda key: key.expert == 0, copy_s_per_expert=0.5,
                          max_tasks=5)
    routing = np.array([[[1, 2], [0, 3]]])  # one token: layer 0 -> experts 1, 2; layer 1 -> 0, 3
    for i in range(10_000):
        predictor.observe_request(f"task-{i}", routing)
        assert cost.load_seconds(f"task-{i}") == 3 * 0.5  # experts 1, 2 and 3 are not resident
    assert predictor.num_tasks == 5 and cost.num_tasks == 5
    assert predictor.predict("task-9999", 2) == {0: [1, 2], 1: [0, 3]}
    assert predictor.predict("task-0", 2) == {}  # aged out
