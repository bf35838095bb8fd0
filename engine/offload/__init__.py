"""The expert offload tier: host store, device slot pool, expert cache and the provider over them."""

from moe_serve.engine.offload.expert_cache import ExpertCache, ExpertCacheFullError, ExpertCacheStats
from moe_serve.engine.offload.expert_store import (
    HostExpertStore,
    HostTierSpaceError,
    min_slots_for_step,
    slots_for_budget,
)
from moe_serve.engine.offload.provider import (
    CacheSizing,
    OffloadedExperts,
    build_expert_provider,
    size_expert_cache,
)
from moe_serve.engine.offload.slot_pool import ExpertSlot, SlotPool, SlotState

__all__ = ["CacheSizing", "ExpertCache", "ExpertCacheFullError", "ExpertCacheStats", "ExpertSlot",
           "HostExpertStore", "HostTierSpaceError", "OffloadedExperts", "SlotPool", "SlotState",
           "build_expert_provider", "min_slots_for_step", "size_expert_cache", "slots_for_budget"]
