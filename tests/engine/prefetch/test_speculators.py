"""Next-layer speculators (router on the hidden state, inter-layer affinity) and trace-replayed routing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_serve.engine.builder import RoutingReplay, build_engine
from moe_serve.engine.config import EngineConfig
from moe_serve.engine.core.request import EngineRequest
from moe_serve.engine.core.sampling_params import SamplingParams
from moe_serve.engine.core.step import StepChunk, StepLayout
from moe_serve.engine.prefetch.logistic_predictor import LogisticPredictor
from moe_serve.engine.prefetch.predictors import AffinityPredictor
from moe_serve.engine.prefetch.speculators import AffinitySpeculator, LogisticSpeculator, RouterSpeculator
from moe_serve.engine.traces.trace_file import RoutingTrace, load_trace
from moe_serve.engine.traces.trace_router import TraceRouter
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


def layout(*chunks: tuple[str, int, int]) -> StepLayout:
    """A step of (sequence id, tokens, first position) chunks in row order."""
    out, row = [], 0
    for seq_id, count, start in chunks:
        out.append(StepChunk(seq_id, "default", start, range(row, row + count), prefill=count > 1))
        row += count
    return StepLayout(tuple(out))


def decode_steps(speculator: LogisticSpeculator, routing: list[list[list[int]]], seq_id: str = "s",
                 first: bool = True) -> list[list[list[int]]]:
    """Feed one sequence's tokens one step at a time ([T][L][K] routing); returns each step's guesses per layer."""
    x, guesses = torch.zeros(1, 4), []
    for index, token in enumerate(routing):
        start = 0 if first and index == 0 else 1 + index
        speculator.begin_step(layout((seq_id, 1, start)))
        guesses.append([sorted(speculator(layer, x, torch.tensor([ids]))) for layer, ids in enumerate(token)])
        speculator.end_step()
    return guesses


def carried_sequences(speculator: LogisticSpeculator, count: int, length: int,
                      seed: int) -> list[tuple[list[int], list[list[list[int]]]]]:
    """Decode `count` sequences: layer 0 random per token, layer 1 one random pair per sequence
    (so only the previous token predicts layer 1); returns each sequence's (pair, guesses per step)."""
    rng = np.random.default_rng(seed)
    out = []
    for index in range(count):
        pair = sorted(rng.choice(8, 2, replace=False).tolist())
        routing = [[sorted(rng.choice(8, 2, replace=False).tolist()), pair] for _ in range(length)]
        out.append((pair, decode_steps(speculator, routing, seq_id=f"s{index}")))
        speculator.forget(f"s{index}", completed=True)
    return out


def test_logistic_speculator_learns_online_to_repeat_the_previous_tokens_next_layer() -> None:
    predictor = LogisticPredictor(num_layers=2, num_experts=8, context_layers=1, top_k=2)
    speculator = LogisticSpeculator(predictor, width=2, min_probability=0.5, learning_rate=0.05)
    _, first_steps = carried_sequences(speculator, count=50, length=8, seed=0)[0]
    assert first_steps[0] == [[], []] and first_steps[1][0] == []  # starts silent (base rate 2/8)
    for pair, steps in carried_sequences(speculator, count=3, length=10, seed=1):
        assert steps[0][0] == []  # a prompt's first token: no previous token to go on
        assert all(step[0] == pair for step in steps[1:])  # then the previous token's layer 1
        assert all(step[1] == [] for step in steps)  # the last layer has no next layer


def test_logistic_speculator_knows_rows_sequences_and_forgets_finished_ones() -> None:
    predictor = LogisticPredictor(num_layers=2, num_experts=8, context_layers=1, top_k=2)
    speculator = LogisticSpeculator(predictor, width=2, min_probability=0.5, learning_rate=0.05)
    carried_sequences(speculator, count=50, length=8, seed=2)
    decode_steps(speculator, [[[0, 1], [5, 6]]], seq_id="s")  # "s" computed one token: layer 1 = [5, 6]
    x = torch.zeros(3, 4)
    # one step: a new sequence's 3-token prefill chunk, then "s" decoding. The chunk's first row starts
    # its prompt and its other rows' predecessors route at layer 1 only in this same pass: no guesses
    # from them; "s" remembers its last token's layer 1 across steps
    speculator.begin_step(layout(("new", 3, 0), ("s", 1, 1)))
    assert sorted(speculator(0, x.new_zeros(4, 4), torch.tensor([[0, 1], [2, 3], [4, 7], [0, 3]]))) == [5, 6]
    speculator(1, x.new_zeros(4, 4), torch.tensor([[1, 2], [1, 2], [1, 2], [5, 6]]))
    speculator.end_step()
    speculator.begin_step(layout(("new", 1, 3)))  # its last prefill row's layer 1 was [1, 2]
    assert sorted(speculator(0, x[:1], torch.tensor([[0, 3]]))) == [1, 2]
    speculator(1, x[:1], torch.tensor([[1, 2]]))
    speculator.end_step()
    speculator.forget("s", completed=True)
    speculator.begin_step(layout(("s", 1, 2)))
    assert speculator(0, x[:1], torch.tensor([[0, 3]])) == []


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


def test_trace_router_makes_the_engine_route_as_the_trace_says(checkpoint_factory, tmp_path) -> None:
    trace = synthetic_trace()
    engine = build_engine(EngineConfig(model=str(checkpoint_factory("mixtral")), dtype="float32",
                                       max_num_batched_tokens=16, record_trace=str(tmp_path)),
                          show_progress=False, replay=RoutingReplay(trace))
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    run_to_completion(engine, {0: [EngineRequest("a", list(range(5, 25)), params)],
                               1: [EngineRequest("b", list(range(40, 43)), params)]})
    engine.close()
    recorded = load_trace(next(tmp_path.glob("*.npz")))
    # request a replays prompt 0 (rows 0..25: 20 prompt + 5 decode tokens computed), b prompt 1 (rows 30..37)
    for request_id, rows in (("a", range(0, 25)), ("b", range(30, 38))):
        p = recorded.request_ids.index(request_id)
        routed = recorded.expert_ids[recorded.offsets[p] : recorded.offsets[p + 1]]
        assert np.array_equal(np.sort(routed, -1), np.sort(trace.expert_ids[list(rows)], -1))


def test_trace_router_refuses_a_trace_of_another_geometry() -> None:
    trace = synthetic_trace(num_layers=2, num_experts=8, top_k=2)
    with pytest.raises(ValueError, match="routes to 2 experts"):
        TraceRouter(trace, num_layers=2, num_experts=8, top_k=4)
    with pytest.raises(ValueError, match="only 4"):
        TraceRouter(trace, num_layers=2, num_experts=4, top_k=2)
    with pytest.raises(ValueError, match="do not fit"):
        TraceRouter(trace, num_layers=3, num_experts=8, top_k=2)
