"""Continuous-batching scheduler with chunked prefill and preemption. No torch import.

Each step gets a token budget. Running sequences go first (decodes before prefill
chunks), each taking the KV blocks it needs; when blocks run out the most recently
admitted sequence is preempted (its blocks freed, recomputed later from its tokens).
Waiting sequences are then admitted in the order of the scheduling policy (fcfs,
priority or slo, see `engine.scheduling_policy`) while budget, sequence slots and
blocks last; a long prompt is split into chunks across steps. `expected_wait_s` turns the
queues and the measured step times into the wait a new request would see (Retry-After).
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from collections.abc import Sequence as SequenceT
from dataclasses import dataclass, field

from moe_serve.engine.config import DEFAULT_MAX_TASKS
from moe_serve.engine.core.block_manager import BlockManager
from moe_serve.engine.core.sampling_params import FinishReason
from moe_serve.engine.core.scheduling_policy import (
    NoExpertCost,
    SchedulingPolicyName,
    ServiceTimeModel,
    SloContext,
    WaitingOrder,
    make_order,
)
from moe_serve.engine.core.sequence import Sequence, SequenceStatus
from moe_serve.engine.core.tasks import OutputLengthEstimator, TaskTable, per_task_capacity
from moe_serve.engine.errors import QueueFullError


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one step and of the waiting queue."""

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_waiting: int = 256
    policy: SchedulingPolicyName = SchedulingPolicyName.FCFS
    reject_unattainable: bool = False
    max_tasks: int = DEFAULT_MAX_TASKS


@dataclass
class ScheduledSequence:
    """`num_new_tokens` tokens of `seq`, starting at its first uncomputed one, run this step."""

    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the sequence's last token, so a new token is sampled."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    """What one step runs, and which sequences were preempted to make room."""

    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Owns the waiting and running queues and the KV block budget."""

    def __init__(self, config: SchedulerConfig, blocks: BlockManager, slo: SloContext | None = None) -> None:
        self.config = config
        self.blocks = blocks
        self.slo = slo or SloContext(TaskTable.from_mapping({}), ServiceTimeModel(), NoExpertCost())
        self.order: WaitingOrder = make_order(config.policy, self.slo)
        self.lengths = OutputLengthEstimator(self.slo.tasks,
                                             max_tasks=per_task_capacity(self.slo.tasks, config.max_tasks))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; raises QueueFullError when the waiting queue is full, or
        (with reject_unattainable) when its TTFT SLO cannot be met even if served next."""
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"waiting queue is full ({self.config.max_waiting} requests)",
                                 retry_after_s=self.expected_wait_s(self.running, self.waiting))
        request = seq.request
        seq.predicted_output_len = self.lengths.predict(request.task, request.sampling.max_tokens)
        if self.config.reject_unattainable:
            ttft = self.slo.service.first_token_s(seq.num_tokens) + self.slo.expert_cost.load_seconds(request.task)
            ttft += sum(self.slo.service.first_token_s(s.num_uncomputed_tokens) for s in self.waiting)
            if ttft > self.slo.tasks.get(request.task).ttft_slo_s:
                raise QueueFullError(
                    f"the {request.task!r} TTFT SLO cannot be met under the current load "
                    f"(predicted {ttft:.2f} s)", retry_after_s=max(1.0, ttft),
                )
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def expected_wait_s(self, running: SequenceT[Sequence], waiting: SequenceT[Sequence]) -> float:
        """Seconds a request arriving now would wait before its own prefill starts, given these
        queues (copies: safe to call from another thread) and the measured step times.

        The larger of two waits: the prefill queued ahead of it (at the measured seconds per
        prefill token, plus one measured step per `max_num_batched_tokens` of it), and, when every
        sequence slot is taken, the decode steps until enough requests ahead of it finish (each
        request's predicted output length; a waiting request takes the first slot that frees).
        """
        service = self.slo.service
        queued = sum(seq.num_uncomputed_tokens for seq in waiting)
        queued += sum(n for seq in running if (n := seq.num_uncomputed_tokens) > 1)
        prefill_s = (queued * service.prefill_s_per_token
                     + math.ceil(queued / self.config.max_num_batched_tokens) * service.decode_s_per_step)
        slots = self.config.max_num_seqs
        must_finish = len(running) + len(waiting) + 1 - slots
        if must_finish <= 0:
            return prefill_s
        entering = deque(max(1, seq.predicted_output_len) for seq in waiting)
        finish_steps = [max(1, seq.predicted_output_len - len(seq.output_token_ids)) for seq in running]
        while len(finish_steps) < slots and entering:  # free slots fill at once
            finish_steps.append(entering.popleft())
        heapq.heapify(finish_steps)  # the step each occupant of a slot finishes at
        step = 0
        for _ in range(must_finish):
            step = heapq.heappop(finish_steps)
            if entering:
                heapq.heappush(finish_steps, step + entering.popleft())
        return max(prefill_s, step * service.decode_s_per_step)

    def expected_wait_by_task(self, running: SequenceT[Sequence], waiting: SequenceT[Sequence], now: float,
                              everyone_ahead_s: float) -> dict[str, float]:
        """`expected_wait_s` of a request of each task of the table arriving now, given
        `everyone_ahead_s` = `expected_wait_s(running, waiting)`. Under the slo policy only the
        waiting requests whose TTFT deadline comes first are counted ahead of it (the policy serves
        feasible requests by least slack); under fcfs and priority every one is."""
        tasks = self.slo.tasks
        if self.config.policy is not SchedulingPolicyName.SLO or not waiting:
            return {task: everyone_ahead_s for task in tasks.tasks}
        deadlines = [seq.request.arrival_time + tasks.get(seq.request.task).ttft_slo_s for seq in waiting]
        waits = {}
        for task, spec in tasks.tasks.items():
            ahead = [seq for seq, deadline in zip(waiting, deadlines, strict=True) if deadline <= now + spec.ttft_slo_s]
            waits[task] = everyone_ahead_s if len(ahead) == len(waiting) else self.expected_wait_s(running, ahead)
        return waits

    def schedule(self) -> SchedulerOutput:
        """Pick this step's work."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        # decodes (one token each) before prefill chunks, in admission order
        for seq in sorted(self.running, key=lambda s: s.num_uncomputed_tokens > 1):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self._make_room(seq, seq.num_computed_tokens + num_new, out):
                continue
            self.blocks.grow(seq.seq_id, seq.num_computed_tokens + num_new)
            out.scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
        if not out.preempted:
            budget = self._admit_waiting(budget, out)
        return out

    def _make_room(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> bool:
        """Preempt the newest running sequences until `seq` fits; False if `seq` itself was preempted."""
        while not self.blocks.can_grow(seq.seq_id, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            out.preempted.append(victim)
            out.scheduled = [s for s in out.scheduled if s.seq is not victim]
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _admit_waiting(self, budget: int, out: SchedulerOutput) -> int:
        now = time.monotonic()
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            index = self.order.pick(self.waiting, self.running, now)
            seq = self.waiting[index]
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self.blocks.can_grow(seq.seq_id, seq.num_computed_tokens + num_new):
                break
            del self.waiting[index]
            self.blocks.grow(seq.seq_id, seq.num_computed_tokens + num_new)
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            out.scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
        return budget

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> None:
        """Advance computed counts and append the tokens sampled this step."""
        for item in out.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
            token = sampled.get(item.seq.seq_id)
            if token is not None:
                item.seq.output_token_ids.append(token)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Retire a sequence (stop, length or abort) and free its blocks at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if reason is not FinishReason.ABORT:
            self.lengths.observe(seq.request.task, seq.predicted_output_len, len(seq.output_token_ids))
