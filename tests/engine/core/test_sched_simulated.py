"""The slo policy against fcfs on random task mixes, on a simulated clock (benchmarks/slo_simulate.py):
deterministic (seeded arrivals and step-time noise), so a change that makes slo lose shows here."""

from __future__ import annotations

import random
import statistics

import pytest

from benchmarks.slo_simulate import StepCost, across_seeds, main, run_mix
from benchmarks.slo_workload import IdleCosts, draw_mix


def test_slo_beats_fcfs_at_the_fcfs_50_to_80_percent_load_and_under_overload() -> None:
    master = random.Random(2)
    mixes = [draw_mix(random.Random(master.random()), StepCost().idle()) for _ in range(3)]
    tightest_at_overload = []
    for index, mix in enumerate(mixes):
        points = run_mix(mix, index, seconds=6.0, least=30)["points"]
        base, overload = points["base"], points["overload"]
        assert base["slo"]["attainment"] >= base["fcfs"]["attainment"] + 0.1
        assert overload["slo"]["attainment"] >= overload["fcfs"]["attainment"]
        tightest_at_overload.append(overload["slo"]["tight_attainment"])
    assert statistics.median(tightest_at_overload) >= 0.5


def test_drawn_slos_are_feasible_on_the_idle_server_they_were_measured_on() -> None:
    idle = IdleCosts(ttft_base_s=0.05, ttft_token_s=0.002, tpot_s=0.04)  # a slow machine: the floors bind
    master = random.Random(3)
    tasks = [task for _ in range(50) for task in draw_mix(random.Random(master.random()), idle).values()]
    for task in tasks:
        assert task.ttft_slo_s >= 3 * idle.ttft_s(task.prompt_len) - 0.005  # SLOs are rounded to 10 ms
        assert task.tpot_slo_s >= 3 * idle.tpot_s - 0.0005
    assert any(task.ttft_slo_s < 0.005 + 3 * idle.ttft_s(task.prompt_len) for task in tasks)  # some sit on the floor


def test_simulated_expert_reads_make_a_split_prefill_cost_more_than_one_step() -> None:
    cost = StepCost(base_s=0.002, token_s=0.0005, overhead_s=0.0, experts_s=0.02)
    assert cost.step_s(1, 1, 1.0) == pytest.approx(0.002 + 0.0005 + 0.02 * cost.route_share)
    assert cost.step_s(128, 0, 1.0) == pytest.approx(0.002 + 0.064 + 0.02, rel=1e-6)  # every expert read
    assert 8 * cost.step_s(16, 0, 1.0) > cost.step_s(128, 0, 1.0) + 7 * 0.002 + 0.1
    assert cost.idle().tpot_s == pytest.approx(cost.step_s(1, 1, 1.0))


def test_the_across_seeds_line_averages_the_per_seed_figures() -> None:
    def report(gain: float, worst: float, fcfs_e2e: float, slo_e2e: float, tight: float) -> dict:
        return {"median_gain_points": gain, "worst_gain_points": worst,
                "median_paired_e2e_s": {"fcfs": fcfs_e2e, "slo": slo_e2e},
                "median_tight_overload": {"fcfs": 0.1, "slo": tight}}

    line = across_seeds([report(10.0, -4.0, 2.0, 1.5, 0.4), report(20.0, 2.0, 1.0, 1.1, 0.6)])
    assert line == ("over 2 seeds (means): median gain +15.0 points, worst mix -1.0 (lowest -4.0), median paired "
                    "mean e2e slo - fcfs -0.200 s, tightest task at 1.5x fcfs 10.0% slo 50.0%")


@pytest.mark.parametrize("argv", [["--step-token-ms", "-0.5"], ["--step-experts-ms", "-1"], ["--route-share", "1.5"]])
def test_a_negative_cost_or_a_route_share_outside_0_1_is_a_usage_error(monkeypatch, capsys, argv: list[str]) -> None:
    monkeypatch.setattr("sys.argv", ["slo_simulate", "--mixes", "1", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2 and argv[0] in capsys.readouterr().err
