"""Lifecycle faults of a live `moe-serve serve` (issue 14, findings 2, 5 and 7).

A bad --model is refused before the port is bound, with the loader's one line and exit 1; a load
failure found in the background and a fatal device fault end the process with exit 1 and exactly
one ERROR line (streams in flight get an error event and [DONE]); SIGTERM drains: new requests
get 503 with Retry-After while running ones finish, streams still running at the end of the
grace period get a `server_shutting_down` event and [DONE] (other requests a 503), and the
process exits 0; a second signal does the same at once and exits 1.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from moe_serve.engine.errors import ModelLoadError
from moe_serve.engine.model.loader import read_spec
from tests.e2e.conftest import REPO_ROOT, build_native_code, free_port, serve_command, server_process
from tests.e2e.faulty_engine import DEVICE_FAULT
from tests.helpers import make_tiny_checkpoint

pytestmark = pytest.mark.e2e

MODEL = "tiny-mixtral"
LONG_CONTEXT = 8192
LONG_STREAM_TOKENS = LONG_CONTEXT - 64  # thousands of steps: outlives every grace period below
SHORT_STREAM_TOKENS = 12
EXIT_TIMEOUT_S = 120.0
DRAIN_START_TIMEOUT_S = 10.0
DONE = "data: [DONE]"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("lifecycle") / MODEL
    return make_tiny_checkpoint("mixtral", directory, max_position_embeddings=LONG_CONTEXT)


def _serve_until_exit(model: Path, extra_args: list[str]) -> tuple[int, str]:
    """Run `moe-serve serve` logging at INFO until it exits; (exit code, stdout + stderr)."""
    build_native_code()
    command = serve_command(model, free_port(), [*extra_args, "--log-level", "info"])
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=EXIT_TIMEOUT_S)
    return result.returncode, result.stdout + result.stderr


def _error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "ERROR" in line]


def _unsupported_architecture(directory: Path) -> None:
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))


@pytest.mark.parametrize("make, reason", [
    (lambda directory: None, "model directory not found"),
    (lambda directory: directory.mkdir(), "no config.json"),
    (_unsupported_architecture, "unsupported architecture ['LlamaForCausalLM']"),
], ids=["missing", "no-config", "unsupported"])
def test_a_bad_model_is_refused_in_one_line_before_the_port_is_bound(
        tmp_path: Path, make: Callable[[Path], None], reason: str) -> None:
    model = tmp_path / "model"
    make(model)
    with pytest.raises(ModelLoadError) as loader_error:
        read_spec(model)
    code, output = _serve_until_exit(model, [])
    assert code == 1
    assert output.strip() == f"moe-serve: error: {loader_error.value}", output  # nothing else: no server started
    assert reason in output


@pytest.mark.parametrize("flags, reason", [
    (["--expert-cache-fraction", "0.01"], "expert_cache_fraction >="),
    (["--expert-cache-fraction", "0.5", "--host-memory-gb", "1e-6", "--host-tier-dir", "{file}"], "host tier"),
], ids=["expert-budget-below-minimum", "host-tier-dir-is-a-file"])
def test_a_load_failure_after_the_port_is_bound_exits_1_with_one_error_line(
        checkpoint: Path, tmp_path: Path, flags: list[str], reason: str) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, output = _serve_until_exit(checkpoint, [flag.format(file=blocker) for flag in flags])
    assert code == 1, output
    assert "Uvicorn running on" in output  # found while loading in the background, not before binding
    errors = _error_lines(output)
    assert len(errors) == 1 and "the model failed to load" in errors[0] and reason in errors[0], output


class _Stream:
    """A streamed completion read on its own thread: its SSE data lines, in order."""

    def __init__(self, base_url: str, max_tokens: int) -> None:
        self.lines: list[str] = []
        self.started = threading.Event()
        self.ended_at = 0.0
        self.cut_off = False  # the connection closed in the middle of the stream
        body = {"model": MODEL, "prompt": "drain", "max_tokens": max_tokens, "stream": True,
                "temperature": 0, "ignore_eos": True}
        self._thread = threading.Thread(target=self._read, args=(base_url, body), daemon=True)
        self._thread.start()
        assert self.started.wait(EXIT_TIMEOUT_S), "the stream sent nothing"

    def _read(self, base_url: str, body: dict[str, Any]) -> None:
        try:
            with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=EXIT_TIMEOUT_S) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.lines.append(line)
                        self.started.set()
        except httpx.TransportError:
            self.cut_off = True
        self.ended_at = time.monotonic()

    def join(self) -> None:
        self._thread.join(EXIT_TIMEOUT_S)
        assert not self._thread.is_alive(), "the stream never ended"

    def error(self) -> dict[str, Any]:
        """The error of the event before [DONE] (there must be one)."""
        return json.loads(self.lines[-2].removeprefix("data: "))["error"]


class _Plain:
    """A completion without streaming, sent on its own thread."""

    def __init__(self, base_url: str, max_tokens: int) -> None:
        self.response: httpx.Response | None = None
        body = {"model": MODEL, "prompt": "drain", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        self._thread = threading.Thread(target=self._send, args=(base_url, body), daemon=True)
        self._thread.start()

    def _send(self, base_url: str, body: dict[str, Any]) -> None:
        self.response = httpx.post(f"{base_url}/v1/completions", json=body, timeout=EXIT_TIMEOUT_S)

    def join(self) -> None:
        self._thread.join(EXIT_TIMEOUT_S)
        assert not self._thread.is_alive(), "the request never ended"


def _wait_running(base_url: str, num_running: int) -> None:
    deadline = time.monotonic() + EXIT_TIMEOUT_S
    while httpx.get(f"{base_url}/health", timeout=5).json()["num_running"] < num_running:
        assert time.monotonic() < deadline, f"fewer than {num_running} requests ever ran"
        time.sleep(0.05)


def _wait_draining(base_url: str) -> None:
    deadline = time.monotonic() + DRAIN_START_TIMEOUT_S
    while time.monotonic() < deadline:
        health = httpx.get(f"{base_url}/health", timeout=5)
        if health.status_code == 503 and health.json()["status"] == "draining":
            return
        time.sleep(0.05)
    raise AssertionError("the server did not start draining")


@pytest.mark.slow
def test_sigterm_drains_503s_new_requests_cuts_late_requests_and_exits_0(checkpoint: Path, tmp_path: Path) -> None:
    grace_s = 4.0
    flags = ["--max-model-len", str(LONG_CONTEXT), "--shutdown-timeout-s", str(grace_s)]
    with server_process(checkpoint, flags, tmp_path / "server.log") as (base_url, process):
        late = _Stream(base_url, LONG_STREAM_TOKENS)
        plain = _Plain(base_url, LONG_STREAM_TOKENS)
        _wait_running(base_url, 2)
        short = _Stream(base_url, SHORT_STREAM_TOKENS)
        process.send_signal(signal.SIGTERM)
        signalled_at = time.monotonic()
        _wait_draining(base_url)

        refused = httpx.post(f"{base_url}/v1/chat/completions", timeout=10,
                             json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert refused.status_code == 503
        assert 1 <= int(refused.headers["Retry-After"]) <= grace_s
        assert refused.json() == {"error": {"message": "the server is shutting down; retry the request",
                                            "type": "service_unavailable_error", "param": None,
                                            "code": "server_shutting_down"}}

        short.join()
        late.join()
        plain.join()
        assert process.wait(timeout=EXIT_TIMEOUT_S) == 0
    assert not (short.cut_off or late.cut_off)
    assert short.lines[-1] == DONE and json.loads(short.lines[-2][len("data: "):])["choices"][0]["finish_reason"] \
        == "length"  # it ran to its end inside the grace period
    assert late.lines[-1] == DONE and late.lines.count(DONE) == 1
    assert late.error()["code"] == "server_shutting_down"
    assert late.ended_at - signalled_at >= grace_s * 0.9  # cut at the end of the grace period, not before
    assert plain.response is not None and plain.response.status_code == 503
    assert plain.response.json()["error"]["code"] == "server_shutting_down"


@pytest.mark.slow
def test_a_second_signal_ends_the_streams_and_exits_at_once(checkpoint: Path, tmp_path: Path) -> None:
    flags = ["--max-model-len", str(LONG_CONTEXT), "--shutdown-timeout-s", "60"]
    with server_process(checkpoint, flags, tmp_path / "server.log") as (base_url, process):
        stream = _Stream(base_url, LONG_STREAM_TOKENS)
        process.send_signal(signal.SIGTERM)
        _wait_draining(base_url)
        second_at = time.monotonic()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=EXIT_TIMEOUT_S) == 1
        assert time.monotonic() - second_at < 10.0  # not the 60 s grace period
        stream.join()
    assert not stream.cut_off and stream.lines[-1] == DONE and stream.error()["code"] == "server_shutting_down"


@pytest.mark.slow
def test_a_device_fault_ends_the_streams_and_exits_1_with_one_error_line(checkpoint: Path, tmp_path: Path) -> None:
    marker = tmp_path / "fault-now"
    log_path = tmp_path / "server.log"
    flags = ["--max-model-len", str(LONG_CONTEXT), "--log-level", "info"]
    with server_process(checkpoint, flags, log_path, launcher=("tests.e2e.faulty_engine", str(marker))) \
            as (base_url, process):
        stream = _Stream(base_url, LONG_STREAM_TOKENS)
        marker.touch()  # the next model step raises the device fault
        stream.join()
        assert process.wait(timeout=EXIT_TIMEOUT_S) == 1
    assert not stream.cut_off and stream.lines[-1] == DONE and stream.lines.count(DONE) == 1
    assert stream.error()["code"] == "engine_dead" and DEVICE_FAULT in stream.error()["message"]
    errors = _error_lines(log_path.read_text())
    assert len(errors) == 1 and DEVICE_FAULT in errors[0], log_path.read_text()
