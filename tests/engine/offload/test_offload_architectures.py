"""Dense layers between MoE layers and the newer architectures through the offload path.

Greedy tokens with offloading (half the experts, the minimum cache, each prefetcher, bf16) equal
the all-resident run, and the recorded routing (MoE layers only) is transformers' routing.
Expert keys, caches, speculators and traces count MoE layers only (dense layers have no experts).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_serve.engine.builder import build_engine
from moe_serve.engine.config import EngineConfig
from moe_serve.engine.core.request import EngineRequest
from moe_serve.engine.core.sampling_params import SamplingParams
from moe_serve.engine.offload.provider import OffloadedExperts
from moe_serve.engine.traces.trace_file import load_trace
from tests.helpers import MIN_FRACTION, NEW_ARCHITECTURES, hf_model, run_to_completion, run_workload, workload

# each with 4 MoE layers of 8 experts: the minimum cache (one layer) is a quarter of the experts
# (gpt-oss has no dense layer: 4 layers, sliding-window and full attention alternating)
CHECKPOINTS = {"qwen2_moe-dense-yarn": {},
               **{arch: {"num_hidden_layers": 4 if arch == "gpt_oss" else 5} for arch in NEW_ARCHITECTURES}}
NUM_MOE_LAYERS = 4


@pytest.fixture(scope="module")
def reference(checkpoint_factory):
    """name -> (checkpoint, the all-resident tokens of the workload), each computed once."""
    made: dict[str, tuple] = {}

    def get(name: str, dtype: str = "float32") -> tuple:
        if (name, dtype) not in made:
            path = checkpoint_factory(name, **CHECKPOINTS[name])
            tokens, engine = run_workload(path, offload="off", dtype=dtype)
            assert engine.runner.model.spec.num_moe_layers == NUM_MOE_LAYERS
            made[name, dtype] = path, tokens
        return made[name, dtype]

    return get


@pytest.mark.parametrize("fraction", [0.5, MIN_FRACTION])
@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_offloaded_greedy_tokens_equal_the_all_resident_run(reference, name: str, fraction: float) -> None:
    path, expected = reference(name)
    tokens, engine = run_workload(path, expert_cache_fraction=fraction, prefetch="none")
    experts = engine.runner.model.experts
    assert isinstance(experts, OffloadedExperts)
    assert tokens == expected
    stats = experts.cache.stats()
    assert sum(stats.evictions.values()) > 0
    assert set(stats.misses) == set(range(NUM_MOE_LAYERS))  # keyed by MoE layer
    experts.cache.check_invariants()


def test_the_shared_expert_runs_while_the_misses_copy(reference) -> None:
    """A layer computes its shared expert after its misses start loading and before it first waits for one
    (the copies overlap it); the tokens stay the all-resident run's."""
    path, expected = reference("qwen2_moe-dense-yarn")
    engine = build_engine(EngineConfig(model=str(path), dtype="float32", max_num_batched_tokens=16, prefetch="none",
                                       offload="on", expert_cache_fraction=MIN_FRACTION, expert_link_gbps=0.02,
                                       miss_handling="copy"), show_progress=False)
    model, experts = engine.runner.model, engine.runner.model.experts
    assert isinstance(experts, OffloadedExperts)
    events: list[str] = []

    def recording(name: str, method):
        def record(*args, **kwargs):
            events.append(name)
            return method(*args, **kwargs)
        return record

    model._shared = recording("shared", model._shared)
    experts.fetch = recording("fetch", experts.fetch)
    experts.cache.wait = recording("wait", experts.cache.wait)
    assert run_to_completion(engine, workload()) == expected
    assert events.count("wait") > 0
    since_fetch: list[str] = []
    for event in events:
        if event == "fetch":
            since_fetch = []
        elif event == "wait":
            assert "shared" in since_fetch, "a layer waited for a copy before computing its shared expert"
        since_fetch.append(event)


@pytest.mark.parametrize("prefetch", ["next_layer", "affinity", "logistic"])
def test_prefetch_across_dense_layers_keeps_the_all_resident_tokens(reference, prefetch: str) -> None:
    """Speculators see MoE layers only: layer l's guesses are for the next MoE layer, past a dense one."""
    path, expected = reference("qwen2_moe-dense-yarn")
    tokens, engine = run_workload(path, expert_cache_fraction=MIN_FRACTION, prefetch=prefetch, prefetch_margin=2,
                         prefetch_min_score=0.0)
    stats = engine.runner.model.experts.cache.stats()
    assert tokens == expected
    assert stats.prefetch_issued > 0 and stats.prefetch_used > 0


@pytest.mark.parametrize("name", NEW_ARCHITECTURES)
def test_bf16_offloading_with_prefetch_keeps_the_bf16_all_resident_tokens(reference, name: str) -> None:
    """bf16 activations with fp32 routers, in the model and in the router speculator."""
    path, expected = reference(name, "bfloat16")
    tokens, engine = run_workload(path, expert_cache_fraction=MIN_FRACTION, prefetch="next_layer", dtype="bfloat16")
    stats = engine.runner.model.experts.cache.stats()
    assert tokens == expected
    assert sum(stats.evictions.values()) > 0 and stats.prefetch_issued > 0


def _transformers_routing(model, token_ids: list[int]) -> np.ndarray:
    """[T, MoE layers, A] expert ids transformers' routers pick (captured at each experts module)."""
    picked: list[torch.Tensor] = []
    hooks = [module.register_forward_pre_hook(lambda _, args: picked.append(args[1].reshape(len(token_ids), -1)))
             for name, module in model.named_modules() if name.endswith("mlp.experts")]
    try:
        with torch.no_grad():
            model(torch.tensor([token_ids]))
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(picked, dim=1).numpy()


@pytest.mark.parametrize("name", ["qwen2_moe-dense-yarn", "deepseek_v3"])
def test_recorded_routing_is_transformers_routing(name: str, checkpoint_factory, tmp_path) -> None:
    """Traces hold MoE layers only (interleaved dense layers skipped), each as transformers routes."""
    path = checkpoint_factory(name, **CHECKPOINTS[name])
    engine = build_engine(EngineConfig(model=str(path), dtype="float32", record_trace=str(tmp_path),
                                       expert_cache_fraction=0.5, max_num_batched_tokens=16), show_progress=False)
    prompt = list(range(30, 52))
    tokens = run_to_completion(engine, {0: [EngineRequest("r", prompt, SamplingParams(
        max_tokens=6, temperature=0.0, ignore_eos=True))]})["r"]
    engine.close()
    trace = load_trace(next(tmp_path.glob("*.npz")))
    assert trace.num_layers == NUM_MOE_LAYERS
    expected = _transformers_routing(hf_model(path), prompt + tokens[:-1])
    assert np.array_equal(np.sort(trace.expert_ids, axis=-1), np.sort(expected, axis=-1))
