"""Offloaded decode per expert format, same run: tokens/s and expert bytes copied per token.

A random Qwen2-MoE checkpoint with DeepSeek-V2-Lite's geometry (hidden 2048, expert FFN 1408,
64 experts top-6, two shared experts as one FFN of 2816; `--layers` MoE layers) in bf16, every
layer routing as the shared DeepSeek-V2-Lite trace recorded (`TraceRouter`), so the expert
cache misses what the real model would. For each cache fraction, one engine per expert format
(`--expert-dtype`: bf16 = the model dtype, int8, int4, mxfp4; int4+w4 = int4 experts with
`--weight-dtype int4`, the dense layers int4 too; adaptive = bf16 experts with `--miss-precision
adaptive`, offloaded fractions only) with that share of the experts in the device
tier (on a CPU a RAM pool filled by the copy engine, unthrottled or throttled to
`--expert-link-gbps`), no prefetching; fraction 1.0 is the all-resident engine (nothing is copied). Every engine replays the same trace prompts with the
same history (`TraceRouter.restart`): warm-up request i replays the trace's prompt i, round r's
request prompt `warmup + r`, and the n-th quantized engine first replays the n pairings' rounds the
bf16 engine decoded before it, so every engine's cache meets each measured prompt in the same state
and misses per token differ only where the format does. A step may need a whole layer's experts, so a
fraction needs at least 1 / layers of them (0.25: 4 layers). Each engine is warmed with
`--warmup` requests (filling the cache); then, one format at a time beside the bf16 engine (host
RAM holds two engines, not five), the two take turns for `--rounds` rounds (A B, B A, A B, ...).
Reported per format: each round's decode tokens/s (the time after each request's first token)
and the median, the median tokens per CPU second of the process (compute and copy threads: the
cost, robust on a machine other jobs load), and the expert bytes the copy engine moved per decoded
token (the real bytes of what each miss loaded), each format beside the bf16 engine's rounds of its
own pairing.

    python -m benchmarks.quant_decode [--layers 4] [--fractions 1.0,0.5,0.25] [--threads 1]
        [--expert-link-gbps GBPS] [--miss-low-gate G] [--checkpoint-dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.engine_runs import counters_since, offload_counters
from benchmarks.prefetch_decode import DEFAULT_TRACE, make_checkpoint
from moe_serve.engine.builder import RoutingReplay, build_engine
from moe_serve.engine.config import EngineConfig
from moe_serve.engine.core.llm_engine import LLMEngine
from moe_serve.engine.core.request import EngineRequest
from moe_serve.engine.core.sampling_params import SamplingParams
from moe_serve.engine.offload.provider import OffloadedExperts
from moe_serve.engine.progress import progress
from moe_serve.engine.traces.trace_file import RoutingTrace, load_trace
from moe_serve.engine.traces.trace_router import TraceRouter

DEFAULT_FORMATS = "bf16,int8,int4,mxfp4,adaptive"
FORMATS = {  # label: the engine settings that make it
    "bf16": {"expert_dtype": "model"},
    "int8": {"expert_dtype": "int8"},
    "int4": {"expert_dtype": "int4"},
    "mxfp4": {"expert_dtype": "mxfp4"},
    "int4+w4": {"expert_dtype": "int4", "weight_dtype": "int4"},  # int4 experts and int4 dense weights (the CPU choice)
    # bf16 experts; a miss whose relative gate weight is below --miss-low-gate loads the int4-g32 copy
    # (docs/mixed_precision.md)
    "adaptive": {"expert_dtype": "model", "miss_precision": "adaptive", "miss_low_dtype": "int4-g32"},
}
OFFLOAD_ONLY = ("adaptive",)  # formats that differ from the model dtype only in what a miss loads: no all-resident row


def bytes_copied(engine: LLMEngine) -> int:
    """Expert bytes the copy engine has moved into slots so far (the real bytes of what each miss loaded)."""
    experts = engine.runner.model.experts
    return sum(experts.cache.stats().bytes_copied.values()) if isinstance(experts, OffloadedExperts) else 0


def decode(engine: LLMEngine, request_id: str, prompt: list[int], params: SamplingParams,
           trace_prompt: int) -> tuple[int, float, dict]:
    """One request to the end, routed as the trace's prompt `trace_prompt`: (tokens decoded after the
    first, their seconds, offload counters over them plus `cpu_s`, the process's CPU seconds: compute
    and copy threads, whatever else runs)."""
    router = engine.runner.model.routing_override
    assert isinstance(router, TraceRouter)
    router.restart(trace_prompt)
    engine.add_request(EngineRequest(request_id, prompt, params))
    first = sum(len(o.new_token_ids) for o in engine.step())  # the prefill and the first token
    before, copied, start, cpu = offload_counters(engine), bytes_copied(engine), time.perf_counter(), time.process_time()
    generated = 0
    while engine.has_unfinished:
        generated += sum(len(o.new_token_ids) for o in engine.step())
    elapsed = time.perf_counter() - start
    assert first == 1
    return generated, elapsed, {**counters_since(before, offload_counters(engine)), "cpu_s": time.process_time() - cpu,
                                "bytes": bytes_copied(engine) - copied}


def warm_engine(path: Path, trace: RoutingTrace, args: argparse.Namespace, name: str, fraction: float,
                prompt: list[int], params: SamplingParams, earlier_pairings: int = 0) -> LLMEngine:
    """The engine of format `name` at `fraction` (1.0: all resident), warmed with `--warmup` requests and
    the rounds of `earlier_pairings` pairings (the history the bf16 engine has when it meets this one)."""
    cache = dict(offload="off") if fraction == 1.0 else dict(offload="on", expert_cache_fraction=fraction)
    if fraction < 1.0 and args.expert_link_gbps:
        cache["expert_link_gbps"] = args.expert_link_gbps
    settings = dict(FORMATS[name])
    if settings.get("miss_precision") == "adaptive":
        settings["miss_low_gate"] = args.miss_low_gate
    config = EngineConfig(model=str(path), dtype="bfloat16", prefetch="none", task_preload="off", num_threads=args.threads,
                          max_num_seqs=1, **settings, **cache)
    engine = build_engine(config, show_progress=False, replay=RoutingReplay(trace, first_layer=args.first_layer))
    for i in range(args.warmup):
        decode(engine, f"w{i}", prompt, params, trace_prompt=i)
    for pairing in range(earlier_pairings):
        for r in range(args.rounds):
            decode(engine, f"h{pairing}-{r}", prompt, params, trace_prompt=args.warmup + r)
    return engine


def expert_nbytes(engine: LLMEngine, fraction: float, total_experts: int) -> int:
    """One routed expert's stored bytes."""
    experts = engine.runner.model.experts
    return experts.nbytes() // total_experts if fraction == 1.0 else experts.cache.store.expert_nbytes


def print_header(args: argparse.Namespace, trace: RoutingTrace) -> None:
    """What was measured, and the table header."""
    print(f"{args.layers} MoE layers x {trace.num_experts} experts (top-{trace.top_k}), hidden {args.hidden}, expert FFN "
          f"{args.moe_intermediate}, bf16 model, {args.threads} thread(s), batch 1, copy link "
          f"{f'{args.expert_link_gbps:g} GB/s' if args.expert_link_gbps else 'unthrottled (RAM to RAM)'}, routing replayed from "
          f"{Path(args.trace).name}; {args.rounds} rounds of {args.tokens} tokens per format, alternated with bf16; "
          f"adaptive: int4-g32 copies below relative gate {args.miss_low_gate:g}")
    print(f"{'fraction':>8} {'format':>8} {'expert MiB':>10} {'tok/s':>7} {'vs bf16':>7} {'tok/CPU s':>9} {'vs bf16':>7} "
          f"{'misses/tok':>10} {'MiB/tok':>8} {'vs bf16':>7}  rounds tok/s")


def summary(fraction: float, name: str, nbytes: int, measured: list[tuple[int, float, dict]]) -> dict:
    """One engine's rounds of one pairing: medians, misses and bytes per token."""
    tokens = sum(m[0] for m in measured)
    misses = sum(m[2]["misses"] for m in measured)
    copied = sum(m[2]["bytes"] for m in measured)
    rounds = [m[0] / m[1] for m in measured]
    return {"fraction": fraction, "format": name, "expert_bytes": nbytes,
            "rounds_tok_s": [round(t, 2) for t in rounds], "tok_s": round(statistics.median(rounds), 2),
            "tok_per_cpu_s": round(statistics.median(m[0] / m[2]["cpu_s"] for m in measured), 2),
            "misses_per_token": round(misses / tokens, 2), "mib_per_token": round(copied / tokens / 2**20, 2)}


def print_rows(rows: list[dict], base_name: str) -> None:
    """One fraction's rows, each against the baseline format's row."""
    base = next(b for b in rows if b["format"] == base_name)
    for r in rows:
        bytes_ratio = r["mib_per_token"] / base["mib_per_token"] if base["mib_per_token"] else float("nan")
        print(f"{r['fraction']:>8} {r['format']:>8} {r['expert_bytes'] / 2**20:>10.2f} {r['tok_s']:>7.2f} "
              f"{r['tok_s'] / base['tok_s']:>6.2f}x {r['tok_per_cpu_s']:>9.2f} {r['tok_per_cpu_s'] / base['tok_per_cpu_s']:>6.2f}x "
              f"{r['misses_per_token']:>10.2f} {r['mib_per_token']:>8.2f} "
              f"{bytes_ratio:>6.2f}x  {' '.join(f'{t:.2f}' for t in r['rounds_tok_s'])}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", default=DEFAULT_TRACE)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--first-layer", type=int, default=0, help="trace layer the model's layer 0 replays")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--moe-intermediate", type=int, default=1408)
    parser.add_argument("--shared-intermediate", type=int, default=2816)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--fractions", default="1.0,0.5,0.25")
    parser.add_argument("--formats", default=DEFAULT_FORMATS, help=f"of {', '.join(FORMATS)}; the first is the baseline")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--expert-link-gbps", type=float, default=None,
                        help="throttle the copy engine to this many GB/s (a PCIe-class link; unset: RAM-to-RAM copies)")
    parser.add_argument("--miss-low-gate", type=float, default=EngineConfig.model_fields["miss_low_gate"].default,
                        help="adaptive: misses whose relative gate weight is below this load the int4-g32 copy")
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="write the checkpoint here, or reuse the one a run with the same flags wrote there")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.dtype = "bfloat16"
    trace = load_trace(args.trace)
    names = args.formats.split(",")
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    prompt = list(range(3, 3 + args.prompt_len))
    rows = []
    if not args.json:
        print_header(args, trace)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.checkpoint_dir or Path(tmp)
        if not (path / "config.json").is_file():
            make_checkpoint(path, trace, args)
        for fraction in progress([float(f) for f in args.fractions.split(",")], show=not args.json, desc="fractions"):
            base, others = names[0], names[1:]
            base_engine = warm_engine(path, trace, args, base, fraction, prompt, params)
            base_bytes = expert_nbytes(base_engine, fraction, args.layers * trace.num_experts)
            for pairing, name in enumerate(n for n in others if fraction < 1.0 or n not in OFFLOAD_ONLY):
                # one quantized engine at a time beside the baseline: A B A B ...
                engines = {base: base_engine, name: warm_engine(path, trace, args, name, fraction, prompt, params, pairing)}
                measured: dict[str, list[tuple[int, float, dict]]] = {base: [], name: []}
                for r in range(args.rounds):
                    for turn in ((base, name) if r % 2 == 0 else (name, base)):
                        measured[turn].append(decode(engines[turn], f"{name}-r{r}", prompt, params,
                                                     trace_prompt=args.warmup + r))
                nbytes = {base: base_bytes, name: expert_nbytes(engines[name], fraction, args.layers * trace.num_experts)}
                del engines
                pair = [summary(fraction, label, nbytes[label], measured[label]) for label in (base, name)]
                rows += pair
                if not args.json:
                    print_rows(pair, base)
            del base_engine
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
