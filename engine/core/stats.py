"""The engine's state as other threads may read it: immutable snapshots built on the engine thread.

`EngineStats` holds the queues by task, KV usage, preemptions, the output-length estimator's
error, folded task names, the slo policy's overload decisions by task, the expected wait of a
new request, the task table, the device and, when experts are offloaded, an `ExpertCacheSnapshot`. The engine thread builds one after every
step and every request added, finished or aborted, and publishes it by one reference assignment
(`AsyncLLMEngine.stats`); /health, /metrics and Retry-After read nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from moe_serve.engine.core.tasks import TaskTable
    from moe_serve.engine.offload.expert_cache import ExpertCache


K = TypeVar("K")
V = TypeVar("V")


def frozen(mapping: Mapping[K, V]) -> Mapping[K, V]:
    """A read-only copy of `mapping`."""
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class ExpertCacheSnapshot:
    """The device expert cache's counters since start (per-layer mappings keyed by MoE layer) and
    its occupancy: `num_experts` routed experts per layer in the host store, `resident_experts`
    the sorted expert ids per layer holding a slot (resident or loading; refreshed at most every
    0.25 s, `SlotPool.residency`); `lookups_by_task` / `misses_by_task`: (row, MoE layer, routed
    expert) lookups by the task of the row, and those that missed (`TaskHitCounter`); `host_misses`:
    the misses computed from the host tier instead of copied (also in `misses`), `host_compute_seconds`
    the host worker's time on them, `link_busy_seconds` the time the link carried copies; `loads` /
    `load_bytes`: copies into slots and their bytes by what they loaded (`full`, `low`, `upgrade`)."""

    hits: Mapping[int, int]
    misses: Mapping[int, int]
    evictions: Mapping[int, int]
    bytes_copied: Mapping[int, int]
    stall_seconds: Mapping[int, float]
    prefetch_issued: int
    prefetch_used: int
    prefetch_wasted: int
    prefetch_late: int
    resident_bytes: int
    capacity_bytes: int
    num_experts: Mapping[int, int]
    resident_experts: Mapping[int, tuple[int, ...]]
    lookups_by_task: Mapping[str, int]
    misses_by_task: Mapping[str, int]
    host_misses: Mapping[int, int]
    host_compute_seconds: float
    link_busy_seconds: float
    loads: Mapping[str, int]
    load_bytes: Mapping[str, int]

    @classmethod
    def of(cls, cache: ExpertCache) -> ExpertCacheSnapshot:
        """Read `cache` (on the engine thread, which owns it)."""
        stats = cache.stats()
        nbytes = cache.store.expert_nbytes
        return cls(
            hits=frozen(stats.hits), misses=frozen(stats.misses), evictions=frozen(stats.evictions),
            bytes_copied=frozen(stats.bytes_copied), stall_seconds=frozen(stats.stall_seconds),
            prefetch_issued=stats.prefetch_issued, prefetch_used=stats.prefetch_used,
            prefetch_wasted=stats.prefetch_wasted, prefetch_late=stats.prefetch_late,
            resident_bytes=cache.num_occupied_slots * nbytes, capacity_bytes=cache.num_slots * nbytes,
            num_experts=cache.store.experts_per_layer,
            resident_experts=cache.pool.residency(),
            lookups_by_task=frozen(stats.lookups_by_task), misses_by_task=frozen(stats.misses_by_task),
            host_misses=frozen(stats.host_misses), host_compute_seconds=stats.host_compute_seconds,
            link_busy_seconds=stats.link_busy_seconds, loads=frozen(stats.loads), load_bytes=frozen(stats.load_bytes),
        )


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine.

    expected_wait_s: seconds a request arriving now would wait before its prefill starts (the
    scheduler's estimate from the queues and measured step times; Retry-After uses it);
    `expected_wait_by_task` the same for a request of each task of the table.
    num_task_names_folded: requests whose task name was served as `default` (max_tasks reached).
    overload_decisions: (task, decision) -> requests the slo policy shed on arrival, shed while
    waiting or demoted because they could no longer meet their TTFT SLO (`OverloadDecision` values).
    expert_cache: None when every expert is resident (no offload).
    """

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions: int
    running_by_task: Mapping[str, int]
    waiting_by_task: Mapping[str, int]
    output_len_mean_abs_error: float
    expected_wait_s: float
    expected_wait_by_task: Mapping[str, float]
    num_task_names_folded: int
    tasks: TaskTable
    device: str
    expert_cache: ExpertCacheSnapshot | None
    overload_decisions: Mapping[tuple[str, str], int] = field(default_factory=lambda: frozen({}))

    @property
    def offload(self) -> bool:
        """Whether routed experts are offloaded to the host (a device cache holds some)."""
        return self.expert_cache is not None
