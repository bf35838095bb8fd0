"""A real `moe-serve serve` process on a free port, serving a tiny random checkpoint."""

from __future__ import annotations

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


def wait_until_healthy(base_url: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
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


@contextmanager
def server_process(checkpoint: Path, extra_args: Sequence[str], log_path: Path
                   ) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run `moe-serve serve` on a free port until healthy (failing the test with the server's log
    otherwise); yields (base URL, process); SIGTERM, then SIGKILL, on exit."""
    port = free_port()
    command = [
        sys.executable, "-m", "server.cli", "serve", "--model", str(checkpoint), "--host", "127.0.0.1",
        "--port", str(port), "--dtype", "float32", "--device", "cpu", "--log-level", "warning", *extra_args,
    ]
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
