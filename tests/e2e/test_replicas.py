"""Two replicas behind the real HAProxy (docker/haproxy.cfg) on loopback: requests of one task
land on one replica, both replicas serve, requests without a task are balanced, and each
replica's own per-task counters agree with what the proxy says it routed."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.replicas import REPLICA_HEADER, Proxy, Routing, haproxy, proxy_config, replicas, server_states
from tests.e2e.conftest import STARTUP_TIMEOUT_S, build_native_code
from tests.helpers import make_tiny_checkpoint

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("haproxy") is None,
                       reason="haproxy is not installed (Debian package haproxy: apt-get install haproxy)"),
]

MODEL = "tiny-mixtral"
TASKS = ("chat", "code", "summarize", "classify")  # the names of configs/tasks.yaml: each gets its own label
ROUNDS = 3
FLAGS = ["--offload", "on", "--expert-cache-fraction", "0.5", "--max-model-len", "256",
         "--tasks-file", "configs/tasks.yaml", "--num-threads", "1"]


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proxy, list[str]]]:
    """Two replicas (CPU, half of the experts cached) and HAProxy with the shipped config."""
    build_native_code()
    workdir = tmp_path_factory.mktemp("replicas")
    checkpoint = make_tiny_checkpoint("mixtral", workdir / MODEL)
    with replicas(checkpoint, FLAGS, workdir, 2, timeout_s=STARTUP_TIMEOUT_S) as addresses, \
            haproxy(proxy_config(Routing.TASK_AFFINE), addresses, workdir) as proxy:
        yield proxy, addresses


def by_task(address: str, sample_name: str) -> Counter[str]:
    """A replica's samples of `sample_name` summed per task label, from its own /metrics."""
    counts: Counter[str] = Counter()
    for family in text_string_to_metric_families(httpx.get(f"http://{address}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == sample_name:
                counts[sample.labels["task"]] += int(sample.value)
    return counts


FINISHED = "moe_serve_requests_finished_total"
EXPERT_LOOKUPS = "moe_serve_expert_cache_task_lookups_total"


def test_one_task_goes_to_one_replica_and_both_replicas_serve(proxied: tuple[Proxy, list[str]]) -> None:
    proxy, addresses = proxied
    before = {(address, name): by_task(address, name) for address in addresses for name in (FINISHED, EXPERT_LOOKUPS)}
    client = openai.OpenAI(base_url=f"{proxy.base_url}/v1", api_key="unused", max_retries=0)
    served: dict[str, Counter[str]] = defaultdict(Counter)
    for round_index in range(ROUNDS):  # a mixed workload: the tasks interleaved, one request at a time
        for task in TASKS:
            raw = client.completions.with_raw_response.create(
                model=MODEL, prompt=f"{task} request {round_index}", max_tokens=3, temperature=0,
                extra_headers={"X-Task": task})
            assert raw.parse().usage.completion_tokens == 3
            served[task][raw.headers[REPLICA_HEADER]] += 1
    assert all(len(replicas_of_task) == 1 for replicas_of_task in served.values()), dict(served)
    assert {name for counts in served.values() for name in counts} == {"replica-1", "replica-2"}, dict(served)
    # the replicas' own counters say the same: each task's requests were finished, and its tokens looked
    # up experts, where the proxy sent them
    names = {name: address for name, address in zip(("replica-1", "replica-2"), addresses, strict=True)}
    for name, address in names.items():
        finished = by_task(address, FINISHED) - before[address, FINISHED]
        assert +finished == {task: counts[name] for task, counts in served.items() if counts[name]}
        looked_up = by_task(address, EXPERT_LOOKUPS) - before[address, EXPERT_LOOKUPS]
        assert set(+looked_up) == set(+finished)


def test_requests_without_a_task_use_both_replicas(proxied: tuple[Proxy, list[str]]) -> None:
    proxy, _ = proxied
    with httpx.Client(base_url=proxy.base_url, timeout=60) as http:
        names = [http.post("/v1/completions", json={"model": MODEL, "prompt": f"plain {i}", "max_tokens": 2})
                 .headers[REPLICA_HEADER] for i in range(4)]
    assert set(names) == {"replica-1", "replica-2"}, names  # leastconn: ties go round robin


def test_the_proxy_health_checks_the_replicas_and_exports_metrics(proxied: tuple[Proxy, list[str]]) -> None:
    proxy, _ = proxied
    assert server_states(proxy.stats_url) == {"replica-1": "UP", "replica-2": "UP"}
    metrics = httpx.get(f"{proxy.stats_url}/metrics", timeout=10).text
    assert 'haproxy_server_status{proxy="by_task",server="replica-1",state="UP"} 1' in metrics



def test_the_benchmarks_round_robin_variant_is_a_valid_config(tmp_path: Path) -> None:
    config = tmp_path / "haproxy.cfg"
    config.write_text(proxy_config(Routing.ROUND_ROBIN))
    text = config.read_text()
    assert "\n    balance roundrobin\n" in text and "\n    hash-balance-factor" not in text
    env = {**os.environ, "MOE_PROXY_BIND": "127.0.0.1:1", "MOE_PROXY_STATS_BIND": "127.0.0.1:2",
           "MOE_SERVE_REPLICA_1": "127.0.0.1:3", "MOE_SERVE_REPLICA_2": "127.0.0.1:4"}
    result = subprocess.run(["haproxy", "-c", "-f", str(config)], env=env, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
