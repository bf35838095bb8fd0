"""Live routing capture: per-request expert choices, the eMoE task preloader and trace files.

`RoutingRecorder` is the model's routing observer: it collects each step's top-k ids per
MoE layer and files them under the requests whose tokens they were. When a request
finishes, its routing [T, L, A] goes to the consumers: the `TaskPreloader` (eMoE: learn
per-task expert profiles, preload them before a new request's prefill, refresh only every
N prompts, skip insensitive tasks) and the `TraceWriter` (npz files in the schema of the
shared traces, with task labels and request ids, rotated by size).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from moe_serve.engine.core.step import StepLayout
from moe_serve.engine.core.tasks import TaskLru, TaskTable
from moe_serve.engine.prefetch.predictors import TaskProfilePredictor
from moe_serve.engine.traces.trace_file import RoutingTrace, save_trace
from moe_serve.engine.types import ExpertKey

logger = logging.getLogger(__name__)

RoutingConsumer = Callable[[str, str, np.ndarray], None]  # (request_id, task, routing [T, L, A])
TRACE_FILE_TOKENS = 100_000  # tokens per --record-trace file before it rotates (bounds the routing held in RAM)


class RoutingRecorder:
    """Collects routing per request across steps (chunked prefill, decode, preemption): the model's
    routing observer and a step observer of the model runner."""

    def __init__(self, num_layers: int, consumers: Sequence[RoutingConsumer]) -> None:
        self.num_layers = num_layers
        self.consumers = tuple(consumers)
        self._layers: list[torch.Tensor] = []
        self._layout: list[tuple[str, int]] = []
        self._per_request: dict[str, list[np.ndarray]] = {}
        self._task_of: dict[str, str] = {}

    def begin_step(self, layout: StepLayout) -> None:
        """Tokens of this step, in batch order."""
        self._layers = []
        self._layout = [(chunk.seq_id, chunk.num_tokens) for chunk in layout]
        for chunk in layout:
            self._task_of[chunk.seq_id] = chunk.task
            if chunk.starts_sequence:  # first chunk, or recompute after preemption: forget what was recorded
                self._per_request[chunk.seq_id] = []

    def __call__(self, layer: int, topk_ids: torch.Tensor) -> None:
        self._layers.append(topk_ids)

    def end_step(self) -> None:
        if len(self._layers) != self.num_layers:
            return
        routing = torch.stack(self._layers, dim=1).cpu().numpy()  # [T, L, A]
        start = 0
        for rid, count in self._layout:
            self._per_request.setdefault(rid, []).append(routing[start : start + count])
            start += count

    def forget(self, seq_id: str, completed: bool) -> None:
        """Hand a finished request's routing to the consumers (aborted or failed ones are dropped)."""
        chunks = self._per_request.pop(seq_id, [])
        task = self._task_of.pop(seq_id, None)
        if not completed or not chunks or task is None:
            return
        routing = np.concatenate(chunks)
        for consume in self.consumers:
            consume(seq_id, task, routing)


class TaskPreloader:
    """eMoE: preload a task's likely experts before its prefill.

    Only experts a request of the task uses with probability >= `min_probability` are
    preloaded (so the count per layer follows the profile's confidence, and a flat profile
    preloads nothing), earliest layers first (the prefill reaches them first), at most
    `max_experts` in all. `prefetch(keys, scores)` is the cache's scored prefetch: it skips
    resident and loading experts, queues copies behind every demand copy and evicts only
    experts scored lower than the one it loads.
    """

    def __init__(self, predictor: TaskProfilePredictor, tasks: TaskTable, per_layer: int,
                 prefetch: Callable[[Sequence[ExpertKey], Mapping[ExpertKey, float]], int],
                 min_probability: float = 0.5, max_experts: int | None = None) -> None:
        if not 0.0 <= min_probability <= 1.0:
            raise ValueError("min_probability must be in [0, 1]")
        self.predictor = predictor
        self.tasks = tasks
        self.per_layer = per_layer
        self.min_probability = min_probability
        self.max_experts = max_experts
        self._prefetch = prefetch
        self.num_preloads = 0
        self.num_experts_preloaded = 0

    def plan(self, task: str) -> dict[ExpertKey, float]:
        """The experts to preload for `task` (in preload order) with their probabilities of use."""
        if not self.tasks.get(task).prediction_sensitive:
            return {}
        predicted = self.predictor.predict_scores(task, self.per_layer, self.min_probability)
        scores = {ExpertKey(layer, e): p for layer in sorted(predicted) for e, p in predicted[layer]}
        if self.max_experts is not None and len(scores) > self.max_experts:
            scores = dict(list(scores.items())[: self.max_experts])
        return scores

    def preload(self, task: str) -> int:
        """Start loading the task's likely experts (asynchronous copies); returns how many started."""
        scores = self.plan(task)
        if not scores:
            return 0
        started = self._prefetch(list(scores), scores)
        self.num_preloads += 1
        self.num_experts_preloaded += started
        return started


class TraceWriter:
    """Writes finished requests' routing into rotated npz files under `directory`."""

    def __init__(self, directory: Path, num_experts: int, model: str, tokens_per_file: int = TRACE_FILE_TOKENS) -> None:
        self.directory = directory
        self.num_experts = num_experts
        self.model = model
        self.tokens_per_file = tokens_per_file
        self.directory.mkdir(parents=True, exist_ok=True)
        self._routings: list[np.ndarray] = []
        self._tasks: list[str] = []
        self._request_ids: list[str] = []
        self._num_tokens = 0
        self._stamp = time.strftime("%Y%m%d-%H%M%S")
        self.files_written: list[Path] = []

    def add(self, request_id: str, task: str, routing: np.ndarray) -> None:
        self._routings.append(routing)
        self._tasks.append(task)
        self._request_ids.append(request_id)
        self._num_tokens += len(routing)
        if self._num_tokens >= self.tokens_per_file:
            self.flush()

    def flush(self) -> Path | None:
        """Write what is buffered into the next file (nothing if empty)."""
        if not self._routings:
            return None
        lengths = [len(r) for r in self._routings]
        trace = RoutingTrace(
            expert_ids=np.concatenate(self._routings),
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            prompt_ids=np.arange(len(lengths), dtype=np.int32),
            num_experts=self.num_experts,
            model=self.model,
            tasks=list(self._tasks),
            request_ids=list(self._request_ids),
        )
        path = self.directory / f"routing-{self._stamp}-{len(self.files_written):04d}.npz"
        save_trace(path, trace)
        self.files_written.append(path)
        logger.info("wrote routing trace %s (%d requests, %d tokens)", path, len(lengths), trace.num_tokens)
        self._routings, self._tasks, self._request_ids, self._num_tokens = [], [], [], 0
        return path


class TaskExpertCost:
    """Scheduler cost model: seconds to load the experts a task is predicted to need that are
    not resident now (predicted experts x copy time of one expert). Memoised per task briefly,
    for at most `max_tasks` tasks (None: no bound)."""

    def __init__(self, predictor: TaskProfilePredictor, per_layer: int, is_resident: Callable[[ExpertKey], bool],
                 copy_s_per_expert: float, ttl_s: float = 0.05, max_tasks: int | None = None) -> None:
        self.predictor = predictor
        self.per_layer = per_layer
        self.is_resident = is_resident
        self.copy_s_per_expert = copy_s_per_expert
        self.ttl_s = ttl_s
        self._memo: TaskLru[tuple[float, float]] = TaskLru(max_tasks)

    @property
    def num_tasks(self) -> int:
        """Tasks with a memoised cost."""
        return len(self._memo)

    def load_seconds(self, task: str) -> float:
        now = time.monotonic()
        cached = self._memo.get(task)
        if cached is not None and now - cached[1] < self.ttl_s:
            return cached[0]
        predicted = self.predictor.predict(task, self.per_layer)
        misses = sum(1 for layer, experts in predicted.items() for e in experts
                     if not self.is_resident(ExpertKey(layer, e)))
        seconds = misses * self.copy_s_per_expert
        self._memo.put(task, (seconds, now))
        return seconds
