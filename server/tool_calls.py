"""How one request uses tools: what the chat template receives (`tools`, messages with tool calls
and results), which parser reads the output (chosen from the template and vocabulary, see
`tool_parsers.detect_format`), and tool_choice `required` / a named function as a grammar
(`GuidedDecoding.tagged_json`: begin literal + JSON matching the function's schema + end literal).

A template that ignores `tools` (ChatML without tool support, e.g. the demo model's) gets the
tools described in a system message in Hermes' `<tool_call>` convention, and earlier assistant
calls written back in that form, so the prompt says what the parser reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from moe_serve.engine.core.guided.spec import GuidedDecoding
from moe_serve.server.errors import APIError, ErrorCode
from moe_serve.server.protocol import FunctionDefinition, NamedToolChoice, ToolChoice
from moe_serve.server.tokenizer_pool import ChatTemplateInfo
from moe_serve.server.tool_parsers import ForcedCall, ToolCallFormat, ToolCallParser, detect_format, parser_for

TOOL_PROMPT = (
    "# Tools\n\nFunctions you may call:\n<tools>\n{tools}\n</tools>\n\nTo call one, reply with <tool_call>\n"
    "{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>"
)


@dataclass(frozen=True)
class ToolPlan:
    """What one request sends to the template and how its output is read."""

    messages: list[dict[str, Any]]  # the conversation as the template reads it
    tools: list[dict[str, Any]] | None  # the template's `tools` argument
    parser: ToolCallParser | None  # None: the output is content only
    guided: GuidedDecoding | None  # tool_choice required / named function
    max_calls: int | None  # parallel_tool_calls=false: 1
    keep_special_tokens: bool  # the format's markers are special tokens the detokenizer must keep


def _tool_dict(function: FunctionDefinition) -> dict[str, Any]:
    return {"type": "function", "function": function.model_dump(exclude_none=True)}


def _hermes_call_text(call: dict[str, Any]) -> str:
    function = call["function"]
    body = json.dumps({"name": function["name"], "arguments": function["arguments"]}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


def _with_tool_prompt(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` for a template that ignores tools: the tool prompt in the (first) system message,
    assistant tool calls as Hermes text."""
    prompt = TOOL_PROMPT.format(tools="\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools))
    rendered = []
    for message in messages:
        if message.get("tool_calls"):
            calls = "\n".join(_hermes_call_text(call) for call in message["tool_calls"])
            content = "\n".join(part for part in (message.get("content"), calls) if part)
            message = {key: value for key, value in message.items() if key != "tool_calls"} | {"content": content}
        rendered.append(message)
    if rendered and rendered[0]["role"] == "system":
        return [{**rendered[0], "content": f"{rendered[0]['content']}\n\n{prompt}"}, *rendered[1:]]
    return [{"role": "system", "content": prompt}, *rendered]


def forced_tool_calls(parser: ToolCallParser, functions: list[FunctionDefinition], named: str | None,
                      parallel: bool) -> GuidedDecoding:
    """The grammar that makes the model call `named` (or, when None, any of `functions`; several
    calls when `parallel` and the format allows it)."""
    indices = [i for i, function in enumerate(functions) if named is None or function.name == named]
    forced: list[ForcedCall] = [parser.forced_call(functions[i].name, functions[i].parameters_schema())
                                for i in indices]
    if len({call.begin for call in forced}) > 1 or len({call.end for call in forced}) > 1:
        raise APIError(400, f"tool_choice 'required' with several tools is not supported for the "
                       f"{parser.format.value} tool-call format: name one function", param="tool_choice",
                       code=ErrorCode.INVALID_VALUE)
    return GuidedDecoding.tagged_json(
        forced[0].begin, forced[0].end, [call.schema for call in forced],
        multiple=parallel and named is None and parser.repeatable_forced_call, separator="\n", param="tools",
        schema_params=[f"tools[{i}].function.parameters" for i in indices],
    )


def plan_tools(messages: list[dict[str, Any]], functions: list[FunctionDefinition], choice: ToolChoice | None,
               parallel: bool, info: ChatTemplateInfo) -> ToolPlan:
    """The ToolPlan of a request with `functions` (possibly none) and `choice` (None: auto when
    there are tools)."""
    if not functions:
        return ToolPlan(messages, None, None, None, None, keep_special_tokens=False)
    tools = [_tool_dict(function) for function in functions]
    tool_format = detect_format(info.source, info.added_tokens)
    if not info.renders_tools and tool_format is ToolCallFormat.HERMES:
        messages = _with_tool_prompt(messages, tools)
    if choice == "none":
        return ToolPlan(messages, tools, None, None, None, keep_special_tokens=False)
    parser = parser_for(tool_format)
    guided = None
    if choice == "required" or isinstance(choice, NamedToolChoice):
        named = choice.function.name if isinstance(choice, NamedToolChoice) else None
        guided = forced_tool_calls(parser, functions, named, parallel)
    keep_special = any(marker in info.special_tokens for marker in parser.special_markers)
    return ToolPlan(messages, tools, parser, guided, None if parallel else 1, keep_special)
