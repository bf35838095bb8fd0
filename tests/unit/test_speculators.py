"""Next-layer speculators (router on the hidden state, inter-layer affinity) and trace-replayed routing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.builder import build_engine
from engine.config import EngineConfig
from engine.predictors import AffinityPredictor
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams
from engine.speculators import AffinitySpeculator, RouterSpeculator
from engine.trace_routing import TraceRouter
from engine.traces import RoutingTrace
from tests.helpers import run_to_completion


def test_affinity_speculator_is_silent_until_it_has_learned_then_follows_co_activation() -> None:
    speculator = AffinitySpeculator(AffinityPredictor(num_layers=3, num_experts=8), width=2, min_score=0.5)
    x = torch.zeros(1, 4)
    layer0, layer1, layer2 = torch.tensor([[0, 1]]), torch.tensor([[2, 3]]), torch.tensor([[4, 5]])
    assert speculator(0, x, layer0) == []  # nothing learned yet: no score clears 0.5
    assert speculator(1, x, layer1) == []  # learns (0 -> 1) now; (1 -> 2) still unseen
    assert speculator(2, x, layer2) == []  # last layer: nothing to prefetch, learns (1 -> 2)
    assert sorted(speculator(0, x, layer0)) == [2, 3]
    assert sorted(speculator(1, x, layer1)) == [4, 5]


def test_affinity_speculator_drops_guesses_below_the_score_and_caps_the_batch_union() -> None:
    predictor = AffinityPredictor(num_layers=2, num_experts=8)
    # expert 0 at layer 0 is followed by {1, 2} three times out of four and by {6, 7} once
    predictor.observe_layer(0, np.array([[0], [0], [0], [0]]), np.array([[1, 2], [1, 2], [1, 2], [6, 7]]))
    strict = AffinitySpeculator(predictor, width=4, min_score=0.5, learn=False)
    assert sorted(strict(0, torch.zeros(1, 4), torch.tensor([[0]]))) == [1, 2]
    loose = AffinitySpeculator(predictor, width=4, min_score=0.0, learn=False)
    assert sorted(loose(0, torch.zeros(1, 4), torch.tensor([[0]]))) == [1, 2, 6, 7]
    assert len(loose(0, torch.zeros(3, 4), torch.tensor([[0], [0], [0]]))) <= 4  # cap: half of 8 experts


def test_router_speculator_names_the_next_routers_top_choices() -> None:
    routers = [torch.eye(4), torch.tensor([[0.0, 0, 0, 0], [9, 0, 0, 0], [0, 9, 0, 0], [0, 0, 0, 0]])]
    speculator = RouterSpeculator(routers, top_k=1, margin=0)
    assert speculator(0, torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([[0]])) == [1]
    assert speculator(0, torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]), torch.tensor([[0], [1]])) == [1, 2]
    assert speculator(1, torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([[0]])) == []  # no layer after the last


def synthetic_trace(num_layers: int = 2, num_experts: int = 8, top_k: int = 2) -> RoutingTrace:
    gen = np.random.default_rng(0)
    lengths = [30, 25, 40]
    ids = np.stack([np.stack([gen.choice(num_experts, top_k, replace=False) for _ in range(num_layers)])
                    for _ in range(sum(lengths))]).astype(np.uint8)
    return RoutingTrace(expert_ids=ids, offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                        prompt_ids=np.arange(len(lengths), dtype=np.int32), num_experts=num_experts)


def test_trace_router_makes_the_engine_route_as_the_trace_says(checkpoint_factory) -> None:
    trace = synthetic_trace()
    engine = build_engine(EngineConfig(model=str(checkpoint_factory("mixtral")), dtype="float32",
                                       max_num_batched_tokens=16), show_progress=False)
    spec = engine.runner.model.spec
    engine.runner.replay_routing(TraceRouter(trace, spec.num_layers, spec.num_experts, spec.top_k))
    seen: list[tuple[int, torch.Tensor]] = []
    engine.runner.model.routing_observer = lambda layer, ids: seen.append((layer, ids.clone()))
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    run_to_completion(engine, {0: [EngineRequest("a", list(range(5, 25)), params)],
                               1: [EngineRequest("b", list(range(40, 43)), params)]})
    per_layer = [torch.cat([ids for layer, ids in seen if layer == l]) for l in range(spec.num_layers)]
    # request a replays prompt 0 (rows 0..25: 20 prompt + 5 decode tokens computed), b prompt 1 (rows 30..37)
    routed = torch.stack(per_layer, dim=1).sort(dim=-1).values  # [tokens, L, K] in step order
    expected_rows = {tuple(r) for r in np.sort(trace.expert_ids[list(range(0, 25)) + list(range(30, 38))], -1)
                     .reshape(33, -1).tolist()}
    assert {tuple(r) for r in routed.reshape(len(routed), -1).tolist()} == expected_rows
    assert len(routed) == 33


def test_trace_router_refuses_a_trace_of_another_geometry() -> None:
    trace = synthetic_trace(num_layers=2, num_experts=8, top_k=2)
    with pytest.raises(ValueError, match="routes to 2 experts"):
        TraceRouter(trace, num_layers=2, num_experts=8, top_k=4)
    with pytest.raises(ValueError, match="only 4"):
        TraceRouter(trace, num_layers=2, num_experts=4, top_k=2)
    with pytest.raises(ValueError, match="do not fit"):
        TraceRouter(trace, num_layers=3, num_experts=8, top_k=2)
