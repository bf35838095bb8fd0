"""The synchronous engine: add requests, call step(), get RequestOutputs.

step() = scheduler.schedule() -> model_runner.execute() -> scheduler.update(); the requests
the scheduler shed end with their QueueFullError (a 429), and the output processor advances
each constrained request's grammar matcher, detokenizes and applies the stop rules (a request
whose grammar is complete stops). When every attention layer has a
sliding window, the KV blocks that slid out of it are freed after each step. `engine.async_engine` runs
this in its own thread for the server.

Faults: when the model step raises, every request of that step ends with an
EngineStepError (its KV blocks, queue entry and per-request state freed) and the engine
goes on; a request whose row alone failed (non-finite logits) ends the same way while the
rest of its batch continues. A device fault, or MAX_CONSECUTIVE_FAILED_STEPS failed steps
in a row, raises EngineFatalError: the engine cannot go on.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from moe_serve.engine.core.block_manager import BlockManager, kv_free_window
from moe_serve.engine.core.detokenizer import IncrementalDetokenizer
from moe_serve.engine.core.guided.compiler import GuidedCompiler
from moe_serve.engine.core.model_runner import ModelRunner, is_device_fault
from moe_serve.engine.core.request import EngineRequest, RequestOutput, check_context_length
from moe_serve.engine.core.sampling_params import FinishReason, TokenLogprob
from moe_serve.engine.core.scheduler import Scheduler, SchedulerOutput
from moe_serve.engine.core.sequence import Sequence
from moe_serve.engine.core.stats import EngineStats, ExpertCacheSnapshot, frozen
from moe_serve.engine.core.tasks import TaskNames
from moe_serve.engine.errors import (
    EngineError,
    EngineFatalError,
    EngineStepError,
    InvalidRequestError,
)

if TYPE_CHECKING:
    from moe_serve.engine.offload.expert_cache import ExpertCache

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_FAILED_STEPS = 3
# a step starting within this long after the previous one ended ran back to back with it: the
# step-time model is fed the whole cycle (scheduling, the model, the snapshot and deliveries after it)
BACK_TO_BACK_S = 0.02


def describe_exception(exc: BaseException) -> str:
    """`Type: first line of the message`, for one-line errors and logs."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


class Preloader(Protocol):
    """Starts loading a task's likely experts before its prefill (eMoE task preloading)."""

    def preload(self, task: str) -> int:
        """Start the copies; returns how many started."""
        ...


class Flushable(Protocol):
    """Buffers output that `flush` writes (routing trace files)."""

    def flush(self) -> object:
        ...


@dataclass
class _Tracked:
    seq: Sequence
    detok: IncrementalDetokenizer


class LLMEngine:
    """Scheduler + model runner + output processing, driven one step at a time."""

    def __init__(
        self,
        scheduler: Scheduler,
        runner: ModelRunner,
        tokenizer: Any,
        max_model_len: int,
        model_name: str,
        *,
        preloader: Preloader | None = None,
        trace_writer: Flushable | None = None,
        expert_cache: ExpertCache | None = None,
    ) -> None:
        """`preloader`: told each new request's task; `trace_writer`: flushed on close;
        `expert_cache`: the offloaded experts' device cache, whose counters the stats carry."""
        self.scheduler = scheduler
        self.runner = runner
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.model_name = model_name
        self.vocab_size = runner.model.spec.vocab_size
        # past this window (every layer slides) a sequence's old KV blocks are freed after each step
        self.kv_window = kv_free_window(runner.model.spec.layer_windows, runner.model.spec.num_layers)
        self.preloader = preloader
        self.trace_writer = trace_writer
        self._expert_cache = expert_cache
        self._tracked: dict[str, _Tracked] = {}
        self.guided = GuidedCompiler(tokenizer, self.vocab_size, runner.eos_token_ids)
        self.task_names = TaskNames(scheduler.slo.tasks, scheduler.config.max_tasks)
        self.num_failed_steps = 0
        self._consecutive_failed_steps = 0
        self._last_step_end: float | None = None

    @property
    def blocks(self) -> BlockManager:
        return self.scheduler.blocks

    def validate(self, request: EngineRequest) -> None:
        """Raise an InvalidRequestError for a request that can never be served (its own fields
        only: safe to call on another thread before `add_validated_request`); a grammar spec is
        compiled here (a GuidedCompileError when it cannot be) and cached for the add."""
        request.sampling.validate()
        if request.sampling.guided is not None:
            self.guided.compile(request.sampling.guided)
        num_prompt = len(request.prompt_token_ids)
        if num_prompt == 0:
            raise InvalidRequestError("the prompt is empty")
        if any(not 0 <= t < self.vocab_size for t in request.prompt_token_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.vocab_size})")
        check_context_length(self.max_model_len, num_prompt)  # one output token must fit

    def add_request(self, request: EngineRequest) -> None:
        """Validate and queue a request (raises EngineError subclasses)."""
        self.validate(request)
        self.add_validated_request(request)

    def add_validated_request(self, request: EngineRequest) -> None:
        """Queue a request `validate` accepted (raises InvalidRequestError for an id in use, and
        the scheduler's QueueFullError). Its task name is folded here (`TaskNames`), so every
        component sees the folded name."""
        if request.request_id in self._tracked:
            raise InvalidRequestError(f"duplicate request id {request.request_id!r}")
        guided = request.sampling.guided
        matcher = None if guided is None else self.guided.matcher(guided)
        request.task = self.task_names.fold(request.task)
        seq = Sequence(request, guided=matcher)
        self.scheduler.add(seq)
        self._tracked[request.request_id] = _Tracked(
            seq, IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, request.sampling,
                                         skip_special_tokens=request.sampling.skip_special_tokens)
        )
        if self.preloader is not None:
            self.preloader.preload(request.task)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks; None if it is unknown or already done."""
        tracked = self._tracked.get(request_id)
        if tracked is None:
            return None
        return self._finish(tracked, FinishReason.ABORT, [], "", None)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def close(self) -> None:
        """Flush what is buffered (routing trace files)."""
        if self.trace_writer is not None:
            self.trace_writer.flush()

    def stats(self) -> EngineStats:
        """A snapshot of the engine now (call on the thread that steps the engine)."""
        running, waiting = list(self.scheduler.running), list(self.scheduler.waiting)
        wait = self.scheduler.expected_wait_s(running, waiting)
        return EngineStats(
            num_running=len(running),
            num_waiting=len(waiting),
            kv_cache_usage=self.blocks.usage,
            num_preemptions=self.scheduler.num_preemptions,
            running_by_task=frozen(Counter(seq.request.task for seq in running)),
            waiting_by_task=frozen(Counter(seq.request.task for seq in waiting)),
            output_len_mean_abs_error=self.scheduler.lengths.mean_abs_error,
            expected_wait_s=wait,
            expected_wait_by_task=frozen(self.scheduler.expected_wait_by_task(running, waiting, time.monotonic(), wait)),
            num_task_names_folded=self.task_names.num_folded,
            overload_decisions=frozen({(task, decision.value): count for (task, decision), count
                                       in self.scheduler.overload_decisions.items()}),
            tasks=self.scheduler.slo.tasks,
            device=str(self.runner.model.device),
            expert_cache=None if self._expert_cache is None else ExpertCacheSnapshot.of(self._expert_cache),
        )

    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch and return every request's new output (a failed request's
        last output carries its error); raises EngineFatalError when the engine cannot go on."""
        started = time.monotonic()
        if self._last_step_end is not None and started - self._last_step_end < BACK_TO_BACK_S:
            started = self._last_step_end  # the time between steps (snapshots, deliveries) is part of a step
        out = self.scheduler.schedule()
        shed = [self._fail(self._tracked[item.seq.seq_id], item.error) for item in out.shed]
        if out.is_empty:
            return shed
        try:
            result = self.runner.execute(out, [self.blocks.table(s.seq.seq_id) for s in out.scheduled])
        except Exception as exc:  # noqa: BLE001 - the step's requests fail, the engine decides whether to go on
            return shed + self._fail_step(out, exc)
        self._consecutive_failed_steps = 0
        self.scheduler.update(out, {seq_id: token for seq_id, (token, _) in result.sampled.items()})
        if self.kv_window is not None:
            for item in out.scheduled:
                self.blocks.free_slid_out(item.seq.seq_id, item.seq.num_computed_tokens, self.kv_window)
        now = time.monotonic()
        self.scheduler.slo.service.observe_step(out.num_tokens, now - started)
        self._last_step_end = now
        outputs = shed + [self._fail(self._tracked[seq_id], EngineStepError(message))
                   for seq_id, message in result.failed.items()]
        for seq_id, (token, logprob) in result.sampled.items():
            tracked = self._tracked[seq_id]
            if tracked.seq.first_token_time is None:
                tracked.seq.first_token_time = now
            try:
                outputs.append(self._process(tracked, token, logprob))
            except Exception as exc:  # noqa: BLE001 - e.g. the tokenizer failing on this request's text
                logger.warning("request %s failed while processing its output: %s", seq_id, exc, exc_info=exc)
                outputs.append(self._fail(tracked, EngineStepError(
                    f"processing this request's output failed ({describe_exception(exc)})")))
        return outputs

    def _fail_step(self, out: SchedulerOutput, exc: Exception) -> list[RequestOutput]:
        """End every request of a step that raised `exc`, or raise EngineFatalError."""
        self.num_failed_steps += 1
        self._consecutive_failed_steps += 1
        what = describe_exception(exc)
        if is_device_fault(exc):
            raise EngineFatalError(f"the device failed during an engine step ({what})") from exc
        if self._consecutive_failed_steps >= MAX_CONSECUTIVE_FAILED_STEPS:
            raise EngineFatalError(
                f"{self._consecutive_failed_steps} engine steps in a row failed; the last with {what}") from exc
        logger.warning("an engine step failed (%s); failing its %d requests", what, len(out.scheduled),
                       exc_info=exc)
        self.runner.recover(exc)
        return [self._fail(self._tracked[item.seq.seq_id], EngineStepError(f"the engine step serving this request "
                                                                             f"failed ({what})"))
                for item in out.scheduled]

    def _fail(self, tracked: _Tracked, error: EngineError) -> RequestOutput:
        """End a request with `error`: freed like an abort, its last output carries the error."""
        output = self._finish(tracked, FinishReason.ABORT, [], "", None)
        output.error = error
        return output

    def _process(self, tracked: _Tracked, token: int, logprob: TokenLogprob | None) -> RequestOutput:
        seq, params = tracked.seq, tracked.seq.request.sampling
        if seq.guided is not None and not seq.guided.accept(token):
            return self._fail(tracked, EngineStepError(
                f"the sampled token {token} does not match the request's grammar ({seq.guided.error})"))
        logprobs = [logprob] if logprob is not None else None
        num_out = len(seq.output_token_ids)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= self.runner.eos_token_ids
        if token in stop_ids and num_out >= params.min_tokens:
            return self._finish(tracked, FinishReason.STOP, [token], tracked.detok.flush(), logprobs)
        delta = tracked.detok.add_tokens([token])
        if delta.stopped:
            return self._finish(tracked, FinishReason.STOP, [token], delta.text, logprobs)
        if seq.guided is not None and seq.guided.is_finished:
            return self._finish(tracked, FinishReason.STOP, [token], delta.text + tracked.detok.flush(), logprobs)
        if num_out >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return self._finish(tracked, FinishReason.LENGTH, [token], delta.text + tracked.detok.flush(), logprobs)
        return RequestOutput(
            request_id=seq.seq_id,
            new_token_ids=[token],
            new_text=delta.text,
            new_logprobs=logprobs,
            finished=False,
            finish_reason=None,
            num_prompt_tokens=len(seq.prompt_token_ids),
            num_output_tokens=num_out,
        )

    def _finish(
        self,
        tracked: _Tracked,
        reason: FinishReason,
        tokens: list[int],
        text: str,
        logprobs: list[TokenLogprob] | None,
    ) -> RequestOutput:
        seq = tracked.seq
        self.scheduler.finish(seq, reason)
        self.runner.forget(seq.seq_id, completed=reason is not FinishReason.ABORT)
        del self._tracked[seq.seq_id]
        return RequestOutput(
            request_id=seq.seq_id,
            new_token_ids=tokens,
            new_text=text,
            new_logprobs=logprobs,
            finished=True,
            finish_reason=reason,
            num_prompt_tokens=len(seq.prompt_token_ids),
            num_output_tokens=len(seq.output_token_ids),
            first_scheduled_time=seq.first_scheduled_time,
        )
