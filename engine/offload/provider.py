"""Offloaded experts: the ExpertProvider over the expert cache, and building it from the config.

Owns `OffloadedExperts` (acquire a layer's experts, compute each as its slot becomes ready,
release; pins a failed step leaves behind are released at the step's end; misses the
`MissPlanner` keeps on the host go to the host worker with views of the host tier; which copy a
copied miss loads, full or low-bit, and which low-bit resident experts to upgrade), the device budget
(free memory after the dense weights, less the KV cache and a working reserve), the cache sizing
and the offload decision it bounds, and `build_expert_provider`. Details: docs/offload.md.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_serve.cache_policies import DEFAULT_POLICY, make_layered_policy, make_policy
from moe_serve.cuda_ext import load_copy_engine
from moe_serve.engine.config import EngineConfig, MissHandling, MissPrecision, OffloadMode
from moe_serve.engine.errors import ModelLoadError
from moe_serve.engine.host_memory import Arena
from moe_serve.engine.model.experts import ExpertFetch, ExpertGroup, ResidentExperts
from moe_serve.engine.model.quant import MODEL_DTYPE, ExpertFormat, parse_expert_dtype
from moe_serve.engine.model.spec import ModelSpec
from moe_serve.engine.model.weights import ExpertTensors, pack_expert, packed_experts_nbytes
from moe_serve.engine.offload.expert_cache import ExpertCache
from moe_serve.engine.offload.expert_store import (
    HostExpertStore,
    Precision,
    min_slots_for_step,
    size_text,
    slots_for_budget,
)
from moe_serve.engine.offload.host_compute import HostExpertWorker
from moe_serve.engine.offload.hybrid import MissPlanner, probe_rates
from moe_serve.engine.offload.slot_pool import ExpertSlot
from moe_serve.engine.types import ExpertKey

logger = logging.getLogger(__name__)
# adaptive: a miss finds the link busy (and loads the low-bit copy whatever its gate) when at least this many
# copies are already pending ahead of it (a decode layer's demand misses at top-k 6-8 and its prefetches)
BUSY_LINK_COPIES = 16
# adaptive: a low-bit resident expert is upgraded when hit with a relative gate weight of at least this
# (above an average routed expert: upgrades go to the ones that weigh), within the step's full-copy budget;
# with the default gate it moved the least bytes for the KL in the sweep of docs/mixed_precision.md
UPGRADE_GATE = 1.2


@dataclass(frozen=True)
class MixedPrecision:
    """Which copy a copied miss loads (`--miss-precision`): `low_format` is the low-bit copy's format;
    adaptive loads it for a miss whose largest relative gate weight is below `low_gate`, when the link is
    busy, or when the layer-step has already started `full_per_token` full copies per token it computes
    (None: no such cap); it upgrades a low-bit resident expert hit with a relative gate weight of at
    least `UPGRADE_GATE` within what is left of that budget. `top_k`: experts per token (a step's
    tokens are its routed rows over it)."""

    mode: MissPrecision
    low_format: ExpertFormat
    low_gate: float
    full_per_token: float | None = None
    top_k: int = 1


def _hottest(indices: Sequence[int], gates: Sequence[float], limit: int) -> list[int]:
    """At most `limit` of `indices`, highest gate weight first."""
    return sorted(indices, key=lambda i: gates[i], reverse=True)[:limit]


class OffloadedExperts:
    """ExpertProvider over an ExpertCache: computes on resident experts while misses load, or, as
    the `planner` decides, computes misses from the host tier on the host worker instead; with
    `precision` (the cache holds a low-bit store) copied misses may load the low-bit copy."""

    def __init__(self, cache: ExpertCache, handling: MissHandling = MissHandling.COPY,
                 planner: MissPlanner | None = None, precision: MixedPrecision | None = None) -> None:
        """`handling`: `copy` copies every miss, `host` computes every miss from the host tier, `auto`
        asks `planner` (required then) per miss. `precision` None or full: every copy is the full one."""
        if precision is not None and precision.mode is not MissPrecision.FULL and cache.low_store is None:
            raise ValueError(f"miss precision {precision.mode.value} needs a cache with a low-bit store")
        self.cache = cache
        self.precision = None if precision is None or precision.mode is MissPrecision.FULL else precision
        self.miss_handling, self.planner = MissHandling.COPY, None
        self._worker: HostExpertWorker | None = None
        self.set_miss_handling(handling, planner)
        self._held: dict[int, list[ExpertKey]] = {}  # layer -> keys acquired and not yet released
        # layer -> (host job, weight bytes it reads, sum of rows x bytes) until the layer is done
        self._host_jobs: dict[int, tuple[Future[float], int, int]] = {}
        self._host_rows: dict[int, tuple[int, int]] = {}  # layer -> the planned host work's bytes, row bytes
        self._host_views: dict[ExpertKey, tuple[torch.Tensor, ...]] = {}
        self._fetched_at: dict[int, float] = {}  # layer -> when its fetch began

    def set_miss_handling(self, handling: MissHandling, planner: MissPlanner | None = None) -> None:
        """Switches how misses are handled, between steps (benchmarks compare them on one engine)."""
        if (handling is MissHandling.AUTO) != (planner is not None):
            raise ValueError("a planner is required for auto miss handling, and only for it")
        self.miss_handling, self.planner = handling, planner
        if handling is not MissHandling.COPY and self._worker is None:
            self._worker = HostExpertWorker()

    @property
    def needs_gates(self) -> bool:
        return self.precision is not None and self.precision.mode is MissPrecision.ADAPTIVE

    def fetch(self, layer: int, expert_ids: Sequence[int], rows: Sequence[int],
              gates: Sequence[float] | None = None) -> ExpertFetch:
        """Acquire now the experts computed on the device (misses start loading at once, full or
        low-bit as `_low_bit` says), then yield those whose slots are ready as one group, or, when none
        is, wait for the oldest pending copy and yield it. Misses the planner keeps on the host take no
        slot: `ExpertFetch.host` (at full precision: they move no bytes over the link)."""
        keys = [ExpertKey(layer, e) for e in expert_ids]
        self._fetched_at[layer] = time.perf_counter()
        on_host = self._plan(layer, keys, rows)
        device = [(e, key) for e, key, host in zip(expert_ids, keys, on_host) if not host]
        if len(device) < len(keys):
            host_keys = [key for key, host in zip(keys, on_host) if host]
            self.cache.record_host_misses(host_keys)
            host: ExpertGroup = [(key.expert, self._host_tensors(key)) for key in host_keys]
            nbytes = self.cache.store.expert_nbytes
            self._host_rows[layer] = (nbytes * len(host), nbytes * sum(r for r, h in zip(rows, on_host) if h))
        else:
            host = []
        if self.precision is None:
            slots = self.cache.acquire([key for _, key in device])
            low, low_format = frozenset(), None
        else:
            device_gates = None if gates is None else [g for g, h in zip(gates, on_host) if not h]
            tokens = -(-sum(rows) // self.precision.top_k)
            slots = self.cache.acquire([key for _, key in device], self._low_bit([key for _, key in device],
                                                                                  device_gates, tokens))
            low = frozenset(e for e, key in device if self.cache.is_low(key))
            low_format = self.precision.low_format
        self._held.setdefault(layer, []).extend(key for _, key in device)
        return ExpertFetch(self._in_ready_order([(e, slot) for (e, _), slot in zip(device, slots)]), host,
                           low, low_format)

    def _low_bit(self, keys: Sequence[ExpertKey], gates: Sequence[float] | None, tokens: int) -> set[ExpertKey]:
        """The misses among `keys` that load their low-bit copy: every one with `low`; with `adaptive` all
        when the link is busy, else all but those the step's full-copy budget (`full_per_token` x `tokens`)
        takes from the misses at or above the gate, highest relative gate weight first. What is left of the
        budget asks upgrades, hottest first, of low-bit resident keys hit at or above `UPGRADE_GATE`."""
        precision = self.precision
        assert precision is not None
        cache = self.cache
        misses = [i for i, key in enumerate(keys) if not cache.holds(key)]
        if precision.mode is MissPrecision.LOW or cache.pool.num_loading >= BUSY_LINK_COPIES:
            return {keys[i] for i in misses}
        if gates is None:
            raise ValueError("adaptive miss precision needs each expert's largest gate weight")
        budget = len(keys) if precision.full_per_token is None else int(precision.full_per_token * tokens)
        full = set(_hottest([i for i in misses if gates[i] >= precision.low_gate], gates, budget))
        hot = [i for i, key in enumerate(keys) if gates[i] >= UPGRADE_GATE and cache.is_low(key)]
        for i in _hottest(hot, gates, budget - len(full)):
            cache.request_upgrade(keys[i])
        return {keys[i] for i in misses if i not in full}

    def run_on_host(self, layer: int, work: Callable[[], None]) -> Future[float]:
        assert self._worker is not None, "host work while every miss is copied"
        job = self._worker.submit(work)
        self._host_jobs[layer] = (job, *self._host_rows.pop(layer, (0, 0)))
        return job

    def _plan(self, layer: int, keys: list[ExpertKey], rows: Sequence[int]) -> list[bool]:
        """Whether each key is computed on the host (only misses are, and only with a planner)."""
        if self.miss_handling is MissHandling.COPY:
            return [False] * len(keys)
        cache = self.cache
        resident = [cache.holds(key) for key in keys]
        if self.planner is None:  # host: every miss
            return [not hit for hit in resident]
        return self.planner.plan(layer, [key.expert for key in keys], rows, resident,
                                 queued_bytes=cache.pool.num_loading * cache.store.expert_nbytes,
                                 max_copies=cache.claimable_slots(set(keys)))

    def _host_tensors(self, key: ExpertKey) -> tuple[torch.Tensor, ...]:
        """The expert's typed views of the host tier (built once per expert)."""
        views = self._host_views.get(key)
        if views is None:
            store = self.cache.store
            views = self._host_views[key] = store.unpack(store.source(key))
        return views

    def _in_ready_order(self, pending: list[tuple[int, ExpertSlot]]) -> Iterator[list[tuple[int, ExpertTensors]]]:
        cache = self.cache
        while pending:
            ready, waiting = [], []
            for expert, slot in pending:
                views = cache.take_ready(slot)
                if views is None:
                    waiting.append((expert, slot))
                else:
                    ready.append((expert, views))
            if not ready:  # nothing usable yet: wait for the oldest pending copy
                expert, slot = waiting.pop(0)
                ready.append((expert, cache.wait(slot)))
            pending = waiting
            yield ready

    def done(self, layer: int, expert_ids: Sequence[int]) -> None:
        """Releases the layer's device experts among `expert_ids` (host ones hold no slot) and books
        its finished host job."""
        held = self._held.pop(layer, [])
        wanted = Counter(ExpertKey(layer, e) for e in expert_ids)
        self.cache.release(list((Counter(held) & wanted).elements()))
        remaining = list((Counter(held) - wanted).elements())
        if remaining:  # released part of what the layer holds: keep the rest
            self._held[layer] = remaining
        self._book_host_job(layer)
        fetched_at = self._fetched_at.pop(layer, None)
        if self.planner is not None and fetched_at is not None:
            self.planner.observe_layer(layer, time.perf_counter() - fetched_at)

    def _book_host_job(self, layer: int) -> None:
        entry = self._host_jobs.pop(layer, None)
        if entry is None or not entry[0].done() or entry[0].exception() is not None:
            return
        seconds = entry[0].result()
        self.cache.record_host_compute(seconds)
        if self.planner is not None:
            self.planner.observe_host_job(seconds, entry[1], entry[2])

    def hint(self, layer: int, expert_ids: Sequence[int]) -> None:
        """Prefetches the full copies (the low-bit ones with `low`: no gate weight is known yet)."""
        low = self.precision is not None and self.precision.mode is MissPrecision.LOW
        self.cache.prefetch([ExpertKey(layer, e) for e in expert_ids],
                            precision=Precision.LOW if low else Precision.FULL)

    def end_step(self) -> None:
        """Advances the cache's step clock (the policy's step boundaries, preload freshness), after
        releasing whatever a failed forward acquired and never released; refines the link rate."""
        if self._held:
            leftover = [key for keys in self._held.values() for key in keys]
            self._held.clear()
            logger.debug("releasing %d expert pins left by a failed step", len(leftover))
            self.cache.release(leftover)
        self._host_jobs.clear()
        self._host_rows.clear()
        self._fetched_at.clear()
        if self.planner is not None:
            stats = self.cache.stats()
            self.planner.observe_link(stats.link_busy_seconds, sum(stats.bytes_copied.values()))
        self.cache.on_step()


RESERVE_FIXED_BYTES = 2**30  # CUDA context, allocator slack and copy staging
RESERVE_HIDDEN_ACTIVATIONS = 16  # fp32 hidden-sized activations per batched token, beside its fp32 logits row


def working_reserve_nbytes(spec: ModelSpec, max_tokens_per_step: int) -> int:
    """Device memory kept free for the forward: a fixed part plus each batched token's fp32 logits
    and activations."""
    per_token = 4 * (spec.vocab_size + RESERVE_HIDDEN_ACTIVATIONS * spec.hidden_size)
    return RESERVE_FIXED_BYTES + max_tokens_per_step * per_token


@dataclass(frozen=True)
class DeviceBudget:
    """Device memory for expert slots: what is free once the dense weights are placed, less the KV
    cache and the working reserve placed after the experts."""

    free_nbytes: int
    total_nbytes: int
    kv_nbytes: int
    reserve_nbytes: int

    @property
    def expert_nbytes(self) -> int:
        return max(self.free_nbytes - self.kv_nbytes - self.reserve_nbytes, 0)

    def describe(self) -> str:
        gib = 2**30
        return (f"{self.free_nbytes / gib:.2f} GiB free after the dense weights, less {self.kv_nbytes / gib:.2f} GiB "
                f"KV cache and {self.reserve_nbytes / gib:.2f} GiB working reserve: {self.expert_nbytes / gib:.2f} "
                f"GiB for experts")


def device_budget(device: torch.device, kv_nbytes: int, reserve_nbytes: int) -> DeviceBudget | None:
    """The budget on a CUDA device, measured now (call it once the dense weights are placed); None on
    the CPU, whose expert pool is host memory."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # reusable by torch
    return DeviceBudget(free + cached, total, kv_nbytes, reserve_nbytes)


@dataclass(frozen=True)
class CacheSizing:
    """How many device slots the expert cache gets, and the least one step needs."""

    num_slots: int
    min_slots: int
    total_experts: int


def size_expert_cache(
    total_experts: int,
    min_slots: int,
    expert_nbytes: int,
    cache_gb: float | None,
    cache_fraction: float | None,
    budget: DeviceBudget | None = None,
) -> CacheSizing:
    """Slots from a byte budget, a fraction of all experts, or (neither given) what the device
    `budget` holds; refuses less than one step needs, and more than the device budget holds
    (saying what fits)."""
    if cache_gb is not None:
        num_slots = slots_for_budget(int(cache_gb * 2**30), expert_nbytes)
        asked = f"expert_cache_gb={cache_gb} ({num_slots} experts of {expert_nbytes / 2**20:.3f} MiB)"
    elif cache_fraction is not None:
        num_slots = max(1, math.ceil(cache_fraction * total_experts))
        asked = f"expert_cache_fraction={cache_fraction} ({num_slots} of {total_experts} experts)"
    elif budget is not None:
        num_slots = slots_for_budget(budget.expert_nbytes, expert_nbytes)
        asked = f"the device ({budget.describe()}, {num_slots} experts of {expert_nbytes / 2**20:.3f} MiB)"
    else:
        num_slots = total_experts
        asked = "all experts"
    num_slots = min(num_slots, total_experts)
    if num_slots < min_slots:
        raise ModelLoadError(
            f"{asked} is smaller than one step can need: at least {min_slots} expert slots "
            f"(expert_cache_gb >= {min_slots * expert_nbytes / 2**30:.6f} or "
            f"expert_cache_fraction >= {min_slots / total_experts:.4f})" + _what_fits(budget, min_slots * expert_nbytes)
        )
    if budget is not None and num_slots * expert_nbytes > budget.expert_nbytes:
        fits = slots_for_budget(budget.expert_nbytes, expert_nbytes)
        raise ModelLoadError(
            f"{asked} does not fit on the device: {budget.describe()}; "
            + (f"expert_cache_gb <= {fits * expert_nbytes / 2**30:.3f} (expert_cache_fraction <= "
               f"{fits / total_experts:.4f}) fits" if fits >= min_slots else "")
            + _what_fits(budget, min_slots * expert_nbytes)
        )
    return CacheSizing(num_slots, min_slots, total_experts)


def _what_fits(budget: DeviceBudget | None, least_experts_nbytes: int) -> str:
    """The KV cache that leaves room for the fewest experts a step needs, and the planner's command."""
    if budget is None:
        return ""
    kv_room = budget.free_nbytes - budget.reserve_nbytes - least_experts_nbytes
    advice = (f"; kv_cache_gb <= {kv_room / 2**30:.3f} leaves room for the fewest experts a step needs"
              if budget.expert_nbytes < least_experts_nbytes and kv_room > 0 else "")
    return advice + f" (`moe-serve plan --model DIR --gpu-gb {budget.total_nbytes / 2**30:.1f}` prints a set-up that fits)"


def wants_offload(config: EngineConfig, experts_nbytes: int, budget: DeviceBudget | None) -> bool:
    """`on`/`off` as given (`off` refused when the experts cannot fit the device budget); `auto`
    offloads when a cache budget is set or the experts do not fit the device budget."""
    if config.offload is OffloadMode.ON:
        return True
    fits = budget is None or experts_nbytes <= budget.expert_nbytes
    if config.offload is OffloadMode.OFF:
        if not fits:
            assert budget is not None
            raise ModelLoadError(f"offload=off: the experts ({experts_nbytes / 2**30:.2f} GiB) do not fit on the "
                                 f"device ({budget.describe()}); use offload on or auto")
        return False
    if config.expert_cache_gb is not None or config.expert_cache_fraction is not None:
        return True
    return not fits


def host_tier_dir(config: EngineConfig, experts_nbytes: int) -> Path | None:
    """Where to file-back the host tier when the experts exceed `host_memory_gb` (None: in RAM)."""
    if config.host_memory_gb is None or experts_nbytes <= config.host_memory_gb * 2**30:
        return None
    if config.host_tier_dir is not None:
        directory = Path(config.host_tier_dir)
    else:
        # the one moe-serve cache dir, shared with the demo model
        from moe_serve.engine.model.demo_model import default_cache_dir
        directory = default_cache_dir() / "host-tier"
    logger.info("host tier: %.2f GiB of experts over the %.2f GiB host budget: file-backed in %s (pageable copies)",
                experts_nbytes / 2**30, config.host_memory_gb, directory)
    return directory


def build_expert_provider(
    config: EngineConfig, experts: dict[ExpertKey, ExpertTensors], spec: ModelSpec, device: torch.device,
    max_tokens_per_step: int, pack: bool = False, kv_nbytes: int = 0, expert_format: ExpertFormat = MODEL_DTYPE,
) -> ResidentExperts | OffloadedExperts:
    """All-resident experts, or a host tier + device expert cache as `config` asks; with `pack`
    each expert is packed for the CPU kernels on its way in (one expert at a time). Call it once the
    dense weights are on the device: on CUDA the automatic expert budget is the free memory then,
    less `kv_nbytes` (the KV cache placed afterwards) and the working reserve. `expert_format`: how
    `experts` are stored (the low-bit copy of `--miss-precision low/adaptive` is quantized from it)."""
    experts_nbytes = sum(t.numel() * t.element_size() for pair in experts.values() for t in pair)
    budget = device_budget(device, kv_nbytes, working_reserve_nbytes(spec, max_tokens_per_step))
    if not wants_offload(config, experts_nbytes, budget):
        if pack:
            arena = Arena(packed_experts_nbytes(experts))
            for key in experts:  # in place: each plain expert is dropped as soon as it is packed
                experts[key] = pack_expert(experts[key], arena)
        if config.miss_precision is not MissPrecision.FULL:
            logger.info("miss precision %s applies to offloaded experts only: every expert is resident at %s",
                        config.miss_precision.value, expert_format.name)
        return ResidentExperts(experts, device)
    policy_name = DEFAULT_POLICY if config.cache_policy == "default" else config.cache_policy
    try:
        make_policy(policy_name)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    backing_dir = host_tier_dir(config, experts_nbytes)
    precision = mixed_precision(config, spec.top_k)
    # the low-bit copy first, from the experts as loaded, one expert at a time (never a second full copy)
    low_store = None if precision is None else low_bit_store(experts, precision.low_format, expert_format, spec,
                                                             pin=device.type == "cuda")
    try:
        store = HostExpertStore.from_tensors(experts, pin=device.type == "cuda", backing_dir=backing_dir,
                                             transform=pack_expert if pack else None)
    except OSError as exc:  # only the file-backed tier touches the file system
        reason = "not a directory" if isinstance(exc, (FileExistsError, NotADirectoryError)) else exc.strerror or exc
        raise ModelLoadError(f"cannot create the file-backed host tier in {backing_dir} "
                             f"(host_tier_dir): {reason}") from exc
    experts.clear()  # the packed host slab is now the only copy
    if low_store is not None:
        assert precision is not None
        if low_store.expert_nbytes >= store.expert_nbytes:
            raise ModelLoadError(f"miss_low_dtype {precision.low_format.name} ({low_store.expert_nbytes} bytes an "
                                 f"expert) is not smaller than the experts as stored ({store.expert_nbytes} bytes)")
        logger.info("host tier: %s of full-precision experts (%s) + %s of their %s copies (%s + %s an expert), "
                    "misses: %s precision", size_text(store.nbytes), expert_format.name, size_text(low_store.nbytes),
                    precision.low_format.name, size_text(store.expert_nbytes), size_text(low_store.expert_nbytes),
                    precision.mode.value)
    sizing = size_expert_cache(
        len(store), min_slots_for_step(spec.num_experts, spec.top_k, max_tokens_per_step), store.expert_nbytes,
        config.expert_cache_gb, config.expert_cache_fraction, budget,
    )
    throttle = config.expert_link_gbps if device.type == "cpu" else None  # a CUDA link is the real one
    copy_engine = load_copy_engine(device, num_workers=config.copy_workers, link_gbps=throttle)
    handling = miss_handling(config, device)
    logger.info(
        "offloading experts: %d of %d resident (%.0f%%, %.1f MiB device), policy %s, misses: %s",
        sizing.num_slots, sizing.total_experts, 100 * sizing.num_slots / sizing.total_experts,
        sizing.num_slots * store.expert_nbytes / 2**20, policy_name, handling.value,
    )
    # one instance of the policy per MoE layer, as in trace replay (see cache_policies.partitioned)
    policy = make_layered_policy(policy_name, sizing.num_slots, spec.num_moe_layers, spec.num_experts)
    cache = ExpertCache(store, sizing.num_slots, device, policy, copy_engine, low_store)
    planner = make_planner(cache, spec.num_moe_layers) if handling is MissHandling.AUTO else None
    return OffloadedExperts(cache, handling, planner, precision)


def mixed_precision(config: EngineConfig, top_k: int) -> MixedPrecision | None:
    """`--miss-precision` with its low-bit format and gate (None: full, no low-bit copy is kept)."""
    if config.miss_precision is MissPrecision.FULL:
        return None
    low_format = parse_expert_dtype(config.miss_low_dtype)
    assert low_format is not None and low_format.quantized  # the config's pattern admits only low-bit formats
    return MixedPrecision(config.miss_precision, low_format, config.miss_low_gate, config.miss_full_per_token, top_k)


def low_bit_store(experts: dict[ExpertKey, ExpertTensors], low_format: ExpertFormat, expert_format: ExpertFormat,
                  spec: ModelSpec, pin: bool) -> HostExpertStore:
    """The host tier's low-bit copy: each expert as loaded (in `expert_format`: decoded first when it is
    itself quantized) quantized to `low_format`, one expert at a time; in RAM, pinned with `pin`."""
    hidden, ffn = spec.hidden_size, spec.moe_intermediate_size

    def encode(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        plain = expert_format.decode(tensors, hidden, ffn, torch.float32) if expert_format.quantized else tensors
        return low_format.encode(plain)

    return HostExpertStore.from_tensors(experts, pin=pin, transform=encode)


def miss_handling(config: EngineConfig, device: torch.device) -> MissHandling:
    """`copy` and `host` as given; `auto` decides per miss where there is a link to weigh: a CUDA
    device (PCIe), or a CPU whose copies are throttled (`expert_link_gbps`, the stand-in for one).
    On a CPU with unthrottled copies `auto` copies, as before hybrid handling existed (the device
    tier is RAM there: the CPU profile's measured behaviour)."""
    if config.miss_handling is not MissHandling.AUTO:
        return config.miss_handling
    return MissHandling.COPY if device.type == "cpu" and config.expert_link_gbps is None else MissHandling.AUTO


def make_planner(cache: ExpertCache, num_moe_layers: int) -> MissPlanner:
    """The `auto` planner, its rates probed now over the cache's copy engine (`probe_rates`)."""
    store = cache.store
    rates = probe_rates(store.source(store.keys[0]), cache.pool.copy_engine, cache.device)
    logger.info("miss handling auto: link %.2f GB/s, host %.2f GB/s, device %.2f GB/s (probed; refined online)",
                rates.link_bytes_per_s / 1e9, 1e-9 / (rates.host.per_byte + rates.host.per_row_byte),
                1e-9 / (rates.device.per_byte + rates.device.per_row_byte))
    return MissPlanner(rates, store.expert_nbytes, store.experts_per_layer,
                       cache.num_slots / num_moe_layers, device_is_host=cache.device.type == "cpu")
