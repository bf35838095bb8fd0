"""Batched token sampling: penalties, min_tokens, temperature, top-k, top-p, seeds, logprobs.

Greedy rows take torch.argmax of the penalised logits (so they equal a transformers greedy
oracle when no penalty is set). Random rows each draw from their own torch.Generator when
the request has a seed, so a seeded request gives the same tokens in any batch.
Shapes: B rows, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.sampling_params import SamplingParams, TokenLogprob


@dataclass
class SamplerOutput:
    """One sampled token per row, and its logprobs when the request asked for them."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


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
    ) -> SamplerOutput:
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(p.logprobs is not None for p in params) else None
        logits = logits.clone()
        for row, p in enumerate(params):
            self._penalise(logits[row], p, prompt_ids[row], output_ids[row])
            if len(output_ids[row]) < p.min_tokens:
                banned = [t for t in eos_token_ids | set(p.stop_token_ids) if t < logits.shape[1]]
                logits[row, banned] = float("-inf")
        tokens = torch.argmax(logits, dim=-1).tolist()
        for row, p in enumerate(params):
            if not p.is_greedy:
                tokens[row] = self._sample_row(logits[row], p, generators[row])
        logprobs: list[TokenLogprob | None] = [None] * len(params)
        if raw_logprobs is not None:
            for row, p in enumerate(params):
                if p.logprobs is not None:
                    logprobs[row] = self._logprob(raw_logprobs[row], tokens[row], p.logprobs)
        return SamplerOutput(tokens, logprobs)

    @staticmethod
    def _penalise(row: torch.Tensor, p: SamplingParams, prompt: Sequence[int], output: Sequence[int]) -> None:
        """Repetition penalty (HF: over prompt and output), presence/frequency (OpenAI: over output)."""
        if p.repetition_penalty != 1.0 and (prompt or output):
            seen = torch.tensor(sorted(set(prompt) | set(output)), dtype=torch.long)
            values = row[seen]
            row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and output:
            counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=row.shape[0]).to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)

    @staticmethod
    def _sample_row(row: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
        row = row / p.temperature
        if 0 < p.top_k < row.shape[0]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(row, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            outside = (torch.cumsum(probs, dim=-1) - probs) > p.top_p  # keep the smallest set reaching top_p
            row = row.scatter(0, order, sorted_logits.masked_fill(outside, float("-inf")))
        probs = torch.softmax(row, dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator))

    @staticmethod
    def _logprob(row: torch.Tensor, token: int, top_n: int) -> TokenLogprob:
        top: list[tuple[int, float]] = []
        if top_n:
            values, ids = torch.topk(row, top_n)
            top = list(zip(ids.tolist(), values.tolist()))
        return TokenLogprob(token_id=token, logprob=float(row[token]), top=top)
