"""The `trace` commands: `simulate` replays a routing trace through cache policies (optionally with
next-layer prefetching and a link/compute timing model, the bytes of each expert precision, and the
copy / host / auto miss handlings) and `predictors` scores the affinity predictor; each prints a table or JSON. Their long loops draw progress bars on stderr when it is
a terminal, never with --json."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from moe_serve.cache_policies import DEFAULT_POLICY, available_policies
from moe_serve.engine.model.quant import ExpertFormat
from moe_serve.engine.prefetch.logistic_predictor import LOGISTIC_MIN_PROBABILITY, LogisticPredictor
from moe_serve.engine.prefetch.predictors import AFFINITY_MIN_SCORE, affinity_recall, recall_at
from moe_serve.engine.prefetch.replay import (
    PCIE4_X16_EFFECTIVE_GBPS,
    RTX_24GB_COMPUTE_MS_PER_LAYER,
    Prefetcher,
    PrefetchResult,
    TimingModel,
    available_prefetchers,
    simulate_prefetch,
)
from moe_serve.engine.traces.bytes_model import (
    HANDLINGS,
    HandlingRates,
    PrecisionResult,
    expert_nbytes,
    format_label,
    parse_formats,
    per_format,
    simulate_handling,
)
from moe_serve.engine.traces.replay import Oracle, ReplayResult, simulate, validate_cache_size
from moe_serve.engine.traces.trace_file import KNOWN_GEOMETRIES, RoutingTrace, load_trace

logger = logging.getLogger(__name__)

EXIT_USAGE = 2


def _geometry_help() -> str:
    lines = [
        f"{g.name}: hidden {g.hidden_size} x moe_intermediate {g.moe_intermediate_size} x {g.num_matrices} "
        f"matrices x {g.bytes_per_param:g} byte/param = {g.expert_bytes} bytes"
        for g in KNOWN_GEOMETRIES
    ]
    return "default expert bytes by model (matched in the trace's model name or file name): " + "; ".join(lines)


def add_trace_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `trace simulate` and `trace predictors` under an existing subparsers object."""
    trace = subparsers.add_parser("trace", help="routing-trace tools")
    commands = trace.add_subparsers(dest="trace_command", required=True)
    sim = commands.add_parser(
        "simulate",
        help="replay a routing trace through expert-cache policies",
        description="Replay a routing trace (npz or Mixtral jsonl) through eviction policies, one cache "
        "of N slots per MoE layer, and report hit rate and expert bytes moved per token. " + _geometry_help(),
    )
    sim.add_argument("--trace", required=True, help="routing trace file (.npz or .jsonl)")
    sim.add_argument(
        "--policy",
        default=None,
        help=f"comma-separated policies among {', '.join(available_policies() + [Oracle.BELADY.value])} "
        f"(default lru,{DEFAULT_POLICY},{Oracle.BELADY.value}; without {Oracle.BELADY.value} under --prefetch)",
    )
    sim.add_argument("--cache-experts", required=True, help="slots per layer, comma-separated (e.g. 16,32)")
    sim.add_argument("--tokens", type=int, default=None, help="replay only the first K tokens (after --learn-prompts)")
    sim.add_argument("--expert-bytes", type=int, default=None, help="bytes per expert (default: from geometry)")
    sim.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    sim.add_argument(
        "--prefetch",
        default=None,
        help=f"comma-separated next-layer prefetchers among {', '.join(available_prefetchers())}: "
        "replay with the link/compute timing model and report stall time",
    )
    sim.add_argument("--link-gbps", type=float, default=PCIE4_X16_EFFECTIVE_GBPS,
                     help="host->device link bandwidth in GB/s (default: PCIe 4.0 x16 effective)")
    sim.add_argument("--compute-ms-per-layer", type=float, default=RTX_24GB_COMPUTE_MS_PER_LAYER,
                     help="compute time of one MoE layer for one token in ms (default: a 24 GB card)")
    sim.add_argument("--formats", default=None,
                     help="comma-separated expert precisions among bf16, int8, int4[-g32|-g64|-g128][-sym], mxfp4: "
                     "bytes and stall per token at each (each format's real stored bytes for the trace's geometry)")
    sim.add_argument("--miss-handling", default=None,
                     help=f"comma-separated among {', '.join(HANDLINGS)}: model each layer's misses copied to the "
                     "device, computed on the host, or chosen per miss (the engine's cost model); per token: link "
                     "bytes and modelled MoE milliseconds (default formats: bf16)")
    sim.add_argument("--host-gbps", type=float, default=20.0,
                     help="expert bytes the host's kernels stream per second, GB/s (--miss-handling; default 20)")
    sim.add_argument("--device-gbps", type=float, default=1000.0,
                     help="expert bytes the device's kernels stream per second, GB/s (--miss-handling; default 1000)")
    sim.add_argument("--prefetch-width", type=int, default=None,
                     help="affinity / logistic guesses per layer (default: the trace's top-k)")
    sim.add_argument("--min-score", type=float, default=None,
                     help="affinity guesses need this mean P(expert | previous layer's experts) "
                     f"(default {AFFINITY_MIN_SCORE:g}), logistic guesses this probability "
                     f"(default {LOGISTIC_MIN_PROBABILITY:g}); 0 keeps every guess")
    _add_learn_prompts(sim)
    sim.set_defaults(handler=run_simulate)
    pred = commands.add_parser(
        "predictors",
        help="recall of the inter-layer affinity predictor on held-out prompts",
        description="Learn the affinity predictor (layer l -> layer l+1) on the first prompts, update it after "
        "each later prompt, and report recall@k of its predictions of layer l+1 on the later prompts, per layer.",
    )
    pred.add_argument("--trace", required=True, help="routing trace file (.npz or .jsonl)")
    pred.add_argument("--k", default="6,12", help="comma-separated numbers of guesses (default 6,12)")
    pred.add_argument("--tokens", type=int, default=None, help="evaluate only the first K held-out tokens")
    pred.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    _add_learn_prompts(pred)
    pred.set_defaults(handler=run_predictors)


def _add_learn_prompts(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--learn-prompts", type=int, default=0,
                        help="the first N prompts train the predictors; replay and measure on the rest")


def _parse_sizes(text: str, flag: str = "--cache-experts") -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not sizes:
        raise ValueError(f"{flag} needs at least one size")
    return sizes


def _parse_prefetchers(text: str) -> list[Prefetcher]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in available_prefetchers()]
    if unknown or not names:
        raise ValueError(f"unknown prefetcher {', '.join(unknown) or '(none)'}; "
                         f"valid: {', '.join(available_prefetchers())}")
    return [Prefetcher(name) for name in names]


def _parse_policies(text: str | None, with_prefetch: bool) -> list[str]:
    if text is None:
        text = f"lru,{DEFAULT_POLICY}" + ("" if with_prefetch else f",{Oracle.BELADY.value}")
    names = [part.strip() for part in text.split(",") if part.strip()]
    valid = available_policies() + ([] if with_prefetch else [Oracle.BELADY.value])
    unknown = [name for name in names if name not in valid]
    if unknown or not names:
        raise ValueError(f"unknown policy {', '.join(unknown) or '(none)'}; valid: {', '.join(valid)}")
    return names


def _expert_bytes(trace: RoutingTrace, override: int | None) -> int:
    if override is not None:
        if override < 0:
            raise ValueError("--expert-bytes must be >= 0")
        return override
    geometry = trace.geometry
    return geometry.expert_bytes if geometry is not None else 0


def format_table(results: list[ReplayResult]) -> str:
    """Aligned text table, one row per (cache size, policy)."""
    header = ("policy", "cache_experts", "hit_rate", "misses", "expert_MB_per_token")
    rows = [
        (r.policy, str(r.cache_experts), f"{r.hit_rate:.4f}", str(r.misses), f"{r.expert_bytes_per_token / 1e6:.2f}")
        for r in results
    ]
    return _align(header, rows)


def format_precision_table(results: list[PrecisionResult]) -> str:
    """Aligned text table, one row per (cache size, policy, format[, handling])."""
    handled = any(r.handling for r in results)
    header = ("policy", "cache_experts", "format", *(("handling",) if handled else ()), "expert_MB", "misses_per_token",
              *(("copies_per_token",) if handled else ()), "link_MB_per_token",
              "moe_ms_per_token" if handled else "stall_ms_per_token")
    rows = [
        (r.policy, str(r.cache_experts), r.format, *((r.handling,) if handled else ()), f"{r.expert_bytes / 1e6:.3f}",
         f"{r.misses_per_token:.2f}", *((f"{r.copies_per_token:.2f}",) if handled else ()),
         f"{r.bytes_per_token / 1e6:.2f}", f"{r.ms_per_token:.3f}")
        for r in results
    ]
    return _align(header, rows)


def format_prefetch_table(results: list[PrefetchResult]) -> str:
    """Aligned text table, one row per (cache size, policy, prefetcher)."""
    header = ("policy", "prefetch", "cache_experts", "hit_rate", "stall_ms_per_token", "issued", "used", "late",
              "wasted")
    rows = [
        (r.policy, r.prefetch, str(r.cache_experts), f"{r.hit_rate:.4f}", f"{r.stall_ms_per_token:.3f}",
         str(r.issued), str(r.used), str(r.late), str(r.wasted))
        for r in results
    ]
    return _align(header, rows)


def _align(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in [header, *rows]
    )


def _split(trace: RoutingTrace, learn_prompts: int, tokens: int | None) -> tuple[RoutingTrace, RoutingTrace]:
    """(learning part, measured part): the first `learn_prompts` prompts, then the first `tokens` of the rest."""
    if not 0 <= learn_prompts < trace.num_prompts:
        raise ValueError(f"--learn-prompts must be between 0 and {trace.num_prompts - 1}")
    learn, measured = trace.slice_prompts(0, learn_prompts), trace.slice_prompts(learn_prompts, trace.num_prompts)
    if tokens is not None:
        if tokens <= 0:
            raise ValueError("--tokens must be positive")
        measured = measured.slice_tokens(0, tokens)
    return learn, measured


def _usage_error(error: Exception) -> int:
    message = str(error) if not isinstance(error, KeyError) else f"trace is missing field {error}"
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def run_simulate(args: argparse.Namespace) -> int:
    """Handler of `trace simulate`; returns the process exit code."""
    try:
        prefetchers = _parse_prefetchers(args.prefetch) if args.prefetch is not None else None
        policies = _parse_policies(args.policy, prefetchers is not None)
        sizes = _parse_sizes(args.cache_experts)
        learn, trace = _split(load_trace(args.trace), args.learn_prompts, args.tokens)
        for size in sizes:
            validate_cache_size(trace, size)
        expert_bytes = _expert_bytes(trace, args.expert_bytes)
        timing = TimingModel(args.link_gbps, args.compute_ms_per_layer, expert_bytes)
        if args.prefetch_width is not None and args.prefetch_width <= 0:
            raise ValueError("--prefetch-width must be positive")
        if prefetchers and Prefetcher.LOGISTIC in prefetchers and not learn.num_tokens:
            raise ValueError("the logistic prefetcher is trained on the learning prompts: give --learn-prompts")
        handlings = None if args.miss_handling is None else \
            [part.strip() for part in args.miss_handling.split(",") if part.strip()]
        formats = parse_formats(args.formats if args.formats is not None else "bf16") \
            if args.formats is not None or handlings is not None else None
        if formats is not None and trace.geometry is None:
            raise ValueError("--formats and --miss-handling need the trace's geometry: a known model "
                             f"({', '.join(g.name for g in KNOWN_GEOMETRIES)}) in its model or file name")
        if handlings is not None:
            if prefetchers is not None:
                raise ValueError("--miss-handling does not combine with --prefetch")
            if Oracle.BELADY.value in policies:
                if args.policy is not None:
                    raise ValueError(f"--miss-handling replays live policies: {Oracle.BELADY.value} is offline")
                policies = [name for name in policies if name != Oracle.BELADY.value]
            rates = HandlingRates(args.link_gbps, args.host_gbps, args.device_gbps)
            if min(rates.link_gbps, rates.host_gbps, rates.device_gbps) <= 0:
                raise ValueError("--link-gbps, --host-gbps and --device-gbps must be positive")
    except (OSError, ValueError, KeyError) as error:
        return _usage_error(error)
    if formats is not None:
        return _run_precisions(args, trace, learn, policies, sizes, formats, handlings, prefetchers)
    results: list[ReplayResult] | list[PrefetchResult]
    show_progress = not args.json
    if prefetchers is None:
        results = simulate(trace, policies, sizes, expert_bytes, show_progress)
    else:
        results = simulate_prefetch(trace, policies, prefetchers, sizes, timing, learn, args.prefetch_width,
                                    args.min_score, show_progress)
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
        return 0
    print(f"{trace.model or args.trace}: {trace.num_tokens} tokens measured after {learn.num_prompts} learning "
          f"prompts, {trace.num_layers} layers, top-{trace.top_k} of {trace.num_experts}, {expert_bytes} bytes/expert")
    if prefetchers is None:
        print(format_table(results))
    else:
        print(f"link {timing.link_gbps:g} GB/s ({timing.copy_s * 1e3:.3f} ms/expert), "
              f"compute {timing.compute_ms_per_layer:g} ms/layer/token")
        print(format_prefetch_table(results))
    return 0


def _run_precisions(args: argparse.Namespace, trace: RoutingTrace, learn: RoutingTrace, policies: list[str],
                    sizes: list[int], formats: list[ExpertFormat], handlings: list[str] | None,
                    prefetchers: list[Prefetcher] | None) -> int:
    """`trace simulate --formats / --miss-handling`: the bytes model (`engine.traces.bytes_model`)."""
    show_progress = not args.json
    geometry = trace.geometry
    assert geometry is not None  # checked with the arguments
    results: list[PrecisionResult] | list[PrefetchResult]
    if handlings is not None:
        rates = HandlingRates(args.link_gbps, args.host_gbps, args.device_gbps)
        results = simulate_handling(trace, policies, sizes, geometry, formats, handlings, rates, show_progress)
    elif prefetchers is None:
        results = per_format(simulate(trace, policies, sizes, 0, show_progress), geometry, formats, args.link_gbps)
    else:
        results = []
        for fmt in formats:
            timing = TimingModel(args.link_gbps, args.compute_ms_per_layer, expert_nbytes(geometry, fmt))
            results += [dataclasses.replace(r, prefetch=f"{r.prefetch} [{format_label(fmt)}]") for r in
                        simulate_prefetch(trace, policies, prefetchers, sizes, timing, learn, args.prefetch_width,
                                          args.min_score, show_progress)]
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
        return 0
    print(f"{trace.model or args.trace}: {trace.num_tokens} tokens measured after {learn.num_prompts} learning "
          f"prompts, {trace.num_layers} layers, top-{trace.top_k} of {trace.num_experts}, geometry {geometry.name} "
          f"(hidden {geometry.hidden_size}, expert FFN {geometry.moe_intermediate_size})")
    if handlings is not None:
        print(f"link {args.link_gbps:g} GB/s, host {args.host_gbps:g} GB/s, device {args.device_gbps:g} GB/s "
              "(expert bytes streamed per second by each side's kernels)")
        print(format_precision_table(results))
    elif prefetchers is None:
        print(f"stall: the misses' bytes over a {args.link_gbps:g} GB/s link, one after the other")
        print(format_precision_table(results))
    else:
        print(f"link {args.link_gbps:g} GB/s, compute {args.compute_ms_per_layer:g} ms/layer/token; prefetch [format]")
        print(format_prefetch_table(results))
    return 0


def run_predictors(args: argparse.Namespace) -> int:
    """Handler of `trace predictors`; returns the process exit code."""
    try:
        ks = _parse_sizes(args.k, "--k")
        if min(ks) <= 0:
            raise ValueError("--k must be positive")
        learn, held_out = _split(load_trace(args.trace), args.learn_prompts, args.tokens)
        if held_out.num_layers < 2:
            raise ValueError("the affinity predictor needs at least 2 layers")
    except (OSError, ValueError, KeyError) as error:
        return _usage_error(error)
    show_progress = not args.json
    recalls = {"affinity": affinity_recall(held_out, learn, ks, show_progress)}
    if learn.num_tokens:  # the logistic predictor is trained on the learning prompts only
        model = LogisticPredictor(held_out.num_layers, held_out.num_experts).fit(learn, show_progress=show_progress)
        recalls["logistic"] = recall_at(model.predict_tokens(held_out, max(ks)), held_out, ks)
    rows = [{"layer": layer, "next_layer": layer + 1, "tokens": held_out.num_tokens,
             **{f"recall_at_{k}": float(recalls["affinity"][layer, i]) for i, k in enumerate(ks)},
             **{f"{name}_recall_at_{k}": float(recall[layer, i])
                for name, recall in recalls.items() if name != "affinity" for i, k in enumerate(ks)}}
            for layer in range(held_out.num_layers - 1)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{held_out.model or args.trace}: predictors learned on {learn.num_prompts} prompts (affinity: updated "
          f"after each later prompt; logistic: frozen), measured on {held_out.num_tokens} tokens of "
          f"{held_out.num_prompts} later prompts")
    header = ("layer", *(f"{name} recall@{k}" for name in recalls for k in ks))
    lines = [(f"{layer}->{layer + 1}", *(f"{recall[layer, i]:.3f}" for recall in recalls.values() for i in range(len(ks))))
             for layer in range(held_out.num_layers - 1)]
    lines.append(("mean", *(f"{recall[:, i].mean():.3f}" for recall in recalls.values() for i in range(len(ks)))))
    print(_align(header, lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: `python -m engine.trace_cli trace simulate|predictors ...`."""
    parser = argparse.ArgumentParser(prog="moe-serve")
    add_trace_parser(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
