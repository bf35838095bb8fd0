"""Expert-cache eviction policies (pure Python, no torch) and their registry by name."""

from moe_serve.cache_policies.base import CachePolicy
from moe_serve.cache_policies.registry import (
    DEFAULT_POLICY,
    PolicyName,
    available_policies,
    make_layered_policy,
    make_policy,
)

__all__ = ["DEFAULT_POLICY", "CachePolicy", "PolicyName", "available_policies", "make_layered_policy", "make_policy"]
