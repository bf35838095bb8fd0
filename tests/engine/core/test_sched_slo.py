"""The slo policy's step plan on a fake clock: the step-time fit, the TPOT cap on prefill, the
prefill order, and overload handling (shed on arrival, shed while waiting, demote) with its counters."""

from __future__ import annotations

import pytest

from moe_serve.engine.config import SchedulingPolicyName
from moe_serve.engine.core.block_manager import BlockManager
from moe_serve.engine.core.request import EngineRequest
from moe_serve.engine.core.sampling_params import FinishReason, SamplingParams
from moe_serve.engine.core.scheduler import OverloadDecision, Scheduler, SchedulerConfig
from moe_serve.engine.core.scheduling_policy import (
    ARRIVAL_GUARD_S,
    MIN_PREFILL_CHUNK,
    TPOT_MARGIN,
    NoExpertCost,
    ServiceTimeModel,
    SloContext,
)
from moe_serve.engine.core.sequence import Sequence
from moe_serve.engine.core.tasks import TaskTable
from moe_serve.engine.errors import QueueFullError

TASKS = TaskTable.from_mapping({
    "stream": {"ttft_slo_s": 5.0, "tpot_slo_s": 0.05, "output_len_prior": 11},
    "bulk": {"ttft_slo_s": 20.0, "tpot_slo_s": 1.0, "output_len_prior": 4},
    "tight": {"ttft_slo_s": 0.5, "tpot_slo_s": 1.0, "output_len_prior": 2, "overload": "shed"},
    "tight-demote": {"ttft_slo_s": 0.5, "tpot_slo_s": 1.0, "output_len_prior": 2},
})


class Clock:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 0.0
        monkeypatch.setattr("moe_serve.engine.core.scheduler.time.monotonic", lambda: self.now)


def make_scheduler(max_num_batched_tokens: int = 4096) -> Scheduler:
    # 10 ms per step plus 1 ms per token
    ctx = SloContext(TASKS, ServiceTimeModel(token_s=1e-3, base_s=0.01), NoExpertCost())
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=max_num_batched_tokens,
                             policy=SchedulingPolicyName.SLO)
    return Scheduler(config, BlockManager(1024, 16), ctx)


def seq(rid: str, task: str, prompt_len: int, arrival: float = 0.0) -> Sequence:
    return Sequence(EngineRequest(rid, [1] * prompt_len, SamplingParams(max_tokens=1000), task=task,
                                  arrival_time=arrival))


def decoding(scheduler: Scheduler, clock: Clock, rid: str, produced: int, since_first_s: float) -> Sequence:
    """A `stream` request that has produced `produced` tokens, the first `since_first_s` ago."""
    s = seq(rid, "stream", 4, arrival=clock.now)
    scheduler.add(s)
    out = scheduler.schedule()
    scheduler.update(out, {rid: 1})
    s.output_token_ids = [1] * produced
    s.num_computed_tokens = s.num_tokens - 1
    s.first_token_time = clock.now - since_first_s
    return s


def test_service_time_model_fits_the_step_base_and_the_cost_per_token() -> None:
    model = ServiceTimeModel()
    for tokens in [1, 4, 300, 16, 512, 2, 64] * 20:
        model.observe_step(tokens, 0.008 + 0.0004 * tokens)
    assert model.base_s == pytest.approx(0.008, rel=1e-6)
    assert model.token_s == pytest.approx(0.0004, rel=1e-6)
    assert model.step_s(100) == pytest.approx(0.048)


def test_service_time_model_keeps_the_slope_when_every_step_is_the_same_size() -> None:
    model = ServiceTimeModel(token_s=1e-3, base_s=0.02)
    for _ in range(50):
        model.observe_step(8, 0.030)
    assert model.token_s == 1e-3
    assert model.step_s(8) == pytest.approx(0.030)


def test_service_time_model_fits_the_expert_reads_of_small_steps() -> None:
    # top-4 of 16 experts: a step of n tokens reads 1 - (3/4)^n of them, 23 ms for all
    model = ServiceTimeModel(route_share=0.25)
    share = model.expert_share
    for tokens in [1, 4, 300, 16, 512, 2, 64, 8] * 20:
        model.observe_step(tokens, 0.004 + 0.00055 * tokens + 0.023 * share(tokens))
    assert (model.base_s, model.token_s, model.experts_s) == pytest.approx((0.004, 0.00055, 0.023), rel=1e-6)
    assert model.step_s(1) == pytest.approx(0.004 + 0.00055 + 0.023 / 4)
    linear = ServiceTimeModel()
    for tokens in [1, 4, 300, 16, 512, 2, 64, 8] * 20:
        linear.observe_step(tokens, 0.004 + 0.00055 * tokens + 0.023 * share(tokens))
    assert linear.experts_s == 0.0 and linear.step_s(1) > 2 * model.step_s(1)  # a line overprices one decode


def test_service_time_model_falls_back_to_a_line_when_the_expert_term_fits_negative() -> None:
    model = ServiceTimeModel(route_share=0.25)
    for tokens in [1, 4, 300, 16, 512, 2, 64, 8] * 20:
        model.observe_step(tokens, 0.030 + 0.0005 * tokens - 0.010 * model.expert_share(tokens))
    assert model.experts_s == 0.0 and model.token_s > 0 and model.base_s > 0


def test_tokens_within_and_prefill_seconds_invert_the_step_model() -> None:
    model = ServiceTimeModel(token_s=0.00055, base_s=0.004, experts_s=0.023, route_share=0.25)
    for seconds in (0.0, 0.004, 0.0099, 0.02, 0.05, 0.3):
        most = model.tokens_within(seconds)
        assert most == -1 if seconds < model.step_s(0) else model.step_s(most) <= seconds < model.step_s(most + 1)
    assert model.prefill_s(1100, 512) == pytest.approx(2 * model.step_s(512) + model.step_s(76))
    assert model.prefill_s(0, 512) == 0.0
    assert model.prefill_s(1100, 512, decodes=3) == pytest.approx(2 * model.step_s(515) + model.step_s(79))


def test_prefill_is_capped_so_a_running_request_keeps_its_tpot_slo(monkeypatch) -> None:
    clock = Clock(monkeypatch)
    scheduler = make_scheduler()
    clock.now = 10.0
    # 6 of 11 predicted tokens, the first 0.1 s ago: the SLO allows 0.045 x 10 intervals = 0.45 s,
    # 0.35 s are left for 5 steps: 70 ms a step, of which one decode takes 11 ms
    decoding(scheduler, clock, "r", produced=6, since_first_s=0.1)
    scheduler.add(seq("long", "bulk", 2000, arrival=clock.now))
    out = scheduler.schedule()
    chunks = {s.seq.seq_id: s.num_new_tokens for s in out.scheduled}
    per_step = (TPOT_MARGIN * 0.05 * 10 - 0.1) / 5
    assert chunks["r"] == 1
    assert chunks["long"] == pytest.approx((per_step - 0.011) / 1e-3, abs=1)  # ~59 tokens


def test_prefill_is_uncapped_without_decodes_and_past_a_hopeless_tpot(monkeypatch) -> None:
    clock = Clock(monkeypatch)
    scheduler = make_scheduler(max_num_batched_tokens=512)
    clock.now = 10.0
    scheduler.add(seq("long", "bulk", 2000, arrival=clock.now))
    assert scheduler.schedule().num_tokens == 512
    scheduler = make_scheduler(max_num_batched_tokens=512)
    decoding(scheduler, clock, "late", produced=6, since_first_s=5.0)  # 5 s for 5 intervals: lost already
    scheduler.add(seq("long", "bulk", 2000, arrival=clock.now))
    assert {s.seq.seq_id: s.num_new_tokens for s in scheduler.schedule().scheduled} == {"late": 1, "long": 511}


def test_a_tpot_lost_at_the_batch_decode_step_does_not_cap_prefill(monkeypatch) -> None:
    clock = Clock(monkeypatch)
    clock.now = 10.0
    # r's 12 ms a step fits one decode (11 ms) but not the four decodes now running (14 ms): it is
    # lost, so it neither caps nor defers the prefill (the other three lost their TPOT SLO already)
    scheduler = make_scheduler(max_num_batched_tokens=512)
    running = [decoding(scheduler, clock, "r", produced=6, since_first_s=0.39)]
    running += [decoding(scheduler, clock, f"late{i}", produced=6, since_first_s=5.0) for i in range(3)]
    for s in running:  # each later set-up step advanced the earlier ones too
        s.num_computed_tokens = s.num_tokens - 1
    scheduler.add(seq("long", "bulk", 2000, arrival=clock.now))
    assert {s.seq.seq_id: s.num_new_tokens for s in scheduler.schedule().scheduled}["long"] == 512 - 4


def test_a_recent_tight_arrival_keeps_steps_within_half_its_ttft_slo(monkeypatch) -> None:
    clock = Clock(monkeypatch)
    clock.now = 10.0
    scheduler = make_scheduler(max_num_batched_tokens=512)
    scheduler.add(seq("long", "bulk", 2000, arrival=clock.now))
    assert scheduler.order.arrival_token_cap(0, clock.now) == 9990  # bulk's 20 s SLO: 10 s steps
    scheduler.add(seq("tight", "tight-demote", 10, arrival=clock.now))
    # half of tight's 0.5 s: 10 ms + 240 tokens x 1 ms, so a tight request arriving during the step
    # still gets its first token from the next one in time; a full 512-token step would take 0.52 s
    assert scheduler.order.arrival_token_cap(0, clock.now) == 240
    assert {s.seq.seq_id: s.num_new_tokens for s in scheduler.schedule().scheduled} == {"tight": 10, "long": 230}
    # a task guards for ARRIVAL_GUARD_S after its latest arrival
    scheduler.add(seq("later-bulk", "bulk", 10, arrival=clock.now + 1.0))
    assert scheduler.order.arrival_token_cap(0, clock.now + ARRIVAL_GUARD_S) == 240
    assert scheduler.order.arrival_token_cap(0, clock.now + ARRIVAL_GUARD_S + 0.5) == 9990
    assert scheduler.order.arrival_token_cap(0, clock.now + ARRIVAL_GUARD_S + 1.5) is None


def test_a_request_shed_on_arrival_still_guards_the_steps(monkeypatch) -> None:
    Clock(monkeypatch)
    scheduler = make_scheduler()
    with pytest.raises(QueueFullError):
        scheduler.add(seq("too-long", "tight", 600))  # its own prefill (0.61 s) overruns its 0.5 s SLO
    assert scheduler.order.arrival_token_cap(0, 0.0) == 240  # its task is arriving


def test_the_arrival_guard_yields_to_a_waiting_requests_deadline(monkeypatch) -> None:
    clock = Clock(monkeypatch)
    clock.now = 10.0
    scheduler = make_scheduler(max_num_batched_tokens=512)
    scheduler.add(seq("tight", "tight-demote", 10, arrival=clock.now - 1.0))  # hopeless, but it guards the steps
    # 0.55 s left: one full step of both prompts (0.52 s) meets its deadline, three guarded ones (0.75 s) do not
    scheduler.add(seq("due", "stream", 500, arrival=clock.now - 4.45))
    assert {s.seq.seq_id: s.num_new_tokens for s in scheduler.schedule().scheduled} == {"due": 500, "tight": 10}


def test_a_spent_tpot_bank_defers_prefill_until_a_ttft_deadline_needs_it(monkeypatch) -> None:
    clock = Clock(monkeypatch)
    clock.now = 10.0
    # 12 ms a step left: a decode alone (11 ms) fits, a MIN_PREFILL_CHUNK chunk beside it (27 ms) does not
    scheduler = make_scheduler()
    decoding(scheduler, clock, "r", produced=6, since_first_s=0.39)
    scheduler.add(seq("long", "bulk", 2000, arrival=clock.now))  # 20 s to its deadline: it can wait a step
    assert {s.seq.seq_id: s.num_new_tokens for s in scheduler.schedule().scheduled} == {"r": 1}
    # 4000 prompt tokens 4.02 s before the deadline: one full step (4.011 s) meets it, one step later does not
    scheduler = make_scheduler()
    decoding(scheduler, clock, "r", produced=6, since_first_s=0.39)
    scheduler.add(seq("due", "stream", 4000, arrival=clock.now - 0.98))
    chunks = {s.seq.seq_id: s.num_new_tokens for s in scheduler.schedule().scheduled}
    assert chunks == {"r": 1, "due": MIN_PREFILL_CHUNK}  # the capped step keeps r; "due" is lost either way
    # a hopeless request misses no deadline by waiting, but one that waited past the starvation bound
    # is not deferred again
    scheduler = make_scheduler()
    decoding(scheduler, clock, "r", produced=6, since_first_s=0.39)
    scheduler.add(seq("starved", "stream", 2000, arrival=clock.now - 31.0))
    chunks = {s.seq.seq_id: s.num_new_tokens for s in scheduler.schedule().scheduled}
    assert chunks == {"r": 1, "starved": MIN_PREFILL_CHUNK}


def test_feasible_requests_are_prefilled_shortest_job_first_and_hopeless_ones_where_they_delay_none(monkeypatch) -> None:
    clock = Clock(monkeypatch)
    scheduler = make_scheduler(max_num_batched_tokens=64)
    clock.now = 1.0
    # "late" (hopeless) is the shortest job and delays no deadline; "late-long" would make "tight" late
    for s in (seq("bulk-long", "bulk", 300), seq("late", "stream", 10, arrival=-10.0), seq("bulk-short", "bulk", 50),
              seq("tight", "tight-demote", 300, arrival=0.95), seq("late-long", "stream", 250, arrival=-10.0)):
        scheduler.add(s)
    ranked = scheduler.order.rank(list(scheduler.waiting), scheduler.running, clock.now)
    assert [scheduler.waiting[i].seq_id for i in ranked] == ["late", "bulk-short", "tight", "late-long", "bulk-long"]
    out = scheduler.schedule()
    assert [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled] == [("late", 10), ("bulk-short", 50), ("tight", 4)]
    assert scheduler.overload_decisions == {("stream", OverloadDecision.DEMOTED): 2}


def test_a_task_that_sheds_refuses_a_request_whose_prefill_queue_overruns_its_ttft_slo(monkeypatch) -> None:
    Clock(monkeypatch)
    scheduler = make_scheduler()
    for i in range(4):
        scheduler.add(seq(f"r{i}", "tight", 100))  # r3 waits for 300 tokens: (300 + 100) x 1 ms + 10 ms
    with pytest.raises(QueueFullError, match="'tight' TTFT SLO cannot be met") as info:
        scheduler.add(seq("refused", "tight", 100))  # (400 + 100) x 1 ms + 10 ms > 0.5 s
    assert info.value.retry_after_s == pytest.approx(0.41)  # the four queued prompts
    scheduler.add(seq("short", "tight", 20))  # the shortest job: nothing goes before it
    scheduler.add(seq("demoted-later", "tight-demote", 100))  # its task does not shed
    assert scheduler.overload_decisions == {("tight", OverloadDecision.SHED_ON_ARRIVAL): 1}
    assert [s.seq_id for s in scheduler.waiting] == ["r0", "r1", "r2", "r3", "short", "demoted-later"]


def test_shed_on_arrival_reads_the_plan_not_shortest_first(monkeypatch) -> None:
    Clock(monkeypatch)
    scheduler = make_scheduler()
    for i in range(3):
        scheduler.add(seq(f"bulk{i}", "bulk", 150))  # shorter jobs, 20 s to their deadlines
    # shortest first would put 450 tokens ahead of it (0.76 s > 0.5 s); the plan serves it first (0.31 s)
    scheduler.add(seq("tight", "tight", 300))
    ranked = scheduler.order.rank(list(scheduler.waiting), scheduler.running, 0.0)
    assert scheduler.waiting[ranked[0]].seq_id == "tight"
    assert not scheduler.overload_decisions


def test_a_waiting_request_that_can_no_longer_make_it_is_shed_or_demoted(monkeypatch) -> None:
    clock = Clock(monkeypatch)
    scheduler = make_scheduler(max_num_batched_tokens=64)
    scheduler.add(seq("shed-me", "tight", 50, arrival=0.0))
    scheduler.add(seq("demote-me", "tight-demote", 50, arrival=0.0))
    scheduler.add(seq("fine", "bulk", 50, arrival=0.0))
    clock.now = 0.48  # 0.02 s to the tight deadlines, their prefill takes 0.06 s
    out = scheduler.schedule()
    assert [(s.seq.seq_id, type(s.error)) for s in out.shed] == [("shed-me", QueueFullError)]
    assert "shed-me" not in [s.seq_id for s in scheduler.waiting]
    # the demoted request is the smaller job (2 predicted output tokens to 4) and "fine" stays in time
    assert [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled] == [("demote-me", 50), ("fine", 14)]
    scheduler.finish(out.shed[0].seq, FinishReason.ABORT)  # what the engine does with it
    scheduler.update(out, {"demote-me": 1})
    scheduler.schedule()  # the demoted request is counted once
    assert scheduler.overload_decisions == {("tight", OverloadDecision.SHED_WAITING): 1,
                                            ("tight-demote", OverloadDecision.DEMOTED): 1}


def test_the_tpot_cap_is_dropped_when_it_costs_more_ttft_deadlines_than_it_saves(monkeypatch) -> None:
    clock = Clock(monkeypatch)
    clock.now = 10.0
    # a 12 ms step budget: the cap is MIN_PREFILL_CHUNK tokens a step (27 ms steps, ~590 prefill tokens/s)
    scheduler = make_scheduler()
    decoding(scheduler, clock, "r", produced=6, since_first_s=0.39)
    for i in range(4):  # 4000 tokens, 4.02 s to the deadlines: one full step (4.011 s) meets them all, a
        # step later (deferred) or capped none does
        scheduler.add(seq(f"w{i}", "stream", 1000, arrival=clock.now - 0.98))
    chunks = {s.seq.seq_id: s.num_new_tokens for s in scheduler.schedule().scheduled}
    assert chunks == {"r": 1, "w0": 1000, "w1": 1000, "w2": 1000, "w3": 1000}


def test_the_tpot_cap_holds_when_it_keeps_more_running_requests_than_it_costs_waiting_ones(monkeypatch) -> None:
    clock = Clock(monkeypatch)
    clock.now = 10.0
    scheduler = make_scheduler()
    for s in [decoding(scheduler, clock, rid, produced=6, since_first_s=0.0) for rid in ("r0", "r1")]:
        s.num_computed_tokens = s.num_tokens - 1  # r1's set-up step advanced r0
        s.first_token_time = clock.now - 0.38  # 14 ms a step left each: two decodes take 12 ms
    # one full step (1.012 s) meets w's deadline 1.02 s away, a deferred or a capped one does not: the
    # cap keeps two TPOT SLOs for one TTFT SLO
    scheduler.add(seq("w", "stream", 1000, arrival=clock.now - 3.98))
    chunks = {s.seq.seq_id: s.num_new_tokens for s in scheduler.schedule().scheduled}
    assert chunks == {"r0": 1, "r1": 1, "w": MIN_PREFILL_CHUNK}


def test_a_long_tight_prefill_goes_before_short_loose_ones_that_would_make_it_late(monkeypatch) -> None:
    clock = Clock(monkeypatch)
    scheduler = make_scheduler(max_num_batched_tokens=64)
    # shortest first would serve the three bulk prompts (0.1 s each) before tight-a, whose first token
    # (0.31 s alone) would then come at 0.61 s, past its 0.5 s deadline; only one of the tight pair fits
    for s in (seq("tight-a", "tight-demote", 300), seq("b0", "bulk", 100), seq("tight-b", "tight-demote", 300, arrival=0.01),
              seq("b1", "bulk", 100), seq("b2", "bulk", 100)):
        scheduler.add(s)
    ranked = scheduler.order.rank(list(scheduler.waiting), scheduler.running, clock.now)
    assert [scheduler.waiting[i].seq_id for i in ranked] == ["tight-a", "b0", "b1", "b2", "tight-b"]


def test_lateness_is_priced_at_the_pace_the_tpot_cap_allows(monkeypatch) -> None:
    clock = Clock(monkeypatch)
    scheduler = make_scheduler()
    clock.now = 10.0
    waiting = [seq("tight", "tight-demote", 250, arrival=clock.now), seq("b0", "bulk", 80, arrival=clock.now),
               seq("b1", "bulk", 80, arrival=clock.now)]
    # uncapped, the 410 tokens ahead of tight's first token take one 0.42 s step: shortest first keeps its 0.5 s SLO
    ranked = scheduler.order.rank(waiting, scheduler.running, clock.now)
    assert [waiting[i].seq_id for i in ranked] == ["b0", "b1", "tight"]
    # a decoding stream request affords 45 ms steps (34 prefill tokens beside its decode): the same 410 tokens take
    # 13 steps, 0.55 s, so tight goes first (its own 250 tokens: 8 steps, 0.34 s) and the loose ones still make it
    decoding(scheduler, clock, "r", produced=1, since_first_s=0.0)
    ranked = scheduler.order.rank(waiting, scheduler.running, clock.now)
    assert [waiting[i].seq_id for i in ranked] == ["tight", "b0", "b1"]


def test_shortest_job_first_stays_when_it_meets_every_deadline(monkeypatch) -> None:
    clock = Clock(monkeypatch)
    scheduler = make_scheduler(max_num_batched_tokens=64)
    for s in (seq("tight", "tight-demote", 200), seq("b0", "bulk", 100), seq("b1", "bulk", 50)):
        scheduler.add(s)
    ranked = scheduler.order.rank(list(scheduler.waiting), scheduler.running, clock.now)
    assert [scheduler.waiting[i].seq_id for i in ranked] == ["b1", "b0", "tight"]  # tight's first token at 0.36 s
