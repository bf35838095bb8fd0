"""POST /v1/completions: raw prompts (text or token ids, one or a batch), n choices each,
answered as one `text_completion` body or as server-sent chunks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from moe_serve.server.context import ServingContext, engine_request_ids, http_request_id, request_task, token_text_map
from moe_serve.server.errors import APIError, ErrorCode
from moe_serve.server.generation import (
    ChoiceEvent,
    ChoiceState,
    MergedGeneration,
    collect,
    run_until_disconnected,
    start_generation,
)
from moe_serve.server.protocol import CompletionRequest
from moe_serve.server.request_body import Precheck, TokenIdPromptCheck
from moe_serve.server.responses import (
    CompletionChoice,
    CompletionResponse,
    Usage,
    completion_logprobs,
    logprob_token_ids,
    new_id,
    now,
)
from moe_serve.server.sampling import build_engine_requests
from moe_serve.server.sse import GenerationStreamingResponse, sse_event

PROMPT_PARAM = "prompt"
MAX_CHOICES = 64
DEFAULT_MAX_TOKENS = 16


async def create_completion(ctx: ServingContext, body: CompletionRequest, request: Request) -> Response:
    """Serve one text completion request (streaming or not)."""
    ctx.check_model(body.model)
    ctx.check_ready()
    prompts = body.prompts()
    if len(prompts) * body.n > MAX_CHOICES:
        raise APIError(400, f"at most {MAX_CHOICES} choices (prompts x n) per request", param=PROMPT_PARAM,
                       code=ErrorCode.INVALID_VALUE)
    task = request_task(body.task, request)
    requested = body.max_tokens if "max_tokens" in body.model_fields_set else None
    ids = engine_request_ids(http_request_id(request), len(prompts) * body.n)
    engine_requests = []
    num_prompt_tokens = 0
    for p, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            prompt_ids = await ctx.tokenizer.encode(prompt, ctx.prompt_limit(requested, PROMPT_PARAM))
        else:
            prompt_ids = prompt
        budget = ctx.output_budget(len(prompt_ids), requested, PROMPT_PARAM)
        max_tokens = budget if requested is not None else min(DEFAULT_MAX_TOKENS, budget)
        num_prompt_tokens += len(prompt_ids)
        engine_requests += build_engine_requests(
            ids[p * body.n:(p + 1) * body.n], prompt_ids, body, max_tokens, body.logprobs, task
        )
    generation, first = await start_generation(ctx.engine, request, engine_requests, PROMPT_PARAM)
    stream = _CompletionStream(ctx, body, len(engine_requests), num_prompt_tokens)
    if body.stream:
        return GenerationStreamingResponse(stream.events(generation, first), on_close=generation.aclose)
    try:
        choices = await run_until_disconnected(request, lambda: collect(generation, first, len(engine_requests)))
    finally:
        await generation.aclose()
    return JSONResponse((await stream.response(choices)).model_dump(mode="json"))


def token_id_precheck(ctx: ServingContext) -> Precheck | None:
    """The body precheck that refuses token-id prompts longer than the context by their count
    (none while the model loads: those requests get 503 anyway)."""
    if not ctx.engine.is_ready:
        return None
    return TokenIdPromptCheck(ctx.prompt_limit(None, PROMPT_PARAM))


class _CompletionStream:
    """Builds the response of one completion request, whole or as chunks."""

    def __init__(self, ctx: ServingContext, body: CompletionRequest, num_choices: int, num_prompt_tokens: int) -> None:
        self.ctx = ctx
        self.body = body
        self.num_choices = num_choices
        self.num_prompt_tokens = num_prompt_tokens
        self.response_id = new_id("cmpl")
        self.created = now()

    def _usage(self, choices: list[ChoiceState]) -> Usage:
        return Usage.of(self.num_prompt_tokens, sum(choice.num_output_tokens for choice in choices))

    async def _texts(self, choices: list[ChoiceState]) -> dict[int, str]:
        if self.body.logprobs is None:
            return {}
        return await token_text_map(self.ctx.tokenizer, logprob_token_ids([lp for c in choices for lp in c.logprobs]))

    async def response(self, choices: list[ChoiceState]) -> CompletionResponse:
        texts = await self._texts(choices)
        return CompletionResponse(
            id=self.response_id,
            created=self.created,
            model=self.ctx.served_model_name,
            choices=[
                CompletionChoice(
                    index=choice.index,
                    text=choice.text,
                    logprobs=completion_logprobs(choice.logprobs, texts, 0) if self.body.logprobs is not None else None,
                    finish_reason=choice.finish_reason.value if choice.finish_reason else None,
                )
                for choice in choices
            ],
            usage=self._usage(choices),
        )

    def _chunk(self, choices: list[dict[str, Any]], usage: Usage | None = None) -> str:
        payload: dict[str, Any] = {
            "id": self.response_id,
            "object": "text_completion",
            "created": self.created,
            "model": self.ctx.served_model_name,
            "choices": choices,
        }
        if self.body.include_usage:
            payload["usage"] = usage.model_dump() if usage is not None else None
        return sse_event(payload)

    async def events(self, generation: MergedGeneration, first: ChoiceEvent | None) -> AsyncIterator[str]:
        """Text deltas (the last one carrying finish_reason), then the usage chunk when asked."""
        states = [ChoiceState(i) for i in range(self.num_choices)]
        event = first
        while event is not None:
            output, state = event.output, states[event.index]
            text_offset = len(state.text)
            state.add(output)
            if output.new_text or output.new_logprobs or output.finished:
                logprobs = None
                if self.body.logprobs is not None and output.new_logprobs:
                    delta = ChoiceState(event.index, logprobs=list(output.new_logprobs))
                    logprobs = completion_logprobs(output.new_logprobs, await self._texts([delta]), text_offset)
                yield self._chunk([{
                    "index": event.index,
                    "text": output.new_text,
                    "logprobs": logprobs.model_dump() if logprobs else None,
                    "finish_reason": output.finish_reason.value if output.finished and output.finish_reason else None,
                }])
            event = await generation.next_event()
        if self.body.include_usage:
            yield self._chunk([], self._usage(states))
