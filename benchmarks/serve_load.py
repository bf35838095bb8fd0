"""HTTP serving load: TTFT, inter-token latency, end-to-end latency and throughput, and the
overhead of the HTTP + SSE path over driving the engine directly, in the same run.

Builds a random Mixtral-style checkpoint (or takes --model), then runs the same streaming
workload twice: through the real server (`/v1/completions`, `stream: true`, token-id
prompts) at a fixed concurrency or with Poisson arrivals, and through AsyncLLMEngine in
this process with the same concurrency. HTTP/SSE overhead = how much longer each output
token takes end to end through the server: direct output tok/s / HTTP output tok/s - 1
(the mean inter-token latency is printed too; a client reading SSE in bursts can make it
look smaller than it is, so throughput is the measure).

    python -m benchmarks.serve_load [--concurrency 16] [--requests 64] [--rate R] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.engine_vs_hf import make_checkpoint
from benchmarks.live_server import live_server
from engine.async_engine import AsyncLLMEngine
from engine.builder import build_engine
from engine.config import EngineConfig
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams

MODEL_NAME = "bench"


@dataclass
class Timing:
    """Token arrival times of one request (perf_counter seconds)."""

    start: float
    tokens: list[float] = field(default_factory=list)
    ok: bool = True


async def http_request(client: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> Timing:
    timing = Timing(time.perf_counter())
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                timing.ok = False
                return timing
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if chunk.get("choices"):
                        timing.tokens.append(time.perf_counter())
    except httpx.HTTPError:
        timing.ok = False
    return timing


async def engine_request(engine: AsyncLLMEngine, rid: str, prompt: list[int], max_tokens: int) -> Timing:
    timing = Timing(time.perf_counter())
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    async for out in engine.generate(EngineRequest(rid, prompt, params)):
        timing.tokens.extend(time.perf_counter() for _ in out.new_token_ids)
    return timing


async def drive(send: Callable[[int], Awaitable[Timing]], num_requests: int, concurrency: int,
                rate: float | None) -> tuple[list[Timing], float]:
    """Fixed concurrency (workers back to back) or Poisson arrivals; returns timings and wall time."""
    start = time.perf_counter()
    if rate is None:
        counter = iter(range(num_requests))
        results: list[Timing] = []

        async def worker() -> None:
            for i in counter:
                results.append(await send(i))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.perf_counter() - start
    rng = random.Random(0)
    tasks = []
    for i in range(num_requests):
        await asyncio.sleep(rng.expovariate(rate))
        tasks.append(asyncio.create_task(send(i)))
    return list(await asyncio.gather(*tasks)), time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


def summarize(path: str, timings: list[Timing], wall: float) -> dict:
    done = [t for t in timings if t.ok and t.tokens]
    ttft = [t.tokens[0] - t.start for t in done]
    itl = [b - a for t in done for a, b in zip(t.tokens, t.tokens[1:])]
    e2e = [t.tokens[-1] - t.start for t in done]
    return {"path": path, "requests": len(timings), "errors": len(timings) - len(done),
            "ttft_p50_ms": pct(ttft, 0.5), "ttft_p99_ms": pct(ttft, 0.99),
            "itl_mean_ms": statistics.mean(itl) * 1000, "itl_p50_ms": pct(itl, 0.5), "itl_p99_ms": pct(itl, 0.99),
            "e2e_p50_ms": pct(e2e, 0.5), "e2e_p99_ms": pct(e2e, 0.99),
            "output_tok_s": sum(len(t.tokens) for t in done) / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: a random one)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second instead")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rng = random.Random(1)
    prompts = [[rng.randrange(10, 400) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_checkpoint(Path(tmp) / "model", 512, 256, 8, 16, 4)
        engine = AsyncLLMEngine.from_engine(build_engine(
            EngineConfig(model=str(model), dtype="float32", max_num_seqs=args.concurrency), show_progress=False))
        engine.start(wait=True)

        async def direct() -> tuple[list[Timing], float]:
            await engine_request(engine, "warmup", prompts[0], 4)
            return await drive(lambda i: engine_request(engine, f"r{i}", prompts[i], args.max_tokens),
                               args.requests, args.concurrency, args.rate)

        try:
            rows = [summarize("engine (direct)", *asyncio.run(direct()))]
        finally:
            engine.shutdown()
        flags = ["--served-model-name", MODEL_NAME, "--max-num-seqs", str(args.concurrency)]
        with live_server(model, flags) as base:

            async def over_http() -> tuple[list[Timing], float]:
                async with httpx.AsyncClient(base_url=base, timeout=300,
                                             limits=httpx.Limits(max_connections=args.concurrency + 4)) as client:
                    await http_request(client, prompts[0], 4)
                    return await drive(lambda i: http_request(client, prompts[i], args.max_tokens),
                                       args.requests, args.concurrency, args.rate)

            rows.append(summarize("HTTP + SSE", *asyncio.run(over_http())))
    overhead = rows[0]["output_tok_s"] / rows[1]["output_tok_s"] - 1
    if args.json:
        print(json.dumps({"rows": rows, "http_overhead_of_token_time": overhead}))
        return
    keys = ["ttft_p50_ms", "ttft_p99_ms", "itl_mean_ms", "itl_p50_ms", "itl_p99_ms", "e2e_p50_ms", "e2e_p99_ms",
            "output_tok_s", "errors"]
    print(f"{'path':<16}" + "".join(f"{k:>13}" for k in keys))
    for r in rows:
        print(f"{r['path']:<16}" + "".join(f"{r[k]:>13.1f}" for k in keys))
    print(f"HTTP + SSE overhead: {overhead:+.1%} of the per-token time (output throughput, same workload)")


if __name__ == "__main__":
    main()
