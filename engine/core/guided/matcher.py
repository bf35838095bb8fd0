"""Each constrained sequence's position in its grammar (`GuidedMatcher`), and a step's token masks
as a logit bias (`TokenMasks`), computed on a worker thread while the forward runs (`MaskWorker`).
Shapes: R constrained rows, W = ceil(V / 32) mask words, V vocabulary."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import llguidance
import numpy as np
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
    """The allowed next tokens of the constrained rows of a sampling batch, as a bias to add to
    their logits: `bias[i]` is 0 where row `rows[i]` may sample the token, -inf where it may not.
    `errors`: rows whose matcher failed, and why."""

    rows: list[int]
    bias: torch.Tensor  # R, V float32, on the logits' device
    errors: dict[int, str]


def byte_bias_table(device: torch.device) -> torch.Tensor:
    """[256, 8] float32: entry [b, i] is 0 when bit i of byte b is set, else -inf."""
    bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
    return torch.zeros(256, 8).masked_fill_(bits == 0, float("-inf")).to(device)


def mask_bias(bitmask: torch.Tensor, vocab_size: int, table: torch.Tensor) -> torch.Tensor:
    """[R, W] int32 bitmasks (bit b of word w: token 32 w + b allowed) -> [R, vocab_size] 0 / -inf,
    one table row per mask byte (10x faster than unpacking bits and filling on a CPU), built on
    the table's device. On a CPU numpy gathers: one thread, where a torch op on this worker thread
    would start a second OpenMP team next to the forward's (40 vs 3-8 ms at batch 16, vocab 32k,
    torch at 2 threads on the loaded 2-core box). The words' bytes are read in memory order:
    little-endian, as on x86, ARM and CUDA devices."""
    if table.device.type == "cpu":
        rows = table.numpy()[bitmask.numpy().view(np.uint8).ravel()]  # R * 4W, 8
        return torch.from_numpy(rows).view(len(bitmask), -1)[:, :vocab_size]
    mask_bytes = bitmask.to(table.device, non_blocking=True).view(torch.uint8).flatten()  # R * 4W
    return table.index_select(0, mask_bytes.long()).view(len(bitmask), -1)[:, :vocab_size]


def compute_masks(matchers: Sequence[GuidedMatcher | None], executor: llguidance.LLExecutor, vocab_size: int,
                  table: torch.Tensor) -> TokenMasks:
    """The masks of the rows that have a matcher (their index in `matchers`), for logits of
    `vocab_size` tokens on the device of `table` (`byte_bias_table`)."""
    rows = [row for row, m in enumerate(matchers) if m is not None]
    constrained = [m for m in matchers if m is not None]
    width = (constrained[0].vocab_size + 31) // 32
    bitmask = torch.full((len(rows), width), -1, dtype=torch.int32)
    # llguidance.torch wraps this call but imports torch's compiler (seconds) for a kernel not used here
    executor.unsafe_compute_mask_ptr([(m.matcher, i) for i, m in enumerate(constrained)], bitmask.data_ptr(),
                                     width * 4, len(rows))
    errors = {row: m.error for row, m in zip(rows, constrained) if m.error is not None}
    return TokenMasks(rows, mask_bias(bitmask, vocab_size, table), errors)


class MaskWorker:
    """Computes a step's masks (and their logit bias) on its own thread: `start` before the forward,
    `Future.result()` before sampling. llguidance computes masks without the GIL, so the forward
    is not held up; what is left for the sampler is one add."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self._table = byte_bias_table(device)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe-serve-masks")
        self._executor = llguidance.LLExecutor()

    def start(self, matchers: Sequence[GuidedMatcher | None]) -> Future[TokenMasks] | None:
        """Start computing the masks of `matchers` (None: that row is unconstrained); None when
        no row is constrained."""
        if all(m is None for m in matchers):
            return None
        return self._thread.submit(compute_masks, list(matchers), self._executor, self.vocab_size, self._table)
