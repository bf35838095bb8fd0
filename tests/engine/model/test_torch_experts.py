"""The torch path's batched experts and device routing against plain per-expert torch references."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from moe_serve.engine.model.quant import MODEL_DTYPE
from moe_serve.engine.model.router import _grouped, _top_k, route_on_device
from moe_serve.engine.model.spec import ExpertActivation, ExpertMLPSpec, GroupScoring, RouterScoring, RoutingSpec
from moe_serve.engine.model.torch_experts import ExpertLayout, batched_experts

HIDDEN, FFN, EXPERTS, TOP_K = 24, 10, 16, 4


def random_experts(biases: bool, generator: torch.Generator) -> dict[int, tuple[torch.Tensor, ...]]:
    experts = {}
    for e in range(EXPERTS):
        tensors = [torch.randn(2 * FFN, HIDDEN, generator=generator), torch.randn(HIDDEN, FFN, generator=generator)]
        if biases:
            tensors += [torch.randn(2 * FFN, generator=generator), torch.randn(HIDDEN, generator=generator)]
        experts[e] = tuple(tensors)
    return experts


def reference(spec: ExpertMLPSpec, experts: dict, x: torch.Tensor, ids: torch.Tensor,
              weights: torch.Tensor) -> torch.Tensor:
    """Each (token, slot) through its expert one at a time, summed over the slots in order."""
    out = torch.zeros(x.shape[0], ids.shape[1], HIDDEN, dtype=torch.float64)
    for t in range(x.shape[0]):
        for slot in range(ids.shape[1]):
            gate_up, down, *biases = (w.double() for w in experts[int(ids[t, slot])])
            gate, up = F.linear(x[t].double(), gate_up, biases[0] if biases else None).chunk(2)
            if spec.activation is ExpertActivation.CLAMPED_SWIGLU:
                gate, up = gate.clamp(max=spec.swiglu_limit), up.clamp(-spec.swiglu_limit, spec.swiglu_limit)
                hidden = (up + 1) * gate * torch.sigmoid(gate * spec.swiglu_alpha)
            else:
                hidden = F.silu(gate) * up
            out[t, slot] = F.linear(hidden, down, biases[1] if biases else None) * weights[t, slot].double()
    return out.sum(dim=1)


def random_routing(tokens: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.stack([torch.randperm(EXPERTS, generator=generator)[:TOP_K] for _ in range(tokens)])
    return ids, torch.rand(tokens, TOP_K, generator=generator)


SPECS = [ExpertMLPSpec(), ExpertMLPSpec(activation=ExpertActivation.CLAMPED_SWIGLU, biases=True, swiglu_limit=0.5,
                                        swiglu_alpha=1.5)]


@pytest.mark.parametrize("spec", SPECS, ids=["swiglu", "clamped-biased"])
@pytest.mark.parametrize("tokens", [1, 3, 16])
def test_batched_experts_match_a_per_expert_reference(spec: ExpertMLPSpec, tokens: int) -> None:
    generator = torch.Generator().manual_seed(tokens)
    experts = random_experts(spec.biases, generator)
    x = torch.randn(tokens, HIDDEN, generator=generator)
    ids, weights = random_routing(tokens, generator)
    layout = ExpertLayout.from_ids(ids)
    if tokens == 1:  # slot order, no index tensors
        assert layout.needed == ids[0].tolist() and layout.gather is None and layout.inverse is None
    else:
        assert layout.needed == sorted(set(ids.flatten().tolist()))
    assert layout.counts == [ids.flatten().tolist().count(e) for e in layout.needed]
    groups = [[(e, experts[e]) for e in layout.needed]]
    out = batched_experts(spec, layout, x, weights, iter(groups), MODEL_DTYPE, FFN)
    torch.testing.assert_close(out.double(), reference(spec, experts, x, ids, weights), rtol=1e-5, atol=1e-4)


def test_the_result_does_not_depend_on_how_the_experts_arrive() -> None:
    generator = torch.Generator().manual_seed(5)
    experts = random_experts(False, generator)
    x = torch.randn(8, HIDDEN, generator=generator)
    ids, weights = random_routing(8, generator)
    layout = ExpertLayout.from_ids(ids)
    whole = batched_experts(SPECS[0], layout, x, weights, iter([[(e, experts[e]) for e in layout.needed]]),
                            MODEL_DTYPE, FFN)
    shuffled = list(layout.needed)
    random.Random(0).shuffle(shuffled)
    groups = [[(e, experts[e])] for e in shuffled[:3]] + [[(e, experts[e]) for e in shuffled[3:]]]
    assert torch.equal(batched_experts(SPECS[0], layout, x, weights, iter(groups), MODEL_DTYPE, FFN), whole)


def test_one_token_routed_twice_to_an_expert_takes_the_general_layout() -> None:
    generator = torch.Generator().manual_seed(9)
    experts = random_experts(False, generator)
    x = torch.randn(1, HIDDEN, generator=generator)
    ids, weights = torch.tensor([[3, 5, 3, 0]]), torch.rand(1, TOP_K, generator=generator)  # a replayed trace's row
    layout = ExpertLayout.from_ids(ids)
    assert layout.needed == [0, 3, 5] and layout.counts == [1, 2, 1] and layout.inverse is not None
    out = batched_experts(SPECS[0], layout, x, weights, iter([[(e, experts[e]) for e in layout.needed]]),
                          MODEL_DTYPE, FFN)
    torch.testing.assert_close(out.double(), reference(SPECS[0], experts, x, ids, weights), rtol=1e-5, atol=1e-4)


def test_bf16_experts_sum_in_fp32_and_round_once() -> None:
    generator = torch.Generator().manual_seed(6)
    experts = {e: tuple(t.bfloat16() for t in tensors) for e, tensors in random_experts(False, generator).items()}
    x = torch.randn(4, HIDDEN, generator=generator).bfloat16()
    ids, weights = random_routing(4, generator)
    layout = ExpertLayout.from_ids(ids)
    out = batched_experts(SPECS[0], layout, x, weights, iter([[(e, experts[e]) for e in layout.needed]]),
                          MODEL_DTYPE, FFN)
    assert out.dtype is torch.bfloat16
    expected = reference(SPECS[0], experts, x, ids, weights)
    torch.testing.assert_close(out.double(), expected, rtol=3e-2, atol=3e-2 * float(expected.abs().max()))


ROUTINGS = {
    "softmax": RoutingSpec(),
    "softmax-renormalised": RoutingSpec(norm_topk_prob=True),
    "sigmoid-corrected-grouped": RoutingSpec(scoring=RouterScoring.SIGMOID, correction_bias=True, num_groups=4,
                                             topk_groups=2, group_scoring=GroupScoring.TOP2_SUM,
                                             scaling_factor=2.5, round_weights=False),
    "softmax-of-topk": RoutingSpec(scoring=RouterScoring.SOFTMAX_OF_TOPK, logit_bias=True),
}


@pytest.mark.parametrize("name", ROUTINGS)
def test_device_routing_equals_the_grouped_routing(name: str) -> None:
    spec = ROUTINGS[name]
    generator = torch.Generator().manual_seed(7)
    router, bias = torch.randn(EXPERTS, HIDDEN, generator=generator), torch.randn(EXPERTS, generator=generator)
    x = torch.randn(6, HIDDEN, generator=generator).bfloat16()
    ids, weights = route_on_device(spec, TOP_K, router.bfloat16(), bias.bfloat16(), x)
    assert ids.shape == weights.shape == (6, TOP_K)
    assert weights.dtype is (torch.bfloat16 if spec.round_weights else torch.float32)
    weights = weights.float()
    logits = F.linear(x, router.bfloat16(), bias.bfloat16() if spec.logit_bias else None)
    scores = logits.float().softmax(-1) if spec.scoring is RouterScoring.SOFTMAX else None
    if scores is not None:  # the plain choice: the best scores, renormalised, rounded to bf16
        best, best_ids = scores.topk(TOP_K, dim=-1)
        if spec.norm_topk_prob:
            best = best / best.sum(-1, keepdim=True)
        assert torch.equal(ids, best_ids)
        torch.testing.assert_close(weights, best.bfloat16().float(), rtol=8e-3, atol=0)  # one bf16 rounding apart
    grouped = _grouped(*_top_k(spec, TOP_K, logits, bias.bfloat16(), x, None), EXPERTS, TOP_K)
    assert torch.equal(grouped.ids, ids)
    assert torch.equal(grouped.scale, weights.flatten()[grouped.order])


def test_an_override_routes_as_recorded_with_the_routers_weights() -> None:
    generator = torch.Generator().manual_seed(8)
    router = torch.randn(EXPERTS, HIDDEN, generator=generator)
    x = torch.randn(3, HIDDEN, generator=generator)
    override = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [15, 14, 13, 12]])
    ids, weights = route_on_device(RoutingSpec(norm_topk_prob=False), TOP_K, router, None, x, override)
    assert torch.equal(ids, override)
    torch.testing.assert_close(weights, F.linear(x, router).softmax(-1).gather(1, override))
