"""CPU decode with int8 weights everywhere vs bf16, same run: tokens/s at batch 1 and 16.

A random Mixtral-shape checkpoint (by default hidden 1024, expert FFN 3584 = Mixtral's 3.5 x hidden,
4 layers of 8 experts top-2, 8 heads / 4 KV heads: 365 M parameters) saved in bf16. Two engines, all
experts resident: `bf16` (the model dtype everywhere) and `int8` (`--expert-dtype int8
--weight-dtype int8`: experts, attention projections and lm_head int8 with per-output-channel scales,
run by the integer dot-product kernel; routers and norms bf16). For each batch size the engines take
turns (A B, B A, ...), each round decoding `--tokens` greedy tokens for the same `batch` prompts;
reported: each round's decode tokens/s (the steps after the prefill) and the median, and the
median tokens per CPU second of the process.

    python -m benchmarks.quant_cpu_decode [--threads 1] [--batches 1,16] [--rounds 3] [--tokens 32] \
        [--checkpoint-dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

from moe_serve.engine.builder import build_engine
from moe_serve.engine.config import EngineConfig
from moe_serve.engine.core.llm_engine import LLMEngine
from moe_serve.engine.core.request import EngineRequest
from moe_serve.engine.core.sampling_params import SamplingParams
from moe_serve.engine.model.cpu_kernels import int8_dot_kernel, kernel_flavour
from moe_serve.engine.model.tokenizer_builder import build_byte_level_tokenizer, save_tokenizer

ENGINES = {"bf16": dict(expert_dtype="model", weight_dtype="model"),
           "int8": dict(expert_dtype="int8", weight_dtype="int8")}
PROMPT_TOKENS = 16


def make_checkpoint(directory: Path, args: argparse.Namespace) -> Path:
    """A random Mixtral checkpoint in bf16 (reused when `directory` already holds one)."""
    if (directory / "config.json").is_file():
        return directory
    tokenizer = build_byte_level_tokenizer()
    config = transformers.MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
        num_local_experts=args.experts, num_experts_per_tok=args.top_k, max_position_embeddings=1024,
        sliding_window=None,
    )
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    save_tokenizer(tokenizer, directory)
    return directory


def decode_round(engine: LLMEngine, prompts: list[list[int]], tokens: int, tag: str) -> tuple[float, float]:
    """Decodes `tokens` greedy tokens for every prompt: (decode tokens/s, decode tokens per CPU second),
    the prefill step (and its first token) excluded."""
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(EngineRequest(f"{tag}-{i}", prompt, params))
    first = sum(len(o.new_token_ids) for o in engine.step())
    assert first == len(prompts), "the prefill must fit one step"
    start, cpu = time.perf_counter(), time.process_time()
    generated = 0
    while engine.has_unfinished:
        generated += sum(len(o.new_token_ids) for o in engine.step())
    return generated / (time.perf_counter() - start), generated / (time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=3584, help="expert FFN size")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32, help="decoded tokens per request and round")
    parser.add_argument("--checkpoint-dir", type=Path, help="where the checkpoint is kept (default: a temporary one)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(args.checkpoint_dir or Path(tmp), args)
        engines = {name: build_engine(EngineConfig(model=str(path), dtype="bfloat16", offload="off",
                                                   max_num_seqs=max(batches), num_threads=args.threads, **settings),
                                      show_progress=False)
                   for name, settings in ENGINES.items()}
        generator = torch.Generator().manual_seed(0)
        vocab = engines["bf16"].runner.model.spec.vocab_size
        results = []
        for batch in batches:
            prompts = [torch.randint(3, vocab, (PROMPT_TOKENS,), generator=generator).tolist() for _ in range(batch)]
            for name in ENGINES:  # warm-up: first-call allocations and page faults
                decode_round(engines[name], prompts, 4, f"warm-{batch}")
            rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in ENGINES}
            for r in range(args.rounds):
                order = list(ENGINES) if r % 2 == 0 else list(reversed(ENGINES))
                for name in order:
                    rounds[name].append(decode_round(engines[name], prompts, args.tokens, f"{name}-{batch}-{r}"))
            for name in ENGINES:
                model = engines[name].runner.model
                results.append({
                    "engine": name, "batch": batch,
                    "weights_mib": round((model.dense.nbytes() + model.experts.nbytes()) / 2**20, 1),
                    "tok_s": round(statistics.median(t for t, _ in rounds[name]), 2),
                    "tok_per_cpu_s": round(statistics.median(c for _, c in rounds[name]), 2),
                    "rounds_tok_s": [round(t, 2) for t, _ in rounds[name]],
                })
    baseline = {r["batch"]: r for r in results if r["engine"] == "bf16"}
    for r in results:
        r["vs_bf16"] = round(r["tok_s"] / baseline[r["batch"]]["tok_s"], 2)
        r["cpu_vs_bf16"] = round(r["tok_per_cpu_s"] / baseline[r["batch"]]["tok_per_cpu_s"], 2)
    if args.json:
        print(json.dumps(results))
        return
    print(f"kernels: {kernel_flavour()}, int8: {int8_dot_kernel()}, {args.threads} thread(s)")
    print(f"{'batch':>5} {'engine':>6} {'MiB':>7} {'tok/s':>8} {'vs bf16':>8} {'tok/CPU s':>10} {'vs bf16':>8}  rounds tok/s")
    for r in results:
        print(f"{r['batch']:>5} {r['engine']:>6} {r['weights_mib']:>7} {r['tok_s']:>8} {r['vs_bf16']:>7}x "
              f"{r['tok_per_cpu_s']:>10} {r['cpu_vs_bf16']:>7}x  {' '.join(map(str, r['rounds_tok_s']))}")


if __name__ == "__main__":
    main()
