"""POST /v1/responses and GET /v1/responses/{id}: the Responses API over the chat path.

`instructions` + the input items (after the conversation of `previous_response_id`, when given)
are rendered with the chat template and its tools; the output is a message item and one
`function_call` item per tool call, whole or as typed stream events (`response.created` ...
`response.completed`, built in `server.responses_output`). Responses are kept in a bounded
in-memory store (least recently used dropped first) unless `store` is false.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from moe_serve.server.context import ServingContext, engine_request_ids, http_request_id, request_task
from moe_serve.server.errors import APIError, ErrorCode, ErrorType, from_validation_errors
from moe_serve.server.generation import (
    collect,
    run_until_disconnected,
    start_generation,
)
from moe_serve.server.responses_output import OutputState, ResponseBuilder
from moe_serve.server.responses_protocol import ResponsesRequest, input_messages
from moe_serve.server.sampling import build_engine_requests
from moe_serve.server.sse import GenerationStreamingResponse
from moe_serve.server.tool_calls import plan_tools

PROMPT_PARAM = "input"
MAX_STORED_RESPONSES = 1024


@dataclass(frozen=True)
class StoredResponse:
    """A finished response and its conversation (template messages, instructions excluded)."""

    body: dict[str, Any]
    conversation: list[dict[str, Any]]


class ResponseStore:
    """The last `max_responses` stored responses by id (least recently used dropped first)."""

    def __init__(self, max_responses: int = MAX_STORED_RESPONSES) -> None:
        self._max_responses = max_responses
        self._responses: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._responses)

    def get(self, response_id: str, param: str | None = None) -> StoredResponse:
        """The stored response; 404 naming `param` when it is unknown (never stored, or dropped)."""
        stored = self._responses.get(response_id)
        if stored is None:
            raise APIError(404, f"Response with id '{response_id}' not found.", ErrorType.NOT_FOUND,
                           ErrorCode.INVALID_VALUE, param=param)
        self._responses.move_to_end(response_id)
        return stored

    def put(self, response_id: str, stored: StoredResponse) -> None:
        self._responses[response_id] = stored
        self._responses.move_to_end(response_id)
        while len(self._responses) > self._max_responses:
            self._responses.popitem(last=False)


async def create_response(ctx: ServingContext, store: ResponseStore, body: ResponsesRequest,
                          request: Request) -> Response:
    """Serve one Responses API request (streaming or not)."""
    ctx.check_model(body.model)
    ctx.check_ready()
    try:
        params = body.generation_params()
    except ValidationError as exc:
        raise from_validation_errors(exc.errors()) from exc
    task = request_task(params.task, request)
    history = store.get(body.previous_response_id, "previous_response_id").conversation \
        if body.previous_response_id else []
    conversation = history + input_messages(body.input)
    instructions = [{"role": "system", "content": body.instructions}] if body.instructions else []
    plan = plan_tools(instructions + conversation, body.functions(), body.chat_tool_choice(), body.parallel_tool_calls,
                      await ctx.tokenizer.chat_template_info())
    guided = body.guided()
    if plan.guided is not None and guided is not None:
        raise APIError(400, "tool_choice 'required' or a named function cannot be combined with a JSON text.format",
                       param="text.format", code=ErrorCode.INVALID_VALUE)
    prompt_ids = await ctx.tokenizer.render_chat(plan.messages, ctx.prompt_limit(body.max_output_tokens, PROMPT_PARAM),
                                                 plan.tools)
    max_tokens = ctx.output_budget(len(prompt_ids), body.max_output_tokens, PROMPT_PARAM)
    engine_requests = build_engine_requests(engine_request_ids(http_request_id(request), 1), prompt_ids, params,
                                            max_tokens, None, task, guided=plan.guided or guided,
                                            keep_special_tokens=plan.keep_special_tokens)

    def keep(response: dict[str, Any], whole_conversation: list[dict[str, Any]]) -> None:
        if body.store:
            store.put(response["id"], StoredResponse(response, whole_conversation))

    builder = ResponseBuilder(ctx.served_model_name, body, plan, len(prompt_ids), conversation, keep)
    generation, first = await start_generation(ctx.engine, request, engine_requests, PROMPT_PARAM)
    if body.stream:
        return GenerationStreamingResponse(builder.events(generation, first), on_close=generation.aclose)
    try:
        choices = await run_until_disconnected(request, lambda: collect(generation, first, 1))
    finally:
        await generation.aclose()
    state = OutputState(plan)
    state.feed(choices[0].text, final=True)
    return JSONResponse(builder.finish(state, choices[0]))
