"""An MoE layer's router: hidden states -> each token's top-k experts and their weights.

Softmax or sigmoid scores, or (gpt-oss) a softmax over the top-k logits only, the router's linear
optionally biased; optionally group-limited (only the best `topk_groups` of
`num_groups` expert groups compete) with a correction bias that steers the choice but not the
weights (DeepSeek-V3); renormalised and scaled as the spec says. Plain softmax top-k runs in
one C call on the CPU (`cpu_kernels.route`); everything else in torch. The torch path's
`route_on_device` keeps ids and weights on the device (nothing read on the host).
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
    ids, weights = _top_k(spec, top_k, logits, bias, x, override)
    return _grouped(ids, weights.float(), num_experts, top_k)


def route_on_device(spec: RoutingSpec, top_k: int, router: Matrix, bias: torch.Tensor | None, x: torch.Tensor,
                    override: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, D] -> each token's top-k expert ids [T, A] (int64) and weights [T, A], on x's device and
    without reading anything on the host (the torch path): in x's dtype (rounded like the reference
    models) unless the spec keeps them in fp32. Override as in `route`."""
    logits = linear(x.float() if spec.in_fp32 else x, router, bias if spec.logit_bias else None)  # [T, E]
    return _top_k(spec, top_k, logits, bias, x, override)


def _top_k(spec: RoutingSpec, top_k: int, logits: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor,
           override: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] of x -> ids [T, A] and weights [T, A] (see `route_on_device`)."""
    choice_bias = bias if spec.correction_bias else None
    if spec.scoring is RouterScoring.SOFTMAX_OF_TOPK:
        ids = torch.topk(logits, top_k, dim=-1).indices if override is None else override.to(x.device, torch.long)
        weights = torch.softmax(logits.gather(1, ids).float(), dim=-1)
    elif (spec.scoring is RouterScoring.SOFTMAX and spec.norm_topk_prob and override is None and choice_bias is None
          and spec.num_groups == 1):
        # renormalised softmax top-k is the softmax of the top-k logits: 2 ops instead of 4
        best, ids = torch.topk(logits, top_k, dim=-1)
        weights = torch.softmax(best, dim=-1, dtype=torch.float32)
        if spec.scaling_factor != 1.0:
            weights = weights * spec.scaling_factor
    else:
        if spec.scoring is RouterScoring.SOFTMAX:
            scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
        else:
            scores = torch.sigmoid(logits.float())
        if override is not None:
            ids = override.to(device=x.device, dtype=torch.long)
            weights = scores.gather(1, ids)
        elif choice_bias is None and spec.num_groups == 1:
            weights, ids = torch.topk(scores, top_k, dim=-1)  # the top scores are the weights: no gather
        else:
            ids = _choose(spec, scores, choice_bias, top_k)
            weights = scores.gather(1, ids)
        if spec.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if spec.scaling_factor != 1.0:
            weights = weights * spec.scaling_factor
    if spec.round_weights:
        weights = weights.to(x.dtype)
    return ids, weights


def _grouped(ids: torch.Tensor, weights: torch.Tensor, num_experts: int, top_k: int) -> Routing:
    """ids, fp32 weights [T, A] -> the Routing grouped by expert."""
    flat_ids = ids.flatten()  # [T * A]
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    return Routing(ids, counts, order, order // top_k, weights.flatten()[order])
