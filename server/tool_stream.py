"""Tool calls while streaming: the content and `delta.tool_calls` fragments (index, id, function
name, argument pieces, as OpenAI sends them) between successive parser views of the text
generated so far. Text that may start a tool-call marker is held back until it is decided.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from typing import Any

from moe_serve.server.tool_parsers import ParsedOutput, ToolCallParser, finish_output

logger = logging.getLogger(__name__)


def new_call_id() -> str:
    """An OpenAI-style tool call id (`call_...`)."""
    return f"call_{secrets.token_hex(12)}"


@dataclass(frozen=True)
class ToolCallDelta:
    """One fragment of call `index`: its first one carries the id and the function name."""

    index: int
    arguments: str
    call_id: str | None = None
    name: str | None = None

    def chat_delta(self) -> dict[str, Any]:
        """The `delta.tool_calls[]` entry of a chat completion chunk."""
        if self.call_id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {"index": self.index, "id": self.call_id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class StreamDelta:
    """What one step adds: content text and call fragments, in order."""

    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


@dataclass
class _SentCall:
    call_id: str
    name: str
    arguments: str = ""


class ToolCallStream:
    """Turns the text of one choice, fed piece by piece, into content and tool-call deltas whose
    concatenation equals the non-streaming answer (`finish_output` of the final parse)."""

    def __init__(self, parser: ToolCallParser, max_calls: int | None) -> None:
        self._parser = parser
        self._max_calls = max_calls
        self._text = ""
        self._content_sent = ""
        self._calls: list[_SentCall] = []

    @property
    def num_calls(self) -> int:
        """How many calls have been sent so far."""
        return len(self._calls)

    def feed(self, new_text: str, final: bool) -> StreamDelta:
        """The deltas after appending `new_text`; `final` when the generation has ended."""
        self._text += new_text
        if not new_text and not final:
            return StreamDelta()
        parsed = self._parser.parse(self._text, final)
        if final:
            view = finish_output(parsed, self._max_calls)
            content = view.content or ""
        else:
            view = ParsedOutput(parsed.content, parsed.calls[:self._max_calls])
            content = (parsed.content or "").rstrip()
        return StreamDelta(self._content_delta(content), self._call_deltas(view))

    def _content_delta(self, content: str) -> str:
        if not content.startswith(self._content_sent):
            logger.warning("streamed content is no prefix of the parsed content; sending no more of it")
            return ""
        delta = content[len(self._content_sent):]
        self._content_sent = content
        return delta

    def _call_deltas(self, view: ParsedOutput) -> list[ToolCallDelta]:
        deltas: list[ToolCallDelta] = []
        for index, call in enumerate(view.calls):
            if index == len(self._calls):
                self._calls.append(_SentCall(new_call_id(), call.name))
                deltas.append(ToolCallDelta(index, "", self._calls[index].call_id, call.name))
            sent = self._calls[index]
            if not call.arguments.startswith(sent.arguments):
                logger.warning("tool call %d: arguments are no extension of those streamed", index)
                continue
            if len(call.arguments) > len(sent.arguments):
                deltas.append(ToolCallDelta(index, call.arguments[len(sent.arguments):]))
                sent.arguments = call.arguments
        return deltas
