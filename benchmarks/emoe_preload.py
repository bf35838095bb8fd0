"""eMoE task-aware preloading on the live engine: demand misses per token and TTFT, with and
without preloading, on a workload where tasks repeat.

Three tasks draw their prompts from different token ranges (so, as with real tasks, each
routes to its own experts). Requests arrive one after another, interleaving tasks; the
cache holds a fraction of the experts. With preloading, the engine learns each task's
expert profile from finished requests and loads it at admission, before the prefill.

    python benchmarks/emoe_preload.py [--fraction 0.25] [--requests 36] [--json]
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
from engine.builder import build_engine
from engine.config import EngineConfig
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams

WARMUP_ROUNDS = 2
TASK_TOKEN_RANGES = {"chat": (10, 120), "code": (150, 260), "summarize": (300, 410)}


def workload(num_requests: int, prompt_len: int) -> list[tuple[str, list[int]]]:
    gen = torch.Generator().manual_seed(0)
    tasks = list(TASK_TOKEN_RANGES)
    out = []
    for i in range(num_requests):
        task = tasks[i % len(tasks)]
        low, high = TASK_TOKEN_RANGES[task]
        out.append((task, torch.randint(low, high, (prompt_len,), generator=gen).tolist()))
    return out


def run(path: Path, requests: list[tuple[str, list[int]]], preload: bool, fraction: float, tokens: int) -> dict:
    engine = build_engine(EngineConfig(model=str(path), dtype="float32", expert_cache_fraction=fraction,
                                       prefetch="none", task_preload=preload, preload_refresh_every=4),
                          show_progress=False)
    cache = engine.runner.model.experts.cache
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    ttfts, computed = [], 0
    warmup = WARMUP_ROUNDS * len(TASK_TOKEN_RANGES)  # not measured: profiles are still being learned
    misses_before = 0
    for i, (task, prompt) in enumerate(requests):
        if i == warmup:
            misses_before = sum(cache.stats().misses.values())
            computed = 0
        start = time.perf_counter()
        engine.add_request(EngineRequest(f"r{i}", prompt, params, task=task))
        first = None
        while engine.has_unfinished:
            outs = engine.step()
            if first is None and outs:
                first = time.perf_counter() - start
        if i >= warmup:
            ttfts.append(first)
            computed += len(prompt) + tokens - 1
    misses = sum(cache.stats().misses.values()) - misses_before
    return {"preload": preload, "demand_misses_per_token": misses / computed,
            "ttft_ms_mean": 1000 * statistics.mean(ttfts), "ttft_ms_p50": 1000 * statistics.median(ttfts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--requests", type=int, default=36)
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp), 512, 256, 8, 16, 4)
        requests = workload(args.requests, args.prompt_len)
        run(path, requests[: 2 * WARMUP_ROUNDS * len(TASK_TOKEN_RANGES)], False, args.fraction, 2)  # warm-up
        rows = [run(path, requests, preload, args.fraction, args.tokens) for preload in (False, True)]
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{'preload':>8} {'demand misses/token':>20} {'TTFT mean ms':>13} {'TTFT p50 ms':>12}")
    for r in rows:
        print(f"{str(r['preload']):>8} {r['demand_misses_per_token']:>20.3f} {r['ttft_ms_mean']:>13.1f} "
              f"{r['ttft_ms_p50']:>12.1f}")


if __name__ == "__main__":
    main()
