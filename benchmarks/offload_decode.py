"""Decode tokens/s with experts offloaded, per cache fraction, policy and prefetch setting.

Builds a random Mixtral-style checkpoint (hidden 512, expert FFN 256, 8 layers, 16 experts,
top-4 by default), then for each setting decodes a greedy workload and reports tokens/s, the
expert-cache hit rate, stall seconds, and the slowdown vs the all-resident run measured in
the same process. On a CPU machine the "device" tier is a separate RAM pool filled by the
copy engine's worker threads.

Protocol (this machine's speed drifts by 2x within minutes): one all-resident engine serves
the whole run; each setting gets a fresh engine, first warmed with an untimed batch of other
prompts (the steady state of a running server), then it and the all-resident engine take
turns for `--rounds` rounds, round r decoding prompt set r (new prompts each round, so a
policy cannot learn the workload by heart). Each side's best round counts; hit rate and
stalls are over all rounds.

    python -m benchmarks.offload_decode [--fractions 1.0,0.5,0.25] [--policies lru,lfu,markov] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
from pathlib import Path

import torch

from benchmarks.engine_runs import counters_since, offload_counters, run_to_completion
from benchmarks.engine_vs_hf import make_checkpoint
from moe_serve.cache_policies import DEFAULT_POLICY
from moe_serve.engine.builder import build_engine
from moe_serve.engine.config import EngineConfig
from moe_serve.engine.core.llm_engine import LLMEngine
from moe_serve.engine.core.sampling_params import SamplingParams
from moe_serve.engine.progress import progress


def timed(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, prefix: str) -> float:
    """Tokens/s of one batch decoded to the end."""
    generated, elapsed = run_to_completion(engine, prompts, params, prefix=prefix)
    return generated / elapsed


def compare(path: Path, resident: LLMEngine, warmup: list[list[int]], rounds: list[list[list[int]]],
            params: SamplingParams, **overrides) -> dict:
    """One setting against the all-resident engine, turn by turn (see the module docstring)."""
    engine = build_engine(EngineConfig(model=str(path), dtype="float32", **overrides), show_progress=False)
    run_to_completion(engine, warmup, params, prefix="w")
    before = offload_counters(engine)
    best, best_resident = 0.0, 0.0
    for index, prompts in enumerate(rounds):
        best_resident = max(best_resident, timed(resident, prompts, params, f"a{index}-"))
        best = max(best, timed(engine, prompts, params, f"o{index}-"))
    counters = counters_since(before, offload_counters(engine))
    return {"tok_s": best, "resident_tok_s": best_resident, "hit_rate": counters["hit_rate"],
            "stall_s": counters["stall_s"], "prefetch_used": counters["prefetch_used"],
            "slowdown": best_resident / best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", default="1.0,0.5,0.25")
    parser.add_argument("--policies", default=f"lru,lfu,{DEFAULT_POLICY}")
    parser.add_argument("--prefetch", default="none,next_layer")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3, help="turns each side takes per setting; its best counts")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp), 512, 256, 8, 16, 4)
        gen = torch.Generator().manual_seed(0)
        warmup, *rounds = torch.randint(3, 400, (1 + args.rounds, args.batch, 16), generator=gen).tolist()
        resident = build_engine(EngineConfig(model=str(path), dtype="float32", offload="off"), show_progress=False)
        run_to_completion(resident, warmup, params, prefix="w")  # thread pools, allocator
        settings = list(itertools.product([float(f) for f in args.fractions.split(",")], args.policies.split(","),
                                          args.prefetch.split(",")))
        for fraction, policy, prefetch in progress(settings, show=not args.json, desc="settings"):
            row = compare(path, resident, warmup, rounds, params, expert_cache_fraction=fraction,
                          cache_policy=policy, prefetch=prefetch, task_preload=False)
            rows.append({"fraction": fraction, "policy": policy, "prefetch": prefetch, **row})
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{'fraction':>8} {'policy':>8} {'prefetch':>10} {'tok/s':>7} {'resident':>8} {'hit rate':>8} "
          f"{'stall s':>7} {'slowdown':>8}")
    for r in rows:
        print(f"{r['fraction']:>8} {r['policy']:>8} {r['prefetch']:>10} {r['tok_s']:>7.1f} {r['resident_tok_s']:>8.1f} "
              f"{r['hit_rate']:>8.3f} {r['stall_s']:>7.2f} {r['slowdown']:>7.2f}x")


if __name__ == "__main__":
    main()
