"""A request's state inside the engine: its tokens, progress, status and grammar position.
No torch import."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from moe_serve.engine.core.request import EngineRequest
from moe_serve.engine.core.sampling_params import FinishReason

if TYPE_CHECKING:
    from moe_serve.engine.core.guided.matcher import GuidedMatcher


class SequenceStatus(enum.Enum):
    """Where a sequence is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One request being served: prompt, generated tokens and how many are in the KV cache;
    `guided`: where its output is in its grammar (when the request is constrained)."""

    request: EngineRequest
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    predicted_output_len: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    guided: GuidedMatcher | None = None

    @property
    def seq_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.request.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output."""
        prompt = self.request.prompt_token_ids
        if end <= len(prompt):
            return prompt[start:end]
        return (prompt + self.output_token_ids)[start:end]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens not yet in the KV cache (the whole prompt at first, then one per decode)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
