"""Engine faults against a live `moe-serve serve` (issue 14, findings 1, 2 and 6).

Sampling parameters that once underflowed float32 and killed the engine answer normally (and a
normal request afterwards succeeds); many distinct task names keep the folded-names counter
growing while /metrics' task labels stay bounded; a host-tier directory that cannot hold the
experts ends `serve` with a non-zero exit and one ERROR line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import REPO_ROOT, free_port, server_process
from tests.helpers import make_tiny_checkpoint, mounted_tmpfs

pytestmark = pytest.mark.e2e

MODEL = "tiny-mixtral"
MAX_TASKS = 4  # `default` and three other names
FOLDED = "moe_serve_task_names_folded_total"
EXIT_TIMEOUT_S = 180.0
EXTREME_PARAMETERS = [{"temperature": 1e-45}, {"temperature": 1e-300}, {"repetition_penalty": 1e-45}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("faults-engine") / MODEL)


@pytest.fixture(scope="module")
def offload_server(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server keeping half of the experts in its cache and at most MAX_TASKS task names."""
    log_path = tmp_path_factory.mktemp("faults-engine-log") / "server.log"
    flags = ["--max-model-len", "256", "--expert-cache-fraction", "0.5", "--max-tasks", str(MAX_TASKS)]
    with server_process(checkpoint, flags, log_path) as (base_url, _process):
        yield base_url


def _body(endpoint: str, extra: dict[str, Any], stream: bool, text: str = "the engine must survive") -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 8, "stream": stream, **extra}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _generate(client: httpx.Client, endpoint: str, body: dict[str, Any], headers: dict[str, str] | None = None
              ) -> tuple[str, str, int]:
    """(text, finish_reason, completion_tokens) of a one-choice request; fails on any error."""
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    if not body["stream"]:
        response = client.post(path, json=body, headers=headers)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        text = choice["message"]["content"] if endpoint == "chat" else choice["text"]
        return text, choice["finish_reason"], response.json()["usage"]["completion_tokens"]
    with client.stream("POST", path, json=body, headers=headers) as response:
        assert response.status_code == 200, response.read()
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert not [c for c in chunks if "error" in c], chunks
    text, finish_reason = "", None
    for chunk in chunks:
        for choice in chunk.get("choices", []):
            piece = (choice.get("delta") or {}).get("content") if endpoint == "chat" else choice.get("text")
            text += piece or ""
            finish_reason = choice.get("finish_reason") or finish_reason
    usage = next(c["usage"] for c in chunks if c.get("usage"))
    return text, finish_reason, usage["completion_tokens"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_parameters_that_underflow_float32_answer_normally(offload_server: str, endpoint: str, stream: bool) -> None:
    with httpx.Client(base_url=offload_server, timeout=60) as client:
        greedy = _generate(client, endpoint, _body(endpoint, {"temperature": 0}, stream))
        for extra in EXTREME_PARAMETERS:
            text, finish_reason, num_tokens = _generate(client, endpoint, _body(endpoint, extra, stream))
            assert finish_reason in ("stop", "length") and num_tokens >= 1
            if "temperature" in extra:  # below the sampling epsilon: greedy, the temperature-0 answer
                assert (text, finish_reason, num_tokens) == greedy
        assert _generate(client, endpoint, _body(endpoint, {"temperature": 0}, stream)) == greedy
        health = client.get("/health")
        assert health.status_code == 200, health.text


def _scrape(base_url: str) -> tuple[float, set[str]]:
    """(the folded-names counter, every value a `task` label takes)."""
    families = text_string_to_metric_families(httpx.get(f"{base_url}/metrics", timeout=10).text)
    folded, labels = None, set()
    for family in families:
        for sample in family.samples:
            if sample.name == FOLDED:
                folded = sample.value
            if "task" in sample.labels:
                labels.add(sample.labels["task"])
    assert folded is not None, f"{FOLDED} is not exposed"
    return folded, labels


def test_many_task_names_are_folded_and_metric_labels_stay_bounded(offload_server: str) -> None:
    before, _ = _scrape(offload_server)
    with httpx.Client(base_url=offload_server, timeout=60) as client:
        for wave in range(2):
            for i in range(4 * MAX_TASKS):
                body = _body("completions", {"temperature": 0, "max_tokens": 1}, stream=False, text=f"name {i}")
                _generate(client, "completions", body, headers={"X-Task": f"client-task-{wave}-{i}"})
            folded, labels = _scrape(offload_server)
            # at most MAX_TASKS - 1 names besides `default` are ever tracked, so each wave folds all but those
            assert folded - before >= (wave + 1) * 4 * MAX_TASKS - (MAX_TASKS - 1)
            assert labels == {"default"}  # no tasks file: the only label is the table's one task
        assert _generate(client, "chat", _body("chat", {"temperature": 0}, stream=False))[1] in ("stop", "length")


def _serve_until_exit(checkpoint: Path, host_tier_dir: Path) -> tuple[int, str]:
    """Run `serve` with a file-backed host tier in `host_tier_dir`; (exit code, log) once it exits."""
    command = [sys.executable, "-m", "moe_serve.server.cli", "serve", "--model", str(checkpoint), "--host", "127.0.0.1",
               "--port", str(free_port()), "--dtype", "float32", "--device", "cpu", "--log-level", "warning",
               "--expert-cache-fraction", "0.5", "--host-memory-gb", "0.000001", "--host-tier-dir", str(host_tier_dir)]
    try:
        result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"serve did not exit within {EXIT_TIMEOUT_S} s; log:\n{exc.stderr}")
    return result.returncode, result.stdout + result.stderr


def _error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if " ERROR " in line or line.startswith("moe-serve: error")]


def test_a_host_tier_dir_too_small_for_the_experts_ends_serve_with_one_error_line(checkpoint: Path,
                                                                                  tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "tier", 64 * 1024) as tier:
        code, log = _serve_until_exit(checkpoint, tier)
    assert code != 0 and code > 0, log  # not killed by SIGBUS
    errors = _error_lines(log)
    assert len(errors) == 1, log
    assert str(tier) in errors[0] and "host_tier_dir" in errors[0] and "No space left on device" in errors[0]
    assert "Traceback" not in log


def test_a_host_tier_dir_that_is_a_file_ends_serve_with_one_error_line(checkpoint: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file")
    code, log = _serve_until_exit(checkpoint, blocker)
    assert code != 0 and code > 0, log
    errors = _error_lines(log)
    assert len(errors) == 1, log
    assert str(blocker) in errors[0] and "not a directory" in errors[0]
