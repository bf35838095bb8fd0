"""Tool-call parsing on text: each format's calls and content, the streaming view (fed piece by
piece, its deltas add up to the non-streaming answer), the choice of format from a template or
vocabulary, and the request-side plan (template fallback, forced calls as a grammar)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_serve.engine.core.guided.spec import GuidedKind
from moe_serve.server.errors import APIError
from moe_serve.server.protocol import FunctionDefinition, NamedToolChoice
from moe_serve.server.tokenizer_pool import ChatTemplateInfo
from moe_serve.server.tool_calls import plan_tools
from moe_serve.server.tool_parsers import (
    DeepSeekParser,
    HarmonyParser,
    HermesParser,
    MistralParser,
    ToolCallFormat,
    ToolCallParser,
    detect_format,
    finish_output,
    pending_marker_length,
)
from moe_serve.server.tool_stream import ToolCallStream

WEATHER = '{"city": "Paris", "days": [1, 2], "unit": {"c": true}}'
HERMES_TWO = (f'Let me check.\n<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>\n'
              '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
DS_V3 = ("Sure<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
         f"{WEATHER}\n```<｜tool▁call▁end｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{{}}\n```"
         "<｜tool▁call▁end｜><｜tool▁calls▁end｜>")
DS_V31 = (f"<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{WEATHER}<｜tool▁call▁end｜>"
          "<｜tool▁calls▁end｜>")
HARMONY = ("<|channel|>analysis<|message|>The user wants weather.<|end|><|start|>assistant<|channel|>commentary "
           f"to=functions.get_weather <|constrain|>json<|message|>{WEATHER}<|call|>")
HARMONY_FINAL = "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final<|message|>Hi there!"

# (parser, generated text, expected content, expected [(name, arguments JSON)])
CASES: list[tuple[ToolCallParser, str, str | None, list[tuple[str, str]]]] = [
    (HermesParser(), HERMES_TWO, "Let me check.", [("get_weather", WEATHER), ("get_time", "{}")]),
    (HermesParser(), "no tools here, <tool but not a tag", "no tools here, <tool but not a tag", []),
    (HermesParser(), '<tool_call>\n{"arguments": {"a": 1}, "name": "f"}\n</tool_call>', None, [("f", '{"a": 1}')]),
    (HermesParser(), '<tool_call>\n{"name": "f", "arguments": {"a": 1}}', None, [("f", '{"a": 1}')]),
    (HermesParser(), "x <tool_call>not json</tool_call>", "x <tool_call>not json</tool_call>", []),
    (MistralParser(), f'Ok[TOOL_CALLS][{{"name": "get_weather", "arguments": {WEATHER}}}, '
                      '{"name": "get_time", "arguments": {}}]', "Ok", [("get_weather", WEATHER), ("get_time", "{}")]),
    (MistralParser(), f"[TOOL_CALLS]get_weather[ARGS]{WEATHER}[TOOL_CALLS]get_time[ARGS]{{}}", None,
     [("get_weather", WEATHER), ("get_time", "{}")]),
    (DeepSeekParser(), DS_V3, "Sure", [("get_weather", WEATHER), ("get_time", "{}")]),
    (DeepSeekParser(), DS_V31, None, [("get_weather", WEATHER)]),
    (HarmonyParser(), HARMONY, None, [("get_weather", WEATHER)]),
    (HarmonyParser(), HARMONY_FINAL, "Hi there!", []),
    (HarmonyParser(), "plain text", "plain text", []),
]


def _normalized(arguments: str) -> object:
    return json.loads(arguments)


@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES)
def test_each_format_parses_content_and_calls(parser: ToolCallParser, text: str, content: str | None,
                                              calls: list[tuple[str, str]]) -> None:
    parsed = finish_output(parser.parse(text, final=True), None)
    assert parsed.content == content
    assert [(c.name, _normalized(c.arguments)) for c in parsed.calls] == [(n, json.loads(a)) for n, a in calls]


def _stream(parser: ToolCallParser, text: str, step: int, max_calls: int | None = None) -> tuple[str, list[dict]]:
    """Feed `text` `step` characters at a time; accumulate the deltas as the OpenAI SDK does."""
    return _stream_pieces(parser, [text[i:i + step] for i in range(0, len(text), step)], max_calls)


def _stream_pieces(parser: ToolCallParser, pieces: list[str], max_calls: int | None = None) -> tuple[str, list[dict]]:
    stream = ToolCallStream(parser, max_calls)
    content, calls = "", []
    for i, piece in enumerate(pieces):
        delta = stream.feed(piece, final=i == len(pieces) - 1)
        content += delta.content
        for call in delta.tool_calls:
            if call.call_id is not None:
                assert call.index == len(calls) and call.name
                calls.append({"id": call.call_id, "name": call.name, "arguments": call.arguments})
            else:
                calls[call.index]["arguments"] += call.arguments
    return content, calls


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
@pytest.mark.parametrize(("parser", "text", "content", "calls"), CASES)
def test_streamed_deltas_add_up_to_the_whole_answer(parser: ToolCallParser, text: str, content: str | None,
                                                    calls: list[tuple[str, str]], step: int) -> None:
    whole = finish_output(parser.parse(text, final=True), None)
    streamed_content, streamed_calls = _stream(parser, text, step)
    assert streamed_content == (whole.content or "")
    assert [(c["name"], c["arguments"]) for c in streamed_calls] == [(c.name, c.arguments) for c in whole.calls]
    assert len({c["id"] for c in streamed_calls}) == len(streamed_calls)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(CASES) - 1), st.lists(st.integers(1, 9), min_size=1, max_size=400))
def test_any_chunking_streams_the_whole_answer(case: int, sizes: list[int]) -> None:
    parser, text, _, _ = CASES[case]
    pieces, position = [], 0
    for size in sizes:
        pieces.append(text[position:position + size])
        position += size
    pieces[-1] += text[position:]
    whole = finish_output(parser.parse(text, final=True), None)
    content, calls = _stream_pieces(parser, pieces)
    assert content == (whole.content or "")
    assert [(c["name"], c["arguments"]) for c in calls] == [(c.name, c.arguments) for c in whole.calls]


def test_hermes_arguments_stream_before_the_call_closes() -> None:
    stream = ToolCallStream(HermesParser(), None)
    first = stream.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', final=False)
    assert first.content == "" and [d.name for d in first.tool_calls] == ["get_weather", None]
    assert first.tool_calls[1].arguments == '{"city": "Par'
    second = stream.feed('is"}', final=False)  # a `}` that may be the wrapper's is held back
    assert [d.arguments for d in second.tool_calls] == ['is"']
    third = stream.feed('}\n</tool', final=False)
    assert [d.arguments for d in third.tool_calls] == ["}"]
    assert stream.feed("_call>", final=True).tool_calls == []


def test_text_that_may_open_a_tag_is_held_back_then_released() -> None:
    stream = ToolCallStream(HermesParser(), None)
    assert stream.feed("Hello <tool", final=False).content == "Hello"
    assert stream.feed("box> ok", final=True).content == " <toolbox> ok"


def test_parallel_tool_calls_false_keeps_the_first_call() -> None:
    assert [c.name for c in finish_output(HermesParser().parse(HERMES_TWO, final=True), 1).calls] == ["get_weather"]
    _, calls = _stream(HermesParser(), HERMES_TWO, 5, max_calls=1)
    assert [c["name"] for c in calls] == ["get_weather"]


def test_pending_marker_length() -> None:
    assert pending_marker_length("abc <tool_c", ["<tool_call>"]) == len("<tool_c")
    assert pending_marker_length("abc", ["<tool_call>"]) == 0
    assert pending_marker_length("<tool_call>", ["<tool_call>"]) == 0  # whole markers are not pending


@pytest.mark.parametrize(("template", "vocabulary", "expected"), [
    ("{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}", [], ToolCallFormat.HERMES),
    ("{{ '<tool_call>' }}{{ tools | tojson }}", ["<tool_call>", "</tool_call>"], ToolCallFormat.HERMES),
    ("{{ '[AVAILABLE_TOOLS]' }}", ["[TOOL_CALLS]", "[AVAILABLE_TOOLS]"], ToolCallFormat.MISTRAL),
    ("{{'<｜tool▁calls▁begin｜>'}}", [], ToolCallFormat.DEEPSEEK),
    ("{{ '<|channel|>' }}", ["<|channel|>", "<|call|>"], ToolCallFormat.HARMONY),
])
def test_the_format_is_chosen_from_template_and_vocabulary(template: str, vocabulary: list[str],
                                                           expected: ToolCallFormat) -> None:
    assert detect_format(template, vocabulary) is expected


WEATHER_FN = FunctionDefinition(name="get_weather", parameters={"type": "object", "properties": {
    "city": {"type": "string"}}, "required": ["city"]})
TIME_FN = FunctionDefinition(name="get_time")
CHATML = ChatTemplateInfo("{{ messages }}", frozenset({"<|im_start|>"}), frozenset({"<|im_start|>"}))
QWEN = ChatTemplateInfo("{% if tools %}<tool_call>{% endif %}", frozenset({"<tool_call>"}), frozenset())
DEEPSEEK = ChatTemplateInfo("{% if tools %}<｜tool▁calls▁begin｜>{% endif %}", frozenset(), frozenset())
MISTRAL = ChatTemplateInfo("{% if tools %}[AVAILABLE_TOOLS]{% endif %}", frozenset({"[TOOL_CALLS]"}),
                           frozenset({"[TOOL_CALLS]"}))


def test_a_template_without_tools_gets_them_in_a_system_message() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
                {"role": "tool", "content": "rain", "tool_call_id": "call_1"}]
    plan = plan_tools(messages, [WEATHER_FN], None, True, CHATML)
    assert plan.parser is not None and plan.parser.format is ToolCallFormat.HERMES and plan.guided is None
    assert plan.messages[0]["content"].startswith("Be brief.\n\n# Tools") and '"get_weather"' in plan.messages[0]["content"]
    assert plan.messages[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert plan.messages[3] == messages[3]
    assert plan_tools(messages, [WEATHER_FN], None, True, QWEN).messages == messages  # the template renders tools


def test_tool_choice_none_and_no_tools_parse_nothing() -> None:
    messages = [{"role": "user", "content": "hi"}]
    assert plan_tools(messages, [], None, True, QWEN).parser is None
    plan = plan_tools(messages, [WEATHER_FN], "none", True, QWEN)
    assert plan.parser is None and plan.tools is not None and plan.guided is None


def test_required_and_named_tool_choice_are_tagged_json_grammars() -> None:
    messages = [{"role": "user", "content": "hi"}]
    required = plan_tools(messages, [WEATHER_FN, TIME_FN], "required", True, QWEN).guided
    assert required is not None and required.kind is GuidedKind.TAGGED_JSON and required.multiple
    assert (required.begin, required.end) == ("<tool_call>\n", "\n</tool_call>")
    assert required.schema_params == ("tools[0].function.parameters", "tools[1].function.parameters")
    assert json.loads(required.schemas[1])["properties"]["name"] == {"const": "get_time"}
    single = plan_tools(messages, [WEATHER_FN, TIME_FN], "required", False, QWEN)
    assert single.guided is not None and not single.guided.multiple and single.max_calls == 1
    named = plan_tools(messages, [WEATHER_FN, TIME_FN], NamedToolChoice.model_validate(
        {"type": "function", "function": {"name": "get_time"}}), True, DEEPSEEK).guided
    assert named is not None and "get_time" in named.begin and not named.multiple
    assert named.schema_params == ("tools[1].function.parameters",)
    assert json.loads(named.schemas[0]) == {"type": "object", "properties": {}}
    with pytest.raises(APIError) as error:
        plan_tools(messages, [WEATHER_FN, TIME_FN], "required", True, DEEPSEEK)
    assert error.value.param == "tool_choice"


def test_a_forced_call_parses_back_in_its_own_format() -> None:
    for parser in (HermesParser(), MistralParser(), DeepSeekParser(), HarmonyParser()):
        forced = parser.forced_call("get_weather", WEATHER_FN.parameters_schema())
        value = {"city": "Rome"} if "name" not in forced.schema.get("properties", {}) else {
            "name": "get_weather", "arguments": {"city": "Rome"}}
        text = forced.begin + json.dumps(value, separators=(",", ":")) + forced.end
        parsed = finish_output(parser.parse(text, final=True), None)
        assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [("get_weather", {"city": "Rome"})]


def test_special_token_markers_ask_the_detokenizer_to_keep_them() -> None:
    plan = plan_tools([{"role": "user", "content": "hi"}], [WEATHER_FN], "auto", True, MISTRAL)
    assert plan.parser is not None and plan.parser.format is ToolCallFormat.MISTRAL and plan.keep_special_tokens
    assert not plan_tools([{"role": "user", "content": "hi"}], [WEATHER_FN], "auto", True, QWEN).keep_special_tokens
