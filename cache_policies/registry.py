"""Policy names and the registry that builds a policy by name."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Any

from moe_serve.cache_policies.base import CachePolicy
from moe_serve.cache_policies.context import ContextPolicy
from moe_serve.cache_policies.frequency import DecayedLFUPolicy, LFUDAPolicy, LFUPolicy
from moe_serve.cache_policies.markov import MarkovPolicy
from moe_serve.cache_policies.native_context import NativeContextPolicy, native_library
from moe_serve.cache_policies.partitioned import PartitionedPolicy
from moe_serve.cache_policies.recency import FIFOPolicy, LRUPolicy


class PolicyName(str, Enum):
    """Names accepted by `make_policy`."""

    LRU = "lru"
    FIFO = "fifo"
    LFU = "lfu"
    LFUDA = "lfuda"
    DECAYED_LFU = "decayed_lfu"
    MARKOV = "markov"
    CONTEXT = "context"


_FACTORIES: dict[PolicyName, Callable[..., CachePolicy]] = {
    PolicyName.LRU: LRUPolicy,
    PolicyName.FIFO: FIFOPolicy,
    PolicyName.LFU: LFUPolicy,
    PolicyName.LFUDA: LFUDAPolicy,
    PolicyName.DECAYED_LFU: DecayedLFUPolicy,
    PolicyName.MARKOV: MarkovPolicy,
    PolicyName.CONTEXT: ContextPolicy,
}

DEFAULT_POLICY: str = PolicyName.CONTEXT.value


def available_policies() -> list[str]:
    """Every name `make_policy` accepts."""
    return [name.value for name in PolicyName]


def make_policy(name: str, **kwargs: Any) -> CachePolicy:
    """A fresh policy; `kwargs` go to its constructor. Unknown names raise ValueError."""
    try:
        policy_name = PolicyName(name)
    except ValueError:
        raise ValueError(f"unknown cache policy {name!r}; valid: {', '.join(available_policies())}") from None
    return _FACTORIES[policy_name](**kwargs)


def make_layered_policy(name: str, capacity: int, num_layers: int, num_experts: int) -> CachePolicy:
    """The live engine's policy: one `name` policy per MoE layer over `capacity` shared slots
    (`PartitionedPolicy`, keys `(layer, expert)`); `context` runs in native code where it builds
    (`NativeContextPolicy`: the same decisions). Unknown names raise ValueError."""
    make_policy(name)
    if PolicyName(name) is PolicyName.CONTEXT:
        library = native_library()
        if library is not None:
            return NativeContextPolicy(library, capacity, num_layers, num_experts)
    return PartitionedPolicy(lambda: make_policy(name), capacity, num_layers)
