"""Scheduler policies, starvation guard, admission control and the length estimator (no torch)."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from moe_serve.engine.config import SchedulingPolicyName
from moe_serve.engine.core.block_manager import BlockManager
from moe_serve.engine.core.request import EngineRequest
from moe_serve.engine.core.sampling_params import FinishReason, SamplingParams
from moe_serve.engine.core.scheduler import OverloadDecision, Scheduler, SchedulerConfig
from moe_serve.engine.core.scheduling_policy import ServiceTimeModel, SloContext
from moe_serve.engine.core.sequence import Sequence
from moe_serve.engine.core.tasks import OutputLengthEstimator, TaskLru, TaskNames, TaskSpec, TaskTable
from moe_serve.engine.errors import QueueFullError

TASKS = TaskTable.from_mapping({
    "chat": {"ttft_slo_s": 1.0, "tpot_slo_s": 0.1, "output_len_prior": 64},
    "summarize": {"ttft_slo_s": 10.0, "tpot_slo_s": 0.2, "output_len_prior": 256},
    "classify": {"ttft_slo_s": 0.5, "tpot_slo_s": 0.1, "output_len_prior": 2, "prediction_sensitive": False},
})


class FixedCost:
    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds = seconds

    def load_seconds(self, task: str) -> float:
        return self.seconds.get(task, 0.0)


def make_scheduler(policy: SchedulingPolicyName, max_num_seqs: int = 1, cost: dict[str, float] | None = None,
                   **config) -> Scheduler:
    ctx = SloContext(TASKS, ServiceTimeModel(token_s=1e-3, base_s=0.01), FixedCost(cost or {}))
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=4096, policy=policy, **config),
                     BlockManager(1024, 16), ctx)


def seq(rid: str, task: str = "default", prompt_len: int = 10, arrival: float = 0.0, priority: int = 0,
        max_tokens: int = 1000) -> Sequence:
    return Sequence(EngineRequest(rid, [1] * prompt_len, SamplingParams(max_tokens=max_tokens), task=task,
                                  priority=priority, arrival_time=arrival))


def admitted_order(scheduler: Scheduler, seqs: list[Sequence], monkeypatch, now: float) -> list[str]:
    monkeypatch.setattr("moe_serve.engine.core.scheduler.time.monotonic", lambda: now)
    for s in seqs:
        scheduler.add(s)
    order = []
    while scheduler.waiting:
        out = scheduler.schedule()
        order += [s.seq.seq_id for s in out.scheduled if s.seq.num_computed_tokens == 0]
        scheduler.update(out, {})
        for s in list(scheduler.running):
            scheduler.finish(s, FinishReason.STOP)
    return order


def test_scheduler_and_policies_import_no_torch() -> None:
    code = "import sys, moe_serve.engine.core.scheduler, moe_serve.cache_policies; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[3])


def test_fcfs_admits_in_arrival_order(monkeypatch) -> None:
    seqs = [seq("a", arrival=0.0), seq("b", "chat", arrival=0.1), seq("c", arrival=0.2)]
    assert admitted_order(make_scheduler(SchedulingPolicyName.FCFS), seqs, monkeypatch, 0.3) == ["a", "b", "c"]


def test_priority_admits_lowest_value_first_then_arrival(monkeypatch) -> None:
    seqs = [seq("a", priority=5, arrival=0.0), seq("b", priority=-1, arrival=0.1), seq("c", priority=5, arrival=0.05)]
    assert admitted_order(make_scheduler(SchedulingPolicyName.PRIORITY), seqs, monkeypatch, 0.3) == ["b", "a", "c"]


def test_slo_serves_feasible_requests_shortest_job_first(monkeypatch) -> None:
    seqs = [seq("sum", "summarize", arrival=0.0), seq("chat", "chat", arrival=0.1), seq("cls", "classify", arrival=0.2)]
    order = admitted_order(make_scheduler(SchedulingPolicyName.SLO), seqs, monkeypatch, 0.25)
    assert order == ["cls", "chat", "sum"]


def test_slo_slots_hopeless_requests_in_shortest_job_first_where_they_make_no_feasible_one_late(monkeypatch) -> None:
    # the summary has plenty of slack (not urgent), the chats already missed their TTFT SLO; the short
    # chat (10 prompt tokens, 64 predicted output tokens) is a smaller job than the summary (256) and
    # going first leaves the summary in time; the long chat (500 prompt tokens) is the largest job
    seqs = [seq("late-long", "chat", prompt_len=500, arrival=0.0), seq("relaxed-summary", "summarize", arrival=4.0),
            seq("late-short", "chat", arrival=0.0)]
    scheduler = make_scheduler(SchedulingPolicyName.SLO)
    order = admitted_order(scheduler, seqs, monkeypatch, 5.0)
    assert order == ["late-short", "relaxed-summary", "late-long"]
    assert scheduler.overload_decisions == {("chat", OverloadDecision.DEMOTED): 2}


def test_slo_serves_a_request_that_can_make_its_slo_before_shorter_hopeless_jobs(monkeypatch) -> None:
    # the chat can still make its TTFT SLO; the classify jobs are shorter but already hopeless
    seqs = [seq(f"cls{i}", "classify", prompt_len=400, arrival=0.0) for i in range(3)]
    seqs.append(seq("chat", "chat", arrival=4.4))
    order = admitted_order(make_scheduler(SchedulingPolicyName.SLO), seqs, monkeypatch, 5.0)
    assert order[0] == "chat"


def test_slo_counts_expert_loading_in_slack(monkeypatch) -> None:
    # "code" is the shorter job, but loading its experts (0.8 s) leaves it no way to make its 1 s
    # TTFT SLO: it is hopeless and goes after "a", which can still make its own
    table = TaskTable.from_mapping({"a": {"ttft_slo_s": 2.0, "output_len_prior": 200},
                                    "code": {"ttft_slo_s": 1.0, "output_len_prior": 1}})
    scheduler = make_scheduler(SchedulingPolicyName.SLO, cost={"a": 0.0, "code": 0.8})
    scheduler.slo.tasks = table
    scheduler.lengths = OutputLengthEstimator(table)
    seqs = [seq("code", "code", prompt_len=100, arrival=0.0), seq("a", "a", prompt_len=100, arrival=0.0)]
    order = admitted_order(scheduler, seqs, monkeypatch, 0.5)
    assert order == ["a", "code"]


def test_slo_batches_same_task_when_switching_costs_more_than_the_slack_gap(monkeypatch) -> None:
    table = TaskTable.from_mapping({"x": {"ttft_slo_s": 5.0}, "y": {"ttft_slo_s": 5.0}})
    scheduler = make_scheduler(SchedulingPolicyName.SLO, max_num_seqs=8, cost={"x": 1.0, "y": 1.0})
    scheduler.slo.tasks = table
    monkeypatch.setattr("moe_serve.engine.core.scheduler.time.monotonic", lambda: 1.0)
    scheduler.add(seq("x0", "x", arrival=0.0))
    scheduler.schedule()  # x0 is running
    scheduler.add(seq("y1", "y", arrival=0.2))
    scheduler.add(seq("x2", "x", arrival=0.4))
    ranked = scheduler.order.rank(scheduler.waiting, scheduler.running, 1.0)
    assert [scheduler.waiting[i].seq_id for i in ranked] == ["x2", "y1"]


def test_starvation_guard_serves_the_oldest_request_first(monkeypatch) -> None:
    scheduler = make_scheduler(SchedulingPolicyName.SLO)
    scheduler.slo.starvation_s = 20.0
    seqs = [seq("old-summary", "summarize", prompt_len=2000, arrival=0.0), seq("fresh-chat", "chat", arrival=29.9)]
    assert admitted_order(scheduler, seqs, monkeypatch, 30.0) == ["old-summary", "fresh-chat"]


def test_expected_wait_by_task_skips_hopeless_requests_under_slo() -> None:
    waiting = [seq("s1", "summarize", prompt_len=1000, arrival=0.0), seq("c1", "chat", prompt_len=100, arrival=0.0)]
    slo = make_scheduler(SchedulingPolicyName.SLO, max_num_seqs=8)
    # at 5 s the chat (1 s TTFT SLO) is hopeless: a new request goes before it
    waits = slo.expected_wait_by_task([], waiting, 5.0, slo.expected_wait_s([], waiting))
    assert waits == dict.fromkeys(TASKS.tasks, pytest.approx(slo.expected_wait_s([], waiting[:1])))
    fcfs = make_scheduler(SchedulingPolicyName.FCFS, max_num_seqs=8)
    everyone = fcfs.expected_wait_s([], waiting)
    assert set(fcfs.expected_wait_by_task([], waiting, 5.0, everyone).values()) == {everyone}


def test_bounded_waiting_queue_rejects_with_queue_full() -> None:
    scheduler = make_scheduler(SchedulingPolicyName.FCFS, max_waiting=2)
    scheduler.add(seq("a"))
    scheduler.add(seq("b"))
    with pytest.raises(QueueFullError) as info:
        scheduler.add(seq("c"))
    assert info.value.retry_after_s >= 1


def test_length_estimator_uses_prior_then_recent_median_capped_by_max_tokens() -> None:
    est = OutputLengthEstimator(TASKS, window=4, min_samples=3)
    assert est.predict("summarize", 1000) == 256
    assert est.predict("summarize", 100) == 100
    for actual in (10, 30, 20):
        est.observe("summarize", 256, actual)
    assert est.predict("summarize", 1000) == 20
    for actual in (100, 100, 100):
        est.observe("summarize", 20, actual)
    assert est.predict("summarize", 1000) == 100  # window of 4 forgot the early ones
    assert est.mean_abs_error == pytest.approx((246 + 226 + 236 + 80 + 80 + 80) / 6)
    assert est.predict("unknown-task", 1000) == TaskSpec().output_len_prior


def test_finished_requests_teach_the_estimator(monkeypatch) -> None:
    scheduler = make_scheduler(SchedulingPolicyName.SLO)
    s = seq("a", "chat")
    scheduler.add(s)
    scheduler.schedule()
    s.output_token_ids = [1] * 7
    scheduler.finish(s, FinishReason.STOP)
    assert scheduler.lengths.mean_abs_error == 64 - 7


def test_task_table_errors_name_task_and_field() -> None:
    with pytest.raises(ValueError, match="task 'chat', field ttft_slo_s"):
        TaskTable.from_mapping({"chat": {"ttft_slo_s": -1}})


def test_expected_wait_grows_with_the_queued_prefill() -> None:
    scheduler = make_scheduler(SchedulingPolicyName.FCFS, max_num_seqs=64)
    waits = [scheduler.expected_wait_s(scheduler.running, scheduler.waiting)]
    for i in range(5):
        scheduler.add(seq(f"w{i}", prompt_len=100))
        waits.append(scheduler.expected_wait_s(scheduler.running, scheduler.waiting))
    assert waits[0] == 0.0
    assert all(later > earlier for earlier, later in zip(waits, waits[1:]))
    # 500 queued prompt tokens at 1 ms each, in one 4096-token step of 10 ms
    assert waits[-1] == pytest.approx(500 * 1e-3 + 0.01)


def test_expected_wait_counts_decode_steps_until_a_sequence_slot_frees() -> None:
    scheduler = make_scheduler(SchedulingPolicyName.FCFS, max_num_seqs=1)
    running = seq("r", "chat")  # chat's output-length prior: 64 tokens
    scheduler.add(running)
    scheduler.schedule()
    running.num_computed_tokens = running.num_tokens
    running.output_token_ids = [1] * 5
    # a one-sequence decode step: 10 ms + 1 ms per token
    assert scheduler.expected_wait_s(scheduler.running, scheduler.waiting) == pytest.approx((64 - 5) * 0.011)
    scheduler.add(seq("w", "chat", prompt_len=10))
    # the waiting chat takes the slot after 59 steps and holds it for its predicted 64
    assert scheduler.expected_wait_s(scheduler.running, scheduler.waiting) == pytest.approx((59 + 64) * 0.011)


def test_queue_full_retry_after_is_the_expected_wait_and_grows_with_the_queue() -> None:
    retry_after = []
    for prompt_len in (100, 2000):
        scheduler = make_scheduler(SchedulingPolicyName.FCFS, max_num_seqs=64, max_waiting=3)
        for i in range(3):
            scheduler.add(seq(f"w{i}", prompt_len=prompt_len))
        with pytest.raises(QueueFullError) as info:
            scheduler.add(seq("rejected"))
        assert info.value.retry_after_s == scheduler.expected_wait_s(scheduler.running, scheduler.waiting)
        retry_after.append(info.value.retry_after_s)
    assert retry_after[1] > retry_after[0]
    assert retry_after[1] == pytest.approx(6000 * 1e-3 + 2 * 0.01)  # 6000 tokens: two 4096-token steps


def test_task_names_beyond_max_tasks_fold_into_default_and_are_counted() -> None:
    names = TaskNames(TASKS, max_tasks=6)  # 4 table names (default included): 2 others
    assert [names.fold(n) for n in ("x", "chat", "y", "z", "x", "classify", "w")] == \
        ["x", "chat", "y", "default", "x", "classify", "default"]
    assert names.num_folded == 2 and len(names) == 2


def test_a_task_name_idle_long_enough_gives_its_place() -> None:
    now = [0.0]
    names = TaskNames(TASKS, max_tasks=5, idle_s=60.0, clock=lambda: now[0])  # one name outside the table
    assert names.fold("a") == "a"
    now[0] = 59.0
    assert names.fold("b") == "default"
    assert names.fold("a") == "a"  # used again at 59 s
    now[0] = 120.0
    assert names.fold("b") == "b"
    assert names.fold("a") == "default" and names.num_folded == 2


def test_task_names_fold_safely_from_many_threads() -> None:
    names = TaskNames(TaskTable.from_mapping({}), max_tasks=17)
    folded: list[str] = []

    def client(offset: int) -> None:
        folded.extend(names.fold(f"t{offset}-{i}") for i in range(500))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    kept = [name for name in folded if name != "default"]
    assert len(names) == len(set(kept)) == len(kept) == 16
    assert names.num_folded == 8 * 500 - 16


def test_task_lru_drops_the_least_recently_used_name() -> None:
    lru: TaskLru[int] = TaskLru(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1  # b is now the oldest
    assert lru.get_or_add("c", lambda: 3) == 3
    assert "b" not in lru and "a" in lru and len(lru) == 2
    assert lru.get_or_add("a", lambda: 9) == 1


def test_length_estimator_keeps_at_most_max_tasks_histories() -> None:
    est = OutputLengthEstimator(TASKS, max_tasks=4)
    for i in range(1000):
        est.observe(f"task-{i}", 10, 20)
    assert est.num_tasks == 4
