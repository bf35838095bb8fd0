"""Which waiting request the scheduler admits next: fcfs, priority or slo. No torch import.

`slo` is eMoE's task-aware policy. A waiting request's slack is its TTFT deadline minus
now minus its predicted time to first token (prefill of its uncomputed tokens plus the
expert loading its task will cause). A request is urgent when it can still make its
deadline but not if a typical waiting job (the median predicted job size) were served
before it; urgent requests go first, least slack first. Everything else, including
requests already past saving, is served shortest predicted job first (prefill + predicted
output length x step time + expert loading), which is what lowers mean latency. When the
slack difference is smaller than the expert traffic a task switch would cause, a request
of the running batch's task wins; a starvation guard serves anything that has waited too
long before everything else.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence as SequenceT
from dataclasses import dataclass
from typing import Protocol

from moe_serve.engine.config import SchedulingPolicyName
from moe_serve.engine.core.sequence import Sequence
from moe_serve.engine.core.tasks import TaskTable

SLACK_TIE_S = 0.010


class ExpertCostModel(Protocol):
    """Seconds of expert loading a request of `task` would cause given the cache's contents."""

    def load_seconds(self, task: str) -> float: ...


class NoExpertCost:
    """Cost model for engines that keep every expert resident."""

    def load_seconds(self, task: str) -> float:
        return 0.0


@dataclass
class ServiceTimeModel:
    """Step-time model learned online: seconds = decode_s_per_step + prefill_s_per_token * prefill_tokens."""

    prefill_s_per_token: float = 1e-3
    decode_s_per_step: float = 0.02
    smoothing: float = 0.2

    def observe_step(self, num_prefill_tokens: int, seconds: float) -> None:
        a = self.smoothing
        if num_prefill_tokens == 0:
            self.decode_s_per_step += a * (seconds - self.decode_s_per_step)
        else:
            per_token = max(0.0, seconds - self.decode_s_per_step) / num_prefill_tokens
            self.prefill_s_per_token += a * (per_token - self.prefill_s_per_token)

    def first_token_s(self, num_prefill_tokens: int) -> float:
        return self.decode_s_per_step + self.prefill_s_per_token * num_prefill_tokens


@dataclass
class SloContext:
    """What the slo policy consults: SLO table, step-time model, expert cost, starvation bound."""

    tasks: TaskTable
    service: ServiceTimeModel
    expert_cost: ExpertCostModel
    starvation_s: float = 30.0


class WaitingOrder(Protocol):
    """Picks the index of the next waiting sequence to admit."""

    def pick(self, waiting: SequenceT[Sequence], running: SequenceT[Sequence], now: float) -> int: ...


class FcfsOrder:
    """Arrival order (preempted requests go back to the front)."""

    def pick(self, waiting: SequenceT[Sequence], running: SequenceT[Sequence], now: float) -> int:
        return 0


class PriorityOrder:
    """Lowest `priority` value first (vLLM's convention), then arrival."""

    def pick(self, waiting: SequenceT[Sequence], running: SequenceT[Sequence], now: float) -> int:
        return min(range(len(waiting)), key=lambda i: (waiting[i].request.priority, waiting[i].request.arrival_time))


class SloOrder:
    """Least-slack-first over requests that can still meet their TTFT SLO; see the module doc."""

    def __init__(self, ctx: SloContext) -> None:
        self.ctx = ctx

    def slack(self, seq: Sequence, now: float) -> float:
        spec = self.ctx.tasks.get(seq.request.task)
        service = self.ctx.service.first_token_s(seq.num_uncomputed_tokens)
        service += self.ctx.expert_cost.load_seconds(seq.request.task)
        return seq.request.arrival_time + spec.ttft_slo_s - now - service

    def job_size(self, seq: Sequence) -> float:
        """Predicted seconds of work: prefill, expert loading and the predicted decode steps."""
        return (
            self.ctx.service.first_token_s(seq.num_uncomputed_tokens)
            + self.ctx.expert_cost.load_seconds(seq.request.task)
            + seq.predicted_output_len * self.ctx.service.decode_s_per_step
        )

    def pick(self, waiting: SequenceT[Sequence], running: SequenceT[Sequence], now: float) -> int:
        starving = [i for i, s in enumerate(waiting) if now - s.request.arrival_time > self.ctx.starvation_s]
        if starving:
            return min(starving, key=lambda i: waiting[i].request.arrival_time)
        slacks = [self.slack(s, now) for s in waiting]
        sizes = [self.job_size(s) for s in waiting]
        feasible = [i for i, sl in enumerate(slacks) if sl >= 0]
        typical = statistics.median(sizes)
        urgent = [i for i in feasible if slacks[i] < typical]
        if urgent:
            best = min(urgent, key=lambda i: (slacks[i], sizes[i]))
            near = [i for i in urgent if slacks[i] - slacks[best] <= SLACK_TIE_S]
            best = min(near, key=lambda i: sizes[i])
        else:
            best = min(range(len(waiting)), key=lambda i: (sizes[i], waiting[i].request.arrival_time))
        batch_task = self._dominant_task(running)
        if batch_task is None or waiting[best].request.task == batch_task:
            return best
        switch_cost = self.ctx.expert_cost.load_seconds(waiting[best].request.task)
        same_task = [i for i in feasible if waiting[i].request.task == batch_task
                     and slacks[i] - slacks[best] <= switch_cost]
        return min(same_task, key=lambda i: slacks[i]) if same_task else best

    @staticmethod
    def _dominant_task(running: SequenceT[Sequence]) -> str | None:
        if not running:
            return None
        return Counter(s.request.task for s in running).most_common(1)[0][0]


def make_order(name: SchedulingPolicyName, ctx: SloContext) -> WaitingOrder:
    """The waiting-queue order for a policy name."""
    if name is SchedulingPolicyName.FCFS:
        return FcfsOrder()
    if name is SchedulingPolicyName.PRIORITY:
        return PriorityOrder()
    return SloOrder(ctx)

