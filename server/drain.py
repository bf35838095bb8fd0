"""The request side of the shutdown drain: which requests are running, 503 for new ones while
the server drains, and the end of those still running when the grace period is over.

`DrainState` is shared by `DrainMiddleware` (every HTTP request passes through it) and the
server's lifecycle (server/serve.py), which starts the drain on SIGTERM and cuts what is left
when the grace period ends. A cut stream gets a final `server_shutting_down` error event and
`[DONE]`; a cut request whose response has not started gets a 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Iterator
from typing import Any

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moe_serve.server.errors import APIError, ErrorCode, ErrorType, retry_after_header
from moe_serve.server.routes import HealthStatus
from moe_serve.server.sse import DONE_EVENT, sse_event

HEALTH_PATH = "/health"
# Still answered while draining: a scrape or a version check costs nothing and ends at once.
ANSWERED_WHILE_DRAINING = frozenset({"/metrics", "/version"})


class ServerPhase(str, enum.Enum):
    """Whether the server takes new requests."""

    SERVING = "serving"
    DRAINING = "draining"


def shutting_down_error(retry_after_s: float) -> APIError:
    """The 503 (and final stream event) of a request the shutdown refuses or cuts."""
    return APIError(503, "the server is shutting down; retry the request", ErrorType.UNAVAILABLE,
                    ErrorCode.SERVER_SHUTTING_DOWN, headers=retry_after_header(retry_after_s))


class DrainState:
    """The server's phase and its running requests: the task serving each one, and the task
    running the app for it (the one `cut` cancels)."""

    def __init__(self) -> None:
        self.phase = ServerPhase.SERVING
        self._deadline = 0.0
        self._running: dict[asyncio.Task[Any], asyncio.Task[None]] = {}
        self._cutting = False

    def begin(self, grace_s: float) -> None:
        """Refuse new requests from now on; running ones have `grace_s` seconds to finish."""
        self.phase = ServerPhase.DRAINING
        self._deadline = time.monotonic() + grace_s

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def retry_after_s(self) -> float:
        """What a refused client is told to wait: the rest of the grace period (at least 1 s)."""
        return max(1.0, self._deadline - time.monotonic())

    @property
    def cutting(self) -> bool:
        """True once `cut` has cancelled the running requests."""
        return self._cutting

    @contextlib.contextmanager
    def running(self, app_call: asyncio.Task[None]) -> Iterator[None]:
        """Count the current task as serving a request whose app runs as `app_call`."""
        serving = asyncio.current_task()
        assert serving is not None
        self._running[serving] = app_call
        try:
            yield
        finally:
            del self._running[serving]

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for every running request to end; False if some still run."""
        deadline = time.monotonic() + timeout_s
        while self._running and time.monotonic() < deadline:
            await asyncio.wait(set(self._running), timeout=deadline - time.monotonic())
        return not self._running

    async def cut(self, timeout_s: float) -> int:
        """End every running request now (see the module docstring), waiting up to `timeout_s`
        for their last bytes to be sent; returns how many there were."""
        self._cutting = True
        count = len(self._running)
        for app_call in self._running.values():
            app_call.cancel()
        await self.wait_idle(timeout_s)
        return count


class _ResponseProgress:
    """How far a response got: headers sent, an event stream, the last body part sent."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self.event_stream = False
        self.finished = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            self.event_stream = Headers(raw=message.get("headers", [])).get("content-type", "").startswith(
                "text/event-stream")
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.finished = True
        await self._send(message)


class DrainMiddleware:
    """Refuses new requests while draining (503 with Retry-After; /health answers 503 "draining")
    and ends the requests `DrainState.cut` cancels."""

    def __init__(self, app: ASGIApp, state: DrainState, served_model_name: str) -> None:
        self.app = app
        self.state = state
        self.served_model_name = served_model_name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.state.phase is ServerPhase.DRAINING and scope["path"] not in ANSWERED_WHILE_DRAINING:
            await self._refuse(scope, receive, send)
            return
        response = _ResponseProgress(send)
        app_call = asyncio.create_task(self.app(scope, receive, response.send))
        with self.state.running(app_call):
            try:
                await app_call
            except asyncio.CancelledError:
                if not (self.state.cutting and app_call.cancelled()):
                    raise
                await self._end_cut(response, scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {"Connection": "close"}  # the client reconnects, to another instance if it can
        if scope["path"] == HEALTH_PATH:
            body = {"status": HealthStatus.DRAINING.value, "model": self.served_model_name}
            await JSONResponse(body, status_code=503, headers=headers)(scope, receive, send)
            return
        error = shutting_down_error(self.state.retry_after_s)
        error.headers.update(headers)
        await error.to_response()(scope, receive, send)

    async def _end_cut(self, response: _ResponseProgress, scope: Scope, receive: Receive, send: Send) -> None:
        error = shutting_down_error(self.state.retry_after_s)
        if not response.started:
            await error.to_response()(scope, receive, send)
        elif not response.finished:
            tail = sse_event(error.body()) + DONE_EVENT if response.event_stream else ""
            await send({"type": "http.response.body", "body": tail.encode(), "more_body": False})
