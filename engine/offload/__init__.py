"""The expert offload tier: host store, device slot pool, expert cache and the provider over them."""

from moe_serve.engine.exports import lazy_exports

_NAMES = {
    "ExpertCache": "expert_cache", "ExpertCacheFullError": "expert_cache", "ExpertCacheStats": "expert_cache",
    "HostExpertStore": "expert_store", "HostTierSpaceError": "expert_store", "min_slots_for_step": "expert_store",
    "slots_for_budget": "expert_store", "CacheSizing": "provider", "OffloadedExperts": "provider",
    "build_expert_provider": "provider", "size_expert_cache": "provider", "ExpertSlot": "slot_pool",
    "SlotPool": "slot_pool", "SlotState": "slot_pool",
}
__all__ = sorted(_NAMES)
__getattr__ = lazy_exports(__name__, _NAMES)
