"""Decode tokens/s with experts offloaded, per cache fraction, policy and prefetch setting.

Builds a random Mixtral-style checkpoint (hidden 512, expert FFN 256, 8 layers, 16 experts,
top-4 by default), then for each setting decodes the same greedy workload and reports
tokens/s, the expert-cache hit rate, stall seconds, and the slowdown vs the all-resident
run measured in the same process. On a CPU machine the "device" tier is a separate RAM
pool filled by the copy engine's worker threads.

    python benchmarks/offload_decode.py [--fractions 1.0,0.5,0.25] [--policies lru,lfu,markov] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from benchmarks.engine_runs import counters_since, offload_counters, run_to_completion
from benchmarks.engine_vs_hf import make_checkpoint
from cache_policies import DEFAULT_POLICY
from engine.builder import build_engine
from engine.config import EngineConfig
from engine.sampling_params import SamplingParams


def decode(path: Path, prompts: list[list[int]], num_tokens: int, **overrides) -> dict:
    engine = build_engine(EngineConfig(model=str(path), dtype="float32", **overrides), show_progress=False)
    params = SamplingParams(max_tokens=num_tokens, temperature=0.0, ignore_eos=True)
    before = offload_counters(engine)
    generated, elapsed = run_to_completion(engine, prompts, params)
    counters = counters_since(before, offload_counters(engine))
    return {"tok_s": generated / elapsed, "hit_rate": counters["hit_rate"], "stall_s": counters["stall_s"],
            "prefetch_used": counters["prefetch_used"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", default="1.0,0.5,0.25")
    parser.add_argument("--policies", default=f"lru,lfu,{DEFAULT_POLICY}")
    parser.add_argument("--prefetch", default="none,next_layer")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp), 512, 256, 8, 16, 4)
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, 400, (args.batch, 16), generator=gen).tolist()
        decode(path, prompts[:1], 4, offload="off")  # warm-up: thread pools, allocator
        base = decode(path, prompts, args.tokens, offload="off")
        rows.append({"fraction": 1.0, "policy": "all-resident", "prefetch": "-", **base, "slowdown": 1.0})
        for fraction in (float(f) for f in args.fractions.split(",")):
            for policy in args.policies.split(","):
                for prefetch in args.prefetch.split(","):
                    row = decode(path, prompts, args.tokens, expert_cache_fraction=fraction, cache_policy=policy,
                                 prefetch=prefetch, task_preload=False)
                    rows.append({"fraction": fraction, "policy": policy, "prefetch": prefetch, **row,
                                 "slowdown": base["tok_s"] / row["tok_s"]})
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{'fraction':>8} {'policy':>12} {'prefetch':>10} {'tok/s':>7} {'hit rate':>8} {'stall s':>7} {'slowdown':>8}")
    for r in rows:
        print(f"{r['fraction']:>8} {r['policy']:>12} {r['prefetch']:>10} {r['tok_s']:>7.1f} {r['hit_rate']:>8.3f} "
              f"{r['stall_s']:>7.2f} {r['slowdown']:>7.2f}x")


if __name__ == "__main__":
    main()
