"""The eviction-policy contract shared by the engine's expert cache and trace replay.

A policy only ranks keys; it never owns slots. The cache tells it what happened
(insert, access, evict, end of a step) and asks it for a victim among the keys that
may be evicted right now (resident and not in use). Keys are any hashable value; the
engine passes `ExpertKey(layer, expert)` tuples. Pure Python: no torch import.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterable, Sequence, Set
from typing import ClassVar


def group_of(key: Hashable) -> Hashable:
    """The group a key belongs to: the first element of a tuple key (the engine's
    `ExpertKey(layer, expert)`: its MoE layer), None for any other key."""
    return key[0] if isinstance(key, tuple) and key else None


class CachePolicy(ABC):
    """Strategy object that picks which resident key to evict."""

    name: ClassVar[str]

    def on_insert(self, key: Hashable) -> None:
        """`key` became resident (a demand load or a prefetch). Called before `on_access`."""

    @abstractmethod
    def on_access(self, key: Hashable) -> None:
        """`key` was used by a token (a hit, or a miss right after its insert)."""

    def on_evict(self, key: Hashable) -> None:
        """`key` left the cache."""

    def on_step(self) -> None:
        """One engine step (or one replayed token) finished; aging policies decay here."""

    @abstractmethod
    def victim(self, candidates: Iterable[Hashable]) -> Hashable:
        """Return the key to evict among `candidates` (non-empty, all resident and evictable).

        Any iterable is accepted; the engine's cache passes a `collections.abc.Set` view of its
        evictable keys, whose O(1) membership lets `PartitionedPolicy` look only at one layer's keys.
        Such a view may name keys it surely excludes in a `protected` attribute (a set, the same object
        across the views of one request for slots), which a policy may skip without asking."""

    def victims(self, candidates: Set[Hashable], incoming: Sequence[Hashable]) -> list[Hashable] | None:
        """Victims for the `incoming` keys (never candidates) that will take their slots, chosen in one
        call: the i-th as `victim` would pick it once the first i victims are evicted and the first i
        incoming keys inserted. Changes nothing: the caller then evicts and inserts them one by one,
        with the usual on_evict / on_insert. None (the default): ask `victim` once per eviction."""
        return None
