"""Runs a scheduled step on the model: builds the flat batch, runs the forward, samples.

Owns the device-side state: the model, the KV-cache tensors, the sampler and each
request's seeded random generator, and says which faults leave the device unusable.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceT
from dataclasses import dataclass, field

import torch

from moe_serve.engine.core.sampler import Sampler, SamplerOutput
from moe_serve.engine.core.sampling_params import TokenLogprob
from moe_serve.engine.core.scheduler import SchedulerOutput
from moe_serve.engine.core.sequence import Sequence
from moe_serve.engine.model.attention import AttentionMetadata
from moe_serve.engine.model.moe_model import MoEModel
from moe_serve.engine.prefetch.routing import RoutingRecorder
from moe_serve.engine.prefetch.speculators import SequenceAwareSpeculator
from moe_serve.engine.traces.trace_router import TraceRouter

# messages of device faults that leave a CUDA context unusable (older torch raises them as plain RuntimeError)
_DEVICE_FAULT_MARKERS = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "device-side assert", "illegal memory access")
_ACCELERATOR_ERROR = getattr(torch, "AcceleratorError", ())  # torch >= 2.8


@dataclass
class StepResult:
    """Per sequence that sampled this step: its token and logprob, or why it got none."""

    sampled: dict[str, tuple[int, TokenLogprob | None]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def is_device_fault(exc: BaseException) -> bool:
    """Whether `exc` leaves the device unusable (a CUDA error; an out-of-memory error is not one:
    the step fails, the allocator's cache is emptied and the engine tries the next step)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return False
    if isinstance(exc, _ACCELERATOR_ERROR):
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc) for marker in _DEVICE_FAULT_MARKERS)


class ModelRunner:
    """Turns a SchedulerOutput into sampled tokens (and logprobs) per sequence."""

    def __init__(
        self,
        model: MoEModel,
        kv_caches: list[tuple[torch.Tensor, ...]],
        block_size: int,
        eos_token_ids: frozenset[int],
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.eos_token_ids = eos_token_ids
        self.sampler = Sampler(model.spec.vocab_size)
        self._generators: dict[str, torch.Generator] = {}
        self.recorder: RoutingRecorder | None = None
        self.trace_router: TraceRouter | None = None

    def attach_recorder(self, recorder: RoutingRecorder) -> None:
        """Capture every step's routing per request (for eMoE profiles and trace files)."""
        self.recorder = recorder
        self.model.routing_observer = recorder

    def replay_routing(self, router: TraceRouter) -> None:
        """Benchmarks: route every token as the trace says instead of by the model's routers."""
        self.trace_router = router
        self.model.routing_override = router

    def forget(self, seq_id: str) -> None:
        """Drop per-request state of a finished sequence."""
        self._generators.pop(seq_id, None)
        if self.trace_router is not None:
            self.trace_router.forget(seq_id)
        if isinstance(self.model.speculator, SequenceAwareSpeculator):
            self.model.speculator.forget(seq_id)

    def recover(self, exc: BaseException) -> None:
        """After a failed step: free what the allocator caches when the failure was out of memory.
        (Expert-cache pins of the failed forward are released by `execute` itself.)"""
        if isinstance(exc, torch.cuda.OutOfMemoryError) and self.model.device.type == "cuda":
            torch.cuda.empty_cache()

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        seed = seq.request.sampling.seed
        if seed is None or seq.request.sampling.is_greedy:
            return None
        gen = self._generators.get(seq.seq_id)
        if gen is None:
            gen = torch.Generator(device=self.model.device)
            gen.manual_seed(seed)
            self._generators[seq.seq_id] = gen
        return gen

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, block_tables: SequenceT[SequenceT[int]]) -> StepResult:
        """Run the scheduled chunks and sample for the sequences that reach their last token.

        An exception propagates to the caller (who fails the step's requests) after the expert
        provider has ended the step, which releases any expert the failed forward still held."""
        input_ids: list[int] = []
        positions: list[int] = []
        logit_rows: list[int] = []
        sampling_seqs: list[Sequence] = []
        for item in out.scheduled:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            input_ids.extend(seq.token_ids(start, end))
            positions.extend(range(start, end))
            if item.samples:
                logit_rows.append(len(input_ids) - 1)
                sampling_seqs.append(seq)
        device = self.model.device
        meta = AttentionMetadata.build(
            block_tables,
            [s.seq.num_computed_tokens + s.num_new_tokens for s in out.scheduled],
            [s.num_new_tokens for s in out.scheduled],
            self.block_size,
            device,
        )
        # (sequence id, rows, whether the chunk starts the sequence) per chunk, in row order
        layout = [(s.seq.seq_id, s.num_new_tokens, s.seq.num_computed_tokens == 0) for s in out.scheduled]
        if self.recorder is not None:
            self.recorder.begin_step(layout)
        if isinstance(self.model.speculator, SequenceAwareSpeculator):
            self.model.speculator.begin_step(layout)
        if self.trace_router is not None:
            self.trace_router.begin_step(
                [(s.seq.seq_id, s.seq.num_computed_tokens, s.num_new_tokens) for s in out.scheduled]
            )
        try:
            hidden = self.model.forward(
                torch.tensor(input_ids, device=device), torch.tensor(positions, device=device), meta, self.kv_caches
            )
        finally:
            self.model.experts.end_step()
        if self.recorder is not None:
            self.recorder.end_step()
        if not sampling_seqs:
            return StepResult()
        logits = self.model.logits(hidden[torch.tensor(logit_rows, device=device)])
        result: SamplerOutput = self.sampler(
            logits,
            [s.request.sampling for s in sampling_seqs],
            [s.prompt_token_ids for s in sampling_seqs],
            [s.output_token_ids for s in sampling_seqs],
            [self._generator(s) for s in sampling_seqs],
            self.eos_token_ids,
        )
        step = StepResult()
        for seq, token, logprob, error in zip(sampling_seqs, result.token_ids, result.logprobs, result.errors):
            if error is None:
                step.sampled[seq.seq_id] = (token, logprob)
            else:
                step.failed[seq.seq_id] = error
        return step
