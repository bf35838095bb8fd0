"""The random-mix comparison of `slo` and `fcfs` (benchmarks/slo_workload.py --mixes) without a
model or a server: the real Scheduler on a simulated clock.

Each step takes base + per-token x the step's tokens (+-10% seeded noise) plus a fixed per-step
overhead for what runs between steps (snapshot, deliveries), the constants measured on the 2-core
development machine with the benchmark's checkpoint (hidden 512, 8 layers, 16 experts, top-4):
a decode step of 1-32 sequences took 8-19 ms, a 512-token prefill step 182 ms. The step-time model
learns from the simulated steps as it does from real ones. The mixes, arrivals, rate search and
attainment are those of the live benchmark; a run takes seconds, so scheduling ideas can be
compared over many seeds before the live benchmark measures the chosen one.

    python -m benchmarks.slo_simulate --mixes 10 --seeds 7 [--seeds 1,2,3] [--step-overhead-ms 20]
        [--step-base-ms 8 --step-token-ms 0.36] [--step-decode-ms 1.5] [--step-experts-ms 23] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from dataclasses import dataclass
from unittest import mock

from benchmarks.slo_workload import (
    OVERLOAD_FACTOR,
    IdleCosts,
    Task,
    draw_mix,
    find_rate,
    first_guess_rate,
    num_requests,
)
from moe_serve.engine.config import SchedulingPolicyName
from moe_serve.engine.core.block_manager import BlockManager
from moe_serve.engine.core.request import EngineRequest
from moe_serve.engine.core.sampling_params import FinishReason, SamplingParams
from moe_serve.engine.core.scheduler import Scheduler, SchedulerConfig
from moe_serve.engine.core.scheduling_policy import NoExpertCost, ServiceTimeModel, SloContext
from moe_serve.engine.core.sequence import Sequence
from moe_serve.engine.core.tasks import TaskTable
from moe_serve.engine.errors import QueueFullError

STEP_BASE_S = 0.008
STEP_TOKEN_S = 0.00036
STEP_OVERHEAD_S = 0.004
ROUTE_SHARE = 4 / 16  # the live benchmark's checkpoint: top-4 of 16 experts
NUM_KV_BLOCKS = 4096


@dataclass(frozen=True)
class StepCost:
    """Simulated seconds of a step: (base + per token x tokens + per decoding sequence x decodes
    + expert reads) +-10% noise, plus the time between steps. A decode's token costs `token_s +
    decode_s`: it reads its own context. Expert reads cost `experts_s` x the expected share of the
    experts the step's tokens route to, 1 - (1 - route_share)^tokens for tokens routed independently
    to a `route_share` (top-k / experts) of them: a step of one token reads a quarter of a top-4 of
    16 model's experts, one of 16 tokens nearly all, so a prefill split into more steps costs more."""

    base_s: float = STEP_BASE_S
    token_s: float = STEP_TOKEN_S
    overhead_s: float = STEP_OVERHEAD_S
    decode_s: float = 0.0
    experts_s: float = 0.0
    route_share: float = ROUTE_SHARE

    def idle(self) -> IdleCosts:
        """What the live benchmark would measure on this idle simulated server (the mixes' SLO floors)."""
        return IdleCosts(ttft_base_s=self.base_s + self.experts_s + self.overhead_s, ttft_token_s=self.token_s,
                         tpot_s=self.base_s + self.token_s + self.decode_s + self.experts_s * self.route_share
                         + self.overhead_s)

    def step_s(self, num_tokens: int, num_decodes: int, noise: float) -> float:
        """Seconds of a step of `num_tokens` tokens, `num_decodes` of them decodes, scaled by `noise`."""
        experts = self.experts_s * (1.0 - (1.0 - self.route_share) ** num_tokens)
        return (self.base_s + self.token_s * num_tokens + self.decode_s * num_decodes + experts) * noise + self.overhead_s


@dataclass(frozen=True)
class Outcome:
    task: str
    attained: bool
    e2e_s: float
    served: bool  # False: shed (429)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def simulate(mix: dict[str, Task], policy: str, rate: float, count: int, seed: int,
             cost: StepCost = StepCost()) -> list[Outcome]:
    """`count` Poisson arrivals at `rate`/s (the live benchmark's draw for `seed`) served by a
    default-sized scheduler (32 sequences, 512 tokens a step) under `policy`."""
    rng = random.Random(seed)
    names = rng.choices(list(mix), weights=[t.weight for t in mix.values()], k=count)
    arrivals, at = [], 0.0
    for name in names:
        at += rng.expovariate(rate)
        arrivals.append((at, name))
    clock, noise = _Clock(), random.Random(seed + 1)
    table = TaskTable.from_mapping({name: task.table_entry() for name, task in mix.items()})
    ctx = SloContext(table, ServiceTimeModel(route_share=cost.route_share), NoExpertCost())
    outcomes: dict[int, Outcome] = {}
    with mock.patch("moe_serve.engine.core.scheduler.time.monotonic", clock):
        scheduler = Scheduler(SchedulerConfig(policy=SchedulingPolicyName(policy)), BlockManager(NUM_KV_BLOCKS, 16), ctx)
        pending = 0
        while pending < len(arrivals) or scheduler.has_unfinished:
            while pending < len(arrivals) and arrivals[pending][0] <= clock.now:
                arrival, name = arrivals[pending]
                request = EngineRequest(str(pending), [1] * mix[name].prompt_len, SamplingParams(
                    max_tokens=mix[name].output_len, ignore_eos=True), task=name, arrival_time=arrival)
                try:
                    scheduler.add(Sequence(request))
                except QueueFullError:
                    outcomes[pending] = Outcome(name, False, clock.now - arrival, False)
                pending += 1
            out = scheduler.schedule()
            for item in out.shed:
                scheduler.finish(item.seq, FinishReason.ABORT)
                request = item.seq.request
                outcomes[int(request.request_id)] = Outcome(request.task, False, clock.now - request.arrival_time, False)
            if out.is_empty:
                clock.now = arrivals[pending][0] if pending < len(arrivals) else clock.now + 0.01
                continue
            seconds = cost.step_s(out.num_tokens, out.num_decodes, noise.uniform(0.9, 1.1))
            clock.now += seconds
            sampled = {item.seq.seq_id: 1 for item in out.scheduled if item.samples}
            scheduler.update(out, sampled)
            ctx.service.observe_step(out.num_tokens, seconds)
            for item in out.scheduled:
                seq = item.seq
                if seq.seq_id not in sampled:
                    continue
                seq.first_token_time = seq.first_token_time or clock.now
                if len(seq.output_token_ids) >= seq.request.sampling.max_tokens:
                    scheduler.finish(seq, FinishReason.LENGTH)
                    task = mix[seq.request.task]
                    ttft = seq.first_token_time - seq.request.arrival_time
                    tpot = (clock.now - seq.first_token_time) / max(1, len(seq.output_token_ids) - 1)
                    outcomes[int(seq.seq_id)] = Outcome(seq.request.task, ttft <= task.ttft_slo_s and
                                                        tpot <= task.tpot_slo_s, clock.now - seq.request.arrival_time,
                                                        True)
    return [outcomes[i] for i in range(len(arrivals))]


def attainment(outcomes: list[Outcome], task: str | None = None) -> float:
    mine = [o for o in outcomes if task is None or o.task == task]
    return sum(o.attained for o in mine) / len(mine) if mine else math.nan


def run_mix(mix: dict[str, Task], index: int, seconds: float, least: int, cost: StepCost = StepCost()) -> dict:
    """The live benchmark's procedure for one mix: find the fcfs 50-80% rate, then fcfs and slo at it and 1.5x."""
    probes: list[dict] = []
    fcfs_runs: dict[float, list[Outcome]] = {}  # a probe is the fcfs run at its rate

    def run(policy: str, rate: float) -> list[Outcome]:
        return simulate(mix, policy, rate, num_requests(rate, seconds, least), 1000 * index + 500, cost)

    def measure(rate: float) -> float:
        fcfs_runs[rate] = run("fcfs", rate)
        return attainment(fcfs_runs[rate])

    rate = find_rate(measure, first_guess_rate(mix, cost.idle()), 4, probes)
    tight = min(mix, key=lambda t: mix[t].ttft_slo_s)
    points = {}
    for label, factor in (("base", 1.0), ("overload", OVERLOAD_FACTOR)):
        runs = {"fcfs": fcfs_runs.get(rate * factor) or run("fcfs", rate * factor), "slo": run("slo", rate * factor)}
        count = len(runs["fcfs"])
        both = [i for i in range(count) if runs["fcfs"][i].served and runs["slo"][i].served]
        points[label] = {p: {"attainment": attainment(r), "tight_attainment": attainment(r, tight),
                             "paired_mean_e2e_s": statistics.mean(r[i].e2e_s for i in both) if both else math.nan,
                             "shed": sum(not o.served for o in r)} for p, r in runs.items()}
    return {"mix": index, "rate": rate, "probes": probes, "points": points}


def run_seed(seed: int, mixes: int, seconds: float, least: int, cost: StepCost = StepCost()) -> dict:
    master = random.Random(seed)
    results = [run_mix(draw_mix(random.Random(master.random()), cost.idle()), i, seconds, least, cost)
               for i in range(mixes)]
    base = [r["points"]["base"] for r in results]
    over = [r["points"]["overload"] for r in results]
    gains = [100 * (p["slo"]["attainment"] - p["fcfs"]["attainment"]) for p in base]
    return {
        "seed": seed, "mixes": results, "median_gain_points": statistics.median(gains), "worst_gain_points": min(gains),
        "median_paired_e2e_s": {p: statistics.median(b[p]["paired_mean_e2e_s"] for b in base) for p in ("fcfs", "slo")},
        "median_tight_overload": {p: statistics.median(o[p]["tight_attainment"] for o in over) for p in ("fcfs", "slo")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixes", type=int, default=10)
    parser.add_argument("--seeds", default="7", help="comma-separated seeds, one run of --mixes each")
    parser.add_argument("--seconds", type=float, default=12.0, help="seconds of arrivals per point")
    parser.add_argument("--requests", type=int, default=40, help="at least this many requests per point")
    parser.add_argument("--step-base-ms", type=float, default=1e3 * STEP_BASE_S, help="fixed cost of a step")
    parser.add_argument("--step-token-ms", type=float, default=1e3 * STEP_TOKEN_S, help="cost per token of a step")
    parser.add_argument("--step-overhead-ms", type=float, default=1e3 * STEP_OVERHEAD_S,
                        help="time between steps (outside the step-time noise)")
    parser.add_argument("--step-decode-ms", type=float, default=0.0,
                        help="extra cost per decoding sequence of a step (its own context)")
    parser.add_argument("--step-experts-ms", type=float, default=0.0,
                        help="cost of a step that reads every expert (scaled by the share its tokens route to)")
    parser.add_argument("--route-share", type=float, default=ROUTE_SHARE, help="top-k / experts of the model")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not 0 < args.route_share <= 1:
        parser.error(f"--route-share must be in (0, 1] (top-k / experts), got {args.route_share}")
    for flag in ("step_base_ms", "step_token_ms", "step_overhead_ms", "step_decode_ms", "step_experts_ms"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} is a cost and cannot be negative, got {getattr(args, flag)}")
    cost = StepCost(args.step_base_ms / 1e3, args.step_token_ms / 1e3, args.step_overhead_ms / 1e3,
                    args.step_decode_ms / 1e3, args.step_experts_ms / 1e3, args.route_share)
    reports = [run_seed(int(s), args.mixes, args.seconds, args.requests, cost)
               for s in args.seeds.split(",")]
    if args.json:
        print(json.dumps(reports))
        return
    for r in reports:
        e2e, tight = r["median_paired_e2e_s"], r["median_tight_overload"]
        print(f"seed {r['seed']}: median gain {r['median_gain_points']:+.1f} points (worst mix "
              f"{r['worst_gain_points']:+.1f}); median paired mean e2e fcfs {e2e['fcfs']:.2f} s slo {e2e['slo']:.2f} s; "
              f"tightest task at 1.5x fcfs {tight['fcfs']:.1%} slo {tight['slo']:.1%}")
    if len(reports) > 1:
        print(across_seeds(reports))


def across_seeds(reports: list[dict]) -> str:
    """One line over several seeds' reports: the means of their per-seed figures (and the worst mix of all)."""
    def mean(key) -> float:
        return statistics.mean(key(r) for r in reports)

    return (f"over {len(reports)} seeds (means): median gain {mean(lambda r: r['median_gain_points']):+.1f} points, "
            f"worst mix {mean(lambda r: r['worst_gain_points']):+.1f} (lowest "
            f"{min(r['worst_gain_points'] for r in reports):+.1f}), median paired mean e2e slo - fcfs "
            f"{mean(lambda r: r['median_paired_e2e_s']['slo'] - r['median_paired_e2e_s']['fcfs']):+.3f} s, tightest "
            f"task at 1.5x fcfs {mean(lambda r: r['median_tight_overload']['fcfs']):.1%} "
            f"slo {mean(lambda r: r['median_tight_overload']['slo']):.1%}")


if __name__ == "__main__":
    main()
