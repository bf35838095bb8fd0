"""Where a MoE layer gets its routed experts' weights from.

`ExpertProvider` is the seam between the model code and the offload tier: a layer asks
for the experts its tokens routed to (with the rows routed to each) and computes them as soon as
the provider yields them (the already resident ones as one group, then misses as their copies
land), hands the misses the provider keeps on the host (`ExpertFetch.host`: computed where they
live, from the host tier) to `run_on_host`, and says when it is done so their slots can be reused.
A provider that keeps a low-bit copy of each expert may hand some experts over in that format
(`ExpertFetch.low`); it is given each expert's largest relative gate weight (a row's gate weight
over the mean of its token's top-k weights: 1 is an average expert) when it asks (`needs_gates`).
`ResidentExperts` keeps every expert in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import torch

from moe_serve.engine.model.quant import ExpertFormat
from moe_serve.engine.model.weights import ExpertTensors
from moe_serve.engine.types import ExpertKey

ExpertGroup = list[tuple[int, ExpertTensors]]  # (expert, its weights), computed in one call


@dataclass
class ExpertFetch:
    """One layer's experts: `ready` yields the device's groups in the order they become usable;
    `host` are misses to compute from the host tier (weights are views of it, on the host) through
    `ExpertProvider.run_on_host`, beside the device's work. Experts in `low` (device ones only) come
    in `low_format`, the provider's low-bit copy; every other expert in the model's expert format."""

    ready: Iterator[ExpertGroup]
    host: ExpertGroup = field(default_factory=list)
    low: frozenset[int] = frozenset()
    low_format: ExpertFormat | None = None


class ExpertProvider(Protocol):
    """Supplies routed-expert weights to the MoE layers."""

    @property
    def needs_gates(self) -> bool:
        """Whether `fetch` wants each expert's largest relative gate weight (a layer computes them only then)."""
        ...

    def fetch(self, layer: int, expert_ids: Sequence[int], rows: Sequence[int],
              gates: Sequence[float] | None = None) -> ExpertFetch:
        """Claim the experts now (starting any loads; `rows[i]` rows are routed to `expert_ids[i]`, the
        largest of their relative gate weights is `gates[i]` when `needs_gates`).
        `ready` yields groups of (expert, weights): each group is every claimed expert usable at
        that moment, in the order they become usable, so a layer can compute a group in one call
        while the rest load. Experts in `host` are not claimed: compute them with `run_on_host`."""
        ...

    def run_on_host(self, layer: int, work: Callable[[], None]) -> Future[float]:
        """Runs `work` (computing this layer's `ExpertFetch.host`) on the host's expert worker;
        the future's result is its seconds."""
        ...

    def done(self, layer: int, expert_ids: Sequence[int]) -> None:
        """The layer finished with these experts."""
        ...

    def hint(self, layer: int, expert_ids: Sequence[int]) -> None:
        """These experts of `layer` will probably be needed soon (prefetch if useful)."""
        ...

    def end_step(self) -> None:
        """One engine step (a forward over every layer) finished."""
        ...


class ResidentExperts:
    """Every routed expert resident in memory: the all-resident reference run."""

    def __init__(self, experts: Mapping[ExpertKey, ExpertTensors], device: torch.device) -> None:
        self._experts = {key: tuple(t.to(device) for t in tensors) for key, tensors in experts.items()}

    @property
    def needs_gates(self) -> bool:
        return False

    def fetch(self, layer: int, expert_ids: Sequence[int], rows: Sequence[int],
              gates: Sequence[float] | None = None) -> ExpertFetch:
        return ExpertFetch(iter([[(expert, self._experts[ExpertKey(layer, expert)]) for expert in expert_ids]]))

    def run_on_host(self, layer: int, work: Callable[[], None]) -> Future[float]:
        """Never needed (nothing is fetched for the host): runs `work` inline."""
        done: Future[float] = Future()
        work()
        done.set_result(0.0)
        return done

    def done(self, layer: int, expert_ids: Sequence[int]) -> None:
        """Nothing to release: resident experts are never evicted."""

    def hint(self, layer: int, expert_ids: Sequence[int]) -> None:
        """Nothing to prefetch: every expert is already resident."""

    def end_step(self) -> None:
        """No per-step state."""

    def nbytes(self) -> int:
        """Bytes held by all routed experts."""
        return sum(t.numel() * t.element_size() for tensors in self._experts.values() for t in tensors)
