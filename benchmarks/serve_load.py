"""HTTP serving load: TTFT, inter-token latency, end-to-end latency and throughput, and the
overhead of the HTTP + SSE path over driving the engine directly, in the same run.

Builds a random Mixtral-style checkpoint (or takes --model), then runs the same streaming
workload twice, one after the other, each after its own warm-up:

1. direct: the engine wrapped in AsyncLLMEngine in this process, one asyncio task per
   in-flight request iterating `generate(EngineRequest(...))`;
2. HTTP: the real server in a subprocess, `POST /v1/completions` with `stream: true`,
   token-id prompts, `ignore_eos`, `temperature: 0`, read with httpx.AsyncClient.

Either at a fixed concurrency (each worker sends its next request as soon as the previous
one finishes) or with Poisson arrivals (--rate). Both paths ask for `logprobs: 0`, so each
output token is its own SSE event (without it the server leaves out events whose text is
empty, e.g. an incomplete UTF-8 character, and the gaps between events would span several
tokens); --no-logprobs turns it off on both paths, and then the mean ITL still counts
tokens (from the usage chunk) but its percentiles are over SSE events.

HTTP + SSE overhead = (HTTP mean ITL - direct mean ITL) / direct mean ITL: how much longer
each output token takes through the server. The ratio of output throughputs is printed too.

    python -m benchmarks.serve_load [--concurrency 16] [--requests 64] [--rate R] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.engine_vs_hf import make_checkpoint
from benchmarks.live_server import live_server
from moe_serve.engine.builder import build_engine
from moe_serve.engine.config import EngineConfig
from moe_serve.engine.core.async_engine import AsyncLLMEngine
from moe_serve.engine.core.request import EngineRequest
from moe_serve.engine.core.sampling_params import SamplingParams

MODEL_NAME = "bench"
TABLE_KEYS = ["ttft_p50_ms", "ttft_p99_ms", "itl_mean_ms", "itl_p50_ms", "itl_p99_ms", "e2e_p50_ms", "e2e_p99_ms",
              "output_tok_s", "errors"]


@dataclass
class Timing:
    """One request: its start, the arrival time of each streamed event and the tokens it carried."""

    start: float
    events: list[tuple[float, int]] = field(default_factory=list)  # (perf_counter, tokens in the event)
    num_tokens: int = 0  # output tokens (usage / engine count)
    ok: bool = True


async def http_request(client: httpx.AsyncClient, prompt: list[int], max_tokens: int, logprobs: bool) -> Timing:
    timing = Timing(time.perf_counter())
    body: dict = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                  "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if logprobs:
        body["logprobs"] = 0
    finished = False
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                timing.ok = False
                return timing
            async for line in resp.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                now = time.perf_counter()
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    timing.ok = False
                    continue
                for choice in chunk.get("choices") or []:
                    lp = choice.get("logprobs")
                    timing.events.append((now, len(lp["tokens"]) if lp else 0))
                    finished = finished or choice.get("finish_reason") is not None
                if chunk.get("usage"):
                    timing.num_tokens = chunk["usage"]["completion_tokens"]
    except (httpx.HTTPError, ValueError):
        timing.ok = False
    if not finished or timing.num_tokens != max_tokens:
        timing.ok = False
    return timing


async def engine_request(engine: AsyncLLMEngine, rid: str, prompt: list[int], max_tokens: int,
                         logprobs: bool) -> Timing:
    timing = Timing(time.perf_counter())
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=0 if logprobs else None)
    try:
        async for out in engine.generate(EngineRequest(rid, prompt, params)):
            now = time.perf_counter()
            # the server sends an event for an output only when it has text, logprobs or finishes
            if out.new_text or out.new_logprobs or out.finished:
                timing.events.append((now, len(out.new_token_ids)))
            timing.num_tokens = out.num_output_tokens
    except Exception:  # noqa: BLE001 - counted as an error, like an HTTP failure
        timing.ok = False
    if timing.num_tokens != max_tokens:
        timing.ok = False
    return timing


async def drive(send: Callable[[int], Awaitable[Timing]], num_requests: int, concurrency: int,
                rate: float | None, seed: int) -> tuple[list[Timing], float]:
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
    rng = random.Random(seed)
    tasks = []
    for i in range(num_requests):
        await asyncio.sleep(rng.expovariate(rate))
        tasks.append(asyncio.create_task(send(i)))
    return list(await asyncio.gather(*tasks)), time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile, in milliseconds."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] * 1000


def summarize(path: str, timings: list[Timing], wall: float) -> dict:
    done = [t for t in timings if t.ok and t.events]
    ttft = [t.events[0][0] - t.start for t in done]
    e2e = [t.events[-1][0] - t.start for t in done]
    gaps = [b[0] - a[0] for t in done for a, b in zip(t.events, t.events[1:])]
    # mean ITL counts tokens, not events: the gaps telescope to (last - first) per request
    spans = sum(t.events[-1][0] - t.events[0][0] for t in done)
    intervals = sum(t.num_tokens - 1 for t in done)
    tokens = sum(t.num_tokens for t in done)
    return {"path": path, "requests": len(timings), "errors": len(timings) - len(done),
            "ttft_p50_ms": pct(ttft, 0.5), "ttft_p99_ms": pct(ttft, 0.99),
            "itl_mean_ms": spans / intervals * 1000 if intervals else float("nan"),
            "itl_p50_ms": pct(gaps, 0.5), "itl_p99_ms": pct(gaps, 0.99),
            "e2e_p50_ms": pct(e2e, 0.5), "e2e_p99_ms": pct(e2e, 0.99),
            "output_tok_s": tokens / wall, "events_per_token": sum(len(t.events) for t in done) / max(tokens, 1),
            "wall_s": wall}


def run_direct(model: Path, args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    config = EngineConfig(model=str(model), dtype="float32", served_model_name=MODEL_NAME,
                          max_num_seqs=args.max_num_seqs)
    engine = AsyncLLMEngine.from_engine(build_engine(config, show_progress=False))
    engine.start(wait=True)

    def send(i: int, prefix: str = "r", max_tokens: int = args.max_tokens) -> Awaitable[Timing]:
        return engine_request(engine, f"{prefix}{i}", prompts[i], max_tokens, args.logprobs)

    async def go() -> tuple[list[Timing], float]:
        await drive(lambda i: send(i, "warmup", args.warmup_tokens), args.concurrency, args.concurrency, None, 0)
        return await drive(send, args.requests, args.concurrency, args.rate, args.seed)

    try:
        return summarize("engine (direct)", *asyncio.run(go()))
    finally:
        engine.shutdown()


def run_http(model: Path, args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    flags = ["--served-model-name", MODEL_NAME, "--max-num-seqs", str(args.max_num_seqs)]
    with live_server(model, flags) as base:

        async def go() -> tuple[list[Timing], float]:
            limits = httpx.Limits(max_connections=args.concurrency + 8, max_keepalive_connections=args.concurrency + 8)
            async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as client:
                await drive(lambda i: http_request(client, prompts[i], args.warmup_tokens, args.logprobs),
                            args.concurrency, args.concurrency, None, 0)
                return await drive(lambda i: http_request(client, prompts[i], args.max_tokens, args.logprobs),
                                   args.requests, args.concurrency, args.rate, args.seed)

        return summarize("HTTP + SSE", *asyncio.run(go()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: a random one)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16, help="in-flight requests (default 16)")
    parser.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second instead")
    parser.add_argument("--requests", type=int, default=64, help="measured requests per path (default 64)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--warmup-tokens", type=int, default=8, help="tokens of each warm-up request")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="engine batch limit (default: concurrency)")
    parser.add_argument("--no-logprobs", dest="logprobs", action="store_false",
                        help="don't ask for logprobs (then SSE events can carry several tokens)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    args.max_num_seqs = args.max_num_seqs or max(args.concurrency, 1)
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(10, 400) for _ in range(args.prompt_len)]
               for _ in range(max(args.requests, args.concurrency))]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_checkpoint(Path(tmp) / "model", args.hidden, args.intermediate, args.layers,
                                              args.experts, args.top_k)
        rows = [run_direct(model, args, prompts), run_http(model, args, prompts)]
    direct, http = rows
    overhead = (http["itl_mean_ms"] - direct["itl_mean_ms"]) / direct["itl_mean_ms"]
    throughput_overhead = direct["output_tok_s"] / http["output_tok_s"] - 1
    load = f"rate {args.rate}/s" if args.rate else f"concurrency {args.concurrency}"
    if args.json:
        print(json.dumps({"load": load, "requests": args.requests, "prompt_len": args.prompt_len,
                          "max_tokens": args.max_tokens, "rows": rows, "http_itl_overhead": overhead,
                          "http_throughput_overhead": throughput_overhead}))
        return
    print(f"{args.requests} requests/path, {load}, prompt {args.prompt_len} tokens, {args.max_tokens} tokens out")
    print(f"{'path':<16}" + "".join(f"{k:>13}" for k in TABLE_KEYS))
    for r in rows:
        print(f"{r['path']:<16}" + "".join(f"{r[k]:>13.1f}" if k != "errors" else f"{r[k]:>13d}" for k in TABLE_KEYS))
    print(f"HTTP + SSE overhead: {overhead:+.1%} of the mean inter-token latency (target <= 10%); "
          f"{throughput_overhead:+.1%} by output throughput")


if __name__ == "__main__":
    main()
