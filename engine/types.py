"""Small typed values shared across the engine's boundaries (no torch import)."""

from __future__ import annotations

from typing import NamedTuple


class ExpertKey(NamedTuple):
    """Address of one routed expert: (MoE layer index, expert index within the layer)."""

    layer: int
    expert: int
