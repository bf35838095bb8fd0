"""The live dashboard: `GET /dashboard`, one static page, and `GET /dashboard/data`, the JSON it polls.

The JSON is built from the engine's published snapshot (`latest_stats`: queues and expected
waits by task, the task table, the expert cache's per-layer counters, residency and lookups by
task) and the server's own request
counters (`ServerMetrics`: generated tokens, SLO attainment by task); it reads no live engine
object. Output tokens per second are the rate of the generated-token counter over the samples
of the last `TOKEN_RATE_WINDOW_S` seconds. The page (static/dashboard.html) keeps the history
the heat maps draw over time. Importing this module does not import torch.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping
from importlib.resources import files
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from fastapi.responses import HTMLResponse
from prometheus_client import Counter

from moe_serve.engine.core.request import DEFAULT_TASK
from moe_serve.server.metrics import ServerMetrics, latest_stats

if TYPE_CHECKING:
    from moe_serve.engine.core.async_engine import AsyncLLMEngine
    from moe_serve.engine.core.stats import EngineStats, ExpertCacheSnapshot

PAGE_DIR, PAGE_FILE = "static", "dashboard.html"
TOKEN_RATE_WINDOW_S = 10.0


class TokenRate:
    """Output tokens per second: the counter's rise since the last sample taken at or before
    `window_s` seconds ago (every read of the dashboard data adds one sample; polls further apart
    than the window give the rate since the previous poll)."""

    def __init__(self, window_s: float = TOKEN_RATE_WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._window_s = window_s
        self._clock = clock
        self._samples: deque[tuple[float, float]] = deque()  # (time, tokens generated so far)

    def observe(self, total_tokens: float) -> float:
        """Add a sample of the counter; the rate over the window (0 with one sample)."""
        now = self._clock()
        samples = self._samples
        samples.append((now, total_tokens))
        while len(samples) > 2 and samples[1][0] <= now - self._window_s:
            samples.popleft()  # keep one sample at or before the window's start
        first_time, first_total = samples[0]
        elapsed = now - first_time
        return (total_tokens - first_total) / elapsed if elapsed > 0 else 0.0


def counter_by_task(counter: Counter) -> dict[str, float]:
    """{task label: value} of a Counter labelled by task alone."""
    return {sample.labels["task"]: sample.value
            for family in counter.collect() for sample in family.samples if sample.name.endswith("_total")}


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def _by_table_task(stats: EngineStats, by_task: Mapping[str, int]) -> dict[str, int]:
    """`by_task` with the names outside the task table summed into `default`."""
    counts: dict[str, int] = {}
    for task, count in by_task.items():
        label = task if task in stats.tasks.tasks else DEFAULT_TASK
        counts[label] = counts.get(label, 0) + count
    return counts


def _tasks(stats: EngineStats | None, metrics: ServerMetrics) -> list[dict[str, Any]]:
    """Queue, expected wait, SLO attainment and expert-cache hit rate per task of the task table
    (unknown names count as `default`)."""
    requests, attained = counter_by_task(metrics.slo_requests), counter_by_task(metrics.slo_attained)
    names = set(requests)
    running: dict[str, int] = {}
    waiting: dict[str, int] = {}
    lookups: dict[str, int] = {}
    misses: dict[str, int] = {}
    if stats is not None:
        running, waiting = _by_table_task(stats, stats.running_by_task), _by_table_task(stats, stats.waiting_by_task)
        if stats.expert_cache is not None:
            lookups = _by_table_task(stats, stats.expert_cache.lookups_by_task)
            misses = _by_table_task(stats, stats.expert_cache.misses_by_task)
        names |= set(stats.tasks.tasks) | set(running) | set(waiting) | set(lookups)
    rows = []
    for task in sorted(names):
        spec = None if stats is None else stats.tasks.get(task)
        judged = requests.get(task, 0.0)
        hit_rate = _ratio(lookups.get(task, 0) - misses.get(task, 0), lookups.get(task, 0))
        rows.append({
            "task": task,
            "running": running.get(task, 0),
            "waiting": waiting.get(task, 0),
            "expected_wait_s": None if stats is None else stats.expected_wait_by_task.get(task),
            "slo_requests": int(judged),
            "slo_attained": int(attained.get(task, 0.0)),
            "slo_attainment": _ratio(attained.get(task, 0.0), judged),
            "ttft_slo_s": None if spec is None else spec.ttft_slo_s,
            "tpot_slo_s": None if spec is None else spec.tpot_slo_s,
            "expert_lookups": lookups.get(task, 0),
            "expert_hit_rate": hit_rate,
        })
    return rows


def _expert_cache(cache: ExpertCacheSnapshot) -> dict[str, Any]:
    """Per-layer counters and residency, occupancy and prefetch accuracy of the expert cache."""
    layers = sorted(set(cache.num_experts) | set(cache.hits) | set(cache.misses))
    total_misses = sum(cache.misses.values())
    return {
        "layers": [{
            "layer": layer,
            "num_experts": cache.num_experts.get(layer, 0),
            "resident": list(cache.resident_experts.get(layer, ())),
            "hits": cache.hits.get(layer, 0),
            "misses": cache.misses.get(layer, 0),
            "evictions": cache.evictions.get(layer, 0),
            "stall_s": cache.stall_seconds.get(layer, 0.0),
        } for layer in layers],
        "resident_bytes": cache.resident_bytes,
        "capacity_bytes": cache.capacity_bytes,
        "prefetch": {
            "issued": cache.prefetch_issued,
            "used": cache.prefetch_used,
            "wasted": cache.prefetch_wasted,
            "late": cache.prefetch_late,
            "precision": _ratio(cache.prefetch_used, cache.prefetch_issued),
            "recall": _ratio(cache.prefetch_used, cache.prefetch_used + total_misses),
        },
    }


def dashboard_data(stats: EngineStats | None, metrics: ServerMetrics, token_rate: TokenRate,
                   served_model_name: str) -> dict[str, Any]:
    """The JSON of `GET /dashboard/data`; `stats` is None while the engine loads or after it died."""
    generated = sum(counter_by_task(metrics.generation_tokens).values())
    cache = None if stats is None else stats.expert_cache
    return {
        "model": served_model_name,
        "ready": stats is not None,
        "device": None if stats is None else stats.device,
        "tokens": {"generated": int(generated), "per_second": token_rate.observe(generated)},
        "queue": None if stats is None else {
            "running": stats.num_running,
            "waiting": stats.num_waiting,
            "kv_cache_usage": stats.kv_cache_usage,
            "expected_wait_s": stats.expected_wait_s,
            "preemptions": stats.num_preemptions,
        },
        "tasks": _tasks(stats, metrics),
        "expert_cache": None if cache is None else _expert_cache(cache),
    }


def dashboard_page() -> str:
    """The page's HTML (package data of moe_serve.server)."""
    return (files("moe_serve.server") / PAGE_DIR / PAGE_FILE).read_text(encoding="utf-8")


def build_dashboard_router(engine: AsyncLLMEngine, metrics: ServerMetrics,
                           served_model_name: str) -> APIRouter:
    """The two dashboard routes, bound to one app's engine and request counters."""
    router = APIRouter()
    page = dashboard_page()
    token_rate = TokenRate()

    @router.get("/dashboard", tags=["ops"], response_class=HTMLResponse)
    async def dashboard() -> HTMLResponse:
        """The live view: expert residency and hit/miss heat maps, prefetch accuracy, queues, SLOs, tok/s."""
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @router.get("/dashboard/data", tags=["ops"])
    async def data() -> Mapping[str, Any]:
        """What the dashboard shows, from the engine's latest snapshot and the server's counters."""
        return dashboard_data(latest_stats(engine), metrics, token_rate, served_model_name)

    return router
