"""What the route handlers share: the engine, the served model id, a tokenizer worker.

Tokenization and chat-template rendering run on one dedicated worker thread so that a
long prompt never blocks the event loop and the tokenizer is never used concurrently.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jinja2
from fastapi import Request

from server.errors import APIError, ErrorCode, ErrorType, retry_after_header
from server.protocol import TASK_NAME_PATTERN

if TYPE_CHECKING:
    from engine.async_engine import AsyncLLMEngine

logger = logging.getLogger(__name__)

LOADING_RETRY_AFTER_S = 5.0
TASK_HEADER = "X-Task"


class TokenizerWorker:
    """Runs the engine's tokenizer on a single background thread."""

    def __init__(self, engine: AsyncLLMEngine) -> None:
        self._engine = engine
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        tokenizer = self._engine.tokenizer
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except (jinja2.TemplateError, ValueError) as exc:
            raise APIError(400, f"the chat template rejected these messages: {exc}", param="messages",
                           code=ErrorCode.INVALID_VALUE) from exc
        return list(tokenizer.encode(text, add_special_tokens=False))

    def _encode(self, text: str) -> list[int]:
        return list(self._engine.tokenizer.encode(text))

    def _token_texts(self, token_ids: list[int]) -> list[str]:
        tokenizer = self._engine.tokenizer
        return [tokenizer.decode([token_id]) for token_id in token_ids]

    async def render_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt token ids for `messages` with the generation prompt appended."""
        return await self._run(self._render_chat, messages)

    async def encode(self, text: str) -> list[int]:
        """Token ids of a raw text prompt (with the tokenizer's special tokens)."""
        return await self._run(self._encode, text)

    async def token_texts(self, token_ids: list[int]) -> list[str]:
        """The text of each token on its own."""
        if not token_ids:
            return []
        return await self._run(self._token_texts, token_ids)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass
class ServingContext:
    """The engine and the settings the OpenAI routes need."""

    engine: AsyncLLMEngine
    served_model_name: str
    tokenizer: TokenizerWorker

    def check_model(self, model: str) -> None:
        """404 for any model id other than the one served."""
        if model != self.served_model_name:
            raise APIError(404, f"The model '{model}' does not exist", ErrorType.NOT_FOUND,
                           ErrorCode.MODEL_NOT_FOUND, param="model")

    def check_ready(self) -> None:
        """503 while the model loads or after the engine died."""
        if self.engine.is_dead:
            raise APIError(503, "the engine has stopped", ErrorType.UNAVAILABLE, ErrorCode.ENGINE_DEAD)
        if not self.engine.is_ready:
            raise APIError(503, "the model is still loading", ErrorType.UNAVAILABLE, ErrorCode.MODEL_LOADING,
                           headers=retry_after_header(LOADING_RETRY_AFTER_S))

    def output_budget(self, num_prompt_tokens: int, requested: int | None, prompt_param: str) -> int:
        """Tokens the request may generate; 400 context_length_exceeded when it cannot fit."""
        max_len = self.engine.max_model_len
        available = max_len - num_prompt_tokens
        if available <= 0 or (requested is not None and requested > available):
            wanted = f" and {requested} in the completion" if requested is not None else ""
            raise APIError(
                400,
                f"This model's maximum context length is {max_len} tokens. However, you requested "
                f"{num_prompt_tokens + (requested or 0)} tokens ({num_prompt_tokens} in the prompt{wanted}). "
                "Please reduce the length of the prompt or the completion.",
                code=ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                param=prompt_param,
            )
        return requested if requested is not None else available


def engine_request_ids(http_request_id: str, count: int) -> list[str]:
    """Unique engine ids prefixed by the HTTP request id (clients may reuse X-Request-Id)."""
    nonce = secrets.token_hex(4)
    return [f"{http_request_id}-{nonce}-{i}" for i in range(count)]


def http_request_id(request: Request) -> str:
    """The X-Request-Id the middleware echoed (generated when the client sent none)."""
    return str(getattr(request.state, "request_id", "") or secrets.token_hex(8))


def request_task(task_from_metadata: str | None, request: Request) -> str | None:
    """metadata.task, else the X-Task header (validated like metadata.task)."""
    if task_from_metadata is not None:
        return task_from_metadata
    header = request.headers.get(TASK_HEADER)
    if header is not None and not re.match(TASK_NAME_PATTERN, header):
        raise APIError(400, f"the {TASK_HEADER} header must match {TASK_NAME_PATTERN}", param=TASK_HEADER,
                       code=ErrorCode.INVALID_VALUE)
    return header


async def token_text_map(tokenizer: TokenizerWorker, token_ids: list[int]) -> dict[int, str]:
    """token id -> its text, for the ids the logprob formats need."""
    return dict(zip(token_ids, await tokenizer.token_texts(token_ids), strict=True))
