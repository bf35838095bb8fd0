"""The slo policy against fcfs on random task mixes, on a simulated clock (benchmarks/slo_simulate.py):
deterministic (seeded arrivals and step-time noise), so a change that makes slo lose shows here."""

from __future__ import annotations

import random
import statistics

from benchmarks.slo_simulate import run_mix
from benchmarks.slo_workload import draw_mix


def test_slo_beats_fcfs_at_the_fcfs_50_to_80_percent_load_and_under_overload() -> None:
    master = random.Random(2)
    mixes = [draw_mix(random.Random(master.random())) for _ in range(3)]
    tightest_at_overload = []
    for index, mix in enumerate(mixes):
        points = run_mix(mix, index, seconds=6.0, least=30)["points"]
        base, overload = points["base"], points["overload"]
        assert base["slo"]["attainment"] >= base["fcfs"]["attainment"] + 0.1
        assert overload["slo"]["attainment"] >= overload["fcfs"]["attainment"]
        tightest_at_overload.append(overload["slo"]["tight_attainment"])
    assert statistics.median(tightest_at_overload) >= 0.5
