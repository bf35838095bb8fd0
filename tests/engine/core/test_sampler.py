"""Sampler against straightforward reference implementations."""

from __future__ import annotations

import pytest
import torch

from moe_serve.engine.core.sampler import Sampler
from moe_serve.engine.core.sampling_params import (
    MAX_REPETITION_PENALTY,
    MIN_REPETITION_PENALTY,
    MIN_TEMPERATURE,
    SamplingParams,
)
from moe_serve.engine.errors import InvalidParameter, InvalidRequestError

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
     ("repetition_penalty", 0.0), ("logprobs", 21), ("stop", [""]), ("frequency_penalty", -2.5),
     ("min_tokens", 17), ("stop_token_ids", [-1]), ("seed", -(2**63) - 1)],
)
def test_validate_names_the_field(field: str, value) -> None:
    with pytest.raises(ValueError, match=field) as info:
        SamplingParams(**{field: value}).validate()
    # the field travels as data: an InvalidParameter, which is also the engine's InvalidRequestError
    assert isinstance(info.value, InvalidParameter) and isinstance(info.value, InvalidRequestError)
    assert info.value.param == field and info.value.code == "invalid_value"


def test_top_k_minus_one_means_off() -> None:
    p = SamplingParams(top_k=-1)
    p.validate()
    assert p.top_k == 0


def reference_penalised(logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    """Straightforward per-token loops: HF repetition penalty, then OpenAI presence/frequency."""
    row = logits.clone()
    for t in set(prompt) | set(output):
        row[t] = row[t] / p.repetition_penalty if row[t] > 0 else row[t] * p.repetition_penalty
    for t in set(output):
        row[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return row


def test_batched_penalties_match_reference_per_row() -> None:
    torch.manual_seed(3)
    logits = torch.randn(6, V) * 3
    rng = torch.Generator().manual_seed(4)
    params, prompts, outputs = [], [], []
    for _ in range(6):
        params.append(SamplingParams(
            temperature=0.0,
            repetition_penalty=float(torch.rand(1, generator=rng)) * 2 + 0.5,
            presence_penalty=float(torch.rand(1, generator=rng)) * 4 - 2,
            frequency_penalty=float(torch.rand(1, generator=rng)) * 4 - 2,
        ))
        prompts.append(torch.randint(0, V, (12,), generator=rng).tolist())
        outputs.append(torch.randint(0, V, (9,), generator=rng).tolist())
    out = run(logits, params, prompts, outputs).token_ids
    expected = [int(reference_penalised(logits[i], params[i], prompts[i], outputs[i]).argmax()) for i in range(6)]
    assert out == expected


def test_min_tokens_masks_eos_even_with_ignore_eos() -> None:
    logits = torch.zeros(2, V)
    logits[:, 9] = 100.0
    p = SamplingParams(temperature=1.0, min_tokens=3, ignore_eos=True)
    out = run(logits, [p, p], outputs=[[1], [1, 2, 3]], eos=frozenset({9}))
    assert out.token_ids[0] != 9 and out.token_ids[1] == 9


def test_half_precision_logits_are_upcast() -> None:
    logits = torch.randn(3, V)
    out = run(logits.to(torch.bfloat16), [SamplingParams(temperature=0.0, logprobs=2)] * 3)
    assert out.token_ids == logits.to(torch.bfloat16).float().argmax(-1).tolist()
    assert all(lp is not None and len(lp.top) == 2 for lp in out.logprobs)


def test_logprobs_zero_gives_no_alternatives_and_ignore_penalties() -> None:
    logits = torch.randn(1, V)
    p = SamplingParams(temperature=0.0, logprobs=0, repetition_penalty=2.0, frequency_penalty=1.0)
    out = run(logits, [p], [[0, 1, 2]], [[3, 3]])
    lp = out.logprobs[0]
    assert lp is not None and lp.top == []
    assert lp.logprob == pytest.approx(float(torch.log_softmax(logits[0], -1)[lp.token_id]))


@pytest.mark.parametrize("vocab", [V, 4000])
def test_top_p_support_matches_a_full_sort_reference(vocab: int) -> None:
    """Flat rows (nucleus beyond the candidate set, full-sort path) and peaked rows (candidate path)."""
    torch.manual_seed(5)
    logits = torch.cat([torch.randn(1, vocab) * 0.3, torch.randn(1, vocab) * 6])
    sampler = Sampler(vocab)
    for row in range(2):
        for top_p, top_k in [(0.5, 0), (0.8, 0), (0.7, 40)]:
            p = SamplingParams(temperature=1.0, top_p=top_p, top_k=top_k)
            ref = logits[row].clone()
            if top_k:
                ref[ref < torch.topk(ref, top_k).values[-1]] = float("-inf")
            probs, order = torch.sort(torch.softmax(ref, -1), descending=True)
            allowed = set(order[: int(((torch.cumsum(probs, 0) - probs) < top_p).sum())].tolist())
            gen = torch.Generator().manual_seed(row)
            for _ in range(60):
                token = sampler(logits[row : row + 1], [p], [[]], [[]], [gen], frozenset()).token_ids[0]
                assert token in allowed


def test_sampling_frequencies_follow_the_tempered_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0] + [-30.0] * (V - 4)])
    p = SamplingParams(temperature=0.5)
    gen = torch.Generator().manual_seed(11)
    n = 4000
    counts = torch.bincount(torch.tensor([run(logits, [p], gens=[gen]).token_ids[0] for _ in range(n)]), minlength=V)
    expected = torch.softmax(logits[0] / 0.5, -1) * n
    assert counts[4:].sum() == 0
    assert torch.all((counts[:4] - expected[:4]).abs() <= 4 * expected[:4].sqrt() + 5)


@pytest.mark.parametrize("extra", [{}, {"top_k": 5}, {"top_p": 0.6}, {"top_p": 0.99, "top_k": 30}])
def test_seeded_rows_are_batch_independent_across_steps(extra: dict) -> None:
    torch.manual_seed(8)
    steps = [torch.randn(4, V) for _ in range(10)]
    p = SamplingParams(temperature=0.9, seed=3, **extra)
    noise = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_p=0.5)]
    solo_gen, batch_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    solo, batched = [], []
    for logits in steps:
        solo.append(run(logits[2:3], [p], gens=[solo_gen]).token_ids[0])
        batch = run(logits, [noise[0], noise[1], p, noise[2]], gens=[None, None, batch_gen, None]).token_ids
        batched.append(batch[2])
    assert solo == batched
    assert len(set(solo)) > 1


def test_out_of_vocabulary_prompt_ids_are_ignored_by_penalties() -> None:
    logits = torch.randn(1, V)
    p = SamplingParams(temperature=0.0, repetition_penalty=1.5)
    assert run(logits, [p], [[V + 5, 1]], [[]]).token_ids == [int(reference_penalised(logits[0], p, [1], []).argmax())]


def test_seed_outside_the_generator_range_is_rejected() -> None:
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=2**64).validate()
    SamplingParams(seed=2**64 - 1).validate()


@pytest.mark.parametrize("temperature", [1e-45, 1e-300, 5e-6])
def test_a_temperature_below_the_epsilon_is_greedy(temperature: float) -> None:
    torch.manual_seed(5)
    logits = torch.randn(3, V) * 8
    params = [SamplingParams(temperature=temperature), SamplingParams(temperature=temperature, seed=7),
              SamplingParams(temperature=temperature, top_k=3, top_p=0.5)]
    out = run(logits, params, gens=[None, torch.Generator().manual_seed(7), None])
    assert out.errors == [None] * 3
    assert out.token_ids == logits.argmax(-1).tolist()


def test_a_temperature_just_above_the_epsilon_samples_finite_logits() -> None:
    logits = torch.randn(1, V) * 30
    out = run(logits, [SamplingParams(temperature=MIN_TEMPERATURE)], gens=[torch.Generator().manual_seed(0)])
    assert out.errors == [None] and 0 <= out.token_ids[0] < V


@pytest.mark.parametrize("penalty", [1e-45, 1e-300, 1e300, float("inf")])
def test_an_extreme_repetition_penalty_is_clamped_and_stays_finite(penalty: float) -> None:
    torch.manual_seed(6)
    logits = torch.randn(2, V) * 4
    prompt = list(range(0, V, 2))
    params = [SamplingParams(temperature=0.0, repetition_penalty=penalty),
              SamplingParams(temperature=1.0, repetition_penalty=penalty)]
    out = run(logits, params, [prompt, prompt], [[1], [1]], gens=[None, torch.Generator().manual_seed(1)])
    assert out.errors == [None, None]
    assert all(0 <= t < V for t in out.token_ids)
    clamped = SamplingParams(repetition_penalty=min(max(penalty, MIN_REPETITION_PENALTY), MAX_REPETITION_PENALTY))
    assert out.token_ids[0] == int(reference_penalised(logits[0], clamped, prompt, [1]).argmax())


@pytest.mark.parametrize("bad", ["nan", "posinf", "all_neginf"])
def test_a_non_finite_row_fails_alone_and_the_batch_goes_on(bad: str) -> None:
    torch.manual_seed(8)
    logits = torch.randn(4, V) * 3
    if bad == "nan":
        logits[1, 7] = float("nan")
    elif bad == "posinf":
        logits[1, 7] = float("inf")
    else:
        logits[1] = float("-inf")
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, logprobs=2),
              SamplingParams(temperature=1.0, seed=3, logprobs=1), SamplingParams(temperature=0.0, logprobs=0)]
    gens = [None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(3), None]
    out = run(logits, params, gens=gens)
    assert out.errors[1] is not None and "non-finite" in out.errors[1]
    assert out.token_ids[1] == -1 and out.logprobs[1] is None
    assert [out.errors[i] for i in (0, 2, 3)] == [None, None, None]
    assert out.token_ids[0] == int(logits[0].argmax()) and out.token_ids[3] == int(logits[3].argmax())
    alone = run(logits[2:3], [params[2]], gens=[torch.Generator().manual_seed(3)])
    assert out.token_ids[2] == alone.token_ids[0] and out.logprobs[2] == alone.logprobs[0]


def test_a_greedy_nan_row_is_reported_not_argmaxed() -> None:
    logits = torch.full((1, V), float("nan"))
    out = run(logits, [SamplingParams(temperature=0.0)])
    assert out.token_ids == [-1] and out.errors[0] is not None
