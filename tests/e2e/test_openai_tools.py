"""Tool calling and structured outputs through the official `openai` SDK against a live server on
the demo model (random weights: it never calls a tool or writes JSON unless the grammar makes it).

Round trips use tool_choice `required` / a named function, which the engine enforces with a
grammar; `json_schema` strict answers are sampled at temperature 1 and must always validate.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from tests.e2e.conftest import LONG_CONTEXT, LiveServer, server_process
from tests.helpers import make_tiny_checkpoint

pytestmark = pytest.mark.e2e

CONTEXT = LONG_CONTEXT
WEATHER_PARAMS = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Rome"]},
                                                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                  "required": ["city", "days"], "additionalProperties": False}
TIME_PARAMS = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
               "additionalProperties": False}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                      "parameters": WEATHER_PARAMS}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME_PARAMS}},
]
PARAMS = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}
ANSWER_SCHEMA = {"type": "object", "properties": {
    "ok": {"type": "boolean"}, "level": {"type": "integer", "minimum": 0, "maximum": 9},
    "color": {"enum": ["red", "green", "blue"]}}, "required": ["ok", "level", "color"], "additionalProperties": False}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


class Answer(BaseModel):
    """A structured answer whose every instance is short (for the SDK's parse helper)."""

    ok: bool
    color: Literal["red", "green", "blue"]


@pytest.fixture(scope="module")
def server(long_context_server: LiveServer) -> LiveServer:
    return long_context_server


def _rename_special_token(checkpoint: Path, old: str, new: str) -> None:
    """Rename one of the tokenizer's special tokens (same id), e.g. the unused `</s>` to Mistral's `[TOOL_CALLS]`."""
    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text())
    for token in tokenizer["added_tokens"]:
        if token["content"] == old:
            token["content"] = new
    tokenizer["model"]["vocab"][new] = tokenizer["model"]["vocab"].pop(old)
    (checkpoint / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    config["extra_special_tokens"] = [new if token == old else token for token in config["extra_special_tokens"]]
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=server.api_key, max_retries=0, timeout=120)


def _check_call(name: str, arguments: str) -> dict[str, Any]:
    value = json.loads(arguments)
    jsonschema.validate(value, PARAMS[name])
    return value


def test_required_tool_call_round_trips_through_create(client: openai.OpenAI, server: LiveServer) -> None:
    response = client.chat.completions.create(model=server.model, messages=USER, tools=TOOLS, tool_choice="required",
                                              parallel_tool_calls=False, max_tokens=128, temperature=1.0, seed=1)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert calls and all(call.type == "function" and call.id.startswith("call_") for call in calls)
    for call in calls:
        _check_call(call.function.name, call.function.arguments)
    # The SDK's message goes back into the conversation, with the tool's result.
    follow_up = client.chat.completions.create(
        model=server.model, tools=TOOLS, max_tokens=4, temperature=0,
        messages=[*USER, choice.message,
                  *({"role": "tool", "tool_call_id": call.id, "content": "sunny"} for call in calls)])
    assert follow_up.choices[0].finish_reason in ("length", "stop", "tool_calls")


def test_named_tool_call_streams_into_the_sdks_accumulator(client: openai.OpenAI, server: LiveServer) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    with client.chat.completions.stream(model=server.model, messages=USER, tools=TOOLS, tool_choice=named,
                                        max_tokens=64, temperature=1.0, seed=2) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls is not None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_time" and call.id.startswith("call_")
    _check_call("get_time", call.function.arguments)
    deltas = [e for e in events if e.type == "tool_calls.function.arguments.delta"]
    assert "".join(e.arguments_delta for e in deltas) == call.function.arguments
    assert any(e.type == "tool_calls.function.arguments.done" for e in events)


def test_streamed_chunks_carry_index_id_name_then_argument_fragments(client: openai.OpenAI, server: LiveServer) -> None:
    chunks = list(client.chat.completions.create(model=server.model, messages=USER, tools=TOOLS, stream=True,
                                                 tool_choice="required", parallel_tool_calls=False, max_tokens=128,
                                                 temperature=1.0, seed=3))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert deltas and deltas[0].index == 0 and deltas[0].id and deltas[0].function.name in PARAMS
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in deltas[1:])
    _check_call(deltas[0].function.name, "".join(d.function.arguments or "" for d in deltas))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_parallel_calls_are_separate_tool_calls(client: openai.OpenAI, server: LiveServer) -> None:
    """The demo model rarely ends a run of calls (EOS is unlikely): a cut run ends in `length`,
    its last call possibly cut; every earlier call is whole."""
    response = client.chat.completions.create(model=server.model, messages=USER, tools=TOOLS, tool_choice="required",
                                              max_tokens=128, temperature=1.0, n=2, seed=1)
    assert max(len(choice.message.tool_calls or []) for choice in response.choices) >= 2
    for choice in response.choices:
        calls = choice.message.tool_calls or []
        assert len({call.id for call in calls}) == len(calls) >= 1
        whole = calls if choice.finish_reason == "tool_calls" else calls[:-1]
        assert choice.finish_reason in ("tool_calls", "length")
        for call in whole:
            _check_call(call.function.name, call.function.arguments)


def test_parallel_tool_calls_false_gives_one_call(client: openai.OpenAI, server: LiveServer) -> None:
    response = client.chat.completions.create(model=server.model, messages=USER, tools=TOOLS, tool_choice="required",
                                              parallel_tool_calls=False, max_tokens=96, temperature=1.0, n=2, seed=4)
    for choice in response.choices:
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls or []) == 1


def test_tool_choice_none_and_auto_answer_in_text(client: openai.OpenAI, server: LiveServer) -> None:
    for tool_choice in ("none", "auto"):
        response = client.chat.completions.create(model=server.model, messages=USER, tools=TOOLS,
                                                  tool_choice=tool_choice, max_tokens=6, temperature=0)
        choice = response.choices[0]
        assert choice.message.tool_calls is None and isinstance(choice.message.content, str)
        assert choice.finish_reason == "length"


def test_a_text_reply_has_no_tool_calls_key(server: LiveServer) -> None:
    """As OpenAI sends it: `refusal` null, `tool_calls` absent (not null) unless the model called tools."""
    for extra in ({}, {"tools": TOOLS, "tool_choice": "none"}):
        response = httpx.post(f"{server.v1}/chat/completions", timeout=30, json={
            "model": server.model, "messages": USER, "max_tokens": 4, **extra})
        assert response.status_code == 200, response.text
        message = response.json()["choices"][0]["message"]
        assert message["role"] == "assistant" and isinstance(message["content"], str)
        assert "tool_calls" not in message and message["refusal"] is None, message


def test_bad_tool_requests_are_400s_naming_the_field(server: LiveServer) -> None:
    cases = [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
            "x": {"type": "no-such-type"}}}}}], "tool_choice": "required"}, "tools[0].function.parameters"),
    ]
    for extra, param in cases:
        response = httpx.post(f"{server.v1}/chat/completions", timeout=30, json={
            "model": server.model, "messages": USER, "max_tokens": 4, **extra})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param, response.text


def test_json_schema_strict_answers_always_validate(client: openai.OpenAI, server: LiveServer) -> None:
    """100 requests sampled at temperature 1, sent together (the engine batches them)."""
    response_format: Any = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA,
                                                                   "strict": True}}
    aclient = openai.AsyncOpenAI(base_url=server.v1, api_key=server.api_key, max_retries=0, timeout=300)

    async def run() -> list[Any]:
        return await asyncio.gather(*(aclient.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": f"Rate color {i}."}], temperature=1.0,
            max_tokens=64, response_format=response_format) for i in range(100)))

    responses = asyncio.run(run())
    answers = [choice for response in responses for choice in response.choices]
    assert len(answers) == 100
    for choice in answers:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content or ""), ANSWER_SCHEMA)


def test_json_object_and_completions_json_schema(client: openai.OpenAI, server: LiveServer) -> None:
    chat = client.chat.completions.create(model=server.model, messages=USER, max_tokens=200, temperature=0,
                                          response_format={"type": "json_object"})
    assert chat.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(chat.choices[0].message.content or ""), dict)
    completion = client.completions.create(model=server.model, prompt="Answer:", max_tokens=64, temperature=1.0, n=4,
                                           extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                               "name": "answer", "schema": ANSWER_SCHEMA, "strict": True}}})
    for choice in completion.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.text), ANSWER_SCHEMA)


def test_parse_helper_reads_a_pydantic_answer(client: openai.OpenAI, server: LiveServer) -> None:
    completion = client.chat.completions.parse(model=server.model, messages=USER, response_format=Answer,
                                               max_tokens=96, temperature=1.0, seed=5)
    assert completion.choices[0].finish_reason == "stop"
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Answer) and parsed.color in ("red", "green", "blue")


def _mistral_vocabulary(checkpoint: Path) -> None:
    _rename_special_token(checkpoint, "</s>", "[TOOL_CALLS]")


def _deepseek_template(checkpoint: Path) -> None:
    template = checkpoint / "chat_template.jinja"
    template.write_text("{#- calls: <｜tool▁calls▁begin｜> -#}" + template.read_text())


OTHER_FORMATS = [  # (how the checkpoint is marked, tool_choice: one format's markers are special tokens)
    (_mistral_vocabulary, "required"),
    (_deepseek_template, {"type": "function", "function": {"name": "get_time"}}),  # its markers: ~200 byte tokens
]


@pytest.mark.slow  # a server per format
@pytest.mark.parametrize(("mark", "tool_choice"), OTHER_FORMATS, ids=["mistral", "deepseek"])
def test_other_formats_are_detected_forced_and_parsed_back(tmp_path: Path, mark: Any, tool_choice: Any) -> None:
    """A tokenizer with Mistral's `[TOOL_CALLS]` special token, a template with DeepSeek's tool
    tokens: the server picks the format, forces a call in it (keeping a special-token marker in
    the text) and parses it back, whole and streamed."""
    checkpoint = make_tiny_checkpoint("mixtral", tmp_path / "tiny-mixtral", max_position_embeddings=CONTEXT)
    mark(checkpoint)
    with server_process(checkpoint, ["--max-model-len", str(CONTEXT)], tmp_path / "server.log") as (base_url, _):
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
        request: dict[str, Any] = {"model": checkpoint.name, "messages": USER, "tools": TOOLS, "max_tokens": 320,
                                   "tool_choice": tool_choice, "temperature": 1.0, "seed": 7}
        whole = client.chat.completions.create(**request)
        with client.chat.completions.stream(**request) as stream:
            streamed = stream.get_final_completion()
    for completion in (whole, streamed):
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls" and not choice.message.content  # None, or the role chunk's ""
        [call] = choice.message.tool_calls or []
        _check_call(call.function.name, call.function.arguments)
    assert streamed.choices[0].message.tool_calls[0].function.arguments == \
        whole.choices[0].message.tool_calls[0].function.arguments  # same seed, same call
