"""/metrics of a live server that offloads experts: every metric the Grafana dashboard
queries is exposed, and the counters agree with what the API returned."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import server_process
from tests.helpers import make_tiny_checkpoint
from tests.project.test_deploy_files import DASHBOARD, dashboard_metric_names, exposed_names

pytestmark = pytest.mark.e2e

MODEL = "tiny-mixtral"
# tiny_config("mixtral") in fp32: gate_up [2*48, 32] + down [32, 48] floats per expert
EXPERT_NBYTES = (2 * 48 * 32 + 32 * 48) * 4
NUM_COMPLETIONS = 3
NUM_STREAMED_CHATS = 2


@pytest.fixture(scope="module")
def offload_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server keeping half of the experts in its cache; yields its base URL."""
    checkpoint = make_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("metrics") / MODEL)
    log_path = tmp_path_factory.mktemp("metrics-log") / "server.log"
    flags = ["--max-model-len", "256", "--expert-cache-fraction", "0.5"]
    with server_process(checkpoint, flags, log_path) as (base_url, _process):
        yield base_url


def _completion_tokens(base_url: str) -> int:
    """Send the workload (plain and streamed); the sum of completion_tokens the API reported."""
    total = 0
    with httpx.Client(base_url=base_url, timeout=60) as client:
        for i in range(NUM_COMPLETIONS):
            body = {"model": MODEL, "prompt": f"metrics {i}", "max_tokens": 6 + i, "temperature": 0}
            response = client.post("/v1/completions", json=body)
            response.raise_for_status()
            total += response.json()["usage"]["completion_tokens"]
        for i in range(NUM_STREAMED_CHATS):
            body = {"model": MODEL, "messages": [{"role": "user", "content": f"stream {i}"}], "max_tokens": 5,
                    "stream": True, "stream_options": {"include_usage": True}}
            with client.stream("POST", "/v1/chat/completions", json=body, headers={"X-Task": "chat"}) as response:
                response.raise_for_status()
                chunks = [json.loads(line[len("data: "):]) for line in response.iter_lines()
                          if line.startswith("data: ") and line != "data: [DONE]"]
            total += next(c["usage"] for c in chunks if c.get("usage"))["completion_tokens"]
    return total


def _scrape(base_url: str) -> tuple[set[str], dict[str, float]]:
    """(every exposed sample name incl. empty families, {sample name: value summed over labels})."""
    families = list(text_string_to_metric_families(httpx.get(f"{base_url}/metrics", timeout=10).text))
    totals: dict[str, float] = {}
    for family in families:
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return exposed_names(families), totals


def test_metrics_cover_the_dashboard_and_agree_with_the_responses(offload_server: str) -> None:
    completion_tokens = _completion_tokens(offload_server)
    names, totals = _scrape(offload_server)

    used = dashboard_metric_names(json.loads(Path(DASHBOARD).read_text()))
    assert used <= names, f"dashboard metrics missing from /metrics: {sorted(used - names)}"
    assert totals["process_resident_memory_bytes"] > 0 and totals["process_open_fds"] > 0

    num_requests = NUM_COMPLETIONS + NUM_STREAMED_CHATS
    assert totals["moe_serve_requests_finished_total"] == num_requests
    assert totals["moe_serve_generation_tokens_total"] == completion_tokens
    assert totals["moe_serve_time_to_first_token_seconds_count"] == num_requests
    assert totals["moe_serve_e2e_request_latency_seconds_count"] == num_requests
    assert totals["moe_serve_request_queue_time_seconds_count"] == num_requests
    assert totals["moe_serve_inter_token_latency_seconds_count"] == completion_tokens - num_requests
    assert totals["moe_serve_slo_requests_total"] == num_requests
    assert totals["moe_serve_prompt_tokens_total"] > 0

    hits, misses = totals["moe_serve_expert_cache_hits_total"], totals["moe_serve_expert_cache_misses_total"]
    assert hits > 0 and misses > 0
    issued = totals["moe_serve_expert_prefetches_issued_total"]
    # every miss and every prefetch copies one expert (a cancelled pending copy is taken back)
    copied = totals["moe_serve_expert_copy_bytes_total"]
    assert copied % EXPERT_NBYTES == 0 and 0 < copied <= (misses + issued) * EXPERT_NBYTES
    assert totals["moe_serve_expert_prefetches_used_total"] <= issued
    # the default --miss-precision full loads only full copies: the per-precision counters add up to the copies
    assert totals["moe_serve_expert_load_bytes_total"] == copied
    assert totals["moe_serve_expert_loads_total"] == copied // EXPERT_NBYTES
    # auto without a link throttle on a CPU copies every miss; the copies kept the link busy
    assert "moe_serve_expert_cache_host_misses_total" in names
    assert totals.get("moe_serve_expert_cache_host_misses_total", 0) == 0
    assert totals["moe_serve_expert_host_compute_seconds_total"] == 0
    assert totals["moe_serve_expert_link_busy_seconds_total"] > 0
    assert 0 < totals["moe_serve_expert_cache_resident_bytes"] <= totals["moe_serve_expert_cache_capacity_bytes"]
    assert totals["moe_serve_model_info"] == 1
    assert totals["moe_serve_requests_running"] == 0 and totals["moe_serve_requests_waiting"] == 0
