"""Each constrained sequence's position in its grammar (`GuidedMatcher`), and a step's token masks
(`TokenMasks`), computed on a worker thread while the forward runs (`MaskWorker`).
Shapes: R constrained rows, W = ceil(V / 32) mask words, V vocabulary."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import llguidance
import torch


class GuidedMatcher:
    """Where one sequence is in its grammar: which tokens may come next, and whether it is done."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size

    @property
    def matcher(self) -> llguidance.LLMatcher:
        return self._matcher

    def accept(self, token_id: int) -> bool:
        """Advance by a sampled token; False (and `error` set) when the grammar does not allow it."""
        return self._matcher.consume_token(token_id)

    @property
    def is_finished(self) -> bool:
        """The output is complete: nothing but an end-of-sequence token could follow."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    @property
    def error(self) -> str | None:
        """Why the matcher cannot go on (a token the grammar rejects, a parser limit), else None."""
        return self._matcher.get_error() if self._matcher.is_error() else None


@dataclass(frozen=True)
class TokenMasks:
    """The allowed next tokens of the constrained rows of a sampling batch: bit t of `bitmask[i]`
    is set when row `rows[i]` may sample token t. `errors`: rows whose matcher failed, and why."""

    rows: list[int]
    bitmask: torch.Tensor  # R, W int32
    errors: dict[int, str]

    def allowed(self, vocab_size: int, device: torch.device) -> torch.Tensor:
        """[R, vocab_size] bool: True where the token is allowed."""
        bits = torch.arange(32, dtype=torch.int32, device=device)
        words = self.bitmask.to(device, non_blocking=True)
        unpacked = (words.unsqueeze(-1) >> bits) & 1  # R, W, 32: bit b of word w is token 32 w + b
        return unpacked.reshape(len(self.rows), -1)[:, :vocab_size].bool()


def compute_masks(matchers: Sequence[GuidedMatcher | None], executor: llguidance.LLExecutor) -> TokenMasks:
    """The masks of the rows that have a matcher (their index in `matchers`)."""
    rows = [row for row, m in enumerate(matchers) if m is not None]
    constrained = [m for m in matchers if m is not None]
    width = (constrained[0].vocab_size + 31) // 32
    bitmask = torch.full((len(rows), width), -1, dtype=torch.int32)
    # llguidance.torch wraps this call but imports torch's compiler (seconds) for a kernel not used here
    executor.unsafe_compute_mask_ptr([(m.matcher, i) for i, m in enumerate(constrained)], bitmask.data_ptr(),
                                     width * 4, len(rows))
    errors = {row: m.error for row, m in zip(rows, constrained) if m.error is not None}
    return TokenMasks(rows, bitmask, errors)


class MaskWorker:
    """Computes a step's masks on its own thread: `start` before the forward, `Future.result()`
    before sampling. llguidance computes masks without the GIL, so the forward is not held up."""

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe-serve-masks")
        self._executor = llguidance.LLExecutor()

    def start(self, matchers: Sequence[GuidedMatcher | None]) -> Future[TokenMasks] | None:
        """Start computing the masks of `matchers` (None: that row is unconstrained); None when
        no row is constrained."""
        if all(m is None for m in matchers):
            return None
        return self._thread.submit(compute_masks, list(matchers), self._executor)
