"""Next-layer speculation: which experts of layer l+1 to prefetch while layer l computes.

A speculator is called by the MoE layer with its input hidden state and its routing, and
names experts of the next layer for the offload tier to load at low priority:

- `RouterSpeculator` applies layer l+1's router to layer l's hidden state (hidden states
  change little between adjacent layers): each token's top (top_k + margin) experts.
- `AffinitySpeculator` ranks layer l+1's experts by co-activation with the experts layer l
  just chose (`AffinityPredictor`, learned online from the routing it sees, optionally
  warm-started from a trace) and keeps guesses whose calibrated score clears `min_score`.
  It needs no hidden state, so it also works when routing is replayed from a trace.

Both rank the union over a batch's tokens and cap it at half the layer's experts, so a big
batch does not flood the link with guesses.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.models.cpu_kernels import linear
from engine.models.packed import Matrix
from engine.predictors import AFFINITY_MIN_SCORE, AffinityPredictor


def _rank_union(scores: torch.Tensor | np.ndarray, chosen: torch.Tensor | np.ndarray, cap: int) -> list[int]:
    """Experts chosen by at least one token ([T, E] mask), ranked by summed score, at most `cap`."""
    scores_t = torch.as_tensor(scores, dtype=torch.float64)
    chosen_t = torch.as_tensor(chosen, dtype=torch.bool)
    total = (scores_t * chosen_t).sum(dim=0)
    limit = min(int(chosen_t.any(dim=0).sum()), cap)
    return torch.topk(total, limit).indices.tolist() if limit else []


class RouterSpeculator:
    """Layer l+1's router on layer l's hidden state: each token's top (top_k + margin) experts."""

    def __init__(self, routers: list[Matrix], top_k: int, margin: int) -> None:
        self.routers = routers
        self.num_experts = routers[0].shape[0]
        self.width = min(self.num_experts, top_k + margin)

    def __call__(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor) -> list[int]:
        if layer + 1 >= len(self.routers):
            return []
        probs = torch.softmax(linear(x, self.routers[layer + 1]), dim=-1, dtype=torch.float32)  # [T, E]
        chosen = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, torch.topk(probs, self.width, dim=-1).indices, True)
        return _rank_union(probs.cpu(), chosen.cpu(), max(self.width, self.num_experts // 2))


class AffinitySpeculator:
    """Inter-layer co-activation: layer l's chosen experts -> the likely experts of layer l+1.

    Learns online: each step it pairs layer l's routing with layer l+1's (same tokens) and
    adds them to the predictor's counts, so it starts silent (no score clears `min_score`)
    and guesses once it has seen routing like the current one.
    """

    def __init__(self, predictor: AffinityPredictor, width: int, min_score: float = AFFINITY_MIN_SCORE,
                 learn: bool = True) -> None:
        self.predictor = predictor
        self.width = width
        self.min_score = min_score
        self.learn = learn
        self._previous: tuple[int, np.ndarray] | None = None  # (layer, its ids [T, A]) in this step

    def __call__(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor) -> list[int]:
        ids = topk_ids.cpu().numpy()
        previous, self._previous = self._previous, (layer, ids)
        if self.learn and previous is not None and previous[0] == layer - 1 and len(previous[1]) == len(ids):
            self.predictor.observe_layer(layer - 1, previous[1], ids)
        if layer + 1 >= self.predictor.num_layers:
            return []
        table = self.predictor.affinity(slice(layer, layer + 1))[0]  # [E source, E target]
        scores = table[ids].mean(axis=1)  # [T, E]: mean of P(j | i) over the token's experts i
        best = np.argsort(-scores, axis=1, kind="stable")[:, : self.width]
        chosen = np.zeros_like(scores, dtype=bool)
        np.put_along_axis(chosen, best, True, axis=1)
        chosen &= scores >= self.min_score
        return _rank_union(scores, chosen, max(self.width, self.predictor.num_experts // 2))
