"""SLO attainment of the task-aware scheduler (`slo`) vs first-come-first-served (`fcfs`).

Starts the real server (one process per policy) on a random Mixtral-style checkpoint that
offloads half its experts, and replays the same Poisson arrivals of a task mix (chat, code,
summarize, classify: different prompt and output lengths and SLOs) at several rates,
streaming every request over HTTP. A request attains its SLO when both its TTFT and its
mean time per output token are within its task's SLOs. Reports, per policy and rate,
attainment, mean end-to-end latency and p50/p99 TTFT and TPOT per task, and the goodput
(the highest rate with >= 90% attainment).

    python -m benchmarks.slo_workload [--rates 2,4,6,8] [--requests 60] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from benchmarks.engine_vs_hf import make_checkpoint
from benchmarks.live_server import live_server
from moe_serve.engine.progress import progress

# task: (prompt tokens, output tokens, TTFT SLO s, TPOT SLO s)
TASK_MIX = {
    "chat": (48, 24, 1.0, 0.25),
    "code": (96, 48, 2.0, 0.25),
    "summarize": (384, 16, 6.0, 0.4),
    "classify": (64, 2, 0.6, 0.5),
}
MODEL_NAME = "slo-bench"
TASK_WEIGHTS = {"chat": 0.35, "code": 0.2, "summarize": 0.15, "classify": 0.3}


@dataclass
class Result:
    task: str
    ttft: float
    tpot: float
    e2e: float
    ok: bool

    @property
    def attained(self) -> bool:
        _, _, ttft_slo, tpot_slo = TASK_MIX[self.task]
        return self.ok and self.ttft <= ttft_slo and self.tpot <= tpot_slo


async def one_request(client: httpx.AsyncClient, task: str, rng: random.Random) -> Result:
    prompt_len, max_tokens, _, _ = TASK_MIX[task]
    body = {"model": MODEL_NAME, "prompt": [rng.randrange(10, 400) for _ in range(prompt_len)],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    first, count = None, 0
    try:
        async with client.stream("POST", "/v1/completions", json=body, headers={"X-Task": task}) as resp:
            if resp.status_code != 200:
                return Result(task, float("inf"), float("inf"), time.perf_counter() - start, False)
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                        count += 1
                        first = first or time.perf_counter()
    except httpx.HTTPError:
        return Result(task, float("inf"), float("inf"), time.perf_counter() - start, False)
    end = time.perf_counter()
    first = first or end
    tpot = (end - first) / max(1, count - 1)
    return Result(task, first - start, tpot, end - start, True)


async def run_rate(base: str, rate: float, num_requests: int, seed: int) -> list[Result]:
    rng = random.Random(seed)
    tasks = rng.choices(list(TASK_WEIGHTS), weights=list(TASK_WEIGHTS.values()), k=num_requests)
    gaps = [rng.expovariate(rate) for _ in range(num_requests)]
    async with httpx.AsyncClient(base_url=base, timeout=300) as client:
        pending = []
        for task, gap in zip(tasks, gaps):
            await asyncio.sleep(gap)
            pending.append(asyncio.create_task(one_request(client, task, random.Random(rng.random()))))
        return list(await asyncio.gather(*pending))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def summarize(policy: str, rate: float, results: list[Result]) -> dict:
    row = {"policy": policy, "rate": rate, "attainment": sum(r.attained for r in results) / len(results),
           "mean_e2e_s": statistics.mean(r.e2e for r in results), "errors": sum(not r.ok for r in results)}
    for task in TASK_MIX:
        mine = [r for r in results if r.task == task and r.ok]
        row[task] = {"n": len(mine), "ttft_p50": percentile([r.ttft for r in mine], 0.5),
                     "ttft_p99": percentile([r.ttft for r in mine], 0.99),
                     "tpot_p50": percentile([r.tpot for r in mine], 0.5),
                     "tpot_p99": percentile([r.tpot for r in mine], 0.99)}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="2,4,6,8", help="arrivals per second")
    parser.add_argument("--requests", type=int, default=60, help="requests per rate")
    parser.add_argument("--policies", default="fcfs,slo")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = make_checkpoint(Path(tmp) / "model", 512, 256, 8, 16, 4)
        tasks_file = Path(tmp) / "tasks.yaml"
        tasks_file.write_text(yaml.safe_dump({"tasks": {
            name: {"ttft_slo_s": t, "tpot_slo_s": p, "output_len_prior": out}
            for name, (_, out, t, p) in TASK_MIX.items()}}))
        for policy in args.policies.split(","):
            flags = ["--scheduling-policy", policy, "--tasks-file", str(tasks_file), "--expert-cache-fraction",
                     "0.5", "--max-num-seqs", "4", "--served-model-name", MODEL_NAME,
                     "--max-num-batched-tokens", "256"]
            with live_server(model, flags) as base:
                asyncio.run(run_rate(base, 2.0, 6, seed=99))  # warm-up
                rates = [float(r) for r in args.rates.split(",")]
                for rate in progress(rates, show=not args.json, desc=f"{policy} rates"):
                    rows.append(summarize(policy, rate, asyncio.run(run_rate(base, rate, args.requests, seed=1))))
    goodput = {p: max([r["rate"] for r in rows if r["policy"] == p and r["attainment"] >= 0.9], default=0.0)
               for p in args.policies.split(",")}
    if args.json:
        print(json.dumps({"rows": rows, "goodput": goodput}))
        return
    print(f"{'policy':>6} {'rate/s':>6} {'attain':>7} {'mean e2e s':>10}  per task: TTFT p50/p99 s, TPOT p50/p99 s")
    for r in rows:
        per_task = "  ".join(f"{t}: {r[t]['ttft_p50']:.2f}/{r[t]['ttft_p99']:.2f} {r[t]['tpot_p50']:.3f}/"
                             f"{r[t]['tpot_p99']:.3f}" for t in TASK_MIX)
        print(f"{r['policy']:>6} {r['rate']:>6} {r['attainment']:>7.1%} {r['mean_e2e_s']:>10.2f}  {per_task}")
    print("goodput (highest rate with >= 90% attainment):", ", ".join(f"{p} {g}/s" for p, g in goodput.items()))


if __name__ == "__main__":
    main()
