"""Decode tokens/s with missed experts copied, computed on the host, or decided per miss, same run.

Two random-weight checkpoints with real MoE geometry at reduced depth, routing replayed from the
shared traces (`TraceRouter`) so the cache misses what the real models would: DeepSeek-V2-Lite
(a Qwen2-MoE checkpoint: hidden 2048, expert FFN 1408, 64 experts top-6, shared FFN 2816) and
Mixtral-8x7B's 8 experts top-2 (hidden and expert FFN halved by default, 4096 / 14336 with
`--mixtral-hidden 4096 --mixtral-ffn 14336`: four full-width layers of experts are 11 GiB per
engine), both bf16, `--layers` MoE layers, `--fraction` of the experts in the device tier (on a
CPU a RAM pool filled by the copy engine, throttled to each `--links` GB/s; `real`: unthrottled,
the device's own link, e.g. PCIe with `--device cuda`), no prefetching.

One engine per geometry (the host tier is read once); per link speed the copy engine is
re-throttled and `auto`'s rates probed again (a start-up at that link). For each batch size the
handlings (`--modes`) take turns for `--rounds` rounds, the order reversed every other round
(A B C, C B A, ...); each turn empties the cache, replays the same trace prompts as the others'
turns of that round, prefills the batch, decodes `--warmup-steps` steps untimed (the cache
refills), then times ceil(`--decode-tokens` / batch) decode steps (at least 2). Reported per setting: each round's tok/s and the median, and per decoded token the
expert bytes copied over the link and the expert bytes the host read computing misses; `vs copy`
and `vs best` are medians over the rounds of each round's ratio to the copy turn and to the best
other handling's turn of that round (turns of a round run back to back: paired, less drift).

    python -m benchmarks.hybrid_decode [--links 2,8,25] [--batches 1,4,16] [--threads 1] [--json]
    python -m benchmarks.hybrid_decode --device cuda --links real --mixtral-hidden 4096 --mixtral-ffn 14336
    python -m benchmarks.hybrid_decode --smoke   # tiny sizes, a generated trace: checks it runs
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from benchmarks.prefetch_decode import DEFAULT_TRACE, save_random_checkpoint
from moe_serve.engine.builder import RoutingReplay, build_engine
from moe_serve.engine.config import EngineConfig, MissHandling
from moe_serve.engine.core.llm_engine import LLMEngine
from moe_serve.engine.core.request import EngineRequest
from moe_serve.engine.core.sampling_params import SamplingParams
from moe_serve.engine.model.tokenizer_builder import build_byte_level_tokenizer
from moe_serve.engine.offload.hybrid import MissPlanner
from moe_serve.engine.offload.provider import OffloadedExperts, make_planner
from moe_serve.engine.traces.trace_file import RoutingTrace, load_trace, save_trace

MIXTRAL_TRACE = "../shared/traces/mixtral-8x7b-humaneval-decode.jsonl"
PROMPT_LEN = 16


def make_checkpoint(directory: Path, geometry: str, trace: RoutingTrace, args: argparse.Namespace) -> Path:
    """A random bf16 checkpoint of `geometry` with the trace's experts and top-k."""
    tokenizer = build_byte_level_tokenizer()
    common = dict(vocab_size=len(tokenizer), num_hidden_layers=args.layers, max_position_embeddings=4096,
                  tie_word_embeddings=False, num_experts_per_tok=trace.top_k)
    if geometry == "deepseek":
        config = transformers.Qwen2MoeConfig(
            hidden_size=args.ds_hidden, num_attention_heads=args.heads, num_key_value_heads=args.heads,
            intermediate_size=args.ds_ffn, moe_intermediate_size=args.ds_ffn,
            shared_expert_intermediate_size=args.ds_shared, num_experts=trace.num_experts, norm_topk_prob=False,
            **common)
        cls = transformers.Qwen2MoeForCausalLM
    else:
        config = transformers.MixtralConfig(
            hidden_size=args.mixtral_hidden, intermediate_size=args.mixtral_ffn, num_attention_heads=args.heads,
            num_key_value_heads=max(1, args.heads // 4), num_local_experts=trace.num_experts, sliding_window=None,
            **common)
        cls = transformers.MixtralForCausalLM
    return save_random_checkpoint(cls, config, torch.bfloat16, tokenizer, directory)


def counters(experts: OffloadedExperts) -> dict[str, float]:
    stats = experts.cache.stats()
    return {"misses": sum(stats.misses.values()), "host_misses": sum(stats.host_misses.values()),
            "bytes_copied": sum(stats.bytes_copied.values()), "link_busy_s": stats.link_busy_seconds,
            "host_s": stats.host_compute_seconds}


def steps_for(batch: int, args: argparse.Namespace) -> int:
    """Timed decode steps of a turn: about `--decode-tokens` tokens, at least 2 steps."""
    return max(2, -(-args.decode_tokens // batch))


def turn(engine: LLMEngine, handling: MissHandling, planner: MissPlanner, batch: int, args: argparse.Namespace,
         name: str, first_prompt: int) -> dict[str, float]:
    """One handling's run from a cold cache, replaying the trace from `first_prompt`: `batch`
    requests prefilled in one step, `--warmup-steps` decode steps untimed (the cache refills), then
    `steps_for(batch)` decode steps timed, with the offload counters over them."""
    experts = engine.runner.model.experts
    assert isinstance(experts, OffloadedExperts)
    experts.set_miss_handling(handling, planner if handling is MissHandling.AUTO else None)
    experts.cache.clear()
    engine.runner.model.routing_override.restart(first_prompt)
    steps = steps_for(batch, args)
    params = SamplingParams(max_tokens=1 + args.warmup_steps + steps, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(EngineRequest(f"{name}-{i}", list(range(3 + i, 3 + i + PROMPT_LEN)), params))
    for step in range(1 + args.warmup_steps):
        produced = sum(len(o.new_token_ids) for o in engine.step())
        assert produced == batch, f"step {step} produced {produced} tokens, not one per request"
    before, start, tokens = counters(experts), time.perf_counter(), 0
    while engine.has_unfinished:
        tokens += sum(len(o.new_token_ids) for o in engine.step())
    seconds = time.perf_counter() - start
    after = counters(experts)
    return {"tokens": tokens, "seconds": seconds, **{k: after[k] - before[k] for k in after}}


def run_geometry(engine: LLMEngine, geometry: str, args: argparse.Namespace) -> list[dict]:
    experts = engine.runner.model.experts
    assert isinstance(experts, OffloadedExperts)
    cache = experts.cache
    nbytes = cache.store.expert_nbytes
    rows = []
    for link in args.link_list:
        cache.pool.copy_engine.set_link_gbps(link)
        planner = make_planner(cache, engine.runner.model.spec.num_moe_layers)  # probed at this link
        for batch in args.batch_list:
            measured: dict[str, list[dict]] = {mode: [] for mode in args.mode_list}
            for r in range(args.rounds):
                order = args.mode_list if r % 2 == 0 else args.mode_list[::-1]
                for mode in order:
                    name = f"{geometry}-{link}-{batch}-{mode}-{r}"
                    measured[mode].append(turn(engine, MissHandling(mode), planner, batch, args, name, r * batch))
            rates = {mode: [m["tokens"] / m["seconds"] for m in runs] for mode, runs in measured.items()}
            for mode, runs in measured.items():
                tokens = sum(m["tokens"] for m in runs)
                others = [rates[other] for other in rates if other != mode]
                # paired per round (turns of one round run back to back): this mode over the best other one
                vs_best = [rate / max(other[r] for other in others) for r, rate in enumerate(rates[mode])] \
                    if others else [1.0]
                rows.append({
                    "geometry": geometry, "link_gbps": link, "batch": batch, "mode": mode,
                    "expert_mib": round(nbytes / 2**20, 2), "rounds_tok_s": [round(t, 2) for t in rates[mode]],
                    "tok_s": round(statistics.median(rates[mode]), 2),
                    "vs_copy": round(statistics.median(t / c for t, c in zip(rates[mode], rates.get("copy", rates[mode]))), 2),
                    "vs_best_other": round(statistics.median(vs_best), 2),
                    "copied_mib_per_tok": round(sum(m["bytes_copied"] for m in runs) / tokens / 2**20, 2),
                    "host_read_mib_per_tok": round(sum(m["host_misses"] for m in runs) * nbytes / tokens / 2**20, 2),
                    "host_share": round(sum(m["host_misses"] for m in runs) / max(sum(m["misses"] for m in runs), 1), 3),
                    "link_busy": round(sum(m["link_busy_s"] for m in runs) / sum(m["seconds"] for m in runs), 3),
                })
                if not args.json:
                    print_row(rows[-1])
    return rows


def print_row(r: dict) -> None:
    link = "real" if r["link_gbps"] is None else f"{r['link_gbps']:g}"
    print(f"{r['geometry']:>8} {link:>5} {r['batch']:>5} {r['mode']:>5} {r['tok_s']:>7.2f} "
          f"{r['vs_copy']:>7.2f} {r['vs_best_other']:>6.2f} {r['copied_mib_per_tok']:>10.2f} {r['host_read_mib_per_tok']:>10.2f} {r['host_share']:>6.2f} "
          f"{r['link_busy']:>6.2f}  {' '.join(f'{t:.2f}' for t in r['rounds_tok_s'])}", flush=True)


def smoke_trace(path: Path, experts: int, top_k: int, layers: int) -> Path:
    gen = np.random.default_rng(0)
    tokens, prompts = 40, 20
    ids = np.stack([np.stack([gen.choice(experts, top_k, replace=False) for _ in range(layers)])
                    for _ in range(tokens * prompts)])
    save_trace(path, RoutingTrace(expert_ids=ids.astype(np.uint8), offsets=np.arange(0, tokens * prompts + 1, tokens),
                                  prompt_ids=np.arange(prompts, dtype=np.int32), num_experts=experts))
    return path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", default=DEFAULT_TRACE, help="DeepSeek-V2-Lite routing trace (npz)")
    parser.add_argument("--mixtral-trace", default=MIXTRAL_TRACE, help="Mixtral-8x7B routing trace (jsonl)")
    parser.add_argument("--geometries", default="deepseek,mixtral")
    parser.add_argument("--layers", type=int, default=4, help="MoE layers (fraction 0.25 needs 4: a step may need a "
                        "whole layer's experts)")
    parser.add_argument("--ds-hidden", type=int, default=2048)
    parser.add_argument("--ds-ffn", type=int, default=1408)
    parser.add_argument("--ds-shared", type=int, default=2816)
    parser.add_argument("--mixtral-hidden", type=int, default=2048)
    parser.add_argument("--mixtral-ffn", type=int, default=7168)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--links", default="2,8,25",
                        help="GB/s the copy engine is throttled to (CPU); `real`: unthrottled (the device's own link)")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--modes", default="copy,host,auto")
    parser.add_argument("--decode-tokens", type=int, default=8,
                        help="timed tokens per turn: ceil(this / batch) decode steps, at least 2")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed decode steps per turn (cache refill)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="write the checkpoints here, or reuse those a run with the same flags wrote there")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and a generated trace (checks it runs)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.ds_hidden, args.ds_ffn, args.ds_shared, args.heads = 64, 32, 32, 2
        args.mixtral_hidden, args.mixtral_ffn = 64, 96
        args.links, args.batches, args.decode_tokens, args.warmup_steps, args.rounds = "2", "2", 2, 1, 1
    args.link_list = [None if v == "real" else float(v) for v in args.links.split(",")]
    args.batch_list = [int(v) for v in args.batches.split(",")]
    args.mode_list = args.modes.split(",")
    return args


def main() -> None:
    args = parse_args()
    rows: list[dict] = []
    if not args.json:
        print(f"{args.layers} MoE layers, bf16, fraction {args.fraction}, {args.threads} thread(s), "
              f"{args.warmup_steps} + ceil({args.decode_tokens} / batch) timed decode steps per turn, {args.rounds} "
              f"rounds alternated; MiB per decoded token")
        print(f"{'geometry':>8} {'GB/s':>5} {'batch':>5} {'mode':>5} {'tok/s':>7} {'vs copy':>7} {'vs best':>6} "
              f"{'copied':>10} {'host-read':>10} {'host%':>6} {'link':>6}  rounds tok/s")
    with tempfile.TemporaryDirectory() as tmp:
        for geometry in args.geometries.split(","):
            if args.smoke:
                experts, top_k = (16, 4) if geometry == "deepseek" else (8, 2)
                trace = load_trace(smoke_trace(Path(tmp) / f"{geometry}.npz", experts, top_k, args.layers))
            else:
                trace = load_trace(args.trace if geometry == "deepseek" else args.mixtral_trace)
            path = (args.checkpoint_dir or Path(tmp)) / geometry
            if not (path / "config.json").is_file():
                make_checkpoint(path, geometry, trace, args)
            config = EngineConfig(model=str(path), dtype="bfloat16", device=args.device, prefetch="none",
                                  task_preload="off", offload="on", expert_cache_fraction=args.fraction,
                                  miss_handling="auto", expert_link_gbps=args.link_list[0],
                                  num_threads=args.threads, max_num_seqs=max(args.batch_list),
                                  max_num_batched_tokens=max(512, PROMPT_LEN * max(args.batch_list)))
            engine = build_engine(config, show_progress=False, replay=RoutingReplay(trace))
            rows += run_geometry(engine, geometry, args)
            del engine
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
