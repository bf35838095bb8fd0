"""Typed values that cross the server/engine boundary: a request in, per-step outputs out, and
the one rule for whether a request fits the model's context."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from moe_serve.engine.core.sampling_params import FinishReason, SamplingParams, TokenLogprob
from moe_serve.engine.errors import ContextLengthExceeded, EngineError

DEFAULT_TASK = "default"


def check_context_length(max_model_len: int, num_prompt_tokens: int, requested_max_tokens: int | None = None,
                         prompt_is_lower_bound: bool = False) -> int:
    """The output tokens the context leaves after the prompt; raises ContextLengthExceeded unless
    the prompt plus `requested_max_tokens` (one token when None) fit `max_model_len`.
    `prompt_is_lower_bound`: `num_prompt_tokens` is the fewest the untokenized prompt can be."""
    available = max_model_len - num_prompt_tokens
    if available < max(1, requested_max_tokens or 0):
        raise ContextLengthExceeded(max_model_len, num_prompt_tokens, requested_max_tokens, prompt_is_lower_bound)
    return available


@dataclass
class EngineRequest:
    """One generation request as the engine sees it (already tokenized)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    task: str = DEFAULT_TASK
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)


@dataclass
class RequestOutput:
    """What one engine step produced for one request (deltas, not cumulative)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None  # monotonic; set on the finishing output
    error: EngineError | None = None  # set (finished, finish_reason abort) when the request failed
