"""Tool calls in a model's output text: one parser per format the supported families emit, and
the choice of parser from the model's chat template and vocabulary.

A parser reads the whole text generated so far and returns the user-visible content plus the
calls found (the last one possibly still open). `final=False` is the streaming view: it holds
back a trailing piece that may be the start of a tool-call marker, and an open call's arguments
only ever grow (each view's arguments are a prefix of the final ones), so a stream can send them
as fragments. Formats (markers as the models emit them):

- Hermes / Qwen: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call.
- Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (v3 tokenizers) or
  `[TOOL_CALLS]name[ARGS]{...}` per call (v11+).
- DeepSeek V3 / R1: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>name` newline
  then the arguments in a json code fence, `<｜tool▁call▁end｜>`...; V3.1: `name<｜tool▁sep｜>{...}`.
- gpt-oss harmony: messages `<|channel|>commentary to=functions.name <|constrain|>json<|message|>{...}<|call|>`;
  the `final` channel is the content, `analysis` (reasoning) is not shown.
"""

from __future__ import annotations

import enum
import json
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

logger = logging.getLogger(__name__)


class ToolCallFormat(str, enum.Enum):
    """How a model family writes tool calls."""

    HERMES = "hermes"
    MISTRAL = "mistral"
    DEEPSEEK = "deepseek"
    HARMONY = "harmony"


@dataclass(frozen=True)
class ParsedCall:
    """One tool call: the function's name and its arguments as JSON text (a prefix while open)."""

    name: str
    arguments: str
    complete: bool = True


@dataclass(frozen=True)
class ParsedOutput:
    """What a parser found: `content` for the user (None: no text beside the calls) and the calls."""

    content: str | None
    calls: list[ParsedCall] = field(default_factory=list)


@dataclass(frozen=True)
class ForcedCall:
    """How the grammar writes one call of a function in this format: `begin` + a JSON value valid
    against `schema` + `end` (the arguments' schema, or a wrapper naming the function)."""

    begin: str
    schema: dict[str, Any]
    end: str


def pending_marker_length(text: str, markers: Iterable[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `markers`."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), longest, -1):
            if text.endswith(marker[:size]):
                longest = size
                break
    return longest


def _arguments_text(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def _call_from_object(value: Any) -> ParsedCall | None:
    """{"name": ..., "arguments" | "parameters": ...} as a call, else None."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    return ParsedCall(value["name"], _arguments_text(arguments))


class ToolCallParser(ABC):
    """Finds tool calls in generated text (see the module docstring for the view it returns)."""

    format: ClassVar[ToolCallFormat]
    # Strings whose presence in a chat template or vocabulary identifies the format.
    markers: ClassVar[tuple[str, ...]]
    # Markers the model writes as special tokens (the detokenizer must keep them).
    special_markers: ClassVar[tuple[str, ...]] = ()
    # Whether forced calls may repeat (`begin` + JSON + `end`, several times); else one is forced.
    repeatable_forced_call: ClassVar[bool] = True

    @abstractmethod
    def parse(self, text: str, final: bool) -> ParsedOutput:
        """The content and calls in `text`; `final` once the generation has ended."""

    @abstractmethod
    def forced_call(self, name: str, parameters: Mapping[str, Any]) -> ForcedCall:
        """The grammar form of one call of `name` (tool_choice required / named function)."""


class _StartMarkerParser(ToolCallParser):
    """Formats where the content is the text before a start marker and the calls follow it."""

    start: ClassVar[str]

    def parse(self, text: str, final: bool) -> ParsedOutput:
        start = text.find(self.start)
        if start < 0:
            return ParsedOutput(text if final else text[:len(text) - pending_marker_length(text, [self.start])])
        calls = self._calls(text[start + len(self.start):], final)
        if final and not calls:
            logger.info("no parsable tool call after %r; returning the text as content", self.start)
            return ParsedOutput(text)
        return ParsedOutput(text[:start], calls)

    @abstractmethod
    def _calls(self, section: str, final: bool) -> list[ParsedCall]:
        """The calls in the text after the first start marker."""


_HERMES_PREFIX = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"\\]+)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')


class HermesParser(_StartMarkerParser):
    """Hermes / Qwen: `<tool_call>` JSON `</tool_call>` blocks."""

    format = ToolCallFormat.HERMES
    start = "<tool_call>"
    end = "</tool_call>"
    markers = ("<tool_call>",)

    def _calls(self, section: str, final: bool) -> list[ParsedCall]:
        calls: list[ParsedCall] = []
        body_start = 0
        while True:
            end = section.find(self.end, body_start)
            if end < 0:
                call = self._block(section[body_start:], complete=final)
                return calls + ([call] if call else [])
            call = self._block(section[body_start:end], complete=True)
            calls += [call] if call else []
            next_start = section.find(self.start, end)
            if next_start < 0:
                return calls
            body_start = next_start + len(self.start)

    def _block(self, body: str, complete: bool) -> ParsedCall | None:
        """One block's call. When it opens with `{"name": "...", "arguments": ` the arguments are
        its raw text up to the block's last `}` (the wrapper's), so an open block's arguments are
        a prefix of the closed one's; otherwise the block must parse as JSON once closed."""
        match = _HERMES_PREFIX.match(body)
        if match:
            rest = body[match.end():]
            cut = rest.rfind("}")
            if cut < 0:  # no closing brace yet (or arguments that are no object)
                if complete:
                    return ParsedCall(match.group(1), rest.strip())
                rest = rest[:len(rest) - pending_marker_length(rest, [self.end])]
                cut = len(rest)
            return ParsedCall(match.group(1), rest[:cut].rstrip(), complete)
        if not complete:
            return None
        try:
            return _call_from_object(json.loads(body))
        except json.JSONDecodeError:
            logger.info("a <tool_call> block is not JSON: %.200r", body)
            return None

    def forced_call(self, name: str, parameters: Mapping[str, Any]) -> ForcedCall:
        schema = {"type": "object", "properties": {"name": {"const": name}, "arguments": dict(parameters)},
                  "required": ["name", "arguments"]}
        return ForcedCall(f"{self.start}\n", schema, f"\n{self.end}")


class MistralParser(_StartMarkerParser):
    """Mistral: `[TOOL_CALLS]` then a JSON array of calls, or `name[ARGS]{...}` per call."""

    format = ToolCallFormat.MISTRAL
    start = "[TOOL_CALLS]"
    args = "[ARGS]"
    markers = ("[TOOL_CALLS]",)
    special_markers = ("[TOOL_CALLS]",)
    repeatable_forced_call = False

    def _calls(self, section: str, final: bool) -> list[ParsedCall]:
        if section.lstrip().startswith("["):
            return self._array(section, final)
        calls: list[ParsedCall] = []
        segments = section.split(self.start)
        for i, segment in enumerate(segments):
            complete = final or i < len(segments) - 1
            name, sep, arguments = segment.partition(self.args)
            if not sep:
                continue
            if not complete:
                arguments = arguments[:len(arguments) - pending_marker_length(arguments, [self.start])]
            calls.append(ParsedCall(name.strip(), arguments.strip() if complete else arguments.rstrip(), complete))
        return calls

    @staticmethod
    def _array(section: str, final: bool) -> list[ParsedCall]:
        try:
            value, _ = json.JSONDecoder().raw_decode(section.lstrip())
        except json.JSONDecodeError:
            if final:
                logger.info("the [TOOL_CALLS] array is not JSON: %.200r", section)
            return []
        calls = [_call_from_object(item) for item in value] if isinstance(value, list) else []
        return [call for call in calls if call is not None]

    def forced_call(self, name: str, parameters: Mapping[str, Any]) -> ForcedCall:
        schema = {"type": "object", "properties": {"name": {"const": name}, "arguments": dict(parameters)},
                  "required": ["name", "arguments"]}
        return ForcedCall(f"{self.start}[", schema, "]")


class DeepSeekParser(_StartMarkerParser):
    """DeepSeek V3 / R1 / V3.1 tool tokens (calls are reported once each is complete)."""

    format = ToolCallFormat.DEEPSEEK
    start = "<｜tool▁calls▁begin｜>"
    call_begin = "<｜tool▁call▁begin｜>"
    separator = "<｜tool▁sep｜>"
    call_end = "<｜tool▁call▁end｜>"
    calls_end = "<｜tool▁calls▁end｜>"
    repeatable_forced_call = False
    markers = ("<｜tool▁calls▁begin｜>",)
    _fenced = re.compile(r"^(?P<name>[^\n]+)\n```(?:json)?\n(?P<args>.*)\n```\s*$", re.DOTALL)

    def _calls(self, section: str, final: bool) -> list[ParsedCall]:
        calls: list[ParsedCall] = []
        for block in section.split(self.call_begin)[1:]:
            body, closed, _ = block.partition(self.call_end)
            if closed or final:
                call = self._call(body)
                calls += [call] if call else []
        return calls

    def _call(self, body: str) -> ParsedCall | None:
        head, sep, tail = body.partition(self.separator)
        if not sep:
            return None
        if head.strip() == "function":  # V3 / R1: the name, then the arguments in a json fence
            fenced = self._fenced.match(tail.strip("\r ").rstrip())
            if fenced is None:
                return None
            return ParsedCall(fenced.group("name").strip(), fenced.group("args").strip())
        return ParsedCall(head.strip(), tail.strip())  # V3.1: name<｜tool▁sep｜>arguments

    def forced_call(self, name: str, parameters: Mapping[str, Any]) -> ForcedCall:
        begin = f"{self.start}{self.call_begin}function{self.separator}{name}\n```json\n"
        return ForcedCall(begin, dict(parameters), f"\n```{self.call_end}{self.calls_end}")


class HarmonyParser(ToolCallParser):
    """gpt-oss harmony: `final` channel messages are the content, commentary messages addressed
    `to=functions.NAME` are calls (reported when complete), `analysis` is reasoning (not shown)."""

    format = ToolCallFormat.HARMONY
    markers = ("<|channel|>", "<|call|>")
    special_markers = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|call|>", "<|return|>",
                       "<|constrain|>")
    message = "<|message|>"
    _ends = ("<|end|>", "<|call|>", "<|return|>")
    _recipient = re.compile(r"to=functions\.([^\s<]+)")
    _channel = re.compile(r"<\|channel\|>\s*(\w+)")

    def parse(self, text: str, final: bool) -> ParsedOutput:
        if "<|channel|>" not in text and "<|message|>" not in text:
            if final:
                return ParsedOutput(text)
            return ParsedOutput(text[:len(text) - pending_marker_length(text, self.special_markers)])
        content: list[str] = []
        calls: list[ParsedCall] = []
        for message in text.split("<|start|>"):
            header, sep, body = message.partition(self.message)
            if not sep:
                continue
            ends = [body.find(end) for end in self._ends if end in body]
            closed = bool(ends)
            body = body[:min(ends)] if closed else body
            recipient = self._recipient.search(header)
            channel = self._channel.search(header)
            if recipient:
                if closed or final:
                    calls.append(ParsedCall(recipient.group(1), body.strip()))
            elif channel and channel.group(1) in ("final", "commentary"):
                if not (closed or final):
                    body = body[:len(body) - pending_marker_length(body, self.special_markers)]
                content.append(body)
        return ParsedOutput("".join(content) or (None if calls else ""), calls)

    def forced_call(self, name: str, parameters: Mapping[str, Any]) -> ForcedCall:
        return ForcedCall(f"<|channel|>commentary to=functions.{name} <|constrain|>json{self.message}",
                          dict(parameters), "<|call|>")


PARSERS: tuple[type[ToolCallParser], ...] = (HarmonyParser, DeepSeekParser, MistralParser, HermesParser)


def detect_format(chat_template: str, vocabulary: Iterable[str]) -> ToolCallFormat:
    """The format whose markers the chat template or the vocabulary holds (first match in
    PARSERS order); Hermes when none does (ChatML templates without tool support, e.g. the demo
    model, get Hermes' `<tool_call>` convention, which the server also writes into the prompt)."""
    tokens = set(vocabulary)
    for parser in PARSERS:
        if all(marker in chat_template or marker in tokens for marker in parser.markers):
            return parser.format
    return ToolCallFormat.HERMES


def parser_for(tool_format: ToolCallFormat) -> ToolCallParser:
    """The parser of `tool_format`."""
    return next(parser() for parser in PARSERS if parser.format is tool_format)


def finish_output(parsed: ParsedOutput, max_calls: int | None) -> ParsedOutput:
    """The answer's final form: at most `max_calls` calls (parallel_tool_calls=false: one); beside
    calls, content loses trailing whitespace and is None when nothing is left."""
    calls = parsed.calls[:max_calls] if max_calls is not None else parsed.calls
    if not calls:
        return ParsedOutput(parsed.content or "", [])
    content = (parsed.content or "").rstrip()
    return ParsedOutput(content or None, calls)

