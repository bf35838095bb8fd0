"""An MoE layer's router: hidden states -> each token's top-k experts and their weights.

Softmax or sigmoid scores, or (gpt-oss) a softmax over the top-k logits only, the router's linear
optionally biased; optionally group-limited (only the best `topk_groups` of
`num_groups` expert groups compete) with a correction bias that steers the choice but not the
weights (DeepSeek-V3); renormalised and scaled as the spec says. Plain softmax top-k runs in
one C call on the CPU (`cpu_kernels.route`); everything else in torch.
"""

from __future__ import annotations

import torch

from moe_serve.engine.model.cpu_kernels import Routing, linear
from moe_serve.engine.model.cpu_kernels import route as route_kernel
from moe_serve.engine.model.packed import Matrix
from moe_serve.engine.model.spec import GroupScoring, RouterScoring, RoutingSpec


def _choose(spec: RoutingSpec, scores: torch.Tensor, bias: torch.Tensor | None, top_k: int) -> torch.Tensor:
    """Top-k expert ids [T, A] from fp32 scores [T, E] (bias-corrected, group-limited)."""
    choice = scores if bias is None else scores + bias
    if spec.num_groups > 1:
        tokens, experts = choice.shape
        grouped = choice.view(tokens, spec.num_groups, experts // spec.num_groups)
        if spec.group_scoring is GroupScoring.MAX:
            group_scores = grouped.max(dim=-1).values
        else:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        kept = torch.topk(group_scores, spec.topk_groups, dim=-1).indices  # [T, G kept]
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        choice = choice.masked_fill(~mask.repeat_interleave(experts // spec.num_groups, dim=1), float("-inf"))
    return torch.topk(choice, top_k, dim=-1).indices


def route(spec: RoutingSpec, num_experts: int, top_k: int, router: Matrix, bias: torch.Tensor | None,
          x: torch.Tensor, override: torch.Tensor | None = None) -> Routing:
    """x [T, D] -> the top-k experts of each token and their weights, grouped by expert. With an
    override [T, A] the ids come from it and the weights are the router's at those ids. Weights
    are rounded to x's dtype like the reference models unless the spec keeps them in fp32."""
    logits = linear(x.float() if spec.in_fp32 else x, router, bias if spec.logit_bias else None)  # [T, E]
    if spec.is_plain_softmax:
        routing = route_kernel(logits, top_k, spec.norm_topk_prob, x.dtype, override)
        if routing is not None:
            return routing
    choice_bias = bias if spec.correction_bias else None
    if spec.scoring is RouterScoring.SOFTMAX_OF_TOPK:
        ids = torch.topk(logits, top_k, dim=-1).indices if override is None else override.to(x.device, torch.long)
        weights = torch.softmax(logits.gather(1, ids).float(), dim=-1)
        return _grouped(spec, ids, weights, num_experts, top_k, x.dtype)
    if spec.scoring is RouterScoring.SOFTMAX:
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
    else:
        scores = torch.sigmoid(logits.float())
    if override is None:
        ids = _choose(spec, scores, choice_bias, top_k)
    else:
        ids = override.to(device=x.device, dtype=torch.long)
    weights = scores.gather(1, ids)
    if spec.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if spec.scaling_factor != 1.0:
        weights = weights * spec.scaling_factor
    return _grouped(spec, ids, weights, num_experts, top_k, x.dtype)


def _grouped(spec: RoutingSpec, ids: torch.Tensor, weights: torch.Tensor, num_experts: int, top_k: int,
             dtype: torch.dtype) -> Routing:
    """ids, fp32 weights [T, A] -> the Routing grouped by expert (weights rounded to `dtype` unless kept fp32)."""
    if spec.round_weights:
        weights = weights.to(dtype).float()
    flat_ids = ids.flatten()  # [T * A]
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    return Routing(ids, counts, order, order // top_k, weights.flatten()[order])
