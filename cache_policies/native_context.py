"""The default policy (`context`, one instance per MoE layer) in native code, for the live engine.

`NativeContextPolicy` makes the decisions of `PartitionedPolicy` over per-layer `ContextPolicy`
instances (the numpy code stays as the fallback and the oracle its tests compare against, victim for
victim) at a fraction of their cost: every layer's state lives in flat C arrays
(`csrc/context_policy.c`, compiled on first use like the CPU kernels, called through ctypes), and the
insert / access / evict notes are buffered here and handed over at the next victim or step call, so
a layer's bookkeeping is a few appends and one native call for its misses' victims (`victims`). Keys are
`(layer, expert)` tuples (the engine's `ExpertKey`) with 0 <= layer < layers, 0 <= expert < experts.
Measurements: docs/cache_policies.md, "Cost, native".
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import weakref
from array import array
from collections.abc import Hashable, Iterable, Sequence, Set
from pathlib import Path

from moe_serve.cache_policies.base import CachePolicy
from moe_serve.cache_policies.native_build import LoadOnce, build_failure, compile_library

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "context_policy.c"
DISABLE_ENV = "MOE_SERVE_NATIVE_POLICY"  # "0": the numpy policies

_P, _L, _I, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
_SIGNATURES = {  # name: (argument types, result type)
    "context_new": ([_I, _I, _D, _D, _I, _I, _I, _I, _D, _D, _D, _D], _P),
    "context_free": ([_P], None),
    "context_victims": ([_P, _P, _L, _P, _L, _P, _L, _P], _L),
    "context_victim_among": ([_P, _P, _L, _P, _L], _L),
    "context_step": ([_P, _P, _L], _I),
}
_ACCESS, _EVICT = 1, 2  # event kinds as the C side numbers them (an insert is kind 0: its bare code)
_MALFORMED = -3
MAX_CONTEXT_KEYS = 254  # overlaps are counted in bytes, 255 marks a step that is never matched

def _open_library() -> ctypes.PyDLL | None:
    """The compiled policy, built if missing; None when disabled or it cannot be built (logged)."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        logger.info("cache policy: numpy implementation (native disabled by %s=0)", DISABLE_ENV)
        return None
    flags = ["-O3", "-ffp-contract=off", "-fPIC", "-shared"]  # no FMA contraction: numpy's roundings
    try:
        # PyDLL keeps the GIL: a call takes about a microsecond, and releasing the GIL for it would let
        # another thread take it for up to a switch interval
        library = ctypes.PyDLL(str(compile_library(SOURCE, flags, "policies", "the native cache policy")))
    except (subprocess.CalledProcessError, OSError) as exc:
        logger.warning("cache policy: numpy implementation (the native one: %s)", build_failure(exc))
        return None
    for name, (argtypes, restype) in _SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes, function.restype = argtypes, restype
    return library


_library = LoadOnce(_open_library)


def native_library() -> ctypes.PyDLL | None:
    """The compiled policy (built on first use); None when disabled or it cannot be built."""
    return _library.get()


class NativeContextPolicy(CachePolicy):
    """`PartitionedPolicy(ContextPolicy)` over `num_layers` x `num_experts` keys and `capacity` slots."""

    name = "context"

    def __init__(self, library: ctypes.PyDLL, capacity: int, num_layers: int, num_experts: int,
                 context_weight: float = 2.0, horizon: int = 4, neighbours: int = 16, history_steps: int = 2048,
                 max_context_keys: int = 8, frequency_weight: float = 0.1, frequency_half_life: float = 32.0,
                 recency_weight: float = 0.3, recency_half_life: float = 2.0) -> None:
        if capacity < 1 or num_layers < 1 or num_experts < 1:
            raise ValueError("capacity, num_layers and num_experts must be >= 1")
        if horizon < 1 or neighbours < 1 or history_steps < 1 or max_context_keys < 1:
            raise ValueError("horizon, neighbours, history_steps and max_context_keys must be >= 1")
        if max_context_keys > MAX_CONTEXT_KEYS:
            raise ValueError(f"max_context_keys must be <= {MAX_CONTEXT_KEYS} in the native policy (byte overlaps)")
        if frequency_half_life <= 0 or recency_half_life <= 0:
            raise ValueError("half lives must be positive")
        handle = library.context_new(num_layers, num_experts, float(capacity), context_weight, horizon, neighbours,
                                     history_steps, max_context_keys, frequency_weight, frequency_half_life,
                                     recency_weight, recency_half_life)
        if not handle:
            raise MemoryError(f"cannot allocate the native context policy ({num_layers} x {num_experts} keys)")
        self._library, self._handle = library, handle
        weakref.finalize(self, library.context_free, handle)
        self._layers, self._experts = num_layers, num_experts
        self._access_offset, self._evict_offset = (kind * num_layers * num_experts for kind in (_ACCESS, _EVICT))
        self._events = array("q")  # buffered notes: kind x layers x experts + layer x experts + expert
        self._keys: list[Hashable | None] = [None] * (num_layers * num_experts)  # each code's key as inserted
        self._protected: object = None  # the last candidate view's `protected` set, and its codes
        self._protected_codes = array("q")

    def _code(self, key: Hashable) -> int:
        layer, expert = key  # type: ignore[misc]
        if 0 <= layer < self._layers and 0 <= expert < self._experts:
            return layer * self._experts + expert
        raise ValueError(f"key {key!r} is outside {self._layers} layers x {self._experts} experts")

    def on_insert(self, key: Hashable) -> None:
        code = self._code(key)
        self._keys[code] = key
        self._events.append(code)

    def on_access(self, key: Hashable) -> None:  # the hottest call: `_code` inlined
        layer, expert = key  # type: ignore[misc]
        if 0 <= layer < self._layers and 0 <= expert < self._experts:
            self._events.append(self._access_offset + layer * self._experts + expert)
        else:
            self._code(key)

    def on_evict(self, key: Hashable) -> None:
        self._events.append(self._evict_offset + self._code(key))

    def _protected_excluded(self, protected: Iterable[Hashable] | None) -> array:
        """The codes of `protected` keys (computed once per protected set), as a fresh array."""
        if protected is None:
            return array("q")
        if protected is not self._protected:
            self._protected = protected
            self._protected_codes = array("q", [self._code(key) for key in protected])
        return self._protected_codes[:]

    def on_step(self) -> None:
        events = self._events
        self._events = array("q")
        if self._library.context_step(self._handle, events.buffer_info()[0], len(events)) == _MALFORMED:
            raise ValueError("the native context policy was handed a malformed event")

    def victim(self, candidates: Iterable[Hashable]) -> Hashable:
        protected = getattr(candidates, "protected", None)
        if protected is not None or isinstance(candidates, Set):
            chosen = self._choose(candidates, protected, ())  # type: ignore[arg-type]
            if chosen is not None:
                return chosen[0]
        events = self._events
        self._events = array("q")
        keys = list(candidates)
        codes = array("q", [self._code(key) for key in keys])
        code = self._library.context_victim_among(self._handle, events.buffer_info()[0], len(events),
                                                  codes.buffer_info()[0], len(codes))
        if code == _MALFORMED:
            raise ValueError("the native context policy was handed a malformed event")
        if code < 0:
            raise ValueError("victim() needs at least one candidate")
        return keys[codes.index(code)]

    def victims(self, candidates: Set[Hashable], incoming: Sequence[Hashable]) -> list[Hashable] | None:
        return self._choose(candidates, getattr(candidates, "protected", None), incoming)

    def _choose(self, candidates: Set[Hashable], protected: Iterable[Hashable] | None,
                incoming: Sequence[Hashable]) -> list[Hashable] | None:
        """max(1, len(incoming)) victims in one native call (`context_victims`): the layer order of
        PartitionedPolicy over every resident key but the view's protected ones; a pick that is not a
        candidate (pinned) is excluded and the choice repeated. None where that order does not apply
        (before any access, or no candidate left among the resident keys)."""
        events = self._events
        self._events = array("q")
        count = max(1, len(incoming))
        excluded = self._protected_excluded(protected)
        arriving = array("q", [self._code(key) for key in incoming])
        out = array("q", bytes(8 * count))
        while True:
            found = self._library.context_victims(self._handle, events.buffer_info()[0], len(events),
                                                  excluded.buffer_info()[0], len(excluded),
                                                  arriving.buffer_info()[0], count,
                                                  out.buffer_info()[0])
            if found == _MALFORMED:
                raise ValueError("the native context policy was handed a malformed event")
            if found < count:
                return None
            events = array("q")
            chosen = [self._keys[code] for code in out]
            rejected = [code for code, key in zip(out, chosen) if key not in candidates]
            if not rejected:
                return chosen
            excluded.extend(rejected)
