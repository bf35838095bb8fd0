"""Runs a scheduled step on the model: builds the flat batch, runs the forward, samples.

Owns the device-side state: the model, the KV-cache tensors, the sampler and each
request's seeded random generator, tells the step observers it was built with what each step
runs, and says which faults leave the device unusable. The grammar masks of constrained
sequences are computed on a worker thread while the forward runs.
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceT
from concurrent.futures import Future, wait
from dataclasses import dataclass, field

import torch

from moe_serve.engine.core.guided.matcher import MaskWorker, TokenMasks
from moe_serve.engine.core.sampler import Sampler, SamplerOutput
from moe_serve.engine.core.sampling_params import TokenLogprob
from moe_serve.engine.core.scheduler import SchedulerOutput
from moe_serve.engine.core.sequence import Sequence
from moe_serve.engine.core.step import StepChunk, StepLayout, StepObserver
from moe_serve.engine.model.attention import AttentionMetadata
from moe_serve.engine.model.moe_model import MoEModel

# messages of device faults that leave a CUDA context unusable (older torch raises them as plain RuntimeError)
_DEVICE_FAULT_MARKERS = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "device-side assert", "illegal memory access")
_ACCELERATOR_ERROR = getattr(torch, "AcceleratorError", ())  # torch >= 2.8


@dataclass(frozen=True)
class PreparedStep:
    """A step's flat batch: token ids and positions [T], attention metadata, the rows whose logits
    are sampled (one per sampling sequence), and the layout the observers get."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logit_rows: list[int]
    sampling_seqs: list[Sequence]
    layout: StepLayout


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
        observers: SequenceT[StepObserver] = (),
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.eos_token_ids = eos_token_ids
        self.sampler = Sampler(model.spec.vocab_size)
        self._observers = tuple(observers)
        self._generators: dict[str, torch.Generator] = {}
        self._mask_worker: MaskWorker | None = None  # started with the first constrained step

    def forget(self, seq_id: str, completed: bool) -> None:
        """Drop per-request state of a finished sequence (`completed`: not aborted or failed)."""
        self._generators.pop(seq_id, None)
        for observer in self._observers:
            observer.forget(seq_id, completed)

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
        step = self._prepare(out, block_tables)
        pending_masks = self._start_masks(step.sampling_seqs)
        try:
            hidden = self._run(step)
        except BaseException:
            if pending_masks is not None:  # the matchers are the engine's again once this returns
                wait([pending_masks])
            raise
        masks = None if pending_masks is None else pending_masks.result()
        return self._sample(step, hidden, masks)

    def _start_masks(self, seqs: SequenceT[Sequence]) -> Future[TokenMasks] | None:
        """Start computing the grammar masks of the constrained sampling sequences (None: none is)."""
        if all(seq.guided is None for seq in seqs):
            return None
        if self._mask_worker is None:
            self._mask_worker = MaskWorker(self.model.spec.vocab_size, self.model.device)
        return self._mask_worker.start([seq.guided for seq in seqs])

    def _prepare(self, out: SchedulerOutput, block_tables: SequenceT[SequenceT[int]]) -> PreparedStep:
        """The flat batch of the scheduled chunks, in schedule order."""
        input_ids: list[int] = []
        positions: list[int] = []
        logit_rows: list[int] = []
        sampling_seqs: list[Sequence] = []
        chunks: list[StepChunk] = []
        for item in out.scheduled:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            rows = range(len(input_ids), len(input_ids) + item.num_new_tokens)
            prefill = item.num_new_tokens > 1 or start < len(seq.prompt_token_ids)
            chunks.append(StepChunk(seq.seq_id, seq.request.task, start, rows, prefill))
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
        return PreparedStep(torch.tensor(input_ids, device=device), torch.tensor(positions, device=device), meta,
                            logit_rows, sampling_seqs, StepLayout(tuple(chunks)))

    def _run(self, step: PreparedStep) -> torch.Tensor:
        """The forward over the step's rows, between the observers' begin_step and end_step."""
        for observer in self._observers:
            observer.begin_step(step.layout)
        try:
            hidden = self.model.forward(step.input_ids, step.positions, step.meta, self.kv_caches)
        finally:
            self.model.experts.end_step()
        for observer in self._observers:
            observer.end_step()
        return hidden

    def _sample(self, step: PreparedStep, hidden: torch.Tensor, masks: TokenMasks | None) -> StepResult:
        """A token (and logprob) per sampling sequence, or why it got none (a matcher that failed
        fails its sequence alone)."""
        seqs = step.sampling_seqs
        if not seqs:
            return StepResult()
        logits = self.model.logits(hidden[torch.tensor(step.logit_rows, device=self.model.device)])
        sampled: SamplerOutput = self.sampler(
            logits,
            [s.request.sampling for s in seqs],
            [s.prompt_token_ids for s in seqs],
            [s.output_token_ids for s in seqs],
            [self._generator(s) for s in seqs],
            self.eos_token_ids,
            masks,
        )
        result = StepResult()
        errors = sampled.errors if masks is None else [masks.errors.get(row, error)
                                                        for row, error in enumerate(sampled.errors)]
        for seq, token, logprob, error in zip(seqs, sampled.token_ids, sampled.logprobs, errors):
            if error is None:
                result.sampled[seq.seq_id] = (token, logprob)
            else:
                result.failed[seq.seq_id] = error
        return result
