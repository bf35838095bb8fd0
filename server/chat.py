"""POST /v1/chat/completions: render the chat template, run n choices, answer as one JSON
body or as `chat.completion.chunk` server-sent events.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from moe_serve.server.context import ServingContext, engine_request_ids, http_request_id, request_task, token_text_map
from moe_serve.server.generation import (
    ChoiceEvent,
    ChoiceState,
    MergedGeneration,
    collect,
    run_until_disconnected,
    start_generation,
)
from moe_serve.server.protocol import ChatCompletionRequest
from moe_serve.server.responses import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionResponse,
    Usage,
    chat_logprobs,
    logprob_token_ids,
    new_id,
    now,
)
from moe_serve.server.sampling import build_engine_requests
from moe_serve.server.sse import GenerationStreamingResponse, sse_event

PROMPT_PARAM = "messages"


async def create_chat_completion(ctx: ServingContext, body: ChatCompletionRequest, request: Request) -> Response:
    """Serve one chat completion request (streaming or not)."""
    ctx.check_model(body.model)
    ctx.check_ready()
    task = request_task(body.task, request)
    prompt_ids = await ctx.tokenizer.render_chat([message.template_dict() for message in body.messages],
                                                 ctx.prompt_limit(body.output_limit(), PROMPT_PARAM))
    max_tokens = ctx.output_budget(len(prompt_ids), body.output_limit(), PROMPT_PARAM)
    engine_requests = build_engine_requests(
        engine_request_ids(http_request_id(request), body.n), prompt_ids, body, max_tokens, body.num_logprobs(), task
    )
    generation, first = await start_generation(ctx.engine, request, engine_requests, PROMPT_PARAM)
    stream = _ChatStream(ctx, body, new_id("chatcmpl"), now(), len(prompt_ids))
    if body.stream:
        return GenerationStreamingResponse(stream.events(generation, first), on_close=generation.aclose)
    try:
        choices = await run_until_disconnected(request, lambda: collect(generation, first, body.n))
    finally:
        await generation.aclose()
    return JSONResponse((await stream.response(choices)).model_dump(mode="json"))


class _ChatStream:
    """Builds the response of one chat request, whole or as chunks."""

    def __init__(self, ctx: ServingContext, body: ChatCompletionRequest, response_id: str, created: int,
                 num_prompt_tokens: int) -> None:
        self.ctx = ctx
        self.body = body
        self.response_id = response_id
        self.created = created
        self.num_prompt_tokens = num_prompt_tokens

    async def response(self, choices: list[ChoiceState]) -> ChatCompletionResponse:
        texts: dict[int, str] = {}
        if self.body.logprobs:
            texts = await token_text_map(self.ctx.tokenizer, logprob_token_ids([lp for c in choices for lp in c.logprobs]))
        return ChatCompletionResponse(
            id=self.response_id,
            created=self.created,
            model=self.ctx.served_model_name,
            choices=[
                ChatChoice(
                    index=choice.index,
                    message=AssistantMessage(content=choice.text),
                    finish_reason=choice.finish_reason.value if choice.finish_reason else None,
                    logprobs=chat_logprobs(choice.logprobs, texts) if self.body.logprobs else None,
                )
                for choice in choices
            ],
            usage=self._usage(choices),
        )

    def _usage(self, choices: list[ChoiceState]) -> Usage:
        return Usage.of(self.num_prompt_tokens, sum(choice.num_output_tokens for choice in choices))

    def _chunk(self, choices: list[dict[str, Any]], usage: Usage | None = None, final: bool = False) -> str:
        payload: dict[str, Any] = {
            "id": self.response_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.ctx.served_model_name,
            "choices": choices,
        }
        if self.body.include_usage:
            payload["usage"] = usage.model_dump() if final and usage is not None else None
        return sse_event(payload)

    @staticmethod
    def _choice(index: int, delta: dict[str, str], logprobs: Any = None, finish_reason: str | None = None) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    async def events(self, generation: MergedGeneration, first: ChoiceEvent | None) -> AsyncIterator[str]:
        """Role chunks, content deltas, finish chunks, the usage chunk (when asked)."""
        states = [ChoiceState(i) for i in range(self.body.n)]
        for state in states:
            yield self._chunk([self._choice(state.index, {"role": "assistant", "content": ""})])
        event = first
        while event is not None:
            output = event.output
            states[event.index].add(output)
            if output.new_text or output.new_logprobs:
                logprobs = None
                if self.body.logprobs and output.new_logprobs:
                    texts = await token_text_map(self.ctx.tokenizer, logprob_token_ids(output.new_logprobs))
                    logprobs = chat_logprobs(output.new_logprobs, texts).model_dump()
                yield self._chunk([self._choice(event.index, {"content": output.new_text}, logprobs)])
            if output.finished:
                reason = output.finish_reason.value if output.finish_reason else None
                yield self._chunk([self._choice(event.index, {}, finish_reason=reason)])
            event = await generation.next_event()
        if self.body.include_usage:
            yield self._chunk([], self._usage(states), final=True)
