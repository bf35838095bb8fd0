"""Expert-cache hits per task: how often the rows of each task found their experts resident.

A lookup is one (row, MoE layer, routed expert). It missed when the expert held no slot when its
layer acquired its experts (a key still loading from a prefetch counts as a hit, as in the cache's
per-layer counters); every row routed to a missed expert counts that miss, whichever task's row
caused the copy. `TaskHitCounter` follows the model's steps (a `StepObserver` for the rows' tasks,
a routing observer for each layer's routing) and adds each step's counts to the cache's stats.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from moe_serve.engine.core.step import StepLayout
from moe_serve.engine.offload.expert_cache import ExpertCache


class TaskHitCounter:
    """Counts each step's expert lookups and misses by the task of the row that looked up."""

    def __init__(self, cache: ExpertCache, num_experts: int) -> None:
        self.cache, self.num_experts = cache, num_experts
        self._tasks: list[tuple[str, int]] = []  # (task, rows) per chunk, in row order
        self._routing: dict[int, torch.Tensor] = {}  # MoE layer -> topk_ids [T, A] of this step

    def begin_step(self, layout: StepLayout) -> None:
        self._tasks = [(chunk.task, chunk.num_tokens) for chunk in layout]
        self._routing.clear()
        self.cache.take_step_misses()  # what a failed step left behind

    def __call__(self, layer: int, topk_ids: torch.Tensor) -> None:
        self._routing[layer] = topk_ids

    def end_step(self) -> None:
        misses = self.cache.take_step_misses()
        if not self._routing or not self._tasks:
            return
        layers = sorted(self._routing)
        per_row = next(iter(self._routing.values())).shape[1] * len(layers)
        lookups: dict[str, int] = defaultdict(int)
        for task, rows in self._tasks:
            lookups[task] += rows * per_row
        missed: dict[str, int] = defaultdict(int)
        if misses:
            position = {layer: i for i, layer in enumerate(layers)}
            ids = torch.stack([self._routing[layer] for layer in layers])  # [L, T, A]
            table = torch.zeros(len(layers), self.num_experts, dtype=torch.bool, device=ids.device)
            missed_keys = [(position[key.layer], key.expert) for key in misses if key.layer in position]
            if missed_keys:
                table[tuple(zip(*missed_keys, strict=True))] = True
            row_misses = table.gather(1, ids.flatten(1)).view(ids.shape).sum(dim=(0, 2)).tolist()  # [T]
            start = 0
            for task, rows in self._tasks:
                missed[task] += int(sum(row_misses[start:start + rows]))
                start += rows
        self.cache.record_task_lookups(lookups, missed)
        self._routing.clear()

    def forget(self, seq_id: str, completed: bool) -> None:
        """Nothing per sequence to drop."""
