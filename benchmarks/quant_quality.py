"""Quality of each expert format against the bf16 model: next-token KL divergence and top-1 agreement.

Two random-weight checkpoints: a small Mixtral-style one (hidden 512, expert FFN 256, 8 layers,
16 experts top-4) and one with DeepSeek-V2-Lite's MoE geometry (hidden 2048, expert FFN 1408, 64
experts top-6, `--ds-layers` layers; routed by its own routers). Each runs in bf16 with its experts
stored as bf16 (the reference) and in each format (`--expert-dtype`); over `--prompts` random
prompts of `--length` tokens (2,000 positions by default) one prefill per prompt gives every
position's next-token distribution. Reported: the mean KL(reference || format) in nats, the share
of positions whose argmax agrees, and the expert bytes per format.

    python -m benchmarks.quant_quality [--prompts 8] [--length 250] [--ds-layers 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks.engine_vs_hf import make_checkpoint as make_mixtral
from benchmarks.prefetch_decode import make_checkpoint as make_qwen2_moe
from moe_serve.engine.builder import build_engine
from moe_serve.engine.config import EngineConfig
from moe_serve.engine.core.llm_engine import LLMEngine
from moe_serve.engine.model.attention import AttentionMetadata
from moe_serve.engine.progress import progress

FORMATS = ("int8", "int4-g32", "int4-g64", "int4-g128", "int4-g64-sym", "mxfp4")


def prompt_logits(engine: LLMEngine, prompts: list[list[int]]) -> torch.Tensor:
    """fp32 logits [positions, V] of one prefill per prompt (every prompt's positions, in order)."""
    runner = engine.runner
    out = []
    for i, prompt in enumerate(prompts):
        engine.blocks.grow(f"q{i}", len(prompt))
        meta = AttentionMetadata.build([engine.blocks.table(f"q{i}")], [len(prompt)], [len(prompt)], runner.block_size,
                                       runner.model.device)
        with torch.inference_mode():
            hidden = runner.model.forward(torch.tensor(prompt), torch.arange(len(prompt)), meta, runner.kv_caches)
            out.append(runner.model.logits(hidden))
        engine.blocks.free(f"q{i}")
    return torch.cat(out)


def compare(reference: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """Mean KL(reference || logits) over positions (nats) and the share of equal argmaxes."""
    ref_logp, logp = torch.log_softmax(reference, dim=-1), torch.log_softmax(logits, dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(dim=-1)
    return {"kl": kl.mean().item(), "top1": (reference.argmax(-1) == logits.argmax(-1)).float().mean().item()}


def evaluate(path: Path, label: str, prompts: list[list[int]], formats: list[str], show: bool) -> list[dict]:
    def engine(expert_dtype: str) -> LLMEngine:
        return build_engine(EngineConfig(model=str(path), dtype="bfloat16", expert_dtype=expert_dtype, offload="off",
                                         max_model_len=max(len(p) for p in prompts) + 1,
                                         max_num_batched_tokens=max(len(p) for p in prompts)), show_progress=False)

    reference = prompt_logits(engine("model"), prompts)
    rows = []
    for name in progress(formats, show=show, desc=label):
        quantized = engine(name)
        experts = quantized.runner.model.experts
        spec = quantized.runner.model.spec
        rows.append({"model": label, "format": name, **compare(reference, prompt_logits(quantized, prompts)),
                     "expert_bytes": experts.nbytes() // (spec.num_moe_layers * spec.num_experts)})
        del quantized
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--length", type=int, default=250)
    parser.add_argument("--ds-layers", type=int, default=2, help="layers of the DeepSeek-V2-Lite-geometry model (0: skip)")
    parser.add_argument("--ds-prompts", type=int, default=None, help="prompts for that model (default: --prompts)")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    formats = args.formats.split(",")
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 250, (args.prompts, args.length), generator=gen).tolist()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        mixtral = make_mixtral(Path(tmp) / "mixtral", 512, 256, 8, 16, 4)
        rows += evaluate(mixtral, "mixtral-small", prompts, formats, show=not args.json)
        if args.ds_layers:
            geometry = SimpleNamespace(hidden=2048, layers=args.ds_layers, heads=16, moe_intermediate=1408,
                                       shared_intermediate=2816, dtype="bfloat16")
            trace_shape = SimpleNamespace(num_experts=64, top_k=6)
            deepseek = make_qwen2_moe(Path(tmp) / "deepseek", trace_shape, geometry)
            rows += evaluate(deepseek, "deepseek-v2-lite-geometry", prompts[:args.ds_prompts], formats,
                             show=not args.json)
    if args.json:
        print(json.dumps(rows))
        return
    ds_prompts = min(args.ds_prompts or args.prompts, args.prompts)
    print(f"{args.prompts} prompts x {args.length} tokens = {args.prompts * args.length} positions (DeepSeek geometry: "
          f"{ds_prompts * args.length}); reference: the same model with bf16 experts")
    print(f"{'model':>26} {'format':>13} {'mean KL (nats)':>15} {'top-1 agree':>11} {'expert KiB':>10}")
    for r in rows:
        print(f"{r['model']:>26} {r['format']:>13} {r['kl']:>15.2e} {r['top1']:>11.4f} {r['expert_bytes'] / 1024:>10.1f}")


if __name__ == "__main__":
    main()
