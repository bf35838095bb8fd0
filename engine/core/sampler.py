"""Batched token sampling: grammar masks, penalties, min_tokens, temperature, top-k, top-p, seeds,
logprobs.

Processing order (vLLM's), greedy rows equal to a transformers argmax, inverse-CDF draws with
per-request generators for seeded rows, and logprobs taken before penalties: docs/api.md,
"Sampling". A constrained row's tokens outside its grammar mask get -inf first (its logprobs stay
the model's). A row whose logits are not finite or whose id falls outside the vocabulary gets an
error instead of a token; the other rows are sampled as usual.
Shapes: B rows, V vocabulary, R rows that need a given step.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from moe_serve.engine.core.sampling_params import SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from moe_serve.engine.core.guided.matcher import TokenMasks

TOP_P_CANDIDATES = 128


NON_FINITE_LOGITS = "the model produced non-finite logits (NaN or inf) for this request"


@dataclass
class SamplerOutput:
    """One sampled token per row (-1 where the row failed), its logprobs when the request asked
    for them, and per row None or why no token could be sampled."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None]
    errors: list[str | None]


class Sampler:
    """Turns a [B, V] logits batch into one token per row."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
        generators: Sequence[torch.Generator | None],
        eos_token_ids: frozenset[int],
        masks: TokenMasks | None = None,
    ) -> SamplerOutput:
        """`masks`: the allowed tokens of the grammar-constrained rows."""
        raw = logits.float()  # B, V
        logits = raw.clone() if masks is None else _masked(raw, masks)
        self._repetition_penalty(logits, params, prompt_ids, output_ids)
        self._presence_frequency_penalties(logits, params, output_ids)
        self._min_tokens_mask(logits, params, output_ids, eos_token_ids)
        row_max, tokens = logits.max(dim=-1)  # B: the argmax (first maximum, like torch.argmax)
        temperatures = torch.tensor([1.0 if p.is_greedy else p.temperature for p in params], device=logits.device)
        finite = torch.isfinite(row_max / temperatures).tolist()  # NaN, +inf, all -inf, or tempered overflow
        random_rows = [row for row, p in enumerate(params) if not p.is_greedy and finite[row]]
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            sampled = _sample(_select(logits, random_rows), [params[r] for r in random_rows],
                              [generators[r] for r in random_rows])
            tokens[rows] = sampled
        token_ids = tokens.tolist()
        errors: list[str | None] = [None] * len(params)
        for row, token in enumerate(token_ids):
            if not finite[row]:
                errors[row] = NON_FINITE_LOGITS
            elif not 0 <= token < self.vocab_size:
                errors[row] = f"sampled token id {token} is outside the vocabulary [0, {self.vocab_size})"
            if errors[row] is not None:
                token_ids[row] = -1
        return SamplerOutput(token_ids, self._logprobs(raw, params, token_ids), errors)

    def _token_index(
        self, rows: Sequence[int], id_lists: Sequence[Sequence[int]], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch row, token id) pairs, one per listed token, ids outside the vocabulary dropped."""
        lengths = torch.tensor([len(ids) for ids in id_lists], device=device)
        batch_rows = torch.repeat_interleave(torch.tensor(rows, device=device), lengths)
        token_ids = torch.tensor(list(itertools.chain.from_iterable(id_lists)), dtype=torch.long, device=device)
        keep = (token_ids >= 0) & (token_ids < self.vocab_size)
        return batch_rows[keep], token_ids[keep]

    def _repetition_penalty(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        prompt_ids: Sequence[Sequence[int]],
        output_ids: Sequence[Sequence[int]],
    ) -> None:
        """HF: a seen token's logit is divided by the penalty when positive, multiplied when negative."""
        rows = [r for r, p in enumerate(params) if p.repetition_penalty != 1.0 and (prompt_ids[r] or output_ids[r])]
        if not rows:
            return
        batch_rows, token_ids = self._token_index(rows, [[*prompt_ids[r], *output_ids[r]] for r in rows], logits.device)
        penalty = torch.tensor([p.applied_repetition_penalty for p in params], device=logits.device)[batch_rows]
        values = logits[batch_rows, token_ids]  # a repeated token writes the same value twice
        logits[batch_rows, token_ids] = torch.where(values > 0, values / penalty, values * penalty)

    def _presence_frequency_penalties(
        self, logits: torch.Tensor, params: Sequence[SamplingParams], output_ids: Sequence[Sequence[int]]
    ) -> None:
        """OpenAI: logit -= frequency_penalty * count + presence_penalty * (count > 0), over output tokens."""
        rows = [r for r, p in enumerate(params) if (p.presence_penalty or p.frequency_penalty) and output_ids[r]]
        if not rows:
            return
        device, vocab = logits.device, logits.shape[1]
        batch_rows, token_ids = self._token_index(rows, [output_ids[r] for r in rows], device)
        frequency = torch.tensor([p.frequency_penalty for p in params], device=device)
        presence = torch.tensor([p.presence_penalty for p in params], device=device)
        logits.index_put_((batch_rows, token_ids), -frequency[batch_rows], accumulate=True)
        distinct = torch.unique(batch_rows * vocab + token_ids)
        distinct_rows = distinct // vocab
        logits.index_put_((distinct_rows, distinct % vocab), -presence[distinct_rows], accumulate=True)

    def _min_tokens_mask(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        output_ids: Sequence[Sequence[int]],
        eos_token_ids: frozenset[int],
    ) -> None:
        """Forbid eos and stop_token_ids while a row has fewer than min_tokens output tokens."""
        rows = [r for r, p in enumerate(params) if len(output_ids[r]) < p.min_tokens]
        if not rows:
            return
        banned = [sorted(eos_token_ids | set(params[r].stop_token_ids)) for r in rows]
        batch_rows, token_ids = self._token_index(rows, banned, logits.device)
        logits[batch_rows, token_ids] = float("-inf")

    @staticmethod
    def _logprobs(raw: torch.Tensor, params: Sequence[SamplingParams], token_ids: list[int]) -> list[TokenLogprob | None]:
        """Raw model logprobs of the sampled token and the top-n alternatives, best first (rows
        that failed, token -1, get none)."""
        result: list[TokenLogprob | None] = [None] * len(params)
        rows = [r for r, p in enumerate(params) if p.logprobs is not None and token_ids[r] >= 0]
        if not rows:
            return result
        device = raw.device
        logprobs = torch.log_softmax(_select(raw, rows), dim=-1)  # R, V
        chosen = logprobs.gather(1, torch.tensor([token_ids[r] for r in rows], device=device).unsqueeze(1))
        chosen_values = chosen.squeeze(1).tolist()
        top_n = min(max(params[r].logprobs or 0 for r in rows), logprobs.shape[1])
        top_values, top_ids = torch.topk(logprobs, top_n, dim=-1)
        top_values_list, top_ids_list = top_values.tolist(), top_ids.tolist()
        for i, row in enumerate(rows):
            n = params[row].logprobs or 0
            top = list(zip(top_ids_list[i][:n], top_values_list[i][:n]))
            result[row] = TokenLogprob(token_id=token_ids[row], logprob=chosen_values[i], top=top)
        return result


def _masked(raw: torch.Tensor, masks: TokenMasks) -> torch.Tensor:
    """A copy of the [B, V] logits with the grammar's bias added to its constrained rows
    (-inf for the tokens their grammar does not allow next)."""
    if masks.rows == list(range(raw.shape[0])):
        return raw + masks.bias  # the copy and the mask in one pass
    logits = raw.clone()
    logits.index_add_(0, torch.tensor(masks.rows, device=raw.device), masks.bias)
    return logits


def _select(tensor: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """tensor[rows], without a copy when rows is every row in order."""
    if rows == list(range(tensor.shape[0])):
        return tensor
    return tensor[torch.tensor(rows, device=tensor.device)]


def _sample(
    logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """One token per row of the [R, V] penalised logits of random rows, by inverse-CDF sampling.

    Every row draws exactly one uniform number (from its own generator when it has one), so
    a seeded row's token depends only on its own logits and generator.
    """
    device, vocab = logits.device, logits.shape[1]
    uniform = torch.empty(len(params), device=device)
    shared = [r for r, g in enumerate(generators) if g is None]
    if shared:
        uniform[shared] = torch.rand(len(shared), device=device)
    for row, generator in enumerate(generators):
        if generator is not None:
            uniform[row] = torch.rand(1, device=device, generator=generator)
    logits /= torch.tensor([p.temperature for p in params], device=device).unsqueeze(1)
    tokens = torch.empty(len(params), dtype=torch.long, device=device)
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    full = [r for r, p in enumerate(params) if top_k[r] == vocab and p.top_p >= 1.0]
    if full:
        rows = torch.tensor(full, device=device)
        cdf = torch.cumsum(torch.softmax(logits[rows], dim=-1), dim=-1)  # R, V
        tokens[rows] = _search(cdf, uniform[rows])
    truncated = [r for r in range(len(params)) if r not in set(full)]
    if truncated:
        rows = torch.tensor(truncated, device=device)
        tokens[rows] = _sample_truncated(
            logits[rows],
            torch.tensor([top_k[r] for r in truncated], device=device),
            torch.tensor([params[r].top_p for r in truncated], device=device),
            uniform[rows],
        )
    return tokens


def _search(cdf: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """[R] positions where u * total falls in each row of an (unnormalised) [R, N] CDF; zero-mass positions never."""
    total = cdf[:, -1:]
    target = torch.minimum(uniform.unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


def _sample_truncated(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Sample rows restricted to their top-k (V = off) and top-p (1.0 = off) sets.

    top-k keeps the k largest logits; top-p keeps the smallest run of the most likely tokens
    whose probability (after top-k) reaches top_p, at least one. Only the top
    TOP_P_CANDIDATES logits are sorted (torch.topk); rows whose nucleus does not fit among
    them are redone with a full sort.
    """
    vocab = logits.shape[1]
    limited_k = top_k[top_k < vocab]
    num_candidates = min(vocab, max(TOP_P_CANDIDATES, int(limited_k.max()) if len(limited_k) else 0))
    tokens, resolved = _sample_among(logits, top_k, top_p, uniform, num_candidates)
    if not bool(resolved.all()):
        rows = (~resolved).nonzero().squeeze(1)
        tokens[rows] = _sample_among(logits[rows], top_k[rows], top_p[rows], uniform[rows], vocab)[0]
    return tokens


def _sample_among(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor, num_candidates: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[R] tokens sampled among the top num_candidates logits, and [R] whether that set held the whole nucleus."""
    if num_candidates == logits.shape[1]:
        values, ids = torch.sort(logits, dim=-1, descending=True)  # R, V
    else:
        values, ids = torch.topk(logits, num_candidates, dim=-1)  # R, C sorted descending
    in_top_k = torch.arange(num_candidates, device=logits.device).unsqueeze(0) < top_k.unsqueeze(1)  # R, C
    limited = (top_k <= num_candidates).unsqueeze(1)
    log_norm = torch.logsumexp(values.masked_fill(~in_top_k, float("-inf")), dim=-1, keepdim=True)
    if not bool(limited.all()):
        log_norm = torch.where(limited, log_norm, torch.logsumexp(logits, dim=-1, keepdim=True))
    probs = torch.exp(values - log_norm).masked_fill(~in_top_k, 0.0)
    cdf = torch.cumsum(probs, dim=-1)
    kept = in_top_k & ((cdf - probs < top_p.unsqueeze(1)) | (top_p >= 1.0).unsqueeze(1))
    kept[:, 0] = True
    resolved = limited.squeeze(1) | (top_p >= 1.0) | ~kept[:, -1]
    positions = _search(torch.cumsum(probs * kept, dim=-1), uniform)
    return ids.gather(1, positions.unsqueeze(1)).squeeze(1), resolved
