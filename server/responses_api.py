"""POST /v1/responses and GET /v1/responses/{id}: the Responses API over the chat path.

`instructions` + the input items (after the conversation of `previous_response_id`, when given)
are rendered with the chat template and its tools; the output is a message item and one
`function_call` item per tool call, whole or as typed stream events (`response.created` ...
`response.completed`). Responses are kept in a bounded in-memory store (oldest dropped first)
unless `store` is false. Streamed and whole answers are built by the same code (a ToolCallStream
fed the text), so their items agree.
"""

from __future__ import annotations

import json
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from moe_serve.server.context import ServingContext, engine_request_ids, http_request_id, request_task
from moe_serve.server.errors import APIError, ErrorCode, ErrorType, from_validation_errors
from moe_serve.server.generation import (
    ChoiceEvent,
    ChoiceState,
    MergedGeneration,
    collect,
    run_until_disconnected,
    start_generation,
)
from moe_serve.server.responses import now
from moe_serve.server.responses_protocol import FunctionChoice, ResponsesRequest, input_messages
from moe_serve.server.sampling import build_engine_requests
from moe_serve.server.sse import GenerationStreamingResponse
from moe_serve.server.tool_calls import ToolPlan, plan_tools
from moe_serve.server.tool_stream import ToolCallStream

PROMPT_PARAM = "input"
MAX_STORED_RESPONSES = 1024


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


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
    generation, first = await start_generation(ctx.engine, request, engine_requests, PROMPT_PARAM)
    builder = _ResponseBuilder(ctx.served_model_name, body, plan, len(prompt_ids), conversation, store)
    if body.stream:
        return GenerationStreamingResponse(builder.events(generation, first), on_close=generation.aclose)
    try:
        choices = await run_until_disconnected(request, lambda: collect(generation, first, 1))
    finally:
        await generation.aclose()
    state = _OutputState(plan)
    state.feed(choices[0].text, final=True)
    return JSONResponse(builder.finish(state, choices[0]))


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status != "in_progress" else []
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


@dataclass
class _OpenCall:
    item_id: str
    output_index: int
    call_id: str
    name: str
    arguments: str = ""


@dataclass
class _OutputState:
    """The output items so far: the message's text and the calls, with their output indices."""

    plan: ToolPlan
    message_id: str = field(default_factory=lambda: _id("msg"))
    message_index: int | None = None
    text: str = ""
    calls: list[_OpenCall] = field(default_factory=list)
    _stream: ToolCallStream | None = None

    def __post_init__(self) -> None:
        if self.plan.parser is not None:
            self._stream = ToolCallStream(self.plan.parser, self.plan.max_calls)

    @property
    def num_items(self) -> int:
        return len(self.calls) + (self.message_index is not None)

    def feed(self, new_text: str, final: bool) -> list[tuple[str, dict[str, Any]]]:
        """Append generated text; the stream events (type, fields) it causes."""
        events: list[tuple[str, dict[str, Any]]] = []
        if self._stream is None:
            content, call_deltas = new_text, []
        else:
            delta = self._stream.feed(new_text, final)
            content, call_deltas = delta.content, delta.tool_calls
        if content:
            if self.message_index is None:
                events += self._open_message()
            self.text += content
            events.append(("response.output_text.delta", {
                "item_id": self.message_id, "output_index": self.message_index, "content_index": 0,
                "delta": content, "logprobs": []}))
        for call_delta in call_deltas:
            if call_delta.call_id is not None:
                call = _OpenCall(_id("fc"), self.num_items, call_delta.call_id, call_delta.name or "")
                self.calls.append(call)
                events.append(("response.output_item.added", {
                    "output_index": call.output_index,
                    "item": _call_item(call.item_id, call.call_id, call.name, "", "in_progress")}))
            call = self.calls[call_delta.index]
            if call_delta.arguments:
                call.arguments += call_delta.arguments
                events.append(("response.function_call_arguments.delta", {
                    "item_id": call.item_id, "output_index": call.output_index, "delta": call_delta.arguments}))
        if final and self.message_index is None and not self.calls:
            events += self._open_message()  # an empty answer is still one (empty) message
        return events

    def _open_message(self) -> list[tuple[str, dict[str, Any]]]:
        self.message_index = self.num_items
        return [
            ("response.output_item.added", {"output_index": self.message_index,
                                            "item": _message_item(self.message_id, "", "in_progress")}),
            ("response.content_part.added", {"item_id": self.message_id, "output_index": self.message_index,
                                             "content_index": 0,
                                             "part": {"type": "output_text", "text": "", "annotations": []}}),
        ]

    def items(self, status: str) -> list[dict[str, Any]]:
        """The output items in output order."""
        items: list[tuple[int, dict[str, Any]]] = [
            (call.output_index, _call_item(call.item_id, call.call_id, call.name, call.arguments, status))
            for call in self.calls]
        if self.message_index is not None:
            items.append((self.message_index, _message_item(self.message_id, self.text, status)))
        return [item for _, item in sorted(items, key=lambda pair: pair[0])]

    def done_events(self, status: str) -> list[tuple[str, dict[str, Any]]]:
        """The closing events of every item, in output order."""
        events: list[tuple[int, list[tuple[str, dict[str, Any]]]]] = []
        if self.message_index is not None:
            part = {"type": "output_text", "text": self.text, "annotations": [], "logprobs": []}
            where = {"item_id": self.message_id, "output_index": self.message_index, "content_index": 0}
            events.append((self.message_index, [
                ("response.output_text.done", {**where, "text": self.text, "logprobs": []}),
                ("response.content_part.done", {**where, "part": part}),
                ("response.output_item.done", {"output_index": self.message_index,
                                               "item": _message_item(self.message_id, self.text, status)}),
            ]))
        for call in self.calls:
            events.append((call.output_index, [
                ("response.function_call_arguments.done", {"item_id": call.item_id, "output_index": call.output_index,
                                                           "name": call.name, "arguments": call.arguments}),
                ("response.output_item.done", {"output_index": call.output_index, "item": _call_item(
                    call.item_id, call.call_id, call.name, call.arguments, status)}),
            ]))
        return [event for _, group in sorted(events, key=lambda pair: pair[0]) for event in group]

    def assistant_message(self) -> dict[str, Any]:
        """The output as the next turn's template message."""
        message: dict[str, Any] = {"role": "assistant", "content": self.text}
        if self.calls:
            message["content"] = self.text or None
            message["tool_calls"] = [
                {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": _arguments(call)}}
                for call in self.calls]
        return message


def _arguments(call: _OpenCall) -> Any:
    try:
        value = json.loads(call.arguments)
    except json.JSONDecodeError:
        return call.arguments
    return value if isinstance(value, dict) else call.arguments


class _ResponseBuilder:
    """The response object of one request, whole or as stream events."""

    def __init__(self, model: str, body: ResponsesRequest, plan: ToolPlan, num_prompt_tokens: int,
                 conversation: list[dict[str, Any]], store: ResponseStore) -> None:
        self.model = model
        self.body = body
        self.plan = plan
        self.num_prompt_tokens = num_prompt_tokens
        self.conversation = conversation
        self.store = store
        self.response_id = _id("resp")
        self.created_at = now()
        self._sequence_number = 0

    def _response(self, status: str, output: list[dict[str, Any]], choice: ChoiceState | None) -> dict[str, Any]:
        body = self.body
        text_format = body.text.format.model_dump(by_alias=True, exclude_none=True) \
            if body.text is not None and body.text.format is not None else {"type": "text"}
        tool_choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, FunctionChoice) else body.tool_choice
        usage = None
        if choice is not None:
            usage = {"input_tokens": self.num_prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                     "output_tokens": choice.num_output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": self.num_prompt_tokens + choice.num_output_tokens}
        return {
            "id": self.response_id, "object": "response", "created_at": self.created_at, "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": self.model,
            "output": output, "parallel_tool_calls": body.parallel_tool_calls,
            "previous_response_id": body.previous_response_id, "reasoning": {"effort": None, "summary": None},
            "store": body.store, "temperature": body.temperature if body.temperature is not None else 1.0,
            "text": {"format": text_format}, "tool_choice": tool_choice or "auto",
            "tools": [tool.model_dump(exclude_none=True) for tool in body.tools or []],
            "top_p": body.top_p if body.top_p is not None else 1.0, "truncation": "disabled", "usage": usage,
            "metadata": body.metadata or {}, "user": body.user,
        }

    def finish(self, state: _OutputState, choice: ChoiceState) -> dict[str, Any]:
        """The final response object (stored unless `store` is false)."""
        status = "incomplete" if choice.finish_reason is not None and choice.finish_reason.value == "length" \
            else "completed"
        response = self._response(status, state.items(status), choice)
        if self.body.store:
            self.store.put(self.response_id, StoredResponse(response, self.conversation + [state.assistant_message()]))
        return response

    def _event(self, kind: str, fields: dict[str, Any]) -> str:
        payload = {"type": kind, **fields, "sequence_number": self._sequence_number}
        self._sequence_number += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"

    async def events(self, generation: MergedGeneration, first: ChoiceEvent | None) -> AsyncIterator[str]:
        """response.created, in_progress, item/content/delta events, item done events, then
        response.completed (or response.incomplete when max_output_tokens cut it)."""
        yield self._event("response.created", {"response": self._response("in_progress", [], None)})
        yield self._event("response.in_progress", {"response": self._response("in_progress", [], None)})
        state = _OutputState(self.plan)
        choice = ChoiceState(0)
        event = first
        while event is not None:
            choice.add(event.output)
            for kind, fields in state.feed(event.output.new_text, event.output.finished):
                yield self._event(kind, fields)
            event = await generation.next_event()
        response = self.finish(state, choice)
        for kind, fields in state.done_events(response["status"]):
            yield self._event(kind, fields)
        yield self._event(f"response.{response['status']}", {"response": response})
