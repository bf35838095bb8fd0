"""Tasks and their SLOs, the bound on task names, and the per-task output-length estimator.
No torch import.

A task (from request `metadata.task` or the `X-Task` header) names a kind of work with a
time-to-first-token SLO, a time-per-output-token SLO, an output-length prior, whether
expert prediction is worth doing for it (eMoE skips it for insensitive tasks) and what the
slo policy does with its requests once they cannot meet their SLO (`OverloadAction`). The table
comes from YAML (`configs/tasks.yaml`); unknown tasks fall back to `default`.

Task names are chosen by clients, so the engine bounds them: `TaskNames` folds a request's
task into `default` once `max_tasks` distinct names are tracked (the table's names always
count as known), and every per-task structure keeps at most `max_tasks` names in a `TaskLru`
(the least recently used name is dropped first).
"""

from __future__ import annotations

import bisect
import enum
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moe_serve.engine.config import DEFAULT_MAX_TASKS
from moe_serve.engine.core.request import DEFAULT_TASK

# a tracked name unused this long gives its place to a new name (instead of the new one folding)
TASK_NAME_IDLE_S = 600.0

V = TypeVar("V")


class OverloadAction(str, enum.Enum):
    """What the slo policy does with a request of the task that can no longer meet its TTFT SLO."""

    DEMOTE = "demote"  # serve it after every request that still can (lowest priority)
    SHED = "shed"  # refuse it (429 with Retry-After), on arrival or while it waits


class TaskSpec(BaseModel):
    """SLOs and priors of one task."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ttft_slo_s: float = Field(default=2.0, gt=0, description="time-to-first-token SLO in seconds")
    tpot_slo_s: float = Field(default=0.2, gt=0, description="time-per-output-token SLO in seconds")
    output_len_prior: int = Field(default=128, ge=1, description="expected output tokens before any is observed")
    prediction_sensitive: bool = Field(default=True, description="whether expert preloading is worth it")
    overload: OverloadAction = Field(default=OverloadAction.DEMOTE, description="under the slo policy, a request "
                                     "that can no longer meet its TTFT SLO: demote (serve it last) or shed (429)")


@dataclass(frozen=True)
class TaskTable:
    """Task name -> TaskSpec, with `default` for anything unknown."""

    tasks: Mapping[str, TaskSpec]

    def get(self, task: str) -> TaskSpec:
        return self.tasks.get(task) or self.tasks.get(DEFAULT_TASK) or TaskSpec()

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> TaskTable:
        """Validate a {task: {field: value}} mapping; errors name the task and field."""
        tasks: dict[str, TaskSpec] = {}
        for name, values in data.items():
            try:
                tasks[str(name)] = TaskSpec.model_validate(values or {})
            except ValidationError as exc:
                err = exc.errors()[0]
                field = ".".join(str(p) for p in err["loc"])
                raise ValueError(f"task {name!r}, field {field}: {err['msg']}") from exc
        tasks.setdefault(DEFAULT_TASK, TaskSpec())
        return cls(tasks)

    @classmethod
    def from_yaml(cls, path: Path) -> TaskTable:
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("tasks", {}), dict):
            raise ValueError(f"{path}: expected a mapping with a 'tasks' mapping")
        return cls.from_mapping(data.get("tasks", {}))


def per_task_capacity(table: TaskTable, max_tasks: int) -> int:
    """How many task names a per-task structure keeps: `max_tasks`, or every name of a larger table."""
    return max(max_tasks, len(table.tasks))


class TaskLru(Generic[V]):
    """Per-task values for at most `capacity` task names (None: unbounded); reading or adding a
    name makes it the most recently used, and the least recently used name goes first."""

    def __init__(self, capacity: int | None) -> None:
        if capacity is not None and capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._items: OrderedDict[str, V] = OrderedDict()

    def get(self, task: str) -> V | None:
        value = self._items.get(task)
        if value is not None:
            self._items.move_to_end(task)
        return value

    def get_or_add(self, task: str, make: Callable[[], V]) -> V:
        """The task's value, made (and the oldest name dropped when over capacity) if absent."""
        value = self.get(task)
        if value is None:
            value = make()
            self.put(task, value)
        return value

    def put(self, task: str, value: V) -> None:
        self._items[task] = value
        self._items.move_to_end(task)
        if self.capacity is not None and len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, task: object) -> bool:
        return task in self._items


class TaskNames:
    """The task names the engine tracks: every name of the table, and other names while fewer than
    `max_tasks` names are tracked in all; beyond that a new name is folded into `default` (and
    counted), unless the least recently used other name has been idle for `idle_s` seconds, in
    which case it gives its place. Thread-safe: `LLMEngine.add_request` folds on the engine
    thread while the server reads the names and the counter from others."""

    def __init__(self, table: TaskTable, max_tasks: int = DEFAULT_MAX_TASKS, idle_s: float = TASK_NAME_IDLE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.table = table
        self.capacity = max(0, max_tasks - len(table.tasks))  # names outside the table
        self.idle_s = idle_s
        self._clock = clock
        self._last_used: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()
        self.num_folded = 0

    def fold(self, task: str) -> str:
        """`task` if it is (or now becomes) tracked, else `default`."""
        if task in self.table.tasks:
            return task
        with self._lock:
            now = self._clock()
            if task in self._last_used:
                self._last_used[task] = now
                self._last_used.move_to_end(task)
                return task
            if len(self._last_used) >= self.capacity:
                oldest = next(iter(self._last_used.values()), None)
                if oldest is None or now - oldest < self.idle_s:
                    self.num_folded += 1
                    return DEFAULT_TASK
                self._last_used.popitem(last=False)
            self._last_used[task] = now
            return task

    def __len__(self) -> int:
        """Tracked names outside the table."""
        return len(self._last_used)


@dataclass
class _TaskLengths:
    recent: deque[int] = field(default_factory=deque)  # the last `window` lengths, in arrival order
    ordered: list[int] = field(default_factory=list)  # the same lengths, sorted


class OutputLengthEstimator:
    """Per-task output-length prediction from recent finished requests (a sliding quantile).

    Before a task has `min_samples` observations its prior is used. Predictions are capped
    by the request's max_tokens. The mean absolute error of past predictions is tracked.
    At most `max_tasks` tasks keep their history (the least recently used is dropped first).
    """

    def __init__(self, table: TaskTable, window: int = 64, quantile: float = 0.5, min_samples: int = 3,
                 max_tasks: int | None = DEFAULT_MAX_TASKS) -> None:
        self.table = table
        self.window = window
        self.quantile = quantile
        self.min_samples = min_samples
        self._lengths: TaskLru[_TaskLengths] = TaskLru(max_tasks)
        self._abs_error_sum = 0.0
        self._num_scored = 0

    @property
    def num_tasks(self) -> int:
        """Tasks with a length history."""
        return len(self._lengths)

    def predict(self, task: str, max_tokens: int) -> int:
        lengths = self._lengths.get(task)
        values = lengths.ordered if lengths is not None else []
        if len(values) < self.min_samples:
            guess = self.table.get(task).output_len_prior
        else:
            guess = values[min(len(values) - 1, int(self.quantile * len(values)))]
        return max(1, min(guess, max_tokens))

    def observe(self, task: str, predicted: int, actual: int) -> None:
        """Record a finished request's real output length (and score the prediction made for it)."""
        lengths = self._lengths.get_or_add(task, _TaskLengths)
        recent, ordered = lengths.recent, lengths.ordered
        if len(recent) == self.window:
            ordered.pop(bisect.bisect_left(ordered, recent.popleft()))
        recent.append(actual)
        bisect.insort(ordered, actual)
        self._abs_error_sum += abs(predicted - actual)
        self._num_scored += 1

    @property
    def mean_abs_error(self) -> float:
        """Mean |predicted - actual| output tokens over every scored request."""
        return self._abs_error_sum / self._num_scored if self._num_scored else 0.0
