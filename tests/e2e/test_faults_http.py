"""Issue 14's HTTP input findings re-run against a live `moe-serve serve`: large inputs that held
up cheap requests (finding 3), lone surrogates that answered 500 and dropped the connection
(finding 4), and the smaller ones (finding 8: loose types, unformatted messages, null codes, no
Host check, /docs from a CDN, /health and /metrics not behind the key). Each gets its clear
4xx in the OpenAI shape, with a string code and `X-Request-Id`; where the server answered, the
keep-alive connection goes on, and a normal request afterwards succeeds."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.e2e.conftest import REPO_ROOT, STARTUP_TIMEOUT_S, free_port, server_process

pytestmark = pytest.mark.e2e

MAX_MODEL_LEN = 256
MAX_REQUEST_BYTES = 4_200_000
REQUEST_TIMEOUT_S = 2.0
# The compose healthcheck gives /health 4 s; the issue measured 3.2 s under token-id bodies.
HEALTH_DEADLINE_S = 4.0
FLAGS = ["--max-model-len", str(MAX_MODEL_LEN), "--max-request-bytes", str(MAX_REQUEST_BYTES),
         "--request-timeout-s", str(REQUEST_TIMEOUT_S), "--allowed-hosts", "127.0.0.1,localhost", "--docs", "true"]
MESSAGES = [{"role": "user", "content": "Hello"}]


@dataclass(frozen=True)
class Server:
    base_url: str
    model: str

    @property
    def address(self) -> tuple[str, int]:
        parts = urlsplit(self.base_url)
        return str(parts.hostname), int(parts.port or 80)


@pytest.fixture(scope="module")
def server(checkpoint_factory: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    checkpoint = checkpoint_factory("mixtral")
    log_path = tmp_path_factory.mktemp("faults-http") / "server.log"
    with server_process(checkpoint, FLAGS, log_path) as (base_url, _process):
        yield Server(base_url, checkpoint.name)


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: Any
    will_close: bool


class KeepAlive:
    """One HTTP/1.1 connection for a series of requests, to see whether the server keeps it."""

    def __init__(self, server: Server) -> None:
        self.conn = http.client.HTTPConnection(*server.address, timeout=120)
        self.sock: socket.socket | None = None

    def request(self, method: str, path: str, body: bytes | dict | None = None,
                headers: dict[str, str] | None = None) -> Reply:
        raw = json.dumps(body).encode() if isinstance(body, dict) else body
        if self.sock is not None:
            assert self.conn.sock is self.sock, "the server closed the keep-alive connection"
        self.conn.request(method, path, body=raw, headers={"Content-Type": "application/json", **(headers or {})})
        response = self.conn.getresponse()
        data = response.read()
        self.sock = None if response.will_close else self.conn.sock
        content_type = response.getheader("content-type", "")
        parsed = json.loads(data) if content_type.startswith("application/json") else data.decode(errors="replace")
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, parsed, response.will_close)

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def conn(server: Server) -> Iterator[KeepAlive]:
    connection = KeepAlive(server)
    yield connection
    connection.close()


def assert_error(reply: Reply, status: int, code: str, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error shape with a string code, and the request id header."""
    assert reply.status == status, reply.body
    assert set(reply.body) == {"error"} and set(reply.body["error"]) == {"message", "type", "param", "code"}
    error = reply.body["error"]
    assert error["code"] == code and isinstance(error["message"], str) and error["message"]
    assert error["param"] == param
    assert re.fullmatch(r"[0-9a-f]{32}", reply.headers.get("x-request-id", ""))
    return error


def assert_normal_request_succeeds(conn: KeepAlive, server: Server) -> None:
    """A 1-token chat completion on the same connection (it fails if the server dropped it)."""
    reply = conn.request("POST", "/v1/chat/completions", {"model": server.model, "messages": MESSAGES,
                                                          "max_tokens": 1})
    assert reply.status == 200 and reply.body["usage"]["completion_tokens"] == 1


def _big_chat(model: str) -> bytes:
    content = ("lorem ipsum " * 340_000)[:4_000_000]  # the 4 MB prompts
    return json.dumps({"model": model, "messages": [{"role": "user", "content": content}]}).encode()


def _big_token_ids(model: str) -> bytes:
    ids = [100 + i % 300 for i in range(int(3.95 * 2**20) // 5)]  # ~3.95 MiB of token ids
    return json.dumps({"model": model, "prompt": ids}).encode()


@pytest.mark.parametrize(("path", "make_body"), [("/v1/chat/completions", _big_chat),
                                                 ("/v1/completions", _big_token_ids)])
def test_large_inputs_do_not_hold_up_health_or_cheap_requests(server: Server, conn: KeepAlive, path: str,
                                                              make_body: Any) -> None:
    body = make_body(server.model)
    assert len(body) < MAX_REQUEST_BYTES
    replies: list[httpx.Response] = []

    def send_large() -> None:
        replies.append(httpx.post(f"{server.base_url}{path}", content=body, timeout=120,
                                  headers={"Content-Type": "application/json"}))

    senders = [threading.Thread(target=send_large) for _ in range(4)]
    for sender in senders:
        sender.start()
    health_s = []
    while any(sender.is_alive() for sender in senders):
        start = time.monotonic()
        assert conn.request("GET", "/health").status == 200
        health_s.append(time.monotonic() - start)
        time.sleep(0.05)
    for sender in senders:
        sender.join()
    assert max(health_s, default=0.0) < HEALTH_DEADLINE_S, health_s
    for reply in replies:
        error = assert_error(Reply(reply.status_code, dict(reply.headers), reply.json(), False), 400,
                             "context_length_exceeded", "messages" if "chat" in path else "prompt")
        assert f"maximum context length is {MAX_MODEL_LEN} tokens" in error["message"]
    assert_normal_request_succeeds(conn, server)


def test_a_body_that_does_not_arrive_is_408_after_the_timeout(server: Server, conn: KeepAlive) -> None:
    with socket.create_connection(server.address, timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n" + b'{"model": ')  # declares 100 bytes, sends 10
        start = time.monotonic()
        data = b""
        while chunk := sock.recv(65536):  # the server answers, then closes
            data += chunk
        waited = time.monotonic() - start
    head, _, payload = data.partition(b"\r\n\r\n")
    headers = {line.split(b":", 1)[0].strip().lower().decode(): line.split(b":", 1)[1].strip().decode()
               for line in head.split(b"\r\n")[1:]}
    assert head.startswith(b"HTTP/1.1 408") and headers["connection"] == "close"
    assert REQUEST_TIMEOUT_S - 0.1 <= waited < REQUEST_TIMEOUT_S + 10
    assert_error(Reply(408, headers, json.loads(payload), True), 408, "request_timeout")
    assert_normal_request_succeeds(conn, server)


def test_a_body_over_the_configured_limit_is_413_and_the_connection_goes_on(server: Server,
                                                                           conn: KeepAlive) -> None:
    reply = conn.request("POST", "/v1/chat/completions", b"x" * (MAX_REQUEST_BYTES + 100_000))
    assert f"larger than {MAX_REQUEST_BYTES} bytes" in assert_error(reply, 413, "request_too_large")["message"]
    assert not reply.will_close
    assert_normal_request_succeeds(conn, server)


LONE_SURROGATES = [
    ("/v1/chat/completions", r'{"model": "MODEL", "messages": [{"role": "user", "content": "a\ud800b"}]}',
     "messages[0].content"),
    ("/v1/chat/completions",
     r'{"model": "MODEL", "messages": [{"role": "user", "content": [{"type": "text", "text": "a\udc00"}]}]}',
     "messages[0].content[0].text"),
    ("/v1/completions", r'{"model": "MODEL", "prompt": "a\ud800b"}', "prompt"),
    ("/v1/completions", r'{"model": "MODEL", "prompt": ["ok", "a\ud800b"]}', "prompt[1]"),
    ("/v1/chat/completions", r'{"model": "MODEL\ud800", "messages": [{"role": "user", "content": "a"}]}', "model"),
    ("/v1/completions", r'{"model": "MODEL", "prompt": "a", "stop": ["\udfff"]}', "stop[0]"),
    ("/v1/completions", r'{"model": "MODEL", "prompt": "a", "user": "\ud800"}', "user"),
]


@pytest.mark.parametrize(("path", "raw", "param"), LONE_SURROGATES)
def test_a_lone_surrogate_is_a_400_naming_the_field(server: Server, conn: KeepAlive, path: str, raw: str,
                                                    param: str) -> None:
    reply = conn.request("POST", path, raw.replace("MODEL", server.model).encode())
    assert "lone surrogate" in assert_error(reply, 400, "invalid_value", param)["message"]
    assert not reply.will_close
    assert_normal_request_succeeds(conn, server)


@pytest.mark.parametrize(("field", "value"), [("max_tokens", "10"), ("max_tokens", True), ("stream", "yes"),
                                              ("n", 1.0), ("temperature", "0")])
def test_strings_and_booleans_are_no_numbers(server: Server, conn: KeepAlive, field: str, value: Any) -> None:
    reply = conn.request("POST", "/v1/chat/completions", {"model": server.model, "messages": MESSAGES, field: value})
    assert_error(reply, 400, "invalid_value", field)
    assert_normal_request_succeeds(conn, server)


def test_messages_are_formatted_and_every_4xx_has_a_string_code(server: Server, conn: KeepAlive) -> None:
    image = conn.request("POST", "/v1/chat/completions", {"model": server.model, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    message = assert_error(image, 400, "unsupported_parameter", "messages[0].content")["message"]
    assert message == "content parts of type 'image_url' are not supported"
    audio = conn.request("POST", "/v1/chat/completions", {"model": server.model, "messages": MESSAGES,
                                                          "audio": {"voice": "alloy", "format": "wav"}})
    assert assert_error(audio, 400, "unsupported_parameter", "audio")["message"] == \
        "'audio' is not supported by this server"
    assert_error(conn.request("POST", "/v1/completions", b"\xff\xfe not utf-8"), 400, "invalid_json")
    assert_error(conn.request("DELETE", "/v1/completions"), 405, "method_not_allowed")
    assert_error(conn.request("GET", "/v1/nothing"), 404, "not_found")
    assert_normal_request_succeeds(conn, server)


def test_a_host_not_listed_is_refused(server: Server, conn: KeepAlive) -> None:
    reply = conn.request("POST", "/v1/chat/completions", {"model": server.model, "messages": MESSAGES},
                         headers={"Host": "attacker.example:8000"})
    assert_error(reply, 400, "invalid_host", "Host")
    assert conn.request("GET", "/health", headers={"Host": "localhost:8000"}).status == 200
    assert_normal_request_succeeds(conn, server)


def test_the_docs_page_loads_nothing_from_the_network(server: Server, conn: KeepAlive) -> None:
    page = conn.request("GET", "/docs")
    assert page.status == 200 and "https://" not in page.body and "http://" not in page.body
    for asset in re.findall(r'(?:href|src)="([^"]+)"', page.body):
        assert conn.request("GET", asset).status == 200


@pytest.mark.slow
def test_health_and_metrics_behind_the_key(checkpoint_factory: Any, tmp_path: Path) -> None:
    key = {"Authorization": "Bearer sk-ops"}
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "moe_serve.server.cli", "serve", "--model", str(checkpoint_factory("mixtral")),
               "--port", str(port), "--dtype", "float32", "--device", "cpu", "--log-level", "warning"]
    env = {**os.environ, "MOE_SERVE_API_KEY": "sk-ops", "MOE_SERVE_AUTH_HEALTH_AND_METRICS": "true"}
    with (tmp_path / "server.log").open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _healthy(base_url, key):
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.2)
        for path in ("/health", "/metrics"):
            refused = httpx.get(f"{base_url}{path}", timeout=10)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
            assert httpx.get(f"{base_url}{path}", headers=key, timeout=10).status_code == 200
        assert httpx.get(f"{base_url}/version", timeout=10).status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=30)


def _healthy(base_url: str, headers: dict[str, str]) -> bool:
    try:
        return httpx.get(f"{base_url}/health", headers=headers, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_the_head_of_line_benchmark_runs_against_a_live_server(server: Server) -> None:
    from benchmarks.head_of_line import Load, run

    rows = run(server.base_url, server.model, repeats=3)
    assert [row.load for row in rows] == [load.value for load in Load]
    for row in rows:
        assert row.large_answered >= 1 and row.large_statuses == f"{row.large_answered}x 400"
        assert 0 < row.idle_chat_ms and 0 < row.chat_ms and 0 < row.health_ms and row.chat_ratio > 0


def _children(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_the_body_parser_process_does_not_outlive_a_killed_server(checkpoint_factory: Any, tmp_path: Path) -> None:
    checkpoint = checkpoint_factory("mixtral")
    with server_process(checkpoint, ["--max-model-len", str(MAX_MODEL_LEN)], tmp_path / "server.log") as (
            base_url, process):
        reply = httpx.post(f"{base_url}/v1/completions", content=_big_token_ids(checkpoint.name), timeout=120,
                           headers={"Content-Type": "application/json"})
        assert reply.json()["error"]["code"] == "context_length_exceeded"
        helpers = _children(process.pid)
        assert helpers, "the large body was not parsed in a child process"
        process.kill()
        process.wait()
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in helpers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(Path(f"/proc/{pid}").exists() for pid in helpers)
