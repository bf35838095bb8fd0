"""SLO attainment of the task-aware scheduler (`slo`) vs first-come-first-served (`fcfs`).

Starts the real server (one process per policy) on a random Mixtral-style checkpoint (hidden
512, 8 layers, 16 experts, top-4) that offloads half its experts, and streams seeded Poisson
arrivals of a task mix over HTTP, the task named in an `X-Task` header. A request attains its
SLO when both its TTFT and its mean time per output token are within its task's SLOs; a
refused request (429, the slo policy shedding it) or a failed one does not attain.

Fixed mix (chat, code, summarize, classify), `--max-num-seqs 4`, several rates: attainment,
mean end-to-end latency, p50/p99 TTFT and TPOT per task and the goodput (the highest rate with
>= 90% attainment):

    python -m benchmarks.slo_workload [--rates 2,3,4] [--requests 40] [--json]

Random mixes, default server settings: `--mixes N --seed S` draws N task tables (3-5 tasks;
prompt and output lengths, SLOs and weights from wide ranges; some tasks prediction-insensitive;
each task sheds or demotes), finds per mix the rate where fcfs attains 50-80% (bisection on a
log scale; a probe is an fcfs run of the point's arrivals at that rate, and the one that lands
in the band is the fcfs run of the point), then runs slo on the same arrivals (`--seconds` of
them, at least `--requests`) and both at 1.5x that rate. With `--repeats K` each point runs K
rounds, each on its own arrivals (round 0: the point's; round r: seed + r) and both policies on
the same ones, in alternating order (fcfs slo, slo fcfs, ...): the same arrivals served twice by
the same policy differ by up to 25 points at this load, so one round cannot separate the
policies on a mix. Attainment and latency are pooled over the rounds and each round is printed.
Reports per mix and the medians:

    python -m benchmarks.slo_workload --mixes 10 --seed 7 [--seconds 12] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from benchmarks.engine_vs_hf import make_checkpoint
from benchmarks.live_server import live_server
from moe_serve.engine.progress import progress


@dataclass(frozen=True)
class Task:
    prompt_len: int
    output_len: int
    ttft_slo_s: float
    tpot_slo_s: float
    weight: float = 1.0
    prediction_sensitive: bool = True
    overload: str = "demote"

    def table_entry(self) -> dict:
        return {"ttft_slo_s": self.ttft_slo_s, "tpot_slo_s": self.tpot_slo_s, "output_len_prior": self.output_len,
                "prediction_sensitive": self.prediction_sensitive, "overload": self.overload}


FIXED_MIX = {
    "chat": Task(48, 24, 1.0, 0.25, 0.35),
    "code": Task(96, 48, 2.0, 0.25, 0.2),
    "summarize": Task(384, 16, 6.0, 0.4, 0.15),
    "classify": Task(64, 2, 0.6, 0.5, 0.3),
}
MODEL_NAME = "slo-bench"
FIXED_FLAGS = ["--max-num-seqs", "4", "--max-num-batched-tokens", "256"]
OVERLOAD_FACTOR = 1.5
TARGET = (0.5, 0.8)  # the fcfs attainment band a mix is measured at
MAX_REQUESTS = 400  # per run of a random mix


@dataclass
class Result:
    task: str
    ttft: float
    tpot: float
    e2e: float
    status: int  # HTTP status (0: connection error)
    attained: bool


@dataclass(frozen=True)
class IdleCosts:
    """The served model's speed on an idle server, measured before any mix is drawn: a prompt's time
    to first token is about `ttft_base_s + ttft_token_s` x its tokens, and one stream decodes a token
    every `tpot_s`."""

    ttft_base_s: float
    ttft_token_s: float
    tpot_s: float

    def ttft_s(self, prompt_len: int) -> float:
        return self.ttft_base_s + self.ttft_token_s * prompt_len


IDLE_PROMPTS = (16, 512)  # prompt lengths the idle TTFT line is fitted through
IDLE_REPEATS = 3


def measure_idle(base: str) -> IdleCosts:
    """Time requests one at a time on an idle server: the median TTFT of `IDLE_REPEATS` prompts of
    each of `IDLE_PROMPTS` tokens (a line through the two) and the median TPOT of as many 64-token decodes."""
    async def timed(task: Task, seed: int) -> Result:
        async with httpx.AsyncClient(base_url=base, timeout=600) as client:
            return await one_request(client, "default", task, random.Random(seed))

    def median_of(task: Task, field: str) -> float:
        results = [asyncio.run(timed(task, seed)) for seed in range(IDLE_REPEATS)]
        if any(r.status != 200 for r in results):
            raise RuntimeError(f"idle request failed: {[r.status for r in results]}")
        return statistics.median(getattr(r, field) for r in results)

    short, long = (median_of(Task(n, 2, math.inf, math.inf), "ttft") for n in IDLE_PROMPTS)
    token_s = max(0.0, (long - short) / (IDLE_PROMPTS[1] - IDLE_PROMPTS[0]))
    return IdleCosts(ttft_base_s=max(0.0, short - token_s * IDLE_PROMPTS[0]), ttft_token_s=token_s,
                     tpot_s=median_of(Task(16, 64, math.inf, math.inf), "tpot"))


def draw_mix(rng: random.Random, idle: IdleCosts) -> dict[str, Task]:
    """3-5 tasks with log-uniform prompt/output lengths and SLOs; the TTFT SLO is at least three
    times what the prompt takes on the idle server and the TPOT SLO at least three times an idle
    stream's (so every task is feasible when idle, on the machine it runs on)."""
    def log_uniform(low: float, high: float) -> float:
        return math.exp(rng.uniform(math.log(low), math.log(high)))

    tasks = {}
    for i in range(rng.randint(3, 5)):
        prompt_len = round(log_uniform(8, 640))
        tasks[f"t{i}"] = Task(
            prompt_len=prompt_len, output_len=round(log_uniform(2, 128)),
            ttft_slo_s=round(max(log_uniform(0.25, 8.0), 3 * idle.ttft_s(prompt_len)), 2),
            tpot_slo_s=round(max(log_uniform(0.03, 0.5), 3 * idle.tpot_s), 3), weight=round(rng.uniform(0.5, 3.0), 2),
            prediction_sensitive=rng.random() > 0.3, overload=rng.choice(["shed", "demote"]))
    return tasks


async def one_request(client: httpx.AsyncClient, name: str, task: Task, rng: random.Random) -> Result:
    # logprobs: a chunk per token (the byte-level tokenizer holds back text of partial characters)
    body = {"model": MODEL_NAME, "prompt": [rng.randrange(10, 400) for _ in range(task.prompt_len)],
            "max_tokens": task.output_len, "temperature": 0, "ignore_eos": True, "stream": True, "logprobs": 0}
    start = time.perf_counter()
    first, count = None, 0
    try:
        async with client.stream("POST", "/v1/completions", json=body, headers={"X-Task": name}) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return Result(name, math.inf, math.inf, time.perf_counter() - start, resp.status_code, False)
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    logprobs = chunk["choices"][0].get("logprobs") if chunk.get("choices") else None
                    if logprobs and logprobs.get("tokens"):
                        count += len(logprobs["tokens"])
                        first = first or time.perf_counter()
    except httpx.HTTPError:
        return Result(name, math.inf, math.inf, time.perf_counter() - start, 0, False)
    end = time.perf_counter()
    first = first or end
    ttft, tpot = first - start, (end - first) / max(1, count - 1)
    return Result(name, ttft, tpot, end - start, 200, ttft <= task.ttft_slo_s and tpot <= task.tpot_slo_s)


async def run_arrivals(base: str, mix: dict[str, Task], rate: float, num_requests: int, seed: int,
                       grace_s: float | None = None) -> list[Result]:
    """`num_requests` Poisson arrivals at `rate`/s, tasks drawn by weight; the same seed gives the
    same arrivals. With `grace_s`, requests still unfinished that long after the last arrival are
    cut (closed, so the server aborts them): status -1, not attained."""
    rng = random.Random(seed)
    names = rng.choices(list(mix), weights=[t.weight for t in mix.values()], k=num_requests)
    gaps = [rng.expovariate(rate) for _ in range(num_requests)]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        pending, starts = [], []
        for name, gap in zip(names, gaps, strict=True):
            await asyncio.sleep(gap)
            starts.append(time.perf_counter())
            pending.append(asyncio.create_task(one_request(client, name, mix[name], random.Random(rng.random()))))
        await asyncio.wait(pending, timeout=grace_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        cut_at = time.perf_counter()
        return [task.result() if not task.cancelled() else Result(name, math.inf, math.inf, cut_at - start, -1, False)
                for task, name, start in zip(pending, names, starts, strict=True)]


def attainment(results: list[Result], task: str | None = None) -> float:
    mine = [r for r in results if task is None or r.task == task]
    return sum(r.attained for r in mine) / len(mine) if mine else float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def mean_or_nan(values: list[float]) -> float:
    return statistics.mean(values) if values else float("nan")


def write_tasks(path: Path, mix: dict[str, Task]) -> Path:
    path.write_text(yaml.safe_dump({"tasks": {name: task.table_entry() for name, task in mix.items()}}))
    return path


@contextlib.contextmanager
def servers(model: Path, tasks_file: Path, policies: list[str], flags: list[str]) -> Iterator[dict[str, str]]:
    """One warmed-up server per policy, all started before the first is used."""
    with contextlib.ExitStack() as stack:
        bases = {}
        for policy in policies:
            bases[policy] = stack.enter_context(live_server(model, [
                "--scheduling-policy", policy, "--tasks-file", str(tasks_file), "--expert-cache-fraction", "0.5",
                "--served-model-name", MODEL_NAME, *flags]))
        yield bases


def warm_up(base: str, mix: dict[str, Task]) -> None:
    asyncio.run(run_arrivals(base, mix, 2.0, 2 * len(mix), seed=99))


# -- fixed mix --------------------------------------------------------------------------------
def fixed_row(policy: str, rate: float, results: list[Result]) -> dict:
    row = {"policy": policy, "rate": rate, "attainment": attainment(results),
           "mean_e2e_s": statistics.mean(r.e2e for r in results), "errors": sum(r.status != 200 for r in results)}
    for task in FIXED_MIX:
        mine = [r for r in results if r.task == task and r.status == 200]
        row[task] = {"n": len(mine), "ttft_p50": percentile([r.ttft for r in mine], 0.5),
                     "ttft_p99": percentile([r.ttft for r in mine], 0.99),
                     "tpot_p50": percentile([r.tpot for r in mine], 0.5),
                     "tpot_p99": percentile([r.tpot for r in mine], 0.99)}
    return row


def run_fixed(args: argparse.Namespace, model: Path, tmp: Path) -> None:
    rows = []
    policies = args.policies.split(",")
    tasks_file = write_tasks(tmp / "tasks.yaml", FIXED_MIX)
    for policy in policies:
        with servers(model, tasks_file, [policy], FIXED_FLAGS) as bases:
            warm_up(bases[policy], FIXED_MIX)
            rates = [float(r) for r in args.rates.split(",")]
            for rate in progress(rates, show=not args.json, desc=f"{policy} rates"):
                results = asyncio.run(run_arrivals(bases[policy], FIXED_MIX, rate, args.requests, seed=1))
                rows.append(fixed_row(policy, rate, results))
    goodput = {p: max([r["rate"] for r in rows if r["policy"] == p and r["attainment"] >= 0.9], default=0.0)
               for p in policies}
    if args.json:
        print(json.dumps({"rows": rows, "goodput": goodput}))
        return
    print(f"{'policy':>6} {'rate/s':>6} {'attain':>7} {'mean e2e s':>10}  per task: TTFT p50/p99 s, TPOT p50/p99 s")
    for r in rows:
        per_task = "  ".join(f"{t}: {r[t]['ttft_p50']:.2f}/{r[t]['ttft_p99']:.2f} {r[t]['tpot_p50']:.3f}/"
                             f"{r[t]['tpot_p99']:.3f}" for t in FIXED_MIX)
        print(f"{r['policy']:>6} {r['rate']:>6} {r['attainment']:>7.1%} {r['mean_e2e_s']:>10.2f}  {per_task}")
    print("goodput (highest rate with >= 90% attainment):", ", ".join(f"{p} {g}/s" for p, g in goodput.items()))


# -- random mixes -----------------------------------------------------------------------------
def first_guess_rate(mix: dict[str, Task], idle: IdleCosts) -> float:
    """Arrivals per second that would keep this model busy about 70% of the time (a probe's
    starting point): the idle prefill cost per prompt token and ~1 ms per decoded token in a batch."""
    total = sum(t.weight for t in mix.values())
    work = sum(t.weight / total * (idle.ttft_token_s * t.prompt_len + 0.001 * t.output_len) for t in mix.values())
    return 0.7 / work


def num_requests(rate: float, seconds: float, least: int) -> int:
    """Requests for a run of about `seconds` of arrivals at `rate` (at least `least`, at most MAX_REQUESTS)."""
    return max(least, min(MAX_REQUESTS, round(rate * seconds)))


def find_rate(measure: Callable[[float], float], first: float, max_probes: int, log: list[dict]) -> float:
    """A rate where `measure(rate)` (fcfs attainment) is within TARGET: log-scale bisection from
    `first`; when no probe lands inside, the rate interpolated (attainment linear in log rate)
    between the closest probes on either side of the band's middle, else the closest probe."""
    low = high = None
    rate = first
    for _ in range(max_probes):
        value = measure(rate)
        log.append({"rate": rate, "fcfs_attainment": value})
        if TARGET[0] <= value <= TARGET[1]:
            return rate
        if value > TARGET[1]:
            low = rate
            rate = rate * 3 if high is None else math.sqrt(rate * high)
        else:
            high = rate
            rate = rate / 3 if low is None else math.sqrt(rate * low)
    middle = sum(TARGET) / 2
    above = [p for p in log if p["fcfs_attainment"] > middle]
    below = [p for p in log if p["fcfs_attainment"] < middle]
    if not above or not below:
        return min(log, key=lambda p: abs(p["fcfs_attainment"] - middle))["rate"]
    a = max(above, key=lambda p: p["rate"])
    b = min(below, key=lambda p: p["rate"])
    share = (a["fcfs_attainment"] - middle) / (a["fcfs_attainment"] - b["fcfs_attainment"])
    return math.exp(math.log(a["rate"]) + share * (math.log(b["rate"]) - math.log(a["rate"])))


def summarize_pair(mix: dict[str, Task], tight: str, runs: dict[str, list[Result]], rounds: int = 1) -> dict:
    """Both policies' figures at one point, pooled over `rounds` rounds of equally many requests (each
    policy's results in round order; request i of both policies had the same arrival)."""
    both_done = [i for i in range(len(runs["fcfs"])) if all(r[i].status == 200 for r in runs.values())]
    row = {}
    for policy, results in runs.items():
        done = [r for r in results if r.status == 200]
        size = len(results) // rounds
        row[policy] = {
            "attainment": attainment(results), "tight_attainment": attainment(results, tight),
            "round_attainment": [attainment(results[k * size:(k + 1) * size]) for k in range(rounds)],
            "mean_e2e_s": mean_or_nan([r.e2e for r in done]),
            "paired_mean_e2e_s": mean_or_nan([results[i].e2e for i in both_done]),
            "shed": sum(r.status == 429 for r in results), "cut": sum(r.status == -1 for r in results),
            "errors": sum(r.status not in (200, 429, -1) for r in results),
            "by_task": {t: attainment(results, t) for t in mix},
        }
    return row


def run_mixes(args: argparse.Namespace, model: Path, tmp: Path) -> None:
    with live_server(model, ["--expert-cache-fraction", "0.5", "--served-model-name", MODEL_NAME]) as base:
        warm_up(base, {"default": Task(64, 8, math.inf, math.inf)})
        idle = measure_idle(base)
    if not args.json:
        print(f"idle server: TTFT {1000 * idle.ttft_base_s:.1f} ms + {1000 * idle.ttft_token_s:.2f} ms per prompt token, "
              f"TPOT {1000 * idle.tpot_s:.1f} ms (the SLO floors: 3x these)")
    master = random.Random(args.seed)
    mixes = []
    for index in range(args.mixes):
        mix = draw_mix(random.Random(master.random()), idle)
        tight = min(mix, key=lambda t: mix[t].ttft_slo_s)
        tasks_file = write_tasks(tmp / f"tasks{index}.yaml", mix)
        started = time.perf_counter()
        with servers(model, tasks_file, ["fcfs", "slo"], []) as bases:
            for base in bases.values():
                warm_up(base, mix)
            probes: list[dict] = []
            seed = 1000 * index + 500
            fcfs_runs: dict[float, list[Result]] = {}  # a probe is the fcfs run at its rate

            def run(policy: str, rate: float, round_index: int = 0) -> list[Result]:
                count = num_requests(rate, args.seconds, args.requests)
                return asyncio.run(run_arrivals(bases[policy], mix, rate, count, seed=seed + round_index,
                                                grace_s=args.grace_seconds))

            def measure(rate: float) -> float:
                fcfs_runs[rate] = run("fcfs", rate)
                return attainment(fcfs_runs[rate])

            rate = find_rate(measure, first_guess_rate(mix, idle), args.probes, probes)
            points = {}
            for label, factor in (("base", 1.0), ("overload", OVERLOAD_FACTOR)):
                runs: dict[str, list[Result]] = {"fcfs": [], "slo": []}
                for round_index in range(args.repeats):
                    for policy in ("fcfs", "slo") if round_index % 2 == 0 else ("slo", "fcfs"):
                        probed = fcfs_runs.get(rate * factor) if policy == "fcfs" and round_index == 0 else None
                        runs[policy] += probed or run(policy, rate * factor, round_index)
                points[label] = summarize_pair(mix, tight, runs, args.repeats)
        mixes.append({"mix": index, "tasks": {n: t.table_entry() | {"prompt_len": t.prompt_len, "weight": t.weight}
                                              for n, t in mix.items()},
                      "tightest": tight, "rate": rate, "probes": probes, "points": points, "requests": {
                          label: num_requests(rate * f, args.seconds, args.requests)
                          for label, f in (("base", 1.0), ("overload", OVERLOAD_FACTOR))}, "repeats": args.repeats,
                      "seconds": time.perf_counter() - started})
        if not args.json:
            print_mix(mixes[-1])
    report = {"seed": args.seed, "requests": args.requests, "seconds": args.seconds, "repeats": args.repeats,
              "idle": idle.__dict__, "mixes": mixes,
              "medians": medians(mixes)}
    if args.json:
        print(json.dumps(report))
    else:
        print_medians(report)


def medians(mixes: list[dict]) -> dict:
    out = {}
    for label in ("base", "overload"):
        points = [m["points"][label] for m in mixes]
        out[label] = {f"{p}_{key}": statistics.median(pt[p][key] for pt in points)
                      for p in ("fcfs", "slo") for key in ("attainment", "tight_attainment", "mean_e2e_s",
                                                           "paired_mean_e2e_s", "shed")}
        gains = [pt["slo"]["attainment"] - pt["fcfs"]["attainment"] for pt in points]
        out[label]["gain_points"] = 100 * statistics.median(gains)
        out[label]["worst_gain_points"] = 100 * min(gains)
    return out


def print_mix(m: dict) -> None:
    tasks = ", ".join(f"{n}({t['prompt_len']}->{t['output_len_prior']}, ttft {t['ttft_slo_s']}s, tpot "
                      f"{t['tpot_slo_s']}s, w {t['weight']}, {t['overload']}"
                      f"{'' if t['prediction_sensitive'] else ', insensitive'})" for n, t in m["tasks"].items())
    probes = " ".join(f"{p['rate']:.2f}/s:{p['fcfs_attainment']:.0%}" for p in m["probes"])
    print(f"mix {m['mix']}: {tasks}; tightest {m['tightest']}; probes {probes}; {m['seconds']:.0f} s")
    for label, point in m["points"].items():
        f, s = point["fcfs"], point["slo"]
        rate = m["rate"] * (1 if label == "base" else OVERLOAD_FACTOR)
        print(f"  {label:>8} {rate:5.2f}/s n {m['requests'][label]:3d}  attain fcfs {f['attainment']:6.1%} slo {s['attainment']:6.1%} "
              f"({100 * (s['attainment'] - f['attainment']):+5.1f})  tightest {f['tight_attainment']:6.1%} / "
              f"{s['tight_attainment']:6.1%}  mean e2e {f['mean_e2e_s']:5.2f} / {s['mean_e2e_s']:5.2f} s "
              f"(paired {f['paired_mean_e2e_s']:5.2f} / {s['paired_mean_e2e_s']:5.2f})  shed {s['shed']}  cut {f['cut']}/{s['cut']}"
              f"  errors {f['errors']}/{s['errors']}")
        if len(f["round_attainment"]) > 1:
            print(f"           rounds fcfs {' '.join(f'{a:.1%}' for a in f['round_attainment'])}  slo "
                  f"{' '.join(f'{a:.1%}' for a in s['round_attainment'])}")


def print_medians(report: dict) -> None:
    print(f"seed {report['seed']}, {len(report['mixes'])} mixes, {report['seconds']:.0f} s of arrivals "
          f"(at least {report['requests']} requests) per point and round, {report['repeats']} round(s) per point")
    for label, med in report["medians"].items():
        print(f"  median at {label}: attainment fcfs {med['fcfs_attainment']:.1%} slo {med['slo_attainment']:.1%} "
              f"(gain {med['gain_points']:+.1f} points, worst mix {med['worst_gain_points']:+.1f}); tightest task "
              f"fcfs {med['fcfs_tight_attainment']:.1%} slo {med['slo_tight_attainment']:.1%}; mean e2e fcfs "
              f"{med['fcfs_mean_e2e_s']:.2f} s slo {med['slo_mean_e2e_s']:.2f} s (paired {med['fcfs_paired_mean_e2e_s']:.2f}"
              f" / {med['slo_paired_mean_e2e_s']:.2f}); slo shed {med['slo_shed']:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="2,3,4", help="fixed mix: arrivals per second")
    parser.add_argument("--requests", type=int, default=40,
                        help="requests per rate (with --mixes: at least this many per point)")
    parser.add_argument("--policies", default="fcfs,slo", help="fixed mix: policies to run")
    parser.add_argument("--mixes", type=int, default=0, help="random task mixes to run (0: the fixed mix)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the random mixes and their arrivals")
    parser.add_argument("--seconds", type=float, default=12.0, help="--mixes: seconds of arrivals per point")
    parser.add_argument("--grace-seconds", type=float, default=20.0,
                        help="--mixes: requests unfinished this long after the last arrival are cut (not attained)")
    parser.add_argument("--probes", type=int, default=4, help="rate-search probes per mix at most")
    parser.add_argument("--repeats", type=int, default=1,
                        help="--mixes: rounds per point, each on its own arrivals, policies alternating")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = make_checkpoint(Path(tmp) / "model", 512, 256, 8, 16, 4)
        if args.mixes:
            run_mixes(args, model, Path(tmp))
        else:
            run_fixed(args, model, Path(tmp))


if __name__ == "__main__":
    main()
