"""Response bodies shaped exactly like OpenAI's (non-streaming), plus the logprob formats
of chat (`{"content": [...]}`) and of text completions (`tokens`, `token_logprobs`, ...).
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Literal

from pydantic import BaseModel, SerializerFunctionWrapHandler, model_serializer

from moe_serve.engine.core.sampling_params import TokenLogprob


def new_id(prefix: str) -> str:
    """An OpenAI-style object id such as `chatcmpl-...`."""
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobEntry(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry]


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    """A reply's message as OpenAI sends it: `refusal` always (null: this server never refuses),
    `tool_calls` only when the model called tools."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCallOut] | None = None

    @model_serializer(mode="wrap")
    def _without_absent_tool_calls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if data.get("tool_calls") is None:
            data.pop("tool_calls", None)
        return data


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "moe-serve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(logprobs: list[TokenLogprob], texts: dict[int, str]) -> ChatLogprobs:
    """Chat logprobs; `texts` maps every token id involved to its text."""
    return ChatLogprobs(content=[
        TokenLogprobEntry(
            token=texts[lp.token_id],
            logprob=lp.logprob,
            bytes=_bytes(texts[lp.token_id]),
            top_logprobs=[TopLogprob(token=texts[t], logprob=v, bytes=_bytes(texts[t])) for t, v in lp.top],
        )
        for lp in logprobs
    ])


def completion_logprobs(logprobs: list[TokenLogprob], texts: dict[int, str], text_offset: int) -> CompletionLogprobs:
    """Legacy completion logprobs; offsets count characters from `text_offset`."""
    tokens = [texts[lp.token_id] for lp in logprobs]
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[lp.logprob for lp in logprobs],
        top_logprobs=[{texts[t]: v for t, v in lp.top} for lp in logprobs],
        text_offset=offsets,
    )


def logprob_token_ids(logprobs: list[TokenLogprob]) -> list[int]:
    """Every token id whose text the logprob formats need, without duplicates."""
    ids: dict[int, None] = {}
    for lp in logprobs:
        ids[lp.token_id] = None
        ids.update((t, None) for t, _ in lp.top)
    return list(ids)
