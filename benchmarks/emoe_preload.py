"""eMoE task-aware preloading on the live engine: demand misses per token and TTFT, with and
without preloading, on a workload where tasks repeat.

Three tasks draw their prompts from their own small vocabularies (`--task-vocab` tokens each,
in disjoint id ranges), so, as with real tasks, each routes to its own experts: on the
benchmark's random-weight model, 16-token vocabularies make the tasks' expert profiles
clearly differ, while 110-token ranges leave them about as far apart as two halves of one
task's requests. Requests arrive one after another (closed loop, no idle time between
them), interleaving tasks; the cache holds a fraction of the experts. With preloading, the
engine learns each task's expert profile from finished requests and preloads it at
admission, before the prefill.

Both runs of a repeat serve the same requests; the first `WARMUP_ROUNDS` rounds of tasks are
served but not measured in either (profiles are still being learned); the order of the two
runs alternates between repeats. TTFT is from `add_request` (so it includes the preload's
bookkeeping) to the first token.

    python -m benchmarks.emoe_preload [--fraction 0.25] [--requests 48] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.engine_vs_hf import make_checkpoint
from moe_serve.engine.builder import build_engine
from moe_serve.engine.config import EngineConfig
from moe_serve.engine.core.request import EngineRequest
from moe_serve.engine.core.sampling_params import SamplingParams
from moe_serve.engine.progress import progress

WARMUP_ROUNDS = 2
TASK_TOKEN_STARTS = {"chat": 10, "code": 150, "summarize": 300}


def workload(num_requests: int, prompt_len: int, task_vocab: int) -> list[tuple[str, list[int]]]:
    gen = torch.Generator().manual_seed(0)
    tasks = list(TASK_TOKEN_STARTS)
    out = []
    for i in range(num_requests):
        task = tasks[i % len(tasks)]
        low = TASK_TOKEN_STARTS[task]
        out.append((task, torch.randint(low, low + task_vocab, (prompt_len,), generator=gen).tolist()))
    return out


def run(path: Path, requests: list[tuple[str, list[int]]], preload: bool, fraction: float, tokens: int,
        overlap: bool = False) -> dict:
    """Serve the requests in order. Serially (each arrives when the engine is idle), or with
    `overlap` each arrives once the previous one has produced half its tokens, so it waits for
    (at most) one running decode step and then joins the batch: continuous batching."""
    engine = build_engine(EngineConfig(model=str(path), dtype="float32", expert_cache_fraction=fraction,
                                       prefetch="none", task_preload=preload), show_progress=False)
    if engine.preloader is not None:
        engine.preloader.predictor.refresh_every = 4  # the refresh period of the published figures
    cache = engine.runner.model.experts.cache
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    warmup = WARMUP_ROUNDS * len(TASK_TOKEN_STARTS)  # not measured: profiles are still being learned
    arrived: dict[str, tuple[float, int]] = {}  # request id -> (arrival time, demand misses so far)
    ttfts, prefill_misses, computed = [], [], 0
    before = cache.stats()
    next_index = 0

    def arrive() -> None:
        nonlocal next_index, before, computed
        if next_index == warmup:
            before, computed = cache.stats(), 0
        task, prompt = requests[next_index]
        request_id = f"r{next_index}"
        arrived[request_id] = (time.perf_counter(), sum(cache.stats().misses.values()))
        engine.add_request(EngineRequest(request_id, prompt, params, task=task))
        if next_index >= warmup:
            computed += len(prompt) + tokens - 1
        next_index += 1

    while next_index < len(requests) or engine.has_unfinished:
        if not engine.has_unfinished:
            arrive()
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            if out.request_id in arrived and out.new_token_ids:
                start, misses_at_arrival = arrived.pop(out.request_id)
                if int(out.request_id[1:]) >= warmup:
                    ttfts.append(now - start)
                    prefill_misses.append(sum(cache.stats().misses.values()) - misses_at_arrival)
            last = f"r{next_index - 1}"
            if overlap and out.request_id == last and out.num_output_tokens >= tokens // 2 and next_index < len(requests):
                arrive()
    after = cache.stats()
    misses = sum(after.misses.values()) - sum(before.misses.values())
    return {"preload": preload, "demand_misses_per_token": misses / computed,
            "prefill_misses_mean": statistics.mean(prefill_misses),
            "ttft_ms_mean": 1000 * statistics.mean(ttfts), "ttft_ms_p50": 1000 * statistics.median(ttfts),
            "preload_issued": after.prefetch_issued - before.prefetch_issued,
            "preload_used": after.prefetch_used - before.prefetch_used,
            "preload_wasted": after.prefetch_wasted - before.prefetch_wasted}


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--task-vocab", type=int, default=16, help="distinct prompt tokens per task")
    parser.add_argument("--repeats", type=int, default=3, help="paired runs (with and without preload)")
    parser.add_argument("--overlap", action="store_true",
                        help="each request arrives while the previous one decodes (continuous batching)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp), 512, 256, 8, 16, 4)
        requests = workload(args.requests, args.prompt_len, args.task_vocab)
        run(path, requests[: 2 * WARMUP_ROUNDS * len(TASK_TOKEN_STARTS)], False, args.fraction, 2)  # warm-up
        for repeat in progress(range(args.repeats), show=not args.json, desc="repeats"):
            order = (False, True) if repeat % 2 == 0 else (True, False)
            for preload in order:
                rows.append({"repeat": repeat, **run(path, requests, preload, args.fraction, args.tokens, args.overlap)})
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{'repeat':>6} {'preload':>8} {'misses/token':>13} {'prefill misses':>15} {'TTFT mean ms':>13} "
          f"{'TTFT p50 ms':>12} {'preloads used/issued':>21}")
    for r in rows:
        print(f"{r['repeat']:>6} {r['preload']!s:>8} {r['demand_misses_per_token']:>13.3f} "
              f"{r['prefill_misses_mean']:>15.1f} {r['ttft_ms_mean']:>13.1f} {r['ttft_ms_p50']:>12.1f} "
              f"{r['preload_used']:>12}/{r['preload_issued']:<8}")
    print("mean [min, max] over repeats:")
    for preload in (False, True):
        sel = [r for r in rows if r["preload"] is preload]
        print(f"  preload={preload!s:<5} misses/token {spread([r['demand_misses_per_token'] for r in sel])}  "
              f"TTFT mean ms {spread([r['ttft_ms_mean'] for r in sel])}  "
              f"TTFT p50 ms {spread([r['ttft_ms_p50'] for r in sel])}")


if __name__ == "__main__":
    main()
