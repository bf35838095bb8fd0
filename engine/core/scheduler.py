"""Continuous-batching scheduler with chunked prefill and preemption. No torch import.

Each step gets a token budget. Running sequences go first (decodes before prefill
chunks), each taking the KV blocks it needs; when blocks run out the most recently
admitted sequence is preempted (its blocks freed, recomputed later from its tokens).
Under fcfs and priority, waiting sequences are then admitted in the policy's order while
budget, sequence slots and blocks last, and a long prompt is split into chunks across steps.

Under slo the prefill share of the step is planned (`engine.scheduling_policy`): it is capped
so that running requests keep their TPOT SLOs when that saves at least as many requests as the
TTFT deadlines it makes waiting ones miss (or deferred for a step when that misses none), and
handed out in the policy's order to the running and waiting requests still prefilling. A request
that can no longer meet its TTFT SLO is demoted (served only where it makes no request that still
can late) or, when its task says `shed`, refused:
on arrival when the prefill the plan would run ahead of it, and its own, overrun its SLO, or
while it waits (`SchedulerOutput.shed`, a 429 for the server); `overload_decisions` counts
each. `expected_wait_s` turns the queues and the measured step times into the wait a new
request would see (Retry-After).
"""

from __future__ import annotations

import enum
import heapq
import time
from collections import Counter, deque
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
    SloOrder,
    WaitingOrder,
    make_order,
)
from moe_serve.engine.core.sequence import Sequence, SequenceStatus
from moe_serve.engine.core.tasks import OutputLengthEstimator, OverloadAction, TaskTable, per_task_capacity
from moe_serve.engine.errors import QueueFullError


class OverloadDecision(str, enum.Enum):
    """What the slo policy did with a request that could not meet its TTFT SLO."""

    SHED_ON_ARRIVAL = "shed_on_arrival"
    SHED_WAITING = "shed_waiting"
    DEMOTED = "demoted"


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one step and of the waiting queue."""

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_waiting: int = 256
    policy: SchedulingPolicyName = SchedulingPolicyName.FCFS
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


@dataclass(frozen=True)
class ShedSequence:
    """A sequence refused while it waited: the engine ends it with `error` (a 429)."""

    seq: Sequence
    error: QueueFullError


@dataclass
class SchedulerOutput:
    """What one step runs, which sequences were preempted to make room and which were shed."""

    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    shed: list[ShedSequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def num_decodes(self) -> int:
        """Sequences computing one token (decodes; a prompt's last token alone counts too)."""
        return sum(s.num_new_tokens == 1 for s in self.scheduled)

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
        self.overload_decisions: Counter[tuple[str, OverloadDecision]] = Counter()
        self._demoted: set[str] = set()

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; raises QueueFullError when the waiting queue is full, or (slo
        policy, a task that sheds) when its TTFT SLO cannot be met under the current load."""
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"waiting queue is full ({self.config.max_waiting} requests)",
                                 retry_after_s=self.expected_wait_s(self.running, self.waiting))
        request = seq.request
        seq.predicted_output_len = self.lengths.predict(request.task, request.sampling.max_tokens)
        if isinstance(self.order, SloOrder):
            self.order.note_arrival(seq)  # a request shed below still says its task is arriving
            task = self.slo.tasks.get(request.task)
            if task.overload is OverloadAction.SHED:
                now = time.monotonic()
                ttft = self._least_ttft_s(self.order, seq, now)
                if ttft > task.ttft_slo_s:
                    self.overload_decisions[request.task, OverloadDecision.SHED_ON_ARRIVAL] += 1
                    raise QueueFullError(
                        f"the {request.task!r} TTFT SLO cannot be met under the current load "
                        f"(at least {ttft:.2f} s)", retry_after_s=self._feasible_wait_s(self.order, now))
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def expected_wait_s(self, running: SequenceT[Sequence], waiting: SequenceT[Sequence]) -> float:
        """Seconds a request arriving now would wait before its own prefill starts, given these
        queues (copies: safe to call from another thread) and the measured step times.

        The larger of two waits: the prefill queued ahead of it (at the measured seconds per
        token, plus one measured step per `max_num_batched_tokens` of it), and, when every
        sequence slot is taken, the decode steps of a full batch until enough requests ahead of it
        finish (each request's predicted output length; a waiting request takes the first slot
        that frees).
        """
        service = self.slo.service
        queued = sum(seq.num_uncomputed_tokens for seq in waiting)
        queued += sum(n for seq in running if (n := seq.num_uncomputed_tokens) > 1)
        prefill_s = service.prefill_s(queued, self.config.max_num_batched_tokens)
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
        return max(prefill_s, step * service.step_s(slots))

    def expected_wait_by_task(self, running: SequenceT[Sequence], waiting: SequenceT[Sequence], now: float,
                              everyone_ahead_s: float) -> dict[str, float]:
        """`expected_wait_s` of a request of each task of the table arriving now, given
        `everyone_ahead_s` = `expected_wait_s(running, waiting)`. Under the slo policy the waiting
        requests that can no longer meet their TTFT SLO are served after it and not counted;
        under fcfs and priority every one is."""
        tasks = self.slo.tasks
        if not isinstance(self.order, SloOrder) or not waiting:
            return {task: everyone_ahead_s for task in tasks.tasks}
        ahead = [seq for seq in waiting if not self.order.is_hopeless(seq, now)]
        wait = everyone_ahead_s if len(ahead) == len(waiting) else self.expected_wait_s(running, ahead)
        return {task: wait for task in tasks.tasks}

    def _feasible_wait_s(self, order: SloOrder, now: float) -> float:
        """The expected wait of a request arriving now under slo (Retry-After of a shed request):
        the waiting requests that can still meet their TTFT SLO go before it."""
        return self.expected_wait_s(self.running, [s for s in self.waiting if not order.is_hopeless(s, now)])

    def _least_ttft_s(self, order: SloOrder, seq: Sequence, now: float) -> float:
        """`seq`'s TTFT if it were ranked now with the requests still prefilling: its age, its own
        prefill and the prefill ranked ahead of it, at full steps."""
        candidates = self._prefilling() + [seq]
        tokens = 0
        for i in order.rank(candidates, self.running, now):
            tokens += candidates[i].num_uncomputed_tokens
            if candidates[i] is seq:
                break
        service = self.slo.service
        return (now - seq.request.arrival_time + service.prefill_s(tokens, self.config.max_num_batched_tokens)
                + self.slo.expert_cost.load_seconds(seq.request.task))

    def _prefilling(self) -> list[Sequence]:
        """Running sequences with prompt tokens left to compute, then the waiting ones."""
        return [s for s in self.running if s.num_uncomputed_tokens > 1] + list(self.waiting)

    def schedule(self) -> SchedulerOutput:
        """Pick this step's work."""
        out = SchedulerOutput()
        slo = self.order if isinstance(self.order, SloOrder) else None
        budget = self.config.max_num_batched_tokens
        # decodes (one token each) before prefill chunks, in admission order; under slo only decodes
        running = self.running if slo is None else [s for s in self.running if s.num_uncomputed_tokens == 1]
        for seq in sorted(running, key=lambda s: s.num_uncomputed_tokens > 1):
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
        if out.preempted:
            return out
        if slo is None:
            self._admit_waiting(budget, out)
        else:
            self._plan_prefill(slo, budget, out)
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

    def _admit_waiting(self, budget: int, out: SchedulerOutput) -> None:
        """fcfs / priority: admit waiting sequences in the policy's order until budget, slots or blocks run out."""
        now = time.monotonic()
        waiting = list(self.waiting)
        for index in self.order.rank(waiting, self.running, now):
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                break
            seq = waiting[index]
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self.blocks.can_grow(seq.seq_id, seq.num_computed_tokens + num_new):
                break
            self._start(seq)
            self.blocks.grow(seq.seq_id, seq.num_computed_tokens + num_new)
            out.scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new

    def _plan_prefill(self, slo: SloOrder, budget: int, out: SchedulerOutput) -> None:
        """slo: shed what can no longer make its TTFT SLO (tasks that shed), then hand the prefill
        budget, capped for the running requests' TPOT SLOs, to the prefilling requests in rank order."""
        now = time.monotonic()
        candidates = []
        for seq in self._prefilling():
            if not slo.is_hopeless(seq, now):
                candidates.append(seq)
            elif self.slo.tasks.get(seq.request.task).overload is OverloadAction.SHED:
                self._drop(seq)
                out.shed.append(ShedSequence(seq, QueueFullError(
                    f"the {seq.request.task!r} TTFT SLO can no longer be met under the current load",
                    retry_after_s=self._feasible_wait_s(slo, now))))
                self.overload_decisions[seq.request.task, OverloadDecision.SHED_WAITING] += 1
            else:
                candidates.append(seq)
                if seq.seq_id not in self._demoted:
                    self._demoted.add(seq.seq_id)
                    self.overload_decisions[seq.request.task, OverloadDecision.DEMOTED] += 1
        ranked = [candidates[i] for i in slo.rank(candidates, self.running, now)]
        budget = slo.prefill_budget(self.running, ranked, len(out.scheduled), budget, now)
        for seq in ranked:
            if budget <= 0:
                break
            waiting = seq.status is SequenceStatus.WAITING
            if waiting and len(self.running) >= self.config.max_num_seqs:
                continue
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self.blocks.can_grow(seq.seq_id, seq.num_computed_tokens + num_new):
                continue
            if waiting:
                self._start(seq)
            self.blocks.grow(seq.seq_id, seq.num_computed_tokens + num_new)
            out.scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new

    def _drop(self, seq: Sequence) -> None:
        """Take a shed sequence out of the queues and free its blocks (the engine then finishes it)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = FinishReason.ABORT

    def _start(self, seq: Sequence) -> None:
        """Move a waiting sequence to the running ones."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.RUNNING
        if seq.first_scheduled_time is None:
            seq.first_scheduled_time = time.monotonic()
        self.running.append(seq)

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> None:
        """Advance computed counts and append the tokens sampled this step."""
        for item in out.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
            token = sampled.get(item.seq.seq_id)
            if token is not None:
                item.seq.output_token_ids.append(token)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Retire a sequence (stop, length, abort or shed) and free its blocks at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.seq_id)
        self._demoted.discard(seq.seq_id)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if reason is not FinishReason.ABORT:
            self.lengths.observe(seq.request.task, seq.predicted_output_len, len(seq.output_token_ids))
