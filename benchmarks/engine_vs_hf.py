"""Decode throughput of the moe-serve engine vs transformers `generate` on the same checkpoint.

Builds a random Mixtral-style checkpoint (hidden 512, expert FFN 256, 8 layers, 16 experts,
top-4 by default) with transformers' save_pretrained, then in the same process measures greedy
decode tokens/s at batch 1 and at N concurrent requests for both, and prints the ratio.

    python benchmarks/engine_vs_hf.py [--tokens 64] [--concurrency 16] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import transformers

from engine.builder import build_engine
from engine.config import EngineConfig
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams
from engine.tokenizer_builder import build_byte_level_tokenizer, save_tokenizer


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


def engine_tokens_per_s(path: Path, prompts: list[list[int]], num_tokens: int) -> float:
    engine = build_engine(EngineConfig(model=str(path), dtype="float32", max_num_seqs=len(prompts)),
                          show_progress=False)
    params = SamplingParams(max_tokens=num_tokens, temperature=0.0, ignore_eos=True)
    engine.add_request(EngineRequest("warmup", prompts[0], SamplingParams(max_tokens=4, temperature=0.0)))
    while engine.has_unfinished:
        engine.step()
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(EngineRequest(f"r{i}", prompt, params))
    generated = 0
    while engine.has_unfinished:
        generated += sum(len(o.new_token_ids) for o in engine.step())
    return generated / (time.perf_counter() - start)


def hf_tokens_per_s(path: Path, prompts: list[list[int]], num_tokens: int) -> float:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)  # equal lengths: no padding needed
    kwargs = dict(max_new_tokens=num_tokens, min_new_tokens=num_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
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
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp), args.hidden, args.intermediate, args.layers, args.experts, args.top_k)
        gen = torch.Generator().manual_seed(0)
        for batch in (1, args.concurrency):
            prompts = torch.randint(3, 400, (batch, args.prompt_len), generator=gen).tolist()
            ours = engine_tokens_per_s(path, prompts, args.tokens)
            theirs = hf_tokens_per_s(path, prompts, args.tokens)
            rows.append({"batch": batch, "engine_tok_s": round(ours, 1), "hf_tok_s": round(theirs, 1),
                         "ratio": round(ours / theirs, 2)})
    if args.json:
        print(json.dumps(rows))
        return
    print(f"{'batch':>5} {'engine tok/s':>13} {'transformers tok/s':>19} {'ratio':>6}")
    for r in rows:
        print(f"{r['batch']:>5} {r['engine_tok_s']:>13} {r['hf_tok_s']:>19} {r['ratio']:>5}x")


if __name__ == "__main__":
    main()
