"""What one engine step runs, as the objects that follow the model's steps see it.

`StepLayout` names the step's rows (one `StepChunk` per scheduled sequence, in row order); a
`StepObserver` is told each layout before the forward, the end of a successful forward, and each
finished sequence. The model runner calls the observers the builder gave it, in that order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class StepChunk:
    """One sequence's tokens in a step: rows `rows` of the flat batch compute its positions from
    `start` on. `prefill`: the chunk holds prompt tokens, or recomputes after a preemption."""

    seq_id: str
    task: str
    start: int
    rows: range
    prefill: bool

    @property
    def num_tokens(self) -> int:
        return len(self.rows)

    @property
    def starts_sequence(self) -> bool:
        """The sequence's first chunk (or its recompute after a preemption): earlier state is stale."""
        return self.start == 0


@dataclass(frozen=True)
class StepLayout:
    """The chunks of one step, in row order."""

    chunks: tuple[StepChunk, ...]

    @property
    def num_rows(self) -> int:
        return self.chunks[-1].rows.stop if self.chunks else 0

    def __iter__(self) -> Iterator[StepChunk]:
        return iter(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)


@runtime_checkable
class StepObserver(Protocol):
    """Follows the model's steps per sequence (routing recorder, sequence-aware speculators, trace replay)."""

    def begin_step(self, layout: StepLayout) -> None:
        """Before the step's forward: which rows belong to which sequence."""
        ...

    def end_step(self) -> None:
        """The step's forward completed (not called when it raised)."""
        ...

    def forget(self, seq_id: str, completed: bool) -> None:
        """The sequence finished (`completed`: it was not aborted or failed); drop its state."""
        ...
