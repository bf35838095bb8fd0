"""The Responses API's output: message and function_call items built from the generated text
(a ToolCallStream parses it, so streamed and whole answers agree), the response object, and its
typed stream events (`response.created` ... `response.completed`)."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from moe_serve.server.generation import ChoiceEvent, ChoiceState, MergedGeneration
from moe_serve.server.responses import now
from moe_serve.server.responses_protocol import FunctionChoice, ResponsesRequest
from moe_serve.server.tool_calls import ToolPlan
from moe_serve.server.tool_stream import ToolCallStream


def new_item_id(prefix: str) -> str:
    """An OpenAI-style object id such as `resp_...`."""
    return f"{prefix}_{secrets.token_hex(12)}"


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
class OutputState:
    """The output items so far: the message's text and the calls, with their output indices."""

    plan: ToolPlan
    message_id: str = field(default_factory=lambda: new_item_id("msg"))
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
                call = _OpenCall(new_item_id("fc"), self.num_items, call_delta.call_id, call_delta.name or "")
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


class ResponseBuilder:
    """The response object of one request, whole or as stream events."""

    def __init__(self, model: str, body: ResponsesRequest, plan: ToolPlan, num_prompt_tokens: int,
                 conversation: list[dict[str, Any]],
                 on_finished: Callable[[dict[str, Any], list[dict[str, Any]]], None]) -> None:
        self.model = model
        self.body = body
        self.plan = plan
        self.num_prompt_tokens = num_prompt_tokens
        self.conversation = conversation
        self.on_finished = on_finished
        self.response_id = new_item_id("resp")
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

    def finish(self, state: OutputState, choice: ChoiceState) -> dict[str, Any]:
        """The final response object, handed with the conversation it ends to `on_finished`."""
        status = "incomplete" if choice.finish_reason is not None and choice.finish_reason.value == "length" \
            else "completed"
        response = self._response(status, state.items(status), choice)
        self.on_finished(response, self.conversation + [state.assistant_message()])
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
        state = OutputState(self.plan)
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
