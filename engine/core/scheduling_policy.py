"""Which requests get a step's prefill tokens, and how many: fcfs, priority or slo. No torch import.

fcfs and priority only order the waiting queue. `slo` is eMoE's task-aware policy and plans
the whole prefill share of a step:

- Order (`SloOrder.rank`): a request's slack is its TTFT deadline minus now minus its predicted
  time to first token (a step of its uncomputed tokens plus the expert loading its task causes).
  Requests that can still make their deadline (slack >= 0) go shortest predicted job first
  (prefill + expert loading + predicted output length x the per-token step cost: what its decode
  adds to each step it shares), which lowers mean latency; requests that can no longer make it are
  hopeless and go shortest first wherever they make none of the others late, else last, so they
  stop displacing the ones that still can. When shortest first would make some feasible requests late,
  the order keeps the most deadlines instead (Moore-Hodgson, `_most_on_time`: earliest deadline
  first, dropping the largest prefill whenever one would be late; plain least-slack-first met
  about as many deadlines as shortest first at a higher mean latency, docs/scheduling.md). Whether a
  request makes its deadline is priced at the pace prefill runs now: where the running requests'
  TPOT banks cap a step's prefill (`prefill_token_cap`), the tokens ahead of it and its own take as
  many capped steps beside the decodes as they need, not one full step (`PrefillPace`). A
  feasible request of the running batch's most common task goes first when its slack is within the
  expert traffic that switching tasks would cause; a starvation guard serves anything that waited
  too long before everything else.
- Size (`SloOrder.prefill_token_cap`): the mean time per output token of each running request is
  kept within its TPOT SLO. Its TPOT bank is what the SLO allows over its predicted output length
  minus the time already spent since its first token; spread over its remaining tokens it is the
  longest step it can afford. The step may take no longer than the smallest such step of the
  requests that can still meet both SLOs, which bounds the prefill tokens of the step
  (`SloOrder.prefill_budget`). When even MIN_PREFILL_CHUNK tokens would overrun a budget that a
  step of the decodes alone keeps, the step defers prefill altogether if no waiting request's TTFT
  deadline is lost by the delay (`SloOrder.defer_pays`); otherwise the cap is at least
  MIN_PREFILL_CHUNK and applies only when it pays (`SloOrder.cap_pays`): when the running requests
  a full step would push off their TPOT SLOs are at least as many as the waiting ones the capped
  steps would push past their TTFT deadlines. (Always capping lost to fcfs when steps are slow,
  and a floor-sized chunk beside a short tight-TPOT request made it miss: docs/scheduling.md.)
- Arrival guard (`SloOrder.arrival_token_cap`): whatever the plan, a step lasts at most
  ARRIVAL_GUARD_SHARE of the tightest TTFT SLO among the tasks that had a request arrive in the
  last ARRIVAL_GUARD_S, so a request of that task arriving during a step can still wait it out and
  get its first token from the next (a full 512-token step is longer than a sub-0.3 s SLO), unless
  the shorter steps would push a waiting request past its TTFT deadline.

The step-time model (`ServiceTimeModel`) is learned online from the engine's steps.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import Counter
from collections.abc import Sequence as SequenceT
from dataclasses import dataclass, field
from typing import Protocol

from moe_serve.engine.config import SchedulingPolicyName
from moe_serve.engine.core.sequence import Sequence
from moe_serve.engine.core.tasks import TaskTable

# a prefill never gets fewer tokens per step than this while TPOT banks are tight (it still progresses)
MIN_PREFILL_CHUNK = 16
# the share of a TPOT SLO the step plan aims at (the rest absorbs step-time noise)
TPOT_MARGIN = 0.9
# the step-time fit needs at least this spread of step sizes (tokens) before it re-fits the slope
MIN_TOKEN_SPREAD = 8.0
# a step lasts at most this share of the tightest TTFT SLO among the recently arrived tasks: a request of
# that task arriving during a step waits for it and then needs a step of its own (the arrival guard)
ARRIVAL_GUARD_SHARE = 0.5
# a task guards the step length for this long after its latest request arrived
ARRIVAL_GUARD_S = 30.0


class ExpertCostModel(Protocol):
    """Seconds of expert loading a request of `task` would cause given the cache's contents."""

    def load_seconds(self, task: str) -> float: ...


class NoExpertCost:
    """Cost model for engines that keep every expert resident."""

    def load_seconds(self, task: str) -> float:
        return 0.0


@dataclass
class ServiceTimeModel:
    """Step-time model learned online: seconds = base_s + token_s x tokens + experts_s x the share
    of a layer's experts the step's tokens route to (decodes and prefill chunks alike), an
    exponentially weighted least-squares fit over the recent steps (`memory`: the weight an
    observation keeps per later step).

    The expert term is what a step pays for reading its experts' weights: with `route_share` =
    top-k / experts, n tokens routed independently reach 1 - (1 - route_share)^n of them, so a
    step's cost rises steeply over its first tokens and by `token_s` a token after (a step of one
    decode reads a quarter of a top-4-of-16 model's experts, one of 16 tokens nearly all). Without
    `route_share` (or when the three-term fit is not all non-negative) the model is linear."""

    token_s: float = 1e-3
    base_s: float = 0.02
    experts_s: float = 0.0
    route_share: float | None = None
    memory: float = 0.97
    _gram: list[list[float]] = field(default_factory=lambda: [[0.0] * 3 for _ in range(3)], repr=False)
    _moments: list[float] = field(default_factory=lambda: [0.0] * 3, repr=False)

    def expert_share(self, num_tokens: int) -> float:
        """The expected share of a layer's experts a step of `num_tokens` tokens reads (0 without `route_share`)."""
        return 0.0 if self.route_share is None else 1.0 - (1.0 - self.route_share) ** num_tokens

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        features = (1.0, float(num_tokens), self.expert_share(num_tokens))
        for i, row in enumerate(self._gram):
            for j in range(3):
                row[j] = row[j] * self.memory + features[i] * features[j]
            self._moments[i] = self._moments[i] * self.memory + features[i] * seconds
        gram, moments = self._gram, self._moments
        weight, mean_x = gram[0][0], gram[0][1] / gram[0][0]
        if gram[1][1] / weight - mean_x * mean_x > MIN_TOKEN_SPREAD ** 2:
            fit = _solve(gram, moments) if self.route_share is not None else None
            if fit is not None and min(fit) >= 0.0:
                self.base_s, self.token_s, self.experts_s = fit
                return
            linear = _solve([row[:2] for row in gram[:2]], moments[:2])
            self.token_s = max(0.0, linear[1]) if linear is not None else self.token_s
            self.experts_s = 0.0
        self.base_s = max(0.0, (moments[0] - self.token_s * gram[0][1] - self.experts_s * gram[0][2]) / weight)

    def step_s(self, num_tokens: int) -> float:
        """Predicted seconds of a step computing `num_tokens` tokens."""
        return self.base_s + self.token_s * num_tokens + self.experts_s * self.expert_share(num_tokens)

    def first_token_s(self, num_prefill_tokens: int) -> float:
        """Predicted seconds until a prompt of `num_prefill_tokens` uncomputed tokens has its first token."""
        return self.step_s(num_prefill_tokens)

    def prefill_s(self, num_tokens: int, step_tokens: int, decodes: int = 0) -> float:
        """Predicted seconds of `num_tokens` prefill tokens run in full steps of `step_tokens`, each
        beside `decodes` decodes."""
        full, rest = divmod(num_tokens, step_tokens)
        return full * self.step_s(step_tokens + decodes) + (self.step_s(rest + decodes) if rest else 0.0)

    def tokens_within(self, seconds: float) -> int:
        """The most tokens a step can compute within `seconds` (-1 when not even an empty step fits).
        Needs `token_s` > 0 (else any number of tokens may fit)."""
        if self.step_s(0) > seconds:
            return -1
        low, high = 0, int((seconds - self.base_s) / self.token_s) + 1  # step_s(high) > seconds
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if self.step_s(middle) <= seconds else (low, middle)
        return low


def _solve(matrix: list[list[float]], vector: list[float]) -> list[float] | None:
    """The solution of a small linear system by Gaussian elimination with partial pivoting (None:
    singular or nearly so)."""
    size = len(vector)
    rows = [list(map(float, matrix[i])) + [float(vector[i])] for i in range(size)]
    scale = max(abs(value) for row in rows for value in row[:size]) or 1.0
    for col in range(size):
        pivot = max(range(col, size), key=lambda r: abs(rows[r][col]))
        if abs(rows[pivot][col]) < 1e-12 * scale:
            return None
        rows[col], rows[pivot] = rows[pivot], rows[col]
        for r in range(col + 1, size):
            factor = rows[r][col] / rows[col][col]
            for c in range(col, size + 1):
                rows[r][c] -= factor * rows[col][c]
    solution = [0.0] * size
    for r in reversed(range(size)):
        solution[r] = (rows[r][size] - sum(rows[r][c] * solution[c] for c in range(r + 1, size))) / rows[r][r]
    return solution


@dataclass
class SloContext:
    """What the slo policy consults: SLO table, step-time model, expert cost, starvation bound."""

    tasks: TaskTable
    service: ServiceTimeModel
    expert_cost: ExpertCostModel
    starvation_s: float = 30.0


@dataclass(frozen=True)
class PrefillPace:
    """How fast waiting prompts get through, for the order's lateness test: steps of at most
    `tokens` prefill tokens beside `decodes` decodes (the running requests' TPOT cap)."""

    tokens: int
    decodes: int


class WaitingOrder(Protocol):
    """Ranks prefill candidates: the indices of `candidates` in the order they get prefill tokens."""

    def rank(self, candidates: SequenceT[Sequence], running: SequenceT[Sequence], now: float) -> list[int]: ...


class FcfsOrder:
    """Arrival order (preempted requests go back to the front)."""

    def rank(self, candidates: SequenceT[Sequence], running: SequenceT[Sequence], now: float) -> list[int]:
        return list(range(len(candidates)))


class PriorityOrder:
    """Lowest `priority` value first (vLLM's convention), then arrival."""

    def rank(self, candidates: SequenceT[Sequence], running: SequenceT[Sequence], now: float) -> list[int]:
        return sorted(range(len(candidates)),
                      key=lambda i: (candidates[i].request.priority, candidates[i].request.arrival_time))


class SloOrder:
    """Shortest job first over requests that can still meet their TTFT SLO, prefill capped by the
    running requests' TPOT banks; see the module doc."""

    def __init__(self, ctx: SloContext) -> None:
        self.ctx = ctx
        self._latest_arrival: dict[float, float] = {}  # TTFT SLO -> the latest arrival of a task with it

    def note_arrival(self, seq: Sequence) -> None:
        """Remembers that a request of `seq`'s task (its TTFT SLO) arrived, for the arrival guard."""
        ttft = self.ctx.tasks.get(seq.request.task).ttft_slo_s
        self._latest_arrival[ttft] = max(seq.request.arrival_time, self._latest_arrival.get(ttft, -math.inf))

    def arrival_token_cap(self, num_decodes: int, now: float) -> int | None:
        """The most prefill tokens a step beside `num_decodes` decodes may take so that it lasts at most
        ARRIVAL_GUARD_SHARE of the tightest TTFT SLO among the tasks with a request arrived in the last
        ARRIVAL_GUARD_S (at least MIN_PREFILL_CHUNK; None: no such task, or no per-token cost)."""
        recent = [ttft for ttft, at in self._latest_arrival.items() if now - at <= ARRIVAL_GUARD_S]
        if not recent or self.ctx.service.token_s <= 0:
            return None
        return max(MIN_PREFILL_CHUNK, self.ctx.service.tokens_within(ARRIVAL_GUARD_SHARE * min(recent)) - num_decodes)

    def deadline(self, seq: Sequence) -> float:
        """When the request's TTFT SLO runs out (monotonic seconds)."""
        return seq.request.arrival_time + self.ctx.tasks.get(seq.request.task).ttft_slo_s

    def slack(self, seq: Sequence, now: float) -> float:
        service = self.ctx.service.first_token_s(seq.num_uncomputed_tokens)
        service += self.ctx.expert_cost.load_seconds(seq.request.task)
        return self.deadline(seq) - now - service

    def is_hopeless(self, seq: Sequence, now: float) -> bool:
        """Whether a request still waiting for its first token can no longer meet its TTFT SLO."""
        return not seq.output_token_ids and self.slack(seq, now) < 0

    def is_starving(self, seq: Sequence, now: float) -> bool:
        """Whether `seq` has waited past the starvation bound (it is then served before everything else)."""
        return now - seq.request.arrival_time > self.ctx.starvation_s

    def job_size(self, seq: Sequence) -> float:
        """Predicted seconds of work on the shared steps: prefill, expert loading and what the
        predicted decode tokens add to the steps they share (not whole steps: decodes are batched)."""
        service = self.ctx.service
        return (
            service.first_token_s(seq.num_uncomputed_tokens)
            + self.ctx.expert_cost.load_seconds(seq.request.task)
            + seq.predicted_output_len * service.token_s
        )

    def rank(self, candidates: SequenceT[Sequence], running: SequenceT[Sequence], now: float) -> list[int]:
        """Starving requests by arrival, then the ones that can still meet their TTFT SLO shortest
        job first with the hopeless ones slotted in where they delay none of them (`_slot_in`)."""
        if not candidates:
            return []
        pace = self._pace(running, now)
        starving = sorted((i for i, s in enumerate(candidates) if self.is_starving(s, now)),
                          key=lambda i: candidates[i].request.arrival_time)
        slacks = [self.slack(s, now) for s in candidates]
        sizes = [self.job_size(s) for s in candidates]
        first = set(starving)
        rest = [i for i in range(len(candidates)) if i not in first]
        hopeless = [i for i in rest if slacks[i] < 0 and not candidates[i].output_token_ids]
        lost = set(hopeless)
        by_size = sorted((i for i in rest if i not in lost),
                         key=lambda i: (sizes[i], candidates[i].request.arrival_time))
        on_time, late = self._most_on_time(by_size, candidates, now, pace)
        self._prefer_batch_task(on_time, candidates, running, slacks)
        hopeless.sort(key=lambda i: (sizes[i], candidates[i].request.arrival_time))
        return starving + self._slot_in(hopeless, on_time, candidates, sizes, now, pace) + late

    def _pace(self, running: SequenceT[Sequence], now: float) -> PrefillPace | None:
        """The pace prefill runs at while the running requests' TPOT banks cap it (None: uncapped)."""
        decodes = sum(1 for seq in running if seq.num_uncomputed_tokens == 1)
        cap = self.prefill_token_cap(running, decodes, now)
        return None if cap is None else PrefillPace(max(cap, MIN_PREFILL_CHUNK), decodes)

    def _prefill_s(self, tokens: int, pace: PrefillPace | None) -> float:
        """Predicted seconds until `tokens` prefill tokens (a request's own and those ahead of it) are
        computed: one step, or at `pace` as many capped steps beside its decodes as they take."""
        service = self.ctx.service
        if pace is None or tokens <= pace.tokens:
            return service.first_token_s(tokens)
        return service.prefill_s(tokens, pace.tokens, pace.decodes)

    def _slot_in(self, hopeless: list[int], on_time: list[int], candidates: SequenceT[Sequence], sizes: list[float],
                 now: float, pace: PrefillPace | None) -> list[int]:
        """`on_time` with each of `hopeless` (shortest first) moved ahead of the longer jobs of it
        where that keeps every `on_time` request in time; the rest after them. One pass: a request
        of `on_time` tolerates `_tolerance` more prefill tokens ahead of it, each slotted-in request
        spends its tokens from the tolerance of every one after it, and later ones only go further back."""
        totals = itertools.accumulate(candidates[i].num_uncomputed_tokens for i in on_time)
        tolerance = [self._tolerance(candidates[i], total, now, pace) for i, total in zip(on_time, totals, strict=True)]
        least_after = list(itertools.accumulate(reversed(tolerance), min, initial=math.inf))[::-1]
        order: list[int] = []
        j, spent = 0, 0  # on_time[:j] are placed; `spent`: the tokens slotted in ahead of on_time[j:]
        for h in hopeless:
            extra = candidates[h].num_uncomputed_tokens
            while j < len(on_time):
                i = on_time[j]
                if sizes[i] > sizes[h] and least_after[j] - spent >= extra:
                    break
                if tolerance[j] - spent < 0:  # late already where it stands: no later slot keeps it in time
                    order += on_time[j:]
                    j = len(on_time)
                    break
                order.append(i)
                j += 1
            order.append(h)
            spent += extra
        return order + on_time[j:]

    def _tolerance(self, seq: Sequence, tokens: int, now: float, pace: PrefillPace | None) -> float:
        """How many more prefill tokens may run before `seq`'s first token (after `tokens`, its own
        included) with its TTFT deadline still met: -1 when it is late already, inf when its step
        time does not grow with tokens."""
        if self._late(seq, tokens, now, pace):
            return -1
        service = self.ctx.service
        if service.token_s <= 0:
            return math.inf
        # the most extra tokens that keep it on time: lateness only grows with tokens, so bisect between
        # the one-step estimate (exact uncapped up to rounding) and a bound found by doubling
        time_left = self.deadline(seq) - now - self.ctx.expert_cost.load_seconds(seq.request.task)
        low, high = 0, max(1, service.tokens_within(time_left) - tokens + 1)
        while not self._late(seq, tokens + high, now, pace):
            low, high = high, 2 * high
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if not self._late(seq, tokens + middle, now, pace) else (low, middle)
        return low

    def _late(self, seq: Sequence, tokens: int, now: float, pace: PrefillPace | None) -> bool:
        """Whether `seq` misses its TTFT deadline when its first token comes after `tokens` prefill
        tokens (its own included) run from `now` at `pace`."""
        return now + self._prefill_s(tokens, pace) + self.ctx.expert_cost.load_seconds(seq.request.task) \
            > self.deadline(seq)

    def _all_on_time(self, order: list[int], candidates: SequenceT[Sequence], now: float,
                     pace: PrefillPace | None) -> bool:
        """Whether every request of `order` gets its first token by its deadline when their prefills
        run back to back in that order."""
        tokens = 0
        for i in order:
            tokens += candidates[i].num_uncomputed_tokens
            if self._late(candidates[i], tokens, now, pace):
                return False
        return True

    def _most_on_time(self, by_size: list[int], candidates: SequenceT[Sequence], now: float,
                      pace: PrefillPace | None) -> tuple[list[int], list[int]]:
        """Split `by_size` (feasible requests, shortest job first) into those that can all get their
        first token in time and the rest (Moore-Hodgson: earliest deadline first, dropping the largest
        prefill whenever one would be late, keeps the most deadlines). The kept ones stay shortest
        first when that still meets every kept deadline, else go earliest deadline first; the dropped
        ones follow, shortest first."""
        if self._all_on_time(by_size, candidates, now, pace):
            return by_size, []
        rank = {i: n for n, i in enumerate(by_size)}
        largest: list[tuple[int, int, int]] = []  # max-heap of the kept: (-prefill tokens, -rank, index)
        dropped: list[int] = []
        tokens = 0
        for i in sorted(by_size, key=lambda i: (self.deadline(candidates[i]), rank[i])):
            seq = candidates[i]
            heapq.heappush(largest, (-seq.num_uncomputed_tokens, -rank[i], i))
            tokens += seq.num_uncomputed_tokens
            if self._late(seq, tokens, now, pace):
                negative, _, index = heapq.heappop(largest)  # the largest; of equals, the later in `by_size`
                tokens += negative
                dropped.append(index)
        kept = sorted((i for _, _, i in largest), key=rank.__getitem__)
        if not self._all_on_time(kept, candidates, now, pace):
            kept.sort(key=lambda i: (self.deadline(candidates[i]), rank[i]))
        return kept, sorted(dropped, key=rank.__getitem__)

    def _prefer_batch_task(self, order: list[int], candidates: SequenceT[Sequence], running: SequenceT[Sequence],
                           slacks: list[float]) -> None:
        """Move to the front the least-slack request of the running batch's task when its slack is
        within the expert traffic that switching to the best request's task would cause."""
        batch_task = self._dominant_task(running)
        if not order or batch_task is None or candidates[order[0]].request.task == batch_task:
            return
        best = order[0]
        switch_cost = self.ctx.expert_cost.load_seconds(candidates[best].request.task)
        same_task = [i for i in order if candidates[i].request.task == batch_task
                     and slacks[i] - slacks[best] <= switch_cost]
        if same_task:
            chosen = min(same_task, key=lambda i: slacks[i])
            order.remove(chosen)
            order.insert(0, chosen)

    def tpot_step_budgets(self, running: SequenceT[Sequence], num_decodes: int, now: float) -> list[float]:
        """The longest step each running request that can still meet its TPOT SLO can afford: its
        TPOT bank (what its SLO allows over its predicted output length, less the time since its
        first token) spread over its remaining tokens. Requests not decoding, past their TTFT SLO,
        or whose TPOT SLO is lost whatever the plan (below a step of the `num_decodes` decodes
        alone) are left out."""
        budgets = []
        for seq in running:
            if seq.first_token_time is None or seq.num_uncomputed_tokens != 1 or seq.first_token_time > self.deadline(seq):
                continue
            tpot_slo = TPOT_MARGIN * self.ctx.tasks.get(seq.request.task).tpot_slo_s
            produced = len(seq.output_token_ids)
            remaining = max(1, seq.predicted_output_len - produced)
            per_step = (tpot_slo * (produced - 1 + remaining) - (now - seq.first_token_time)) / remaining
            if per_step >= self.ctx.service.step_s(max(1, num_decodes)):
                budgets.append(per_step)
        return budgets

    def step_budget_s(self, running: SequenceT[Sequence], num_decodes: int, now: float) -> float | None:
        """The longest step that keeps every running request that can still meet its TPOT SLO on
        track (the smallest of `tpot_step_budgets`; None: no bound)."""
        return min(self.tpot_step_budgets(running, num_decodes, now), default=None)

    def prefill_token_cap(self, running: SequenceT[Sequence], num_decodes: int, now: float) -> int | None:
        """The most prefill tokens this step may add to its `num_decodes` decodes within
        `step_budget_s` (None: no bound; 0 when the decodes alone fill it)."""
        budget = self.step_budget_s(running, num_decodes, now)
        service = self.ctx.service
        if budget is None or service.token_s <= 0:
            return None
        return max(0, service.tokens_within(budget) - num_decodes)

    def prefill_budget(self, running: SequenceT[Sequence], ranked: SequenceT[Sequence], num_decodes: int,
                       budget: int, now: float) -> int:
        """The prefill tokens this step hands out (of the step's remaining token `budget`) to the
        prefilling requests `ranked` in their order, beside its `num_decodes` decodes: 0 when
        deferring prefill pays (`defer_pays`), else the TPOT cap (at least MIN_PREFILL_CHUNK) when
        it pays (`cap_pays`), else all of `budget`; then at most the arrival guard's cap where that
        pushes none of `ranked` past its TTFT deadline."""
        planned = self._tpot_budget(running, ranked, num_decodes, budget, now)
        guard = self.arrival_token_cap(num_decodes, now)
        full = min(planned, sum(seq.num_uncomputed_tokens for seq in ranked))
        if guard is None or guard >= full:
            return planned
        return guard if self._ttft_misses(ranked, num_decodes, guard, full, 0.0, now) == 0 else planned

    def _tpot_budget(self, running: SequenceT[Sequence], ranked: SequenceT[Sequence], num_decodes: int,
                     budget: int, now: float) -> int:
        """`prefill_budget` before the arrival guard."""
        cap = self.prefill_token_cap(running, num_decodes, now)
        if not ranked or cap is None or cap >= budget:
            return budget
        if cap < MIN_PREFILL_CHUNK and self.defer_pays(running, ranked, num_decodes, budget, now):
            return 0
        cap = max(cap, MIN_PREFILL_CHUNK)
        if cap < budget and self.cap_pays(running, ranked, num_decodes, cap, budget, now):
            return cap
        return budget

    def defer_pays(self, running: SequenceT[Sequence], ranked: SequenceT[Sequence], num_decodes: int, budget: int,
                   now: float) -> bool:
        """Whether a step of the `num_decodes` decodes alone keeps a running request on its TPOT
        track that a step with MIN_PREFILL_CHUNK prefill tokens would not, while every request of
        `ranked` that gets its first token by its TTFT deadline at full steps from now still does
        one such step later, and none of them has waited past the starvation bound."""
        if any(self.is_starving(seq, now) for seq in ranked):
            return False
        service = self.ctx.service
        decodes_s, floor_s = service.step_s(num_decodes), service.step_s(num_decodes + MIN_PREFILL_CHUNK)
        if not any(decodes_s <= per_step < floor_s for per_step in self.tpot_step_budgets(running, num_decodes, now)):
            return False
        full = min(budget, sum(seq.num_uncomputed_tokens for seq in ranked))
        return self._ttft_misses(ranked, num_decodes, full, full, decodes_s, now) == 0

    def cap_pays(self, running: SequenceT[Sequence], ranked: SequenceT[Sequence], num_decodes: int, cap: int,
                 budget: int, now: float) -> bool:
        """Whether capping this step's prefill at `cap` tokens (instead of the full `budget`) keeps
        at least as many requests within their SLOs as it costs. It keeps the running requests whose
        step budget a full step would overrun (`tpot_step_budgets`); it costs the prefilling requests
        (`ranked`, in the order they get tokens) that would still get their first token by their
        TTFT deadline at full steps but no longer at capped ones (each step's prefill tokens handed
        out in that order, every step as long as this one)."""
        full = min(budget, sum(seq.num_uncomputed_tokens for seq in ranked))  # a full step's prefill tokens
        if full <= cap:
            return True
        full_step_s = self.ctx.service.step_s(num_decodes + full)
        kept = sum(per_step < full_step_s for per_step in self.tpot_step_budgets(running, num_decodes, now))
        return kept >= self._ttft_misses(ranked, num_decodes, cap, full, 0.0, now)

    def _ttft_misses(self, ranked: SequenceT[Sequence], num_decodes: int, cap: int, full: int, delay_s: float,
                     now: float) -> int:
        """How many of `ranked` meet their TTFT deadline at steps of `full` prefill tokens from now but
        not at steps of `cap` tokens starting `delay_s` later."""
        service = self.ctx.service
        full_step_s, capped_step_s = service.step_s(num_decodes + full), service.step_s(num_decodes + cap)
        misses, queued = 0, 0
        for seq in ranked:
            queued += seq.num_uncomputed_tokens
            if self.is_hopeless(seq, now):
                continue  # its deadline is lost either way (its tokens still go before the later ones)
            time_left = self.deadline(seq) - now - self.ctx.expert_cost.load_seconds(seq.request.task)
            in_time_full = math.ceil(queued / full) * full_step_s <= time_left
            in_time_capped = delay_s + math.ceil(queued / cap) * capped_step_s <= time_left
            misses += in_time_full and not in_time_capped
        return misses

    @staticmethod
    def _dominant_task(running: SequenceT[Sequence]) -> str | None:
        if not running:
            return None
        return Counter(s.request.task for s in running).most_common(1)[0][0]


def make_order(name: SchedulingPolicyName, ctx: SloContext) -> WaitingOrder:
    """The prefill order for a policy name."""
    if name is SchedulingPolicyName.FCFS:
        return FcfsOrder()
    if name is SchedulingPolicyName.PRIORITY:
        return PriorityOrder()
    return SloOrder(ctx)
