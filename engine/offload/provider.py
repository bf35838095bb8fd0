"""Offloaded experts: the ExpertProvider over the expert cache, and building it from the config.

Owns `OffloadedExperts` (acquire a layer's experts, compute each as its slot becomes ready,
release; pins a failed step leaves behind are released at the step's end), the cache sizing,
the offload decision and `build_expert_provider`. Details: docs/offload.md.
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

AUTO_OFFLOAD_DEVICE_SHARE = 0.6  # auto mode offloads when the experts need more of the free device memory


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
) -> CacheSizing:
    """Slots from a byte budget or a fraction of all experts; refuses less than one step needs."""
    if cache_gb is not None:
        num_slots = slots_for_budget(int(cache_gb * 2**30), expert_nbytes)
        asked = f"expert_cache_gb={cache_gb} ({num_slots} experts of {expert_nbytes / 2**20:.3f} MiB)"
    elif cache_fraction is not None:
        num_slots = max(1, math.ceil(cache_fraction * total_experts))
        asked = f"expert_cache_fraction={cache_fraction} ({num_slots} of {total_experts} experts)"
    else:
        num_slots = total_experts
        asked = "all experts"
    num_slots = min(num_slots, total_experts)
    if num_slots < min_slots:
        raise ModelLoadError(
            f"{asked} is smaller than one step can need: at least {min_slots} expert slots "
            f"(expert_cache_gb >= {min_slots * expert_nbytes / 2**30:.6f} or "
            f"expert_cache_fraction >= {min_slots / total_experts:.4f})"
        )
    return CacheSizing(num_slots, min_slots, total_experts)


def wants_offload(config: EngineConfig, experts_nbytes: int, device: torch.device) -> bool:
    """`on`/`off` as given; `auto` offloads when a cache budget is set or the experts do not fit the device."""
    if config.offload is OffloadMode.ON:
        return True
    if config.offload is OffloadMode.OFF:
        return False
    if config.expert_cache_gb is not None or config.expert_cache_fraction is not None:
        return True
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        return experts_nbytes > AUTO_OFFLOAD_DEVICE_SHARE * free_bytes
    return False


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
    max_tokens_per_step: int, pack: bool = False,
) -> ResidentExperts | OffloadedExperts:
    """All-resident experts, or a host tier + device expert cache as `config` asks; with `pack`
    each expert is packed for the CPU kernels on its way in (one expert at a time)."""
    experts_nbytes = sum(t.numel() * t.element_size() for pair in experts.values() for t in pair)
    if not wants_offload(config, experts_nbytes, device):
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
        config.expert_cache_gb, config.expert_cache_fraction,
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
