"""POST /v1/chat/completions: render the chat template (with the request's tools), run n
choices, answer as one JSON body or as `chat.completion.chunk` server-sent events; with tools,
each choice's text is parsed into content and `tool_calls` (`server.tool_calls` plans it).
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
from moe_serve.server.protocol import ChatCompletionRequest
from moe_serve.server.responses import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionResponse,
    FunctionCallOut,
    ToolCallOut,
    Usage,
    chat_logprobs,
    logprob_token_ids,
    new_id,
    now,
)
from moe_serve.server.sampling import build_engine_requests, response_format_guided
from moe_serve.server.sse import GenerationStreamingResponse, sse_event
from moe_serve.server.tool_calls import ToolPlan, plan_tools
from moe_serve.server.tool_parsers import finish_output
from moe_serve.server.tool_stream import ToolCallStream, new_call_id

PROMPT_PARAM = "messages"


async def create_chat_completion(ctx: ServingContext, body: ChatCompletionRequest, request: Request) -> Response:
    """Serve one chat completion request (streaming or not)."""
    ctx.check_model(body.model)
    ctx.check_ready()
    task = request_task(body.task, request)
    plan = await chat_tool_plan(ctx, body)
    prompt_ids = await ctx.tokenizer.render_chat(plan.messages, ctx.prompt_limit(body.output_limit(), PROMPT_PARAM),
                                                 plan.tools)
    max_tokens = ctx.output_budget(len(prompt_ids), body.output_limit(), PROMPT_PARAM)
    engine_requests = build_engine_requests(
        engine_request_ids(http_request_id(request), body.n), prompt_ids, body, max_tokens, body.num_logprobs(), task,
        guided=plan.guided, keep_special_tokens=plan.keep_special_tokens,
    )
    generation, first = await start_generation(ctx.engine, request, engine_requests, PROMPT_PARAM)
    stream = _ChatStream(ctx, body, plan, new_id("chatcmpl"), now(), len(prompt_ids))
    if body.stream:
        return GenerationStreamingResponse(stream.events(generation, first), on_close=generation.aclose)
    try:
        choices = await run_until_disconnected(request, lambda: collect(generation, first, body.n))
    finally:
        await generation.aclose()
    return JSONResponse((await stream.response(choices)).model_dump(mode="json"))


async def chat_tool_plan(ctx: ServingContext, body: ChatCompletionRequest) -> ToolPlan:
    """The request's ToolPlan; 400 when a forced tool call and a JSON response_format both constrain it."""
    plan = plan_tools([message.template_dict() for message in body.messages],
                      [tool.function for tool in body.tools or []], body.tool_choice, body.parallel_tool_calls,
                      await ctx.tokenizer.chat_template_info())
    if plan.guided is not None and response_format_guided(body.response_format) is not None:
        raise APIError(400, "tool_choice 'required' or a named function cannot be combined with a JSON "
                       "response_format", param="response_format", code=ErrorCode.INVALID_VALUE)
    return plan


def _finish_reason(choice: ChoiceState, has_calls: bool) -> str | None:
    """OpenAI's `tool_calls` when the choice ended by calling tools; else the engine's reason."""
    reason = choice.finish_reason.value if choice.finish_reason else None
    return "tool_calls" if has_calls and reason == "stop" else reason


class _ChatStream:
    """Builds the response of one chat request, whole or as chunks."""

    def __init__(self, ctx: ServingContext, body: ChatCompletionRequest, plan: ToolPlan, response_id: str,
                 created: int, num_prompt_tokens: int) -> None:
        self.ctx = ctx
        self.body = body
        self.plan = plan
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
            choices=[self._choice_body(choice, texts) for choice in choices],
            usage=self._usage(choices),
        )

    def _choice_body(self, choice: ChoiceState, texts: dict[int, str]) -> ChatChoice:
        message = AssistantMessage(content=choice.text)
        if self.plan.parser is not None:
            parsed = finish_output(self.plan.parser.parse(choice.text, final=True), self.plan.max_calls)
            calls = [ToolCallOut(id=new_call_id(), function=FunctionCallOut(name=call.name, arguments=call.arguments))
                     for call in parsed.calls]
            message = AssistantMessage(content=parsed.content, tool_calls=calls or None)
        return ChatChoice(
            index=choice.index,
            message=message,
            finish_reason=_finish_reason(choice, bool(message.tool_calls)),
            logprobs=chat_logprobs(choice.logprobs, texts) if self.body.logprobs else None,
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
    def _choice(index: int, delta: dict[str, Any], logprobs: Any = None, finish_reason: str | None = None) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    async def events(self, generation: MergedGeneration, first: ChoiceEvent | None) -> AsyncIterator[str]:
        """Role chunks, content and tool-call deltas, finish chunks, the usage chunk (when asked)."""
        states = [ChoiceState(i) for i in range(self.body.n)]
        parser = self.plan.parser
        tool_streams = [ToolCallStream(parser, self.plan.max_calls) for _ in states] if parser else []
        for state in states:
            yield self._chunk([self._choice(state.index, {"role": "assistant", "content": ""})])
        event = first
        while event is not None:
            output = event.output
            states[event.index].add(output)
            content, call_deltas = output.new_text, []
            if tool_streams:
                delta = tool_streams[event.index].feed(output.new_text, output.finished)
                content, call_deltas = delta.content, delta.tool_calls
            if content or output.new_logprobs:
                logprobs = None
                if self.body.logprobs and output.new_logprobs:
                    texts = await token_text_map(self.ctx.tokenizer, logprob_token_ids(output.new_logprobs))
                    logprobs = chat_logprobs(output.new_logprobs, texts).model_dump()
                yield self._chunk([self._choice(event.index, {"content": content}, logprobs)])
            for call_delta in call_deltas:
                yield self._chunk([self._choice(event.index, {"tool_calls": [call_delta.chat_delta()]})])
            if output.finished:
                has_calls = bool(tool_streams and tool_streams[event.index].num_calls)
                reason = _finish_reason(states[event.index], has_calls)
                yield self._chunk([self._choice(event.index, {}, finish_reason=reason)])
            event = await generation.next_event()
        if self.body.include_usage:
            yield self._chunk([], self._usage(states), final=True)
