"""Tokenization off the event loop, in two lanes, so that a short prompt never waits behind long ones.

Each lane is one worker thread with its own copy of the engine's tokenizer: a Hugging Face fast
tokenizer must not be shared between threads (transformers reconfigures it on each call, which
fails with "Already borrowed" while another thread is encoding). Inputs of up to
`SMALL_INPUT_CHARS` characters, and token-text lookups, take the small lane; longer ones the
large lane. The encoders release the GIL, so a long prompt costs the event loop nothing. Before
a text is encoded, `PromptLimit.check` refuses one whose byte length alone proves it cannot fit
the context (`TokenBound`), so a prompt of megabytes is answered in milliseconds.
"""

from __future__ import annotations

import asyncio
import copy
import enum
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import jinja2

from moe_serve.server.errors import APIError, ErrorCode
from moe_serve.server.token_bound import PromptLimit, TokenBound

if TYPE_CHECKING:
    from moe_serve.engine.core.async_engine import AsyncLLMEngine

T = TypeVar("T")

SMALL_INPUT_CHARS = 16 * 1024


class Lane(enum.Enum):
    """Which worker thread tokenizes an input."""

    SMALL = "small"
    LARGE = "large"


def lane_for(num_chars: int) -> Lane:
    return Lane.SMALL if num_chars <= SMALL_INPUT_CHARS else Lane.LARGE


@dataclass(frozen=True)
class ChatTemplateInfo:
    """What tool support needs to know of the tokenizer: its chat template's source, the tokens
    added to its vocabulary (markers such as `<tool_call>` or `[TOOL_CALLS]`) and the special ones
    among them (those the detokenizer drops unless told otherwise)."""

    source: str
    added_tokens: frozenset[str]
    special_tokens: frozenset[str]

    @property
    def renders_tools(self) -> bool:
        """Whether the template reads the `tools` it is given."""
        return "tools" in self.source


def _template_source(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # named templates: the default one (and tool_use when present)
        return "\n".join(str(template.get(name, "")) for name in ("default", "tool_use"))
    return str(template)


class TokenizerPool:
    """The engine's tokenizer on two worker threads (one copy each)."""

    def __init__(self, engine: AsyncLLMEngine) -> None:
        self._engine = engine
        self._executors = {lane: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tokenizer-{lane.value}")
                           for lane in Lane}
        self._local = threading.local()
        self._bound: TokenBound | None = None
        self._template_info: ChatTemplateInfo | None = None

    def _tokenizer(self) -> Any:
        """This worker thread's own copy of the tokenizer."""
        tokenizer = getattr(self._local, "tokenizer", None)
        if tokenizer is None:
            tokenizer = self._local.tokenizer = copy.deepcopy(self._engine.tokenizer)
        return tokenizer

    def _token_bound(self) -> TokenBound:
        if self._bound is None:
            self._bound = TokenBound.of(self._tokenizer())
        return self._bound

    async def _run(self, lane: Lane, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executors[lane], fn, *args)

    def _chat_template_info(self) -> ChatTemplateInfo:
        tokenizer = self._tokenizer()
        return ChatTemplateInfo(_template_source(tokenizer), frozenset(tokenizer.get_added_vocab()),
                                frozenset(tokenizer.all_special_tokens))

    def _render_chat(self, messages: list[dict[str, Any]], limit: PromptLimit,
                     tools: list[dict[str, Any]] | None) -> list[int]:
        tokenizer = self._tokenizer()
        try:
            text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
        except (jinja2.TemplateError, ValueError) as exc:
            raise APIError(400, f"the chat template rejected these messages: {exc}", param="messages",
                           code=ErrorCode.INVALID_VALUE) from exc
        limit.check(self._token_bound().min_tokens(text), exact=False)
        return list(tokenizer.encode(text, add_special_tokens=False))

    def _encode(self, text: str) -> list[int]:
        return list(self._tokenizer().encode(text))

    def _token_texts(self, token_ids: list[int]) -> list[str]:
        tokenizer = self._tokenizer()
        return [tokenizer.decode([token_id]) for token_id in token_ids]

    async def render_chat(self, messages: list[dict[str, Any]], limit: PromptLimit,
                          tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Prompt token ids for `messages` (and the `tools` the template may describe) with the
        generation prompt appended; a rendered text too long for `limit` is refused before it is encoded."""
        num_chars = sum(len(str(message.get("content") or "")) for message in messages)
        return await self._run(lane_for(num_chars), self._render_chat, messages, limit, tools)

    async def chat_template_info(self) -> ChatTemplateInfo:
        """The chat template's source and the added and special tokens (read once)."""
        if self._template_info is None:
            self._template_info = await self._run(Lane.SMALL, self._chat_template_info)
        return self._template_info

    async def encode(self, text: str, limit: PromptLimit) -> list[int]:
        """Token ids of a raw text prompt (with the tokenizer's special tokens); a text too long for
        `limit` is refused at once, without waiting for a worker."""
        if self._bound is None:
            await self._run(Lane.SMALL, self._token_bound)
        assert self._bound is not None
        limit.check(self._bound.min_tokens(text), exact=False)
        return await self._run(lane_for(len(text)), self._encode, text)

    async def token_texts(self, token_ids: list[int]) -> list[str]:
        """The text of each token on its own."""
        if not token_ids:
            return []
        return await self._run(Lane.SMALL, self._token_texts, token_ids)

    def shutdown(self) -> None:
        for executor in self._executors.values():
            executor.shutdown(wait=False, cancel_futures=True)
