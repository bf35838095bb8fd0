"""Paged KV-cache bookkeeping: which fixed-size blocks each sequence owns. No torch import.

The tensors live in `engine.kv_cache`; this module only hands out block ids under a fixed
budget so the scheduler can decide admission and preemption in pure Python. When every
attention layer has a sliding window, the blocks that slid out of it are returned early
(`free_slid_out`): their table entries become `FREED`, so positions stay where they were.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

FREED = -1  # the table entry of a block returned because no query can attend it again


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` tokens."""
    return (num_tokens + block_size - 1) // block_size


def kv_free_window(layer_windows: Sequence[int | None], num_layers: int) -> int | None:
    """The window past which KV blocks can be freed: the largest window when every one of the
    `num_layers` layers has one (`layer_windows` per layer, None or missing: full attention),
    else None (a full-attention layer attends every block)."""
    windows = list(layer_windows[:num_layers])
    if len(windows) < num_layers or num_layers == 0 or any(w is None for w in windows):
        return None
    return max(w for w in windows if w is not None)


class BlockManager:
    """A free list of `num_blocks` KV blocks of `block_size` tokens each."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._tables: dict[str, list[int]] = {}
        self._num_freed: dict[str, int] = {}  # leading table entries already FREED, per sequence

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use (0..1)."""
        return 1.0 - len(self._free) / self.num_blocks

    def table(self, seq_id: str) -> list[int]:
        """The block table of a sequence (empty if it owns nothing); entry i holds positions
        [i * block_size, (i + 1) * block_size), FREED once they slid out of every window."""
        return self._tables.get(seq_id, [])

    def num_live(self, seq_id: str) -> int:
        """Blocks `seq_id` holds now (its table less the FREED entries)."""
        return len(self.table(seq_id)) - self._num_freed.get(seq_id, 0)

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

    def free_slid_out(self, seq_id: str, num_computed: int, window: int) -> int:
        """Free the blocks of `seq_id` that no query from position `num_computed` on attends through
        a `window`-token window (their last position < num_computed - window + 1); returns how many."""
        table = self._tables.get(seq_id)
        if table is None:
            return 0
        first = self._num_freed.get(seq_id, 0)
        last = min(len(table), max(0, num_computed - window + 1) // self.block_size)
        for i in range(first, last):
            self._free.append(table[i])
            table[i] = FREED
        if last > first:
            self._num_freed[seq_id] = last
        return max(0, last - first)

    def free(self, seq_id: str) -> None:
        """Return every block `seq_id` still holds to the free list."""
        table = self._tables.pop(seq_id, [])
        self._free.extend(table[self._num_freed.pop(seq_id, 0):])
