"""ASGI middleware driven directly (no server): the body's size and time limits, the 500 of an
unhandled exception with its request id, the allowed-hosts check, and the status codes every
4xx carries."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from moe_serve.server.errors import APIError, default_code
from moe_serve.server.middleware import (
    AllowedHostsMiddleware,
    RequestBodyMiddleware,
    RequestIdMiddleware,
    UnhandledErrorMiddleware,
    normalize_host,
)


def _scope(headers: dict[str, str] | None = None, path: str = "/v1/completions") -> Scope:
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return {"type": "http", "method": "POST", "path": path, "headers": raw, "query_string": b""}


async def _echo_body(scope: Scope, receive: Receive, send: Send) -> None:
    """An app answering 200 with the body it read."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})


def _run(app: Any, scope: Scope, chunks: list[tuple[float, bytes]], complete: bool = True
         ) -> tuple[int, dict[str, str], bytes]:
    """Send `chunks` (delay before each, bytes) as the body, then stop (`complete=False`: without
    saying the body is over, as a client that declared more than it sends); returns status,
    headers and body of the response."""
    sent: list[Message] = []

    async def receive() -> Message:
        if not chunks:
            await asyncio.sleep(3600)  # a client that sends nothing more
        delay, data = chunks.pop(0)
        await asyncio.sleep(delay)
        return {"type": "http.request", "body": data, "more_body": bool(chunks) or not complete}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    headers = {k.decode().lower(): v.decode() for k, v in start.get("headers", [])}
    return start["status"], headers, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def _assert_openai_error(body: bytes, code: str) -> dict[str, Any]:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code and error["message"]
    return error


def test_a_body_within_the_limits_reaches_the_app_whole() -> None:
    app = RequestBodyMiddleware(_echo_body, max_bytes=100, timeout_s=5)
    status, _, body = _run(app, _scope(), [(0, b"abc"), (0.01, b"def")])
    assert (status, body) == (200, b"abcdef")


def test_a_body_over_the_limit_is_413() -> None:
    app = RequestBodyMiddleware(_echo_body, max_bytes=100, timeout_s=5)
    status, headers, body = _run(app, _scope(), [(0, b"x" * 60), (0, b"x" * 60)])
    assert status == 413 and "connection" not in headers  # all of it was read: the connection can go on
    assert "100 bytes" in _assert_openai_error(body, "request_too_large")["message"]
    declared = _scope({"Content-Length": str(2**40)})
    status, headers, body = _run(app, declared, [(0, b"x")])
    assert status == 413 and headers["connection"] == "close"  # not read: the connection cannot go on


def test_a_body_that_never_arrives_whole_is_408_after_the_timeout() -> None:
    app = RequestBodyMiddleware(_echo_body, max_bytes=1000, timeout_s=0.3)
    started = time.monotonic()
    status, headers, body = _run(app, _scope({"Content-Length": "100"}), [(0, b"x" * 10)], complete=False)
    assert 0.3 <= time.monotonic() - started < 2.0
    assert status == 408 and headers["connection"] == "close"
    assert "0.3 s" in _assert_openai_error(body, "request_timeout")["message"]
    status, _, _ = _run(app, _scope(), [(0, b"x"), (0.2, b"y"), (0.2, b"z")])  # a trickle slower than the limit
    assert status == 408


def test_an_unhandled_exception_is_an_openai_500_with_the_request_id() -> None:
    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("boom")

    app = RequestIdMiddleware(UnhandledErrorMiddleware(broken))
    status, headers, body = _run(app, _scope({"X-Request-Id": "req-42"}), [(0, b"")])
    assert status == 500 and headers["x-request-id"] == "req-42"
    error = _assert_openai_error(body, "server_error")
    assert error["type"] == "server_error" and "boom" not in error["message"]


def test_an_exception_after_the_response_started_goes_on_to_the_server() -> None:
    async def breaks_midway(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        _run(UnhandledErrorMiddleware(breaks_midway), _scope(), [(0, b"")])


@pytest.mark.parametrize(
    ("allowed", "host", "ok"),
    [
        (["localhost", "127.0.0.1"], "127.0.0.1:8000", True),
        (["localhost", "127.0.0.1"], "LOCALHOST:8000", True),
        (["localhost", "127.0.0.1"], "attacker.example:8000", False),
        (["localhost"], None, False),
        (["*.example.com"], "api.example.com", True),
        (["*.example.com"], "example.com.evil.org", False),
        (["*.example.com"], "evilexample.com", False),
        (["::1"], "[::1]:8000", True),
        (["*"], "anything.at.all", True),
    ],
)
def test_only_listed_hosts_are_answered(allowed: list[str], host: str | None, ok: bool) -> None:
    app = AllowedHostsMiddleware(_echo_body, allowed)
    status, _, body = _run(app, _scope({"Host": host} if host else {}), [(0, b"fine")])
    if ok:
        assert (status, body) == (200, b"fine")
    else:
        assert status == 400 and _assert_openai_error(body, "invalid_host")["param"] == "Host"


def test_host_normalization() -> None:
    assert normalize_host("Example.COM:8080") == "example.com"
    assert normalize_host("[::1]:8000") == "::1" and normalize_host("::1") == "::1"
    assert normalize_host("10.0.0.1") == "10.0.0.1"


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 408, 409, 413, 415, 422, 429, 500, 503])
def test_every_error_without_a_code_gets_one_from_its_status(status: int) -> None:
    error = APIError(status, "something")
    assert isinstance(error.code, str) and error.code == default_code(status).value
    assert (error.code == "invalid_request") == (status in (403, 409, 415, 422))
