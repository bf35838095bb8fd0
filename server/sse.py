"""Server-sent events: `data: {json}` frames, the `[DONE]` terminator, and a streaming
response that always closes its generation (aborting it in the engine) however it ends.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from moe_serve.engine.errors import EngineError
from moe_serve.server.errors import APIError, ErrorCode, ErrorType, from_engine_error

logger = logging.getLogger(__name__)

DONE_EVENT = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(payload: dict[str, Any]) -> str:
    """One SSE frame carrying `payload` as compact JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def with_error_event(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Pass `events` through, turning an error after streaming started into an `error`
    data frame; always end with `[DONE]` unless the client went away (cancellation)."""
    try:
        async for event in events:
            yield event
    except APIError as exc:
        yield sse_event(exc.body())
    except EngineError as exc:
        yield sse_event(from_engine_error(exc).body())
    except Exception:
        logger.exception("error while streaming a response")
        yield sse_event(APIError(500, "internal server error", ErrorType.SERVER, ErrorCode.SERVER_ERROR).body())
    yield DONE_EVENT


class GenerationStreamingResponse(StreamingResponse):
    """An SSE response that calls `on_close` when it ends, even if the body never started."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], Awaitable[None]],
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(with_error_event(content), media_type="text/event-stream",
                         headers={**SSE_HEADERS, **(headers or {})})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()
