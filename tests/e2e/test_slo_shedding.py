"""A live slo-policy server sheds a request its task's TTFT SLO cannot be met for: 429 with an
OpenAI error body and Retry-After, before any stream byte, counted in /metrics; other tasks are
served."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import server_process
from tests.helpers import make_tiny_checkpoint

pytestmark = pytest.mark.e2e

MODEL = "tiny-mixtral"
# no request can reach its first token within a microsecond: every `instant` request is shed on arrival
TASKS = {"tasks": {"instant": {"ttft_slo_s": 1e-6, "overload": "shed"}, "relaxed": {"ttft_slo_s": 60.0}}}


@pytest.fixture(scope="module")
def slo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("slo-shed")
    checkpoint = make_tiny_checkpoint("mixtral", tmp / MODEL)
    tasks_file = tmp / "tasks.yaml"
    tasks_file.write_text(yaml.safe_dump(TASKS))
    flags = ["--max-model-len", "256", "--scheduling-policy", "slo", "--tasks-file", str(tasks_file)]
    with server_process(checkpoint, flags, tmp / "server.log") as (base_url, _process):
        yield base_url


def _overload_decisions(base_url: str) -> dict[tuple[str, str], float]:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    return {(s.labels["task"], s.labels["decision"]): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "moe_serve_overload_decisions_total"}


def test_a_request_that_cannot_meet_its_ttft_slo_gets_429_with_retry_after(slo_server: str) -> None:
    with httpx.Client(base_url=slo_server, timeout=60) as client:
        body = {"model": MODEL, "prompt": "shed me", "max_tokens": 4, "ignore_eos": True}
        refused = client.post("/v1/completions", json=body, headers={"X-Task": "instant"})
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "shed me"}], "max_tokens": 4,
                "stream": True, "metadata": {"task": "instant"}}
        with client.stream("POST", "/v1/chat/completions", json=chat) as streamed:
            streamed_body = json.loads(streamed.read())
        served = client.post("/v1/completions", json=body, headers={"X-Task": "relaxed"})
    assert refused.status_code == 429 and streamed.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1 and int(streamed.headers["Retry-After"]) >= 1
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    assert "'instant' TTFT SLO cannot be met" in error["message"]
    assert streamed_body["error"]["code"] == "rate_limit_exceeded"
    assert served.status_code == 200 and served.json()["usage"]["completion_tokens"] == 4
    decisions = _overload_decisions(slo_server)
    assert decisions[("instant", "shed_on_arrival")] == 2
    assert decisions[("relaxed", "shed_on_arrival")] == 0 and decisions[("instant", "demoted")] == 0
    text = httpx.get(f"{slo_server}/metrics", timeout=10).text
    waiting = [s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "moe_serve_requests_waiting"]
    assert waiting and sum(waiting) == 0  # nothing shed is left queued
