"""Next-layer speculation: which experts of layer l+1 to prefetch while layer l computes.

A speculator is called by the MoE layer with its input hidden state and its routing, and
names experts of the next layer for the offload tier to load at low priority:

- `RouterSpeculator` applies layer l+1's router to layer l's hidden state (hidden states
  change little between adjacent layers): each token's top (top_k + margin) experts.
- `AffinitySpeculator` ranks layer l+1's experts by co-activation with the experts layer l
  just chose (`AffinityPredictor`, learned online from the routing it sees, optionally
  warm-started from a trace) and keeps guesses whose calibrated score clears `min_score`.
  It needs no hidden state, so it also works when routing is replayed from a trace.
- `LogisticSpeculator` asks a `LogisticPredictor` (the token's routing at the last few
  layers and the previous token's at l+1, learned online by one Adam step per layer and
  engine step, optionally trained on a trace first) and keeps guesses whose probability
  clears `min_probability`. It needs each row's sequence (`begin_step`), which the model
  runner gives it every step.

All rank the union over a batch's tokens and cap it at half the layer's experts, so a big
batch does not flood the link with guesses.
"""

from __future__ import annotations

import numpy as np
import torch

from moe_serve.engine.core.step import StepLayout
from moe_serve.engine.model.cpu_kernels import linear
from moe_serve.engine.model.packed import Matrix
from moe_serve.engine.prefetch.logistic_predictor import LOGISTIC_MIN_PROBABILITY, LogisticPredictor
from moe_serve.engine.prefetch.predictors import AFFINITY_MIN_SCORE, AffinityPredictor, multi_hot


def _rank_union(scores: torch.Tensor | np.ndarray, chosen: torch.Tensor | np.ndarray, cap: int) -> list[int]:
    """Experts chosen by at least one token ([T, E] mask), ranked by summed score, at most `cap`."""
    scores_t = torch.as_tensor(scores, dtype=torch.float64)
    chosen_t = torch.as_tensor(chosen, dtype=torch.bool)
    total = (scores_t * chosen_t).sum(dim=0)
    limit = min(int(chosen_t.any(dim=0).sum()), cap)
    return torch.topk(total, limit).indices.tolist() if limit else []


def _rank_guesses(scores: np.ndarray, width: int, min_score: float, num_experts: int) -> list[int]:
    """Each token's `width` best experts scoring at least `min_score` ([T, E] scores), ranked
    over the batch by `_rank_union` and capped at max(width, half the experts)."""
    best = np.argsort(-scores, axis=1, kind="stable")[:, :width]
    chosen = np.zeros_like(scores, dtype=bool)
    np.put_along_axis(chosen, best, True, axis=1)
    chosen &= scores >= min_score
    return _rank_union(scores, chosen, max(width, num_experts // 2))


class RouterSpeculator:
    """Layer l+1's router on layer l's hidden state: each token's top (top_k + margin) experts."""

    def __init__(self, routers: list[Matrix], top_k: int, margin: int) -> None:
        self.routers = routers
        self.num_experts = routers[0].shape[0]
        self.width = min(self.num_experts, top_k + margin)

    def __call__(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor) -> list[int]:
        if layer + 1 >= len(self.routers):
            return []
        router = self.routers[layer + 1]  # fp32 for some models whatever x's dtype
        probs = torch.softmax(linear(x.to(router.dtype), router), dim=-1, dtype=torch.float32)  # [T, E]
        chosen = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, torch.topk(probs, self.width, dim=-1).indices, True)
        total = (probs.double() * chosen).sum(dim=0)  # [E] summed over the tokens choosing each
        ranked, ranked_ids = torch.topk(total, min(max(self.width, self.num_experts // 2), probs.shape[1]))
        # ranked on the device and read once; experts no token chose (total 0) are dropped on the host
        return [e for e in torch.where(ranked > 0, ranked_ids, -1).tolist() if e >= 0]


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
        return _rank_guesses(scores, self.width, self.min_score, self.predictor.num_experts)


class LogisticSpeculator:
    """Per-row logistic prediction of layer l+1's experts from the routing history.

    It is a step observer of the model runner: `begin_step(layout)` names each step's rows, in row
    order, as the runner lays them out. A row's previous token is
    the row before it in its chunk, or the sequence's last token of an earlier step, or none at
    a prompt's first token. Guesses come only from rows whose previous token's routing at l+1
    is already known (decode rows, a chunk's first row): inside a prefill chunk it is computed
    in the same layer pass. Learning uses every row, once layer l+1 has routed.
    """

    def __init__(self, predictor: LogisticPredictor, width: int, min_probability: float = LOGISTIC_MIN_PROBABILITY,
                 learn: bool = True, learning_rate: float = 0.03) -> None:
        self.predictor = predictor
        self.width = width
        self.min_probability = min_probability
        self.learn = learn
        self.learning_rate = learning_rate
        self._last: dict[str, np.ndarray] = {}  # sequence -> its last computed token's routing [L, K]
        self._step: dict[int, np.ndarray] = {}  # layer -> this step's ids [T, K]
        self._rows: list[tuple[str, int]] = []  # (sequence, rows) this step
        self._previous_row = np.zeros(0, dtype=np.int64)  # [T] row of the previous token in this step, -1: none here
        self._carried: np.ndarray | None = None  # [T, L, K] the previous token's routing from an earlier step (-1: none)

    def begin_step(self, layout: StepLayout) -> None:
        self._step = {}
        rows = layout.num_rows
        previous_row = np.full(rows, -1, dtype=np.int64)
        carried: np.ndarray | None = None
        for chunk in layout:
            start, n = chunk.rows.start, chunk.num_tokens
            previous_row[start + 1:start + n] = np.arange(start, start + n - 1)
            last = None if chunk.starts_sequence else self._last.get(chunk.seq_id)
            if last is not None and n:
                if carried is None:
                    carried = np.full((rows, *last.shape), -1, dtype=np.int64)
                carried[start] = last
        self._rows = [(chunk.seq_id, chunk.num_tokens) for chunk in layout]
        self._previous_row, self._carried = previous_row, carried

    def end_step(self) -> None:
        """Remember each sequence's last row of the finished step (all layers routed)."""
        if self._step and len(self._step) == self.predictor.num_layers:
            routing = np.stack([self._step[layer] for layer in range(self.predictor.num_layers)], axis=1)  # T, L, K
            end = 0
            for seq_id, n in self._rows:
                end += n
                if n and end <= len(routing):
                    self._last[seq_id] = routing[end - 1]
        self._step = {}

    def forget(self, seq_id: str, completed: bool) -> None:
        self._last.pop(seq_id, None)

    def _previous_at(self, layer: int, rows: int) -> np.ndarray:
        """[T, K] the previous token's experts at `layer` where known (-1 elsewhere)."""
        top_k = next(iter(self._step.values())).shape[1]
        out = np.full((rows, top_k), -1, dtype=np.int64) if self._carried is None else self._carried[:, layer].copy()
        here = self._previous_row >= 0
        if layer in self._step and here.any():
            out[here] = self._step[layer][self._previous_row[here]]
        return out

    def _context(self, layer: int) -> list[np.ndarray | None]:
        first = layer - self.predictor.context_layers + 1
        return [self._step.get(source) if source >= 0 else None for source in range(first, layer + 1)]

    def __call__(self, layer: int, x: torch.Tensor, topk_ids: torch.Tensor) -> list[int]:
        ids = topk_ids.cpu().numpy().astype(np.int64)
        self._step[layer] = ids
        rows = len(ids)
        if len(self._previous_row) != rows:  # rows not laid out by begin_step: none knows its predecessor
            self._previous_row, self._carried = np.full(rows, -1, dtype=np.int64), None
        predictor = self.predictor
        if self.learn and layer >= 1 and (layer - 1) in self._step:  # layer's routing is now known: learn l-1 -> l
            features = predictor.features(self._context(layer - 1), self._previous_at(layer, rows))
            targets = multi_hot(ids, predictor.num_experts, np.float32)
            predictor.partial_fit(layer - 1, features, targets, self.learning_rate)
        if layer + 1 >= predictor.num_layers:
            return []
        known = self._previous_row < 0  # a row whose predecessor routes in this same pass cannot guess
        if not known.any():
            return []
        previous = self._previous_at(layer + 1, rows)[known]
        context = [None if block is None else block[known] for block in self._context(layer)]
        probability = predictor.probabilities_of(layer, predictor.features(context, previous))  # [R, E]
        return _rank_guesses(probability, self.width, self.min_probability, predictor.num_experts)
