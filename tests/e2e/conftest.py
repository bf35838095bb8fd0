"""A real `moe-serve serve` process on a free port, serving a tiny random checkpoint.

The native code a server compiles on first use (the copy engine, the CPU kernels) is built by
the test process first, once per session, so that a server's start-up timeout is for loading
only: on a fresh machine (empty cache) that build alone takes minutes on two busy cores.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.helpers import make_tiny_checkpoint

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
API_KEY = "sk-e2e-test-key"
MAX_MODEL_LEN = 256
STARTUP_TIMEOUT_S = 180.0


@dataclass(frozen=True)
class LiveServer:
    """How to reach the server under test."""

    base_url: str
    api_key: str
    model: str
    checkpoint: Path
    max_model_len: int
    process: subprocess.Popen[bytes]

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@functools.cache
def build_native_code() -> None:
    """Compile (or find cached) what `moe-serve serve` builds on first use on a CPU device; a
    failed build is left to the server, which falls back to torch and says so."""
    from moe_serve.cuda_ext.native import load_extension
    from moe_serve.engine.model.cpu_kernels import kernel_flavour

    try:
        load_extension(with_cuda=False)
    except Exception as exc:  # noqa: BLE001 - the server logs the same failure and uses the torch engine
        logger.warning("the copy engine did not build: %s", exc)
    kernel_flavour()  # falls back to torch itself


def wait_until_healthy(base_url: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Poll /health until 200; `timeout_s` starts once the native code is built (see the module
    docstring), so it covers loading only. Raises if the process exits first."""
    build_native_code()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} before becoming healthy")
        try:
            if httpx.get(f"{base_url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the server was not healthy within {timeout_s} s")


def serve_command(checkpoint: Path, port: int, extra_args: Sequence[str],
                  launcher: Sequence[str] = ("moe_serve.server.cli",)) -> list[str]:
    """`python -m <launcher> serve` of `checkpoint` on 127.0.0.1:`port`, fp32 on the CPU, logging
    warnings and errors only unless `extra_args` say otherwise (later flags win)."""
    return [
        sys.executable, "-m", *launcher, "serve", "--model", str(checkpoint), "--host", "127.0.0.1",
        "--port", str(port), "--dtype", "float32", "--device", "cpu", "--log-level", "warning", *extra_args,
    ]


@contextmanager
def server_process(checkpoint: Path, extra_args: Sequence[str], log_path: Path,
                   launcher: Sequence[str] = ("moe_serve.server.cli",)) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run `moe-serve serve` (`serve_command`) on a free port until healthy (failing the test with
    the server's log otherwise); yields (base URL, process); SIGTERM, then SIGKILL, on exit."""
    build_native_code()
    port = free_port()
    command = serve_command(checkpoint, port, extra_args, launcher)
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(base_url, process, STARTUP_TIMEOUT_S)
    except (RuntimeError, TimeoutError) as exc:
        process.kill()
        process.wait()
        pytest.fail(f"{exc}\n--- server log ---\n{log_path.read_text(errors='replace')[-4000:]}")
    try:
        yield base_url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Start the server once per session; stop it at the end."""
    checkpoint = make_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("e2e") / "tiny-mixtral")
    log_path = tmp_path_factory.mktemp("e2e-log") / "server.log"
    flags = ["--api-key", API_KEY, "--max-model-len", str(MAX_MODEL_LEN)]
    with server_process(checkpoint, flags, log_path) as (base_url, process):
        yield LiveServer(base_url, API_KEY, checkpoint.name, checkpoint, MAX_MODEL_LEN, process)


LONG_CONTEXT = 1024  # tool prompts alone take ~200 tokens of the tiny tokenizer


@pytest.fixture(scope="session")
def long_context_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A server (no API key) on a tiny Mixtral with a 1024-token context, for tool calls and the
    Responses API; started once per session."""
    checkpoint = make_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("long") / "tiny-mixtral",
                                      max_position_embeddings=LONG_CONTEXT)
    log_path = tmp_path_factory.mktemp("long-log") / "server.log"
    with server_process(checkpoint, ["--max-model-len", str(LONG_CONTEXT)], log_path) as (base_url, process):
        yield LiveServer(base_url, "unused", checkpoint.name, checkpoint, LONG_CONTEXT, process)
