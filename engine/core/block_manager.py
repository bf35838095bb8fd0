"""Paged KV-cache bookkeeping: which fixed-size blocks each sequence owns. No torch import.

The tensors live in `engine.kv_cache`; this module only hands out block ids under a fixed
budget so the scheduler can decide admission and preemption in pure Python.
"""

from __future__ import annotations

from collections import deque


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` tokens."""
    return (num_tokens + block_size - 1) // block_size


class BlockManager:
    """A free list of `num_blocks` KV blocks of `block_size` tokens each."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._tables: dict[str, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (0..1)."""
        return 1.0 - len(self._free) / self.num_blocks

    def table(self, seq_id: str) -> list[int]:
        """The block table of a sequence (empty if it owns nothing)."""
        return self._tables.get(seq_id, [])

    def extra_blocks(self, seq_id: str, num_tokens: int) -> int:
        """Blocks still to allocate so that `seq_id` can hold `num_tokens` tokens."""
        return max(0, blocks_needed(num_tokens, self.block_size) - len(self.table(seq_id)))

    def can_grow(self, seq_id: str, num_tokens: int) -> bool:
        """Whether `grow(seq_id, num_tokens)` would succeed now."""
        return self.extra_blocks(seq_id, num_tokens) <= len(self._free)

    def grow(self, seq_id: str, num_tokens: int) -> None:
        """Make `seq_id` own enough blocks for `num_tokens` tokens."""
        extra = self.extra_blocks(seq_id, num_tokens)
        if extra > len(self._free):
            raise RuntimeError(f"KV cache out of blocks: need {extra}, {len(self._free)} free")
        table = self._tables.setdefault(seq_id, [])
        table.extend(self._free.popleft() for _ in range(extra))

    def free(self, seq_id: str) -> None:
        """Return every block of `seq_id` to the free list."""
        self._free.extend(self._tables.pop(seq_id, []))
