"""What the route handlers share: the engine, the served model id, the body parser and the
tokenizer pool (both keep long work off the event loop)."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request

from moe_serve.engine.core.request import check_context_length
from moe_serve.engine.errors import ContextLengthExceeded
from moe_serve.server.errors import APIError, ErrorCode, ErrorType, from_engine_error, retry_after_header
from moe_serve.server.protocol import TASK_NAME_PATTERN
from moe_serve.server.request_body import BodyParser
from moe_serve.server.token_bound import PromptLimit
from moe_serve.server.tokenizer_pool import TokenizerPool

if TYPE_CHECKING:
    from moe_serve.engine.core.async_engine import AsyncLLMEngine

LOADING_RETRY_AFTER_S = 5.0
TASK_HEADER = "X-Task"


@dataclass
class ServingContext:
    """The engine and the settings the OpenAI routes need."""

    engine: AsyncLLMEngine
    served_model_name: str
    tokenizer: TokenizerPool
    bodies: BodyParser

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

    def prompt_limit(self, requested: int | None, prompt_param: str) -> PromptLimit:
        """The longest prompt that leaves room for `requested` output tokens (one when None)."""
        return PromptLimit(self.engine.max_model_len, requested, prompt_param)

    def output_budget(self, num_prompt_tokens: int, requested: int | None, prompt_param: str) -> int:
        """Tokens the request may generate; 400 context_length_exceeded when it cannot fit."""
        try:
            available = check_context_length(self.engine.max_model_len, num_prompt_tokens, requested)
        except ContextLengthExceeded as exc:
            raise from_engine_error(exc, prompt_param) from exc
        return requested if requested is not None else available

    def shutdown(self) -> None:
        """Stop the tokenizer threads and the body parser process."""
        self.tokenizer.shutdown()
        self.bodies.shutdown()


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


async def token_text_map(tokenizer: TokenizerPool, token_ids: list[int]) -> dict[int, str]:
    """token id -> its text, for the ids the logprob formats need."""
    return dict(zip(token_ids, await tokenizer.token_texts(token_ids), strict=True))
