"""ASGI middleware: X-Request-Id echo/generation, the 500 of an unhandled exception, the
allowed-hosts check, and the request body's size (413) and time (408) limits.

All are plain ASGI (not BaseHTTPMiddleware) so that `receive` keeps reporting the client's
disconnect to the route handlers and to streaming responses.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Sequence

import anyio
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from moe_serve.server.errors import APIError, ErrorCode, internal_error

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Past the limit the body is still read (and dropped) up to this many bytes, so that the
# client sees the 413 instead of a reset connection; beyond it the server stops reading
# (and closes the connection after the 413).
MAX_DRAIN_BYTES = 64 * 2**20


class RequestIdMiddleware:
    """Puts the request id in `request.state.request_id` and on every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get(REQUEST_ID_HEADER)
        request_id = given if given is not None and _VALID_REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)


class UnhandledErrorMiddleware:
    """An exception nothing else handled becomes an OpenAI-shaped 500 (logged with its traceback).

    It sits inside `RequestIdMiddleware`, so the 500 carries `X-Request-Id`, and it answers
    instead of re-raising, so the keep-alive connection stays usable. Once a response has
    started nothing can be answered any more: the exception goes on to the server, which closes
    the connection (the client sees a cut response, not a well-formed partial one).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            if started:
                raise
            logger.exception("unhandled error while serving %s %s (request %s)", scope.get("method"),
                             scope.get("path"), scope.get("state", {}).get("request_id", "?"))
            await internal_error().to_response()(scope, receive, send)


class AllowedHostsMiddleware:
    """Answers 400 (OpenAI shape) when the Host header names none of `allowed_hosts`.

    An entry is a host name or address (compared without the port, case-insensitively),
    `*.example.com` for any subdomain, or `*` for any host. A server without an API key on
    127.0.0.1 can be reached by a web page through DNS rebinding (the page's own name,
    re-pointed at 127.0.0.1); the Host header still carries that name, so it is refused here.
    """

    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str]) -> None:
        self.app = app
        self.allowed_hosts = [normalize_host(entry) for entry in allowed_hosts]

    def is_allowed(self, host_header: str | None) -> bool:
        if "*" in self.allowed_hosts:
            return True
        if not host_header:
            return False
        host = normalize_host(host_header)
        return any(host == entry or (entry.startswith("*.") and host.endswith(entry[1:]))
                   for entry in self.allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = Headers(scope=scope).get("host")
        if self.is_allowed(host):
            await self.app(scope, receive, send)
            return
        error = APIError(400, "the Host header names a host this server does not serve (see allowed_hosts)",
                         code=ErrorCode.INVALID_HOST, param="Host")
        await error.to_response()(scope, receive, send)


def normalize_host(host: str) -> str:
    """`Example.com:8000` -> `example.com`, `[::1]:8000` -> `::1` (patterns such as `*.x` kept)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host[1:]
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


class RequestBodyMiddleware:
    """Reads the whole body first, within a size limit (413) and a time limit (408).

    A client that declares more than it sends, or sends it too slowly, is answered 408 once
    `timeout_s` have passed since the request arrived, and the connection is closed.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.drain_bytes = max(max_bytes, MAX_DRAIN_BYTES)

    def _too_large(self, body_left_unread: bool) -> APIError:
        headers = {"Connection": "close"} if body_left_unread else None
        return APIError(413, f"the request body is larger than {self.max_bytes} bytes",
                        code=ErrorCode.REQUEST_TOO_LARGE, headers=headers)

    def _too_slow(self) -> APIError:
        return APIError(408, f"the request body did not arrive within {self.timeout_s:g} s",
                        code=ErrorCode.REQUEST_TIMEOUT, headers={"Connection": "close"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.drain_bytes:
            await self._too_large(body_left_unread=True).to_response()(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more_body = True
        with anyio.move_on_after(self.timeout_s) as deadline:
            while more_body:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size <= self.max_bytes:
                    chunks.append(chunk)
                more_body = message.get("more_body", False)
                if size > self.drain_bytes:
                    break
        if deadline.cancelled_caught:
            await self._too_slow().to_response()(scope, receive, send)
            return
        if size > self.max_bytes:
            await self._too_large(body_left_unread=more_body).to_response()(scope, receive, send)
            return
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
