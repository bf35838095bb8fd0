"""Decode throughput of the moe-serve engine vs transformers `generate` on the same checkpoint.

Builds a random Mixtral-style checkpoint (hidden 512, expert FFN 256, 8 layers, 16 experts,
top-4 by default) with transformers' save_pretrained, then in the same process measures greedy
decode tokens/s at batch 1 and at N concurrent requests for both, and prints the ratio.

Decoding a MoE model on a CPU is bound by memory bandwidth: every step reads the dense
weights once plus every expert that at least one token of the batch routes to. So the run
also measures the machine's streaming read bandwidth and prints the roofline (the tokens/s
that reading those bytes once per step at that bandwidth would allow) and how close each
implementation comes to it; `max ratio` is the best ratio any engine could show here.

The two implementations take turns (`--rounds`, each the whole generation) and each keeps its
best round, so a machine whose speed drifts (shared cores, a neighbour's memory traffic) does
not favour whichever ran in its good moment.

    python -m benchmarks.engine_vs_hf [--tokens 64] [--concurrency 16] [--dtype float32] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from benchmarks.engine_runs import run_to_completion
from moe_serve.engine.builder import build_engine
from moe_serve.engine.config import EngineConfig
from moe_serve.engine.core.llm_engine import LLMEngine
from moe_serve.engine.core.request import EngineRequest
from moe_serve.engine.core.sampling_params import SamplingParams
from moe_serve.engine.model.tokenizer_builder import build_byte_level_tokenizer, save_tokenizer
from moe_serve.engine.progress import progress

BANDWIDTH_BUFFER_BYTES = 1 << 30  # far larger than any last-level cache


def make_checkpoint(directory: Path, hidden: int, intermediate: int, layers: int, experts: int, top_k: int) -> Path:
    tokenizer = build_byte_level_tokenizer()
    config = transformers.MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=4, num_local_experts=experts, num_experts_per_tok=top_k,
        max_position_embeddings=1024, sliding_window=None,
    )
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(config).save_pretrained(directory)
    save_tokenizer(tokenizer, directory)
    return directory


def read_bandwidth_gbps(repeats: int = 5) -> float:
    """Streaming read bandwidth of this machine with torch's threads (best of `repeats` full reads)."""
    buffer = torch.ones(BANDWIDTH_BUFFER_BYTES // 4, dtype=torch.float32)
    buffer.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return BANDWIDTH_BUFFER_BYTES / best / 1e9


def decode_bytes_per_step(engine: LLMEngine, batch: int) -> float:
    """Weight bytes one decode step of `batch` sequences must read: the dense weights except the
    embedding table (only `batch` rows of it) plus, per layer, the expected number of distinct
    experts the batch routes to (uniform routing: E * (1 - (1 - k/E)^batch)) times one expert's bytes."""
    model = engine.runner.model
    dense = model.dense
    embed = dense.embed_tokens
    dense_bytes = dense.nbytes()
    if embed is not dense.lm_head:  # an untied table is read only at `batch` rows
        dense_bytes -= embed.numel() * embed.element_size()
    spec = model.spec
    expert_bytes = model.experts.nbytes() / (spec.num_layers * spec.num_experts)
    distinct = spec.num_experts * (1 - (1 - spec.top_k / spec.num_experts) ** batch)
    return dense_bytes + spec.num_layers * distinct * expert_bytes


def warm_engine(path: Path, batch: int, dtype: str) -> LLMEngine:
    """The engine for `batch` concurrent requests, after one short warm-up request."""
    engine = build_engine(EngineConfig(model=str(path), dtype=dtype, max_num_seqs=batch), show_progress=False)
    engine.add_request(EngineRequest("warmup", [3, 4, 5], SamplingParams(max_tokens=4, temperature=0.0)))
    while engine.has_unfinished:
        engine.step()
    return engine


def engine_tokens_per_s(engine: LLMEngine, prompts: list[list[int]], num_tokens: int, round_index: int) -> float:
    params = SamplingParams(max_tokens=num_tokens, temperature=0.0, ignore_eos=True)
    generated, elapsed = run_to_completion(engine, prompts, params, prefix=f"round{round_index}-")
    return generated / elapsed


def warm_hf(path: Path, dtype: str) -> Any:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    with torch.inference_mode():
        model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    return model


def hf_tokens_per_s(model: Any, prompts: list[list[int]], num_tokens: int) -> float:
    ids = torch.tensor(prompts)  # equal lengths: no padding needed
    kwargs = dict(max_new_tokens=num_tokens, min_new_tokens=num_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        elapsed = time.perf_counter() - start
    return (out.shape[1] - ids.shape[1]) * len(prompts) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=256, help="expert FFN size (fine-grained, hidden/2)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="weights and activations of both implementations")
    parser.add_argument("--rounds", type=int, default=3, help="turns each implementation takes; its best counts")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    bandwidth = read_bandwidth_gbps()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp), args.hidden, args.intermediate, args.layers, args.experts, args.top_k)
        gen = torch.Generator().manual_seed(0)
        for batch in progress((1, args.concurrency), show=not args.json, desc="batch sizes"):
            prompts = torch.randint(3, 400, (batch, args.prompt_len), generator=gen).tolist()
            engine, hf_model = warm_engine(path, batch, args.dtype), warm_hf(path, args.dtype)
            ours = theirs = 0.0
            for round_index in range(args.rounds):
                ours = max(ours, engine_tokens_per_s(engine, prompts, args.tokens, round_index))
                theirs = max(theirs, hf_tokens_per_s(hf_model, prompts, args.tokens))
            step_bytes = decode_bytes_per_step(engine, batch)
            del engine, hf_model
            roofline = batch * bandwidth * 1e9 / step_bytes
            rows.append({"batch": batch, "dtype": args.dtype, "engine_tok_s": round(ours, 1),
                         "hf_tok_s": round(theirs, 1), "ratio": round(ours / theirs, 2),
                         "mb_per_step": round(step_bytes / 1e6, 1), "read_gbps": round(bandwidth, 2),
                         "roofline_tok_s": round(roofline, 1), "max_ratio": round(roofline / theirs, 2)})
    if args.json:
        print(json.dumps(rows))
        return
    print(f"streaming read bandwidth {bandwidth:.2f} GB/s, {args.dtype}")
    print(f"{'batch':>5} {'engine tok/s':>13} {'transformers tok/s':>19} {'ratio':>6} {'MB/step':>8} "
          f"{'roofline tok/s':>15} {'engine %':>9} {'hf %':>5} {'max ratio':>10}")
    for r in rows:
        print(f"{r['batch']:>5} {r['engine_tok_s']:>13} {r['hf_tok_s']:>19} {r['ratio']:>5}x {r['mb_per_step']:>8} "
              f"{r['roofline_tok_s']:>15} {100 * r['engine_tok_s'] / r['roofline_tok_s']:>8.0f}% "
              f"{100 * r['hf_tok_s'] / r['roofline_tok_s']:>4.0f}% {r['max_ratio']:>9}x")


if __name__ == "__main__":
    main()
