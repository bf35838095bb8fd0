"""Prometheus metrics of one app: request-level series observed by the server, engine and
expert-cache series read at scrape time.

`ServerMetrics` owns the histograms and counters the server observes when an engine request
finishes (it knows arrival, first-token and per-token times). `EngineCollector` is a custom
Collector that turns the engine's latest published snapshot (`EngineStats`: queues and expected
wait by task, KV usage, preemptions, output-length error, folded task names, the slo policy's
overload decisions (shed / demoted) by task, and the expert cache's
hits, misses, copies, stalls and prefetches, per layer and, as lookups and misses, per task) into
metric families on every scrape; it reads no live engine object.
Both live on the app's own CollectorRegistry.
A `task` label is a name of the task table or `default`, never a client's arbitrary name, so
the label sets stay bounded whatever names clients send. Importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from moe_serve.engine.core.request import DEFAULT_TASK, EngineRequest, RequestOutput
from moe_serve.engine.core.scheduler import OverloadDecision
from moe_serve.engine.offload.expert_cache import LOAD_KINDS

if TYPE_CHECKING:
    from moe_serve.engine.core.async_engine import AsyncLLMEngine
    from moe_serve.engine.core.stats import EngineStats
    from moe_serve.engine.core.tasks import TaskTable

PREFIX = "moe_serve"
ABORTED = "abort"

# vLLM's bucket boundaries (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


@dataclass
class RequestTimer:
    """What the server saw of one engine request: when it arrived and when each token came."""

    task: str
    arrival_time: float
    first_token_time: float | None = None
    last_token_time: float | None = None
    inter_token_s: list[float] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    queue_time_s: float | None = None
    finish_reason: str | None = None

    @classmethod
    def start(cls, request: EngineRequest) -> RequestTimer:
        return cls(task=request.task, arrival_time=request.arrival_time)

    def on_output(self, output: RequestOutput, now: float) -> int:
        """Record one engine output; returns how many output tokens it added."""
        added = max(0, output.num_output_tokens - self.num_output_tokens)
        self.num_prompt_tokens = output.num_prompt_tokens
        self.num_output_tokens += added
        if added:
            if self.last_token_time is None:
                self.first_token_time = now
            else:
                self.inter_token_s.append(now - self.last_token_time)
            self.last_token_time = now
        if output.first_scheduled_time is not None:
            self.queue_time_s = max(0.0, output.first_scheduled_time - self.arrival_time)
        if output.finished:
            self.finish_reason = output.finish_reason.value if output.finish_reason else ABORTED
        return added


def latest_stats(engine: AsyncLLMEngine) -> EngineStats | None:
    """The engine's last published snapshot while it runs (None while loading or dead)."""
    return engine.stats() if engine.is_ready else None


class TaskTableSource:
    """The engine's task/SLO table once the engine is loaded (None before)."""

    def __init__(self, engine: AsyncLLMEngine) -> None:
        self._engine = engine

    def table(self) -> TaskTable | None:
        stats = latest_stats(self._engine)
        return None if stats is None else stats.tasks

    def label(self, task: str) -> str:
        """`task` if the task table knows it, else `default` (bounds label cardinality)."""
        table = self.table()
        return task if table is not None and task in table.tasks else DEFAULT_TASK


class ServerMetrics:
    """Request-level series, observed by the server as engine requests stream and finish."""

    def __init__(self, registry: CollectorRegistry, tasks: TaskTableSource) -> None:
        self._tasks = tasks
        task = ["task"]
        self.time_to_first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds", "Time from arrival to the first output token.", task,
            buckets=TTFT_BUCKETS, registry=registry)
        self.inter_token_latency = Histogram(
            f"{PREFIX}_inter_token_latency_seconds", "Time between consecutive output tokens of a request.", task,
            buckets=ITL_BUCKETS, registry=registry)
        self.e2e_latency = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds", "Time from arrival to the last output token.", task,
            buckets=REQUEST_LATENCY_BUCKETS, registry=registry)
        self.queue_time = Histogram(
            f"{PREFIX}_request_queue_time_seconds", "Time from arrival until first scheduled.", task,
            buckets=REQUEST_LATENCY_BUCKETS, registry=registry)
        self.prompt_tokens = Counter(
            f"{PREFIX}_prompt_tokens", "Prompt tokens of finished requests.", task, registry=registry)
        self.generation_tokens = Counter(
            f"{PREFIX}_generation_tokens", "Output tokens generated.", task, registry=registry)
        self.requests_finished = Counter(
            f"{PREFIX}_requests_finished", "Finished engine requests (one per choice).", ["task", "finish_reason"],
            registry=registry)
        self.slo_requests = Counter(
            f"{PREFIX}_slo_requests", "Requests judged against their task's TTFT and TPOT SLOs (aborts excluded).",
            task, registry=registry)
        self.slo_attained = Counter(
            f"{PREFIX}_slo_attained", "Requests that met both their task's TTFT and TPOT SLOs.", task,
            registry=registry)

    def on_tokens(self, timer: RequestTimer, num_new_tokens: int) -> None:
        """Count streamed output tokens as they arrive."""
        if num_new_tokens:
            self.generation_tokens.labels(self._tasks.label(timer.task)).inc(num_new_tokens)

    def on_finished(self, timer: RequestTimer) -> None:
        """Observe a finished (or abandoned) engine request."""
        task = self._tasks.label(timer.task)
        reason = timer.finish_reason or ABORTED
        self.requests_finished.labels(task, reason).inc()
        self.prompt_tokens.labels(task).inc(timer.num_prompt_tokens)
        if timer.queue_time_s is not None:
            self.queue_time.labels(task).observe(timer.queue_time_s)
        for gap in timer.inter_token_s:
            self.inter_token_latency.labels(task).observe(gap)
        if timer.first_token_time is None or timer.last_token_time is None:
            return
        ttft = timer.first_token_time - timer.arrival_time
        self.time_to_first_token.labels(task).observe(ttft)
        self.e2e_latency.labels(task).observe(timer.last_token_time - timer.arrival_time)
        table = self._tasks.table()
        if reason == ABORTED or table is None:
            return
        spec = table.get(timer.task)
        tpot = (timer.last_token_time - timer.first_token_time) / max(1, timer.num_output_tokens - 1)
        self.slo_requests.labels(task).inc()
        if ttft <= spec.ttft_slo_s and tpot <= spec.tpot_slo_s:
            self.slo_attained.labels(task).inc()


def _by_precision(name: str, doc: str, values: Mapping[str, int]) -> CounterMetricFamily:
    """A counter with a `precision` label, every kind present (0 until it happens)."""
    family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=["precision"])
    for kind in LOAD_KINDS:
        family.add_metric([kind], values.get(kind, 0))
    return family


def _per_layer(name: str, doc: str, values: Mapping[int, float]) -> CounterMetricFamily:
    family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=["layer"])
    for layer, value in sorted(values.items()):
        family.add_metric([str(layer)], value)
    return family


def _per_task(name: str, doc: str, values: Mapping[str, int], stats: EngineStats) -> CounterMetricFamily:
    """A counter by task label: the table's tasks (0 when unseen); other names summed into `default`."""
    family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=["task"])
    counts = dict.fromkeys(stats.tasks.tasks, 0)
    for task, value in values.items():
        label = task if task in stats.tasks.tasks else DEFAULT_TASK
        counts[label] = counts.get(label, 0) + value
    for task, value in sorted(counts.items()):
        family.add_metric([task], value)
    return family


class EngineCollector(Collector):
    """Engine and expert-cache families built from the engine's published snapshot at scrape time."""

    def __init__(self, engine: AsyncLLMEngine, served_model_name: str, version: str) -> None:
        self._engine = engine
        self._model = served_model_name
        self._version = version

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        stats = latest_stats(self._engine)
        yield self._info(stats)
        if stats is None:
            return
        yield from self._engine_families(stats)
        yield from self._cache_families(stats)

    def _info(self, stats: EngineStats | None) -> InfoMetricFamily:
        from moe_serve.cache_policies import DEFAULT_POLICY

        config = self._engine.config
        info = InfoMetricFamily(f"{PREFIX}_model", "The served model and how it is served.")
        info.add_metric([], {
            "version": self._version,
            "model": self._model,
            "cache_policy": DEFAULT_POLICY if config.cache_policy == "default" else config.cache_policy,
            "scheduling_policy": config.scheduling_policy.value,
            "device": config.device.value if stats is None else stats.device,
            "offload": str(stats is not None and stats.offload).lower(),
        })
        return info

    @staticmethod
    def _engine_families(stats: EngineStats) -> Iterator[Metric]:
        for name, doc, by_task in (("requests_running", "Requests being computed.", stats.running_by_task),
                                   ("requests_waiting", "Requests waiting to be scheduled.", stats.waiting_by_task)):
            family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["task"])
            counts = dict.fromkeys(stats.tasks.tasks, 0)  # 0, not absent, when idle
            for task, count in by_task.items():
                label = task if task in stats.tasks.tasks else DEFAULT_TASK
                counts[label] = counts.get(label, 0) + count
            for task, count in sorted(counts.items()):
                family.add_metric([task], count)
            yield family
        yield GaugeMetricFamily(f"{PREFIX}_kv_cache_usage_ratio", "Share of KV-cache blocks in use (0-1).",
                                value=stats.kv_cache_usage)
        wait = GaugeMetricFamily(f"{PREFIX}_expected_wait_seconds",
                                 "Seconds a request of the task arriving now would wait before its prefill starts "
                                 "(the scheduler's estimate from the queues and measured step times).", labels=["task"])
        for task, seconds in sorted(stats.expected_wait_by_task.items()):
            wait.add_metric([task], seconds)
        yield wait
        yield CounterMetricFamily(f"{PREFIX}_preemptions", "Running requests preempted to free KV blocks.",
                                  value=stats.num_preemptions)
        yield GaugeMetricFamily(f"{PREFIX}_output_length_prediction_mean_abs_error_tokens",
                                "Mean |predicted - actual| output tokens of the scheduler's length estimator.",
                                value=stats.output_len_mean_abs_error)
        overload = CounterMetricFamily(
            f"{PREFIX}_overload_decisions", "Requests the slo policy shed (on arrival or while waiting: 429) or "
            "demoted (served last) because they could no longer meet their task's TTFT SLO.",
            labels=["task", "decision"])
        counts = {(task, decision.value): 0 for task in stats.tasks.tasks for decision in OverloadDecision}
        for (task, decision), count in stats.overload_decisions.items():
            key = (task if task in stats.tasks.tasks else DEFAULT_TASK, decision)
            counts[key] = counts.get(key, 0) + count
        for (task, decision), count in sorted(counts.items()):
            overload.add_metric([task, decision], count)
        yield overload
        yield CounterMetricFamily(f"{PREFIX}_task_names_folded",
                                  "Requests served as task 'default' because max_tasks distinct task names were "
                                  "already tracked.", value=stats.num_task_names_folded)

    @staticmethod
    def _cache_families(stats: EngineStats) -> Iterator[Metric]:
        cache = stats.expert_cache
        if cache is None:
            return
        yield _per_layer("expert_cache_hits", "Expert acquisitions served by the device cache.", cache.hits)
        yield _per_layer("expert_cache_misses", "Expert acquisitions not in the device cache (copied, or computed on "
                         "the host: expert_cache_host_misses).", cache.misses)
        yield _per_layer("expert_cache_host_misses", "Misses computed from the host tier instead of copied (also "
                         "counted in expert_cache_misses).", cache.host_misses)
        yield CounterMetricFamily(f"{PREFIX}_expert_host_compute_seconds",
                                  "Seconds the host worker spent computing missed experts.",
                                  value=cache.host_compute_seconds)
        yield CounterMetricFamily(f"{PREFIX}_expert_link_busy_seconds", "Seconds the host-to-device link carried "
                                  "expert copies; rate() is the link's busy fraction.", value=cache.link_busy_seconds)
        yield _by_precision("expert_loads", "Expert copies into device slots by what they load: full, low (the "
                            "low-bit copy, --miss-precision low/adaptive) or upgrade (a low-bit resident expert reloaded "
                            "at full precision).", cache.loads)
        yield _by_precision("expert_load_bytes", "Expert bytes copied into device slots, by what the copies load "
                            "(their sum is expert_copy_bytes summed over layers).", cache.load_bytes)
        yield _per_layer("expert_cache_evictions", "Experts evicted from the device cache.", cache.evictions)
        yield _per_layer("expert_copy_bytes", "Expert bytes copied host-to-device.", cache.bytes_copied)
        yield _per_layer("expert_copy_stall_seconds", "Time compute waited on pending expert copies.",
                         cache.stall_seconds)
        yield _per_task("expert_cache_task_lookups",
                        "Routed-expert lookups of the task's tokens: one per (token, MoE layer, routed expert).",
                        cache.lookups_by_task, stats)
        yield _per_task("expert_cache_task_misses", "Of those, lookups whose expert was not in the device cache.",
                        cache.misses_by_task, stats)
        yield GaugeMetricFamily(f"{PREFIX}_expert_cache_resident_bytes", "Bytes of device slots holding an expert.",
                                value=cache.resident_bytes)
        yield GaugeMetricFamily(f"{PREFIX}_expert_cache_capacity_bytes", "Byte budget of the device expert cache.",
                                value=cache.capacity_bytes)
        for name, doc, value in (
            ("issued", "Prefetch copies started.", cache.prefetch_issued),
            ("used", "Prefetched experts acquired before eviction.", cache.prefetch_used),
            ("wasted", "Prefetched experts evicted or cancelled before any use.", cache.prefetch_wasted),
            ("late", "Prefetched experts acquired while their copy was still pending.", cache.prefetch_late),
        ):
            yield CounterMetricFamily(f"{PREFIX}_expert_prefetches_{name}", doc, value=value)


def register_metrics(
    registry: CollectorRegistry, engine: AsyncLLMEngine, served_model_name: str, version: str
) -> ServerMetrics:
    """Put every moe-serve series on `registry`; returns what the server observes into."""
    registry.register(EngineCollector(engine, served_model_name, version))
    return ServerMetrics(registry, TaskTableSource(engine))
