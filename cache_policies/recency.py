"""Recency- and arrival-order policies: LRU and FIFO (each victim() is one pass over the candidates)."""

from __future__ import annotations

from collections.abc import Hashable, Iterable

from moe_serve.cache_policies.base import CachePolicy


class LRUPolicy(CachePolicy):
    """Evict the candidate whose last access is oldest."""

    name = "lru"

    def __init__(self) -> None:
        self._clock = 0
        self._last_access: dict[Hashable, int] = {}

    def on_access(self, key: Hashable) -> None:
        self._clock += 1
        self._last_access[key] = self._clock

    def on_insert(self, key: Hashable) -> None:
        self._last_access.setdefault(key, 0)  # loaded but not yet used: the oldest

    def on_evict(self, key: Hashable) -> None:
        self._last_access.pop(key, None)

    def victim(self, candidates: Iterable[Hashable]) -> Hashable:
        last = self._last_access
        candidates = list(candidates)
        try:
            return min(candidates, key=last.__getitem__)  # C-level key: the common case, every key accessed
        except KeyError:
            return min(candidates, key=lambda key: last.get(key, 0))  # never accessed counts as oldest


class FIFOPolicy(CachePolicy):
    """Evict the candidate that became resident first, whatever its use since."""

    name = "fifo"

    def __init__(self) -> None:
        self._clock = 0
        self._inserted: dict[Hashable, int] = {}

    def on_insert(self, key: Hashable) -> None:
        self._clock += 1
        self._inserted[key] = self._clock

    def on_access(self, key: Hashable) -> None:
        if key not in self._inserted:
            self.on_insert(key)

    def on_evict(self, key: Hashable) -> None:
        self._inserted.pop(key, None)

    def victim(self, candidates: Iterable[Hashable]) -> Hashable:
        inserted = self._inserted
        return min(candidates, key=lambda key: inserted.get(key, 0))
