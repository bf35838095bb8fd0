"""From parsed API parameters to the engine's EngineRequests (one per choice)."""

from __future__ import annotations

from typing import Any

from moe_serve.engine.core.request import DEFAULT_TASK, EngineRequest
from moe_serve.engine.core.sampling_params import SamplingParams
from moe_serve.server.protocol import GenerationParams

_SEED_MODULUS = 2**64


def build_sampling_params(params: GenerationParams, max_tokens: int, num_logprobs: int | None,
                          seed: int | None) -> SamplingParams:
    """SamplingParams for one choice, unvalidated: the engine checks them once, when the request is
    added and before any response byte (InvalidParameter, a 400 naming the field)."""
    optional: dict[str, Any] = {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "repetition_penalty": params.repetition_penalty,
    }
    return SamplingParams(
        max_tokens=max_tokens,
        seed=seed,
        stop=params.stop_list(),
        ignore_eos=params.ignore_eos,
        min_tokens=params.min_tokens,
        logprobs=num_logprobs,
        **{name: value for name, value in optional.items() if value is not None},
    )


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice i of a seeded request uses seed + i (wrapped to 64 bits)."""
    return None if seed is None else (seed + index) % _SEED_MODULUS


def build_engine_requests(
    request_ids: list[str],
    prompt_token_ids: list[int],
    params: GenerationParams,
    max_tokens: int,
    num_logprobs: int | None,
    task: str | None,
    seed_offset: int = 0,
) -> list[EngineRequest]:
    """One EngineRequest per id, choice i seeded with seed + seed_offset + i."""
    return [
        EngineRequest(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            sampling=build_sampling_params(params, max_tokens, num_logprobs,
                                           choice_seed(params.seed, seed_offset + i)),
            task=task or DEFAULT_TASK,
            priority=params.priority,
        )
        for i, request_id in enumerate(request_ids)
    ]
