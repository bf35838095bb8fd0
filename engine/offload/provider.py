"""Offloaded experts: the ExpertProvider over the expert cache, and building it from the config.

Owns `OffloadedExperts` (acquire a layer's experts, compute each as its slot becomes ready,
release; pins a failed step leaves behind are released at the step's end), the device budget
(free memory after the dense weights, less the KV cache and a working reserve), the cache sizing
and the offload decision it bounds, and `build_expert_provider`. Details: docs/offload.md.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_serve.cache_policies import DEFAULT_POLICY, make_policy
from moe_serve.cache_policies.partitioned import PartitionedPolicy
from moe_serve.cuda_ext import load_copy_engine
from moe_serve.engine.config import EngineConfig, OffloadMode
from moe_serve.engine.errors import ModelLoadError
from moe_serve.engine.host_memory import Arena
from moe_serve.engine.model.experts import ResidentExperts
from moe_serve.engine.model.spec import ModelSpec
from moe_serve.engine.model.weights import ExpertTensors, pack_expert, packed_experts_nbytes
from moe_serve.engine.offload.expert_cache import ExpertCache
from moe_serve.engine.offload.expert_store import HostExpertStore, min_slots_for_step, slots_for_budget
from moe_serve.engine.offload.slot_pool import ExpertSlot
from moe_serve.engine.types import ExpertKey

logger = logging.getLogger(__name__)

class OffloadedExperts:
    """ExpertProvider over an ExpertCache: computes on resident experts while misses load."""

    def __init__(self, cache: ExpertCache) -> None:
        self.cache = cache
        self._held: dict[int, list[ExpertKey]] = {}  # layer -> keys acquired and not yet released

    def fetch(self, layer: int, expert_ids: Sequence[int]) -> Iterator[list[tuple[int, ExpertTensors]]]:
        """Acquire now (misses start loading at once), then yield the experts whose slots are
        ready as one group, or, when none is, wait for the oldest pending copy and yield it."""
        keys = [ExpertKey(layer, e) for e in expert_ids]
        slots = self.cache.acquire(keys)
        self._held.setdefault(layer, []).extend(keys)
        return self._in_ready_order(list(zip(expert_ids, slots)))

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
        keys = [ExpertKey(layer, e) for e in expert_ids]
        self.cache.release(keys)
        held = self._held.pop(layer, [])
        if len(held) != len(keys):  # released part of what the layer holds: keep the rest
            remaining = list((Counter(held) - Counter(keys)).elements())
            if remaining:
                self._held[layer] = remaining

    def hint(self, layer: int, expert_ids: Sequence[int]) -> None:
        self.cache.prefetch([ExpertKey(layer, e) for e in expert_ids])

    def end_step(self) -> None:
        """Advances the cache's step clock (the policy's step boundaries, preload freshness), after
        releasing whatever a failed forward acquired and never released."""
        if self._held:
            leftover = [key for keys in self._held.values() for key in keys]
            self._held.clear()
            logger.debug("releasing %d expert pins left by a failed step", len(leftover))
            self.cache.release(leftover)
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
    max_tokens_per_step: int, pack: bool = False, kv_nbytes: int = 0,
) -> ResidentExperts | OffloadedExperts:
    """All-resident experts, or a host tier + device expert cache as `config` asks; with `pack`
    each expert is packed for the CPU kernels on its way in (one expert at a time). Call it once the
    dense weights are on the device: on CUDA the automatic expert budget is the free memory then,
    less `kv_nbytes` (the KV cache placed afterwards) and the working reserve."""
    experts_nbytes = sum(t.numel() * t.element_size() for pair in experts.values() for t in pair)
    budget = device_budget(device, kv_nbytes, working_reserve_nbytes(spec, max_tokens_per_step))
    if not wants_offload(config, experts_nbytes, budget):
        if pack:
            arena = Arena(packed_experts_nbytes(experts))
            for key in experts:  # in place: each plain expert is dropped as soon as it is packed
                experts[key] = pack_expert(experts[key], arena)
        return ResidentExperts(experts, device)
    policy_name = DEFAULT_POLICY if config.cache_policy == "default" else config.cache_policy
    try:
        make_policy(policy_name)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    backing_dir = host_tier_dir(config, experts_nbytes)
    try:
        store = HostExpertStore.from_tensors(experts, pin=device.type == "cuda", backing_dir=backing_dir,
                                             transform=pack_expert if pack else None)
    except OSError as exc:  # only the file-backed tier touches the file system
        reason = "not a directory" if isinstance(exc, (FileExistsError, NotADirectoryError)) else exc.strerror or exc
        raise ModelLoadError(f"cannot create the file-backed host tier in {backing_dir} "
                             f"(host_tier_dir): {reason}") from exc
    experts.clear()  # the packed host slab is now the only copy
    sizing = size_expert_cache(
        len(store), min_slots_for_step(spec.num_experts, spec.top_k, max_tokens_per_step), store.expert_nbytes,
        config.expert_cache_gb, config.expert_cache_fraction, budget,
    )
    copy_engine = load_copy_engine(device, num_workers=config.copy_workers)
    logger.info(
        "offloading experts: %d of %d resident (%.0f%%, %.1f MiB device), policy %s",
        sizing.num_slots, sizing.total_experts, 100 * sizing.num_slots / sizing.total_experts,
        sizing.num_slots * store.expert_nbytes / 2**20, policy_name,
    )
    # one instance of the policy per MoE layer, as in trace replay (see cache_policies.partitioned)
    policy = PartitionedPolicy(lambda: make_policy(policy_name), sizing.num_slots, spec.num_moe_layers)
    return OffloadedExperts(ExpertCache(store, sizing.num_slots, device, policy, copy_engine))
