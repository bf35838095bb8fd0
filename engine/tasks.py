"""Tasks and their SLOs, and the per-task output-length estimator. No torch import.

A task (from request `metadata.task` or the `X-Task` header) names a kind of work with a
time-to-first-token SLO, a time-per-output-token SLO, an output-length prior and whether
expert prediction is worth doing for it (eMoE skips it for insensitive tasks). The table
comes from YAML (`configs/tasks.yaml`); unknown tasks fall back to `default`.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.request import DEFAULT_TASK


class TaskSpec(BaseModel):
    """SLOs and priors of one task."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ttft_slo_s: float = Field(default=2.0, gt=0, description="time-to-first-token SLO in seconds")
    tpot_slo_s: float = Field(default=0.2, gt=0, description="time-per-output-token SLO in seconds")
    output_len_prior: int = Field(default=128, ge=1, description="expected output tokens before any is observed")
    prediction_sensitive: bool = Field(default=True, description="whether expert preloading is worth it")


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


class OutputLengthEstimator:
    """Per-task output-length prediction from recent finished requests (a sliding quantile).

    Before a task has `min_samples` observations its prior is used. Predictions are capped
    by the request's max_tokens. The mean absolute error of past predictions is tracked.
    """

    def __init__(self, table: TaskTable, window: int = 64, quantile: float = 0.5, min_samples: int = 3) -> None:
        self.table = table
        self.window = window
        self.quantile = quantile
        self.min_samples = min_samples
        self._recent: dict[str, deque[int]] = {}
        self._sorted: dict[str, list[int]] = {}
        self._abs_error_sum = 0.0
        self._num_scored = 0

    def predict(self, task: str, max_tokens: int) -> int:
        values = self._sorted.get(task, [])
        if len(values) < self.min_samples:
            guess = self.table.get(task).output_len_prior
        else:
            guess = values[min(len(values) - 1, int(self.quantile * len(values)))]
        return max(1, min(guess, max_tokens))

    def observe(self, task: str, predicted: int, actual: int) -> None:
        """Record a finished request's real output length (and score the prediction made for it)."""
        recent = self._recent.setdefault(task, deque())
        ordered = self._sorted.setdefault(task, [])
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
