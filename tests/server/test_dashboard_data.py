"""GET /dashboard and /dashboard/data: the JSON built from a published engine snapshot and the
server's request counters, and the token rate over its window."""

from __future__ import annotations

from types import MappingProxyType

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from moe_serve.engine.core.stats import EngineStats, ExpertCacheSnapshot
from moe_serve.engine.core.tasks import TaskSpec, TaskTable
from moe_serve.server.auth import ApiKeyMiddleware
from moe_serve.server.dashboard import TokenRate, build_dashboard_router, dashboard_data
from moe_serve.server.metrics import ServerMetrics, TaskTableSource

TASKS = TaskTable.from_mapping({"chat": {"ttft_slo_s": 0.5, "tpot_slo_s": 0.05}})


class PublishedStats:
    """What the dashboard reads of an engine: readiness and the last published snapshot."""

    def __init__(self, stats: EngineStats | None) -> None:
        self.snapshot = stats

    @property
    def is_ready(self) -> bool:
        return self.snapshot is not None

    def stats(self) -> EngineStats:
        assert self.snapshot is not None
        return self.snapshot


def frozen(mapping: dict) -> MappingProxyType:
    return MappingProxyType(mapping)


def cache_snapshot() -> ExpertCacheSnapshot:
    return ExpertCacheSnapshot(
        hits=frozen({0: 30, 1: 10}), misses=frozen({0: 10, 1: 30}), evictions=frozen({1: 4}),
        bytes_copied=frozen({0: 100, 1: 300}), stall_seconds=frozen({0: 0.5}),
        prefetch_issued=20, prefetch_used=15, prefetch_wasted=5, prefetch_late=2,
        resident_bytes=3 * 64, capacity_bytes=4 * 64,
        num_experts=frozen({0: 8, 1: 8}), resident_experts=frozen({0: (1, 5), 1: (7,)}),
        lookups_by_task=frozen({"chat": 60, "default": 10, "someone-elses-name": 10}),
        misses_by_task=frozen({"chat": 15, "default": 5, "someone-elses-name": 5}),
        host_misses=frozen({}), host_compute_seconds=0.0, link_busy_seconds=0.0,
        loads=frozen({"full": 12, "low": 30, "upgrade": 2}), load_bytes=frozen({"full": 300, "low": 90, "upgrade": 10}),
    )


def engine_stats(cache: ExpertCacheSnapshot | None) -> EngineStats:
    return EngineStats(
        num_running=3, num_waiting=2, kv_cache_usage=0.25, num_preemptions=1,
        running_by_task=frozen({"chat": 1, "default": 1, "someone-elses-name": 1}),
        waiting_by_task=frozen({"chat": 2}), output_len_mean_abs_error=3.0, expected_wait_s=0.75,
        expected_wait_by_task=frozen({"chat": 0.75, "default": 0.5}),
        num_task_names_folded=0, tasks=TASKS, device="cpu", expert_cache=cache,
    )


def server_metrics(engine: PublishedStats) -> ServerMetrics:
    metrics = ServerMetrics(CollectorRegistry(), TaskTableSource(engine))  # type: ignore[arg-type]
    metrics.generation_tokens.labels("chat").inc(40)
    metrics.generation_tokens.labels("default").inc(2)
    metrics.slo_requests.labels("chat").inc(4)
    metrics.slo_attained.labels("chat").inc(3)
    return metrics


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_token_rate_is_the_rise_over_the_last_window() -> None:
    clock = FakeClock()
    rate = TokenRate(window_s=10.0, clock=clock)
    assert rate.observe(0) == 0.0  # one sample: no rate yet
    clock.now = 5.0
    assert rate.observe(50) == pytest.approx(10.0)
    clock.now = 15.0
    assert rate.observe(150) == pytest.approx(100 / 10)  # from the sample at t=5, the window's start
    clock.now = 40.0
    assert rate.observe(150) == 0.0  # idle for a whole window


def test_data_reports_the_snapshot_and_the_counters() -> None:
    stats = engine_stats(cache_snapshot())
    engine = PublishedStats(stats)
    data = dashboard_data(stats, server_metrics(engine), TokenRate(), "tiny")

    assert data["model"] == "tiny" and data["ready"] and data["device"] == "cpu"
    assert data["tokens"]["generated"] == 42
    assert data["queue"] == {"running": 3, "waiting": 2, "kv_cache_usage": 0.25, "expected_wait_s": 0.75,
                             "preemptions": 1}
    by_task = {row["task"]: row for row in data["tasks"]}
    assert set(by_task) == {"chat", "default"}  # a name outside the task table counts as default
    assert (by_task["chat"]["running"], by_task["chat"]["waiting"]) == (1, 2)
    assert (by_task["default"]["running"], by_task["default"]["waiting"]) == (2, 0)
    assert by_task["chat"]["slo_attainment"] == pytest.approx(0.75)
    assert (by_task["chat"]["slo_attained"], by_task["chat"]["slo_requests"]) == (3, 4)
    assert (by_task["chat"]["ttft_slo_s"], by_task["chat"]["tpot_slo_s"]) == (0.5, 0.05)
    assert by_task["default"]["slo_attainment"] is None  # nothing judged yet
    assert by_task["default"]["ttft_slo_s"] == TaskSpec().ttft_slo_s
    assert (by_task["chat"]["expected_wait_s"], by_task["default"]["expected_wait_s"]) == (0.75, 0.5)
    assert by_task["chat"]["expert_lookups"] == 60 and by_task["chat"]["expert_hit_rate"] == pytest.approx(45 / 60)
    assert by_task["default"]["expert_lookups"] == 20 and by_task["default"]["expert_hit_rate"] == pytest.approx(0.5)

    cache = data["expert_cache"]
    assert cache["layers"] == [
        {"layer": 0, "num_experts": 8, "resident": [1, 5], "hits": 30, "misses": 10, "evictions": 0, "stall_s": 0.5},
        {"layer": 1, "num_experts": 8, "resident": [7], "hits": 10, "misses": 30, "evictions": 4, "stall_s": 0.0},
    ]
    assert (cache["resident_bytes"], cache["capacity_bytes"]) == (192, 256)
    prefetch = cache["prefetch"]
    assert prefetch["precision"] == pytest.approx(15 / 20)
    assert prefetch["recall"] == pytest.approx(15 / (15 + 40))
    assert (prefetch["issued"], prefetch["used"], prefetch["wasted"], prefetch["late"]) == (20, 15, 5, 2)


def test_data_without_offload_or_before_the_engine_is_ready() -> None:
    resident = engine_stats(None)
    assert dashboard_data(resident, server_metrics(PublishedStats(resident)), TokenRate(), "m")["expert_cache"] is None

    loading = dashboard_data(None, server_metrics(PublishedStats(None)), TokenRate(), "m")
    assert not loading["ready"] and loading["queue"] is None and loading["expert_cache"] is None
    assert [row["task"] for row in loading["tasks"]] == ["chat"]  # known from the counters alone
    assert loading["tasks"][0]["ttft_slo_s"] is None and loading["tasks"][0]["expert_hit_rate"] is None


def dashboard_app(api_key: str | None = None, protect_health_and_metrics: bool = False) -> FastAPI:
    engine = PublishedStats(engine_stats(cache_snapshot()))
    app = FastAPI()
    app.include_router(build_dashboard_router(engine, server_metrics(engine), "tiny"))  # type: ignore[arg-type]
    if api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key, protect_health_and_metrics=protect_health_and_metrics)
    return app


def test_routes_serve_the_page_and_its_data() -> None:
    client = TestClient(dashboard_app())

    page = client.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'fetch("dashboard/data"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no external resources
    for element in ("residency", "hit-miss", "tok-per-s", "tasks", "prefetch-precision"):
        assert f'id="{element}"' in page.text

    data = client.get("/dashboard/data")
    assert data.status_code == 200
    assert data.json()["expert_cache"]["layers"][0]["resident"] == [1, 5]


@pytest.mark.parametrize("protected", [False, True])
def test_the_api_key_guards_the_dashboard_like_metrics(protected: bool) -> None:
    client = TestClient(dashboard_app(api_key="sk-key", protect_health_and_metrics=protected))
    for path in ("/dashboard", "/dashboard/data"):
        assert client.get(path).status_code == (401 if protected else 200)
        assert client.get(path, headers={"Authorization": "Bearer sk-key"}).status_code == 200
