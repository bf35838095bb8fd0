"""Quality of each expert format against the bf16 model: next-token KL divergence and top-1 agreement.

Two random-weight checkpoints: a small Mixtral-style one (hidden 512, expert FFN 256, 8 layers,
16 experts top-4) and one with DeepSeek-V2-Lite's MoE geometry (hidden 2048, expert FFN 1408, 64
experts top-6, `--ds-layers` layers; routed by its own routers, or with `--trace` as a routing
trace recorded, the routers still weighting the chosen experts). Each runs in bf16 with its experts
stored as bf16 (the reference) and in each format (`--expert-dtype`); over `--prompts` random
prompts of `--length` tokens (2,000 positions by default) one prefill per prompt gives every
position's next-token distribution. Reported: the mean KL(reference || format) in nats, the share
of positions whose argmax agrees, and the expert bytes per format.

Offloaded rows (`--miss-precisions`, at `--cache-fraction`): the bf16 model with its experts offloaded,
each miss loading the full copy or (`--miss-precision low / adaptive`) the `--miss-low-dtype` copy;
teacher-forced decode, one token a step over the first `--offload-positions` positions of each model's
prompts (offloaded decode is where misses happen one token at a time), against the all-resident bf16
model decoded the same way; also reported: expert bytes copied per token and their share of the
offloaded bf16 (`full`) run's. Prefetch is off (demand misses only).

    python -m benchmarks.quant_quality [--prompts 8] [--length 250] [--ds-layers 2] [--json]
        [--miss-precisions full,low,adaptive] [--miss-low-gates 1.1,1.5] [--offload-positions 2000]
        [--trace ../shared/traces/deepseek-v2-lite-puffin-train.npz]
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
from moe_serve.engine.builder import RoutingReplay, build_engine
from moe_serve.engine.config import EngineConfig
from moe_serve.engine.core.llm_engine import LLMEngine
from moe_serve.engine.core.step import StepChunk, StepLayout, StepObserver
from moe_serve.engine.model.attention import AttentionMetadata
from moe_serve.engine.progress import progress
from moe_serve.engine.traces.trace_file import load_trace

FORMATS = ("int8", "int4-g32", "int4-g64", "int4-g128", "int4-g64-sym", "mxfp4")


def begin_step(engine: LLMEngine, seq_id: str, start: int, num_tokens: int, prefill: bool) -> None:
    """Tells a replayed routing (`--trace`) which sequence and positions the next forward computes."""
    override = engine.runner.model.routing_override
    if isinstance(override, StepObserver):
        override.begin_step(StepLayout((StepChunk(seq_id, "", start, range(num_tokens), prefill),)))


def prompt_logits(engine: LLMEngine, prompts: list[list[int]]) -> torch.Tensor:
    """fp32 logits [positions, V] of one prefill per prompt (every prompt's positions, in order)."""
    runner = engine.runner
    out = []
    for i, prompt in enumerate(prompts):
        engine.blocks.grow(f"q{i}", len(prompt))
        begin_step(engine, f"q{i}", 0, len(prompt), prefill=True)
        meta = AttentionMetadata.build([engine.blocks.table(f"q{i}")], [len(prompt)], [len(prompt)], runner.block_size,
                                       runner.model.device)
        with torch.inference_mode():
            hidden = runner.model.forward(torch.tensor(prompt), torch.arange(len(prompt)), meta, runner.kv_caches)
            out.append(runner.model.logits(hidden))
        engine.blocks.free(f"q{i}")
    return torch.cat(out)


def decode_logits(engine: LLMEngine, prompts: list[list[int]], positions: int) -> torch.Tensor:
    """fp32 logits [positions, V]: the prompts fed one token a step (teacher-forced decode), each step
    ending the provider's step (the cache's clock, its upgrades), until `positions` tokens are in."""
    runner = engine.runner
    out = []
    for i, prompt in enumerate(prompts):
        for position, token in enumerate(prompt[:positions - len(out)]):
            engine.blocks.grow(f"d{i}", position + 1)
            begin_step(engine, f"d{i}", position, 1, prefill=False)
            meta = AttentionMetadata.build([engine.blocks.table(f"d{i}")], [position + 1], [1], runner.block_size,
                                           runner.model.device)
            with torch.inference_mode():
                hidden = runner.model.forward(torch.tensor([token]), torch.tensor([position]), meta, runner.kv_caches)
                out.append(runner.model.logits(hidden))
            runner.model.experts.end_step()
        engine.blocks.free(f"d{i}")
        if len(out) >= positions:
            break
    return torch.cat(out)


def compare(reference: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """Mean KL(reference || logits) over positions (nats) and the share of equal argmaxes."""
    ref_logp, logp = torch.log_softmax(reference, dim=-1), torch.log_softmax(logits, dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(dim=-1)
    return {"kl": kl.mean().item(), "top1": (reference.argmax(-1) == logits.argmax(-1)).float().mean().item()}


def evaluate(path: Path, label: str, prompts: list[list[int]], formats: list[str], show: bool,
             replay: RoutingReplay | None = None) -> list[dict]:
    def engine(expert_dtype: str) -> LLMEngine:
        return build_engine(EngineConfig(model=str(path), dtype="bfloat16", expert_dtype=expert_dtype, offload="off",
                                         max_model_len=max(len(p) for p in prompts) + 1,
                                         max_num_batched_tokens=max(len(p) for p in prompts)), show_progress=False,
                            replay=replay)

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


def evaluate_offloaded(path: Path, label: str, prompts: list[list[int]], args: argparse.Namespace,
                       replay: RoutingReplay | None = None) -> list[dict]:
    """The offloaded rows of one model: each miss precision (adaptive at each gate) against the bf16
    all-resident model, all decoded one token a step."""
    positions = min(args.offload_positions, sum(len(p) for p in prompts))

    def engine(**overrides: object) -> LLMEngine:
        return build_engine(EngineConfig(model=str(path), dtype="bfloat16", max_model_len=max(len(p) for p in prompts) + 1,
                                         max_num_batched_tokens=16, prefetch="none", **overrides), show_progress=False,
                            replay=replay)

    reference = decode_logits(engine(offload="off"), prompts, positions)
    runs = [("full", None)] if "full" in args.miss_precisions else []
    runs += [("low", None)] if "low" in args.miss_precisions else []
    runs += [("adaptive", gate) for gate in args.miss_low_gates] if "adaptive" in args.miss_precisions else []
    rows, full_bytes = [], None
    for mode, gate in progress(runs, show=not args.json, desc=f"{label} offloaded"):
        run = engine(expert_cache_fraction=args.cache_fraction, miss_precision=mode, miss_low_dtype=args.miss_low_dtype,
                     **({} if gate is None else {"miss_low_gate": gate}))
        logits = decode_logits(run, prompts, positions)
        stats = run.runner.model.experts.cache.stats()
        per_token = sum(stats.bytes_copied.values()) / positions
        full_bytes = per_token if mode == "full" else full_bytes
        rows.append({"model": label, "format": mode if mode == "full" else f"{mode} {args.miss_low_dtype}"
                     + ("" if gate is None else f" gate {gate}"), **compare(reference, logits),
                     "positions": positions, "bytes_per_token": per_token,
                     "bytes_vs_full": None if full_bytes is None else per_token / full_bytes,
                     "loads": dict(stats.loads)})
        del run
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--length", type=int, default=250)
    parser.add_argument("--ds-layers", type=int, default=2, help="layers of the DeepSeek-V2-Lite-geometry model (0: skip)")
    parser.add_argument("--ds-prompts", type=int, default=None, help="prompts for that model (default: --prompts)")
    parser.add_argument("--ds-hidden", type=int, default=2048, help="that model's hidden size (tests: smaller)")
    parser.add_argument("--ds-moe-intermediate", type=int, default=1408,
                        help="its experts' FFN size (its shared experts': twice that)")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--miss-precisions", default="full,low,adaptive", help="offloaded rows ('' to skip them)")
    parser.add_argument("--miss-low-dtype", default="int4-g32")
    parser.add_argument("--miss-low-gates", default=str(EngineConfig.model_fields["miss_low_gate"].default),
                        help="adaptive: the relative gate thresholds to run (default: the engine's)")
    parser.add_argument("--cache-fraction", type=float, default=0.25)
    parser.add_argument("--offload-positions", type=int, default=2000, help="decoded positions per offloaded row")
    parser.add_argument("--trace", default=None,
                        help="the DeepSeek-geometry model routes as this routing trace recorded (its first "
                             "--ds-layers layers; the routers still weight the chosen experts) instead of by its routers")
    args = parser.parse_args()
    formats = [name for name in args.formats.split(",") if name]
    args.miss_precisions = [name for name in args.miss_precisions.split(",") if name]
    args.miss_low_gates = [float(gate) for gate in args.miss_low_gates.split(",")]
    trace = None if args.trace is None else load_trace(args.trace)  # before minutes of the Mixtral model's rows
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 250, (args.prompts, args.length), generator=gen).tolist()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        mixtral = make_mixtral(Path(tmp) / "mixtral", 512, 256, 8, 16, 4)
        rows += evaluate(mixtral, "mixtral-small", prompts, formats, show=not args.json)
        offloaded = evaluate_offloaded(mixtral, "mixtral-small", prompts, args) if args.miss_precisions else []
        if args.ds_layers:
            geometry = SimpleNamespace(hidden=args.ds_hidden, layers=args.ds_layers, heads=16,
                                       moe_intermediate=args.ds_moe_intermediate,
                                       shared_intermediate=2 * args.ds_moe_intermediate, dtype="bfloat16")
            shape = SimpleNamespace(num_experts=64, top_k=6) if trace is None else trace  # a trace's experts, top-k
            deepseek = make_qwen2_moe(Path(tmp) / "deepseek", shape, geometry)
            replay = None if trace is None else RoutingReplay(trace)
            label = "deepseek-v2-lite-geometry" + ("" if replay is None else " (trace routing)")
            rows += evaluate(deepseek, label, prompts[:args.ds_prompts], formats, show=not args.json, replay=replay)
            if args.miss_precisions:
                offloaded += evaluate_offloaded(deepseek, label, prompts[:args.ds_prompts], args, replay)
    if args.json:
        print(json.dumps(rows + offloaded))
        return
    ds_prompts = min(args.ds_prompts or args.prompts, args.prompts)
    print(f"{args.prompts} prompts x {args.length} tokens = {args.prompts * args.length} positions (DeepSeek geometry: "
          f"{ds_prompts * args.length}); reference: the same model with bf16 experts")
    print(f"{'model':>26} {'format':>13} {'mean KL (nats)':>15} {'top-1 agree':>11} {'expert KiB':>10}")
    for r in rows:
        print(f"{r['model']:>26} {r['format']:>13} {r['kl']:>15.2e} {r['top1']:>11.4f} {r['expert_bytes'] / 1024:>10.1f}")
    if offloaded:
        print(f"offloaded at cache fraction {args.cache_fraction}, decoded one token a step, prefetch off; reference: the "
              "all-resident bf16 model decoded the same way; bytes: expert bytes copied per token")
        print(f"{'model':>26} {'misses':>28} {'positions':>9} {'mean KL (nats)':>15} {'top-1 agree':>11} "
              f"{'KiB/token':>10} {'vs full':>7}  loads")
        for r in offloaded:
            share = "" if r["bytes_vs_full"] is None else f"{r['bytes_vs_full']:.3f}"
            print(f"{r['model']:>26} {r['format']:>28} {r['positions']:>9} {r['kl']:>15.2e} {r['top1']:>11.4f} "
                  f"{r['bytes_per_token'] / 1024:>10.1f} {share:>7}  {r['loads']}")


if __name__ == "__main__":
    main()
