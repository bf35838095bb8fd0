"""Decode tokens/s with prefetching on and off, routing replayed from a real trace.

A random-weight model routes nothing like a trained one, so this benchmark builds a
Qwen2-MoE-style checkpoint with the trace model's MoE geometry (experts per layer, top-k;
hidden and expert sizes from the flags: DeepSeek-V2-Lite's 2048 / 1408 / 2 x 1408 shared by
default) and makes every layer route as the trace recorded (`TraceRouter`). Each prefetch
mode then decodes the same requests with a fraction of the experts cached, after warm-up
requests that fill the cache and let the affinity and logistic predictors learn (the logistic
one first trains on the trace's last `--train-prompts` prompts, which no request replays); the all-resident run of
the same model is the baseline. Use it on a GPU (`--device cuda`); on a CPU it runs the same
path with a RAM pool as the device tier (use small `--hidden` and `--moe-intermediate`).

    python -m benchmarks.prefetch_decode --device cuda --layers 8 [--fraction 0.25] [--json]
    python -m benchmarks.prefetch_decode --hidden 256 --moe-intermediate 128 --shared-intermediate 256
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer

from benchmarks.engine_runs import counters_since, offload_counters, run_to_completion
from moe_serve.engine.builder import RoutingReplay, build_engine
from moe_serve.engine.config import EngineConfig
from moe_serve.engine.core.llm_engine import LLMEngine
from moe_serve.engine.core.sampling_params import SamplingParams
from moe_serve.engine.model.tokenizer_builder import build_byte_level_tokenizer, save_tokenizer
from moe_serve.engine.progress import progress
from moe_serve.engine.traces.trace_file import RoutingTrace, load_trace, save_trace

DEFAULT_TRACE = "../shared/traces/deepseek-v2-lite-puffin-train.npz"


def make_checkpoint(directory: Path, trace: RoutingTrace, args: argparse.Namespace) -> Path:
    """A random Qwen2-MoE checkpoint with the trace's experts and top-k, written in `args.dtype`."""
    tokenizer = build_byte_level_tokenizer()
    config = transformers.Qwen2MoeConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, intermediate_size=args.moe_intermediate,
        moe_intermediate_size=args.moe_intermediate, shared_expert_intermediate_size=args.shared_intermediate,
        num_experts=trace.num_experts, num_experts_per_tok=trace.top_k, norm_topk_prob=False,
        max_position_embeddings=4096, tie_word_embeddings=False,
    )
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    return save_random_checkpoint(transformers.Qwen2MoeForCausalLM, config, dtype, tokenizer, directory)


def save_random_checkpoint(cls: type, config: transformers.PretrainedConfig, dtype: torch.dtype,
                           tokenizer: Tokenizer, directory: Path) -> Path:
    """`cls(config)` with seeded random weights (norms 1, the rest N(0, 0.02)) in `dtype`, saved with
    `tokenizer` into `directory` in the Hub's format, built without a float32 copy of the weights."""
    with torch.device("meta"):
        model = cls(config)
    model = model.to_empty(device="cpu").to(dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
    model.save_pretrained(directory, max_shard_size="2GB")
    save_tokenizer(tokenizer, directory)
    return directory


def training_trace(directory: Path, trace: RoutingTrace, args: argparse.Namespace) -> Path:
    """The trace's last `--train-prompts` prompts at the replayed layers, saved for `prefetch_trace`:
    requests replay the first prompts, so the logistic predictor never trains on a measured one."""
    part = trace.slice_prompts(trace.num_prompts - args.train_prompts, trace.num_prompts)
    layers = slice(args.first_layer, args.first_layer + args.layers)
    path = directory / "train.npz"
    save_trace(path, RoutingTrace(np.ascontiguousarray(part.expert_ids[:, layers]), part.offsets, part.prompt_ids,
                                  part.num_experts, part.model))
    return path


def replaying_engine(path: Path, trace: RoutingTrace, args: argparse.Namespace, **overrides) -> LLMEngine:
    return build_engine(EngineConfig(model=str(path), dtype=args.dtype, device=args.device,
                                     max_num_seqs=max(args.batch, 1), task_preload=False, **overrides),
                        show_progress=False, replay=RoutingReplay(trace, first_layer=args.first_layer))


def measure(engine: LLMEngine, args: argparse.Namespace) -> dict:
    """Warm up (fills the cache, trains the affinity predictor), then time the measured batch."""
    prompt = list(range(3, 3 + args.prompt_len))
    warm = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    for i in range(args.warmup_requests):
        run_to_completion(engine, [prompt], warm, prefix=f"warm{i}-")
    before = offload_counters(engine)
    generated, elapsed = run_to_completion(engine, [prompt] * args.batch, warm)
    delta = counters_since(before, offload_counters(engine))
    return {"tok_s": generated / elapsed, "hit_rate": delta["hit_rate"], "stall_s": delta["stall_s"],
            "misses_per_token": delta["misses"] / generated, "prefetch_issued": delta["prefetch_issued"],
            "prefetch_used": delta["prefetch_used"], "prefetch_late": delta["prefetch_late"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", default=DEFAULT_TRACE)
    parser.add_argument("--layers", type=int, default=None, help="MoE layers to build (default: the trace's)")
    parser.add_argument("--first-layer", type=int, default=0, help="trace layer the model's layer 0 replays")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--moe-intermediate", type=int, default=1408)
    parser.add_argument("--shared-intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--fraction", type=float, default=0.25, help="share of the routed experts cached")
    parser.add_argument("--cache-policy", default="default")
    parser.add_argument("--prefetch", default="none,next_layer,affinity,logistic")
    parser.add_argument("--train-prompts", type=int, default=300,
                        help="logistic prefetch: train on the trace's last N prompts first (0: learn online only)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--warmup-requests", type=int, default=8)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    trace = load_trace(args.trace)
    if not 0 <= args.train_prompts < trace.num_prompts:
        parser.error(f"--train-prompts must be in [0, {trace.num_prompts - 1}] for this trace")
    args.layers = args.layers or trace.num_layers - args.first_layer
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp), trace, args)
        train = training_trace(Path(tmp), trace, args) if args.train_prompts > 0 else None
        base = measure(replaying_engine(path, trace, args, offload="off"), args)
        rows.append({"prefetch": "all-resident", **base, "slowdown": 1.0})
        for prefetch in progress(args.prefetch.split(","), show=not args.json, desc="prefetch settings"):
            engine = replaying_engine(path, trace, args, offload="on", expert_cache_fraction=args.fraction,
                                      cache_policy=args.cache_policy, prefetch=prefetch,
                                      prefetch_trace=str(train) if prefetch == "logistic" and train else None)
            row = measure(engine, args)
            rows.append({"prefetch": prefetch, **row, "slowdown": base["tok_s"] / row["tok_s"]})
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{args.layers} layers x {trace.num_experts} experts (top-{trace.top_k}), hidden {args.hidden}, "
          f"expert FFN {args.moe_intermediate}, {args.dtype}, cache {args.fraction:.0%} of the experts, "
          f"batch {args.batch}, routing replayed from {Path(args.trace).name}")
    print(f"{'prefetch':>12} {'tok/s':>8} {'slowdown':>8} {'hit rate':>8} {'misses/tok':>10} {'stall s':>8} "
          f"{'issued':>7} {'used':>6} {'late':>6}")
    for r in rows:
        print(f"{r['prefetch']:>12} {r['tok_s']:>8.1f} {r['slowdown']:>7.2f}x {r['hit_rate']:>8.3f} "
              f"{r['misses_per_token']:>10.2f} {r['stall_s']:>8.3f} {r['prefetch_issued']:>7} "
              f"{r['prefetch_used']:>6} {r['prefetch_late']:>6}")


if __name__ == "__main__":
    main()
