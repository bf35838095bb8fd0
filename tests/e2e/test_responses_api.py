"""The Responses API (`client.responses.create` / `.stream` / `.retrieve` of the official SDK)
against a live server on the demo model: text, structured output, a function tool, follow-ups
through previous_response_id, store false."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.e2e.conftest import LiveServer

pytestmark = pytest.mark.e2e

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
          "required": ["ok", "color"], "additionalProperties": False}
FORMAT: Any = {"format": {"type": "json_schema", "name": "answer", "schema": SCHEMA, "strict": True}}
WEATHER: Any = {"type": "function", "name": "get_weather", "description": "Weather forecast", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
    "additionalProperties": False}}


@pytest.fixture(scope="module")
def server(long_context_server: LiveServer) -> LiveServer:
    return long_context_server


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=server.api_key, max_retries=0, timeout=120)


def test_text_response_has_the_openai_shape(client: openai.OpenAI, server: LiveServer) -> None:
    response = client.responses.create(model=server.model, input="Hello!", instructions="Answer briefly.",
                                       max_output_tokens=8, temperature=0)
    assert response.id.startswith("resp_") and response.object == "response" and response.model == server.model
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert response.output_text == message.content[0].text and response.instructions == "Answer briefly."
    usage = response.usage
    assert usage.output_tokens == 8 and usage.total_tokens == usage.input_tokens + 8 and usage.input_tokens > 0
    assert client.responses.retrieve(response.id).output_text == response.output_text


def test_stream_events_add_up_to_the_final_response(client: openai.OpenAI, server: LiveServer) -> None:
    with client.responses.stream(model=server.model, input="Rate it.", text=FORMAT, max_output_tokens=64,
                                 temperature=1.0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert final.status == "completed" and final.output_text == text
    jsonschema.validate(json.loads(text), SCHEMA)


def test_text_stream_cut_by_max_output_tokens_ends_incomplete(client: openai.OpenAI, server: LiveServer) -> None:
    whole = client.responses.create(model=server.model, input="Tell a story.", max_output_tokens=6, temperature=0)
    events = list(client.responses.create(model=server.model, input="Tell a story.", max_output_tokens=6,
                                          temperature=0, stream=True))
    assert [event.type for event in events][-1] == "response.incomplete"
    final = events[-1].response
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert final.output_text == text == whole.output_text and final.usage.output_tokens == 6
    assert final.incomplete_details.reason == "max_output_tokens"


def test_structured_output_validates(client: openai.OpenAI, server: LiveServer) -> None:
    for seed_text in ("one", "two", "three"):
        response = client.responses.create(model=server.model, input=seed_text, text=FORMAT, max_output_tokens=64,
                                           temperature=1.0)
        assert response.status == "completed" and response.text.format.type == "json_schema"
        jsonschema.validate(json.loads(response.output_text), SCHEMA)


def test_function_tool_call_and_its_result_in_a_follow_up(client: openai.OpenAI, server: LiveServer) -> None:
    response = client.responses.create(model=server.model, input="Weather in Paris?", tools=[WEATHER],
                                       tool_choice="required", parallel_tool_calls=False, max_output_tokens=64,
                                       temperature=1.0)
    [call] = [item for item in response.output if item.type == "function_call"]
    assert response.status == "completed" and call.name == "get_weather" and call.call_id.startswith("call_")
    assert json.loads(call.arguments)["city"] in ("Paris", "Oslo")
    follow_up = client.responses.create(model=server.model, previous_response_id=response.id, tools=[WEATHER],
                                        input=[{"type": "function_call_output", "call_id": call.call_id,
                                                "output": "sunny"}], max_output_tokens=4, temperature=0)
    assert follow_up.previous_response_id == response.id and follow_up.output[0].type == "message"
    # The conversation grew by the call and its result.
    assert follow_up.usage.input_tokens > response.usage.input_tokens


def test_streamed_function_call_arguments(client: openai.OpenAI, server: LiveServer) -> None:
    named: Any = {"type": "function", "name": "get_weather"}
    with client.responses.stream(model=server.model, input="Weather?", tools=[WEATHER], tool_choice=named,
                                 max_output_tokens=64, temperature=1.0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    [call] = final.output
    assert call.type == "function_call" and call.name == "get_weather"
    deltas = [event.delta for event in events if event.type == "response.function_call_arguments.delta"]
    assert "".join(deltas) == call.arguments and json.loads(call.arguments)["city"] in ("Paris", "Oslo")
    [done] = [event for event in events if event.type == "response.function_call_arguments.done"]
    assert done.arguments == call.arguments


def test_input_items_and_store_false(client: openai.OpenAI, server: LiveServer) -> None:
    items: Any = [{"role": "developer", "content": "Be terse."},
                  {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}]
    unstored = client.responses.create(model=server.model, input=items, store=False, max_output_tokens=2)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=server.model, input="more", previous_response_id=unstored.id,
                                max_output_tokens=2)


def test_bad_responses_requests_are_400s_naming_the_field(server: LiveServer) -> None:
    cases = [
        ({"input": "x", "reasoning": {"effort": "high"}}, "reasoning"),
        ({"input": "x", "tool_choice": "required"}, "tool_choice"),
        ({"input": "x", "text": {"format": {"type": "json_schema", "name": "a", "schema": {
            "type": "object", "properties": {"x": {"type": "no-such-type"}}}}}}, "text.format.schema"),
        ({"input": [{"type": "image", "url": "x"}]}, "input[0]"),
    ]
    for extra, param in cases:
        response = httpx.post(f"{server.v1}/responses", timeout=30, json={"model": server.model, **extra})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param, response.text
