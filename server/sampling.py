"""From parsed API parameters to the engine's EngineRequests (one per choice), including the
output constraint (`response_format` or a forced tool call) as the engine's GuidedDecoding."""

from __future__ import annotations

from typing import Any

from moe_serve.engine.core.guided.spec import GuidedDecoding
from moe_serve.engine.core.request import DEFAULT_TASK, EngineRequest
from moe_serve.engine.core.sampling_params import SamplingParams
from moe_serve.server.protocol import GenerationParams, ResponseFormat, ResponseFormatType

_SEED_MODULUS = 2**64


def response_format_guided(response_format: ResponseFormat | None,
                           param: str = "response_format") -> GuidedDecoding | None:
    """The constraint of `response_format` (None for text): json_object, or json_schema (strict
    when asked; a schema-less json_schema is any object)."""
    if response_format is None or response_format.type is ResponseFormatType.TEXT:
        return None
    spec = response_format.json_schema
    if spec is None or response_format.type is ResponseFormatType.JSON_OBJECT:
        return GuidedDecoding.json_object(param=param)
    if spec.schema_ is None:
        return GuidedDecoding.json_object(param=f"{param}.json_schema")
    return GuidedDecoding.json_schema(spec.schema_, strict=bool(spec.strict), param=f"{param}.json_schema.schema")


def build_sampling_params(params: GenerationParams, max_tokens: int, num_logprobs: int | None,
                          seed: int | None, guided: GuidedDecoding | None = None,
                          keep_special_tokens: bool = False) -> SamplingParams:
    """SamplingParams for one choice, unvalidated: the engine checks them once, when the request is
    added and before any response byte (InvalidParameter, a 400 naming the field).
    `keep_special_tokens`: the output text keeps special tokens (tool-call markers that are)."""
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
        guided=guided,
        skip_special_tokens=not keep_special_tokens,
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
    guided: GuidedDecoding | None = None,
    keep_special_tokens: bool = False,
) -> list[EngineRequest]:
    """One EngineRequest per id, choice i seeded with seed + seed_offset + i; `guided` overrides
    the constraint of `params.response_format`."""
    constraint = guided or response_format_guided(params.response_format)
    return [
        EngineRequest(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            sampling=build_sampling_params(params, max_tokens, num_logprobs,
                                           choice_seed(params.seed, seed_offset + i), constraint,
                                           keep_special_tokens),
            task=task or DEFAULT_TASK,
            priority=params.priority,
        )
        for i, request_id in enumerate(request_ids)
    ]
