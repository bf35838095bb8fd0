"""Sampler against straightforward reference implementations."""

from __future__ import annotations

import pytest
import torch

from engine.sampler import Sampler
from engine.sampling_params import SamplingParams

V = 50


def run(logits, params, prompts=None, outputs=None, gens=None, eos=frozenset()):
    n = len(params)
    return Sampler(V)(logits, params, prompts or [[]] * n, outputs or [[]] * n, gens or [None] * n, eos)


def test_greedy_is_argmax() -> None:
    logits = torch.randn(4, V)
    out = run(logits, [SamplingParams(temperature=0.0)] * 4)
    assert out.token_ids == logits.argmax(-1).tolist()


def test_penalties_match_reference() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, V)
    prompt, output = [1, 2, 3], [3, 3, 7]
    p = SamplingParams(temperature=0.0, repetition_penalty=1.7, presence_penalty=0.5, frequency_penalty=0.3)
    expected = logits[0].clone()
    for t in {1, 2, 3, 7}:
        expected[t] = expected[t] / 1.7 if expected[t] > 0 else expected[t] * 1.7
    for t in set(output):
        expected[t] -= 0.3 * output.count(t) + 0.5
    assert run(logits, [p], [prompt], [output]).token_ids == [int(expected.argmax())]
    # a huge frequency penalty forbids the repeated token
    logits = torch.zeros(1, V)
    logits[0, 5] = 10.0
    banned = SamplingParams(temperature=0.0, frequency_penalty=2.0, presence_penalty=2.0)
    assert run(logits, [banned], [[]], [[5] * 5]).token_ids != [5]


def test_min_tokens_masks_eos_and_stop_token_ids() -> None:
    logits = torch.zeros(1, V)
    logits[0, 9] = 100.0
    logits[0, 8] = 50.0
    p = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[8])
    assert run(logits, [p], outputs=[[1]], eos=frozenset({9})).token_ids[0] not in (8, 9)
    assert run(logits, [p], outputs=[[1, 2]], eos=frozenset({9})).token_ids == [9]


def test_top_k_and_top_p_keep_the_right_support() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0] + [-10.0] * (V - 4)])
    gen = torch.Generator().manual_seed(0)
    k2 = {run(logits, [SamplingParams(temperature=1.0, top_k=2)], gens=[gen]).token_ids[0] for _ in range(200)}
    assert k2 == {0, 1}
    probs = torch.softmax(logits[0], -1)
    top_p = float(probs[0] + probs[1]) - 1e-4  # needs token 0 and token 1
    sampled = {run(logits, [SamplingParams(temperature=1.0, top_p=top_p)], gens=[gen]).token_ids[0] for _ in range(300)}
    assert sampled == {0, 1}


def test_seeded_rows_do_not_depend_on_batch_position() -> None:
    torch.manual_seed(1)
    logits = torch.randn(3, V)
    p = SamplingParams(temperature=1.0, seed=7)
    solo = run(logits[1:2], [p], gens=[torch.Generator().manual_seed(7)]).token_ids[0]
    others = SamplingParams(temperature=1.0)
    batch = run(logits, [others, p, others], gens=[None, torch.Generator().manual_seed(7), None]).token_ids
    assert batch[1] == solo


def test_logprobs_are_raw_log_softmax_with_sorted_top_n() -> None:
    logits = torch.randn(2, V)
    out = run(logits, [SamplingParams(temperature=0.0, logprobs=3), SamplingParams(temperature=0.0)])
    ref = torch.log_softmax(logits[0], -1)
    lp = out.logprobs[0]
    assert lp is not None and out.logprobs[1] is None
    assert lp.logprob == pytest.approx(float(ref[lp.token_id]))
    assert [t for t, _ in lp.top] == torch.topk(ref, 3).indices.tolist()
    assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", 2.5), ("top_p", 0.0), ("max_tokens", 0), ("presence_penalty", 3.0), ("top_k", -5),
     ("repetition_penalty", 0.0), ("logprobs", 21), ("stop", [""])],
)
def test_validate_names_the_field(field: str, value) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value}).validate()


def test_top_k_minus_one_means_off() -> None:
    p = SamplingParams(top_k=-1)
    p.validate()
    assert p.top_k == 0
