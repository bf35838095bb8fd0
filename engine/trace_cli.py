"""The `trace simulate` command: replay a routing trace through cache policies and print a table."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from cache_policies import DEFAULT_POLICY, available_policies
from engine.trace_sim import Oracle, ReplayResult, simulate, validate_cache_size
from engine.traces import KNOWN_GEOMETRIES, RoutingTrace, load_trace

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
    """Register `trace simulate` under an existing subparsers object."""
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
        default=f"lru,{DEFAULT_POLICY},{Oracle.BELADY.value}",
        help=f"comma-separated policies among {', '.join(available_policies() + [Oracle.BELADY.value])}",
    )
    sim.add_argument("--cache-experts", required=True, help="slots per layer, comma-separated (e.g. 16,32)")
    sim.add_argument("--tokens", type=int, default=None, help="replay only the first K tokens")
    sim.add_argument("--expert-bytes", type=int, default=None, help="bytes per expert (default: from geometry)")
    sim.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    sim.set_defaults(handler=run_simulate)


def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--cache-experts must be comma-separated integers, got {text!r}") from None
    if not sizes:
        raise ValueError("--cache-experts needs at least one size")
    return sizes


def _parse_policies(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    valid = available_policies() + [Oracle.BELADY.value]
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
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header, *rows]]
    return "\n".join(lines)


def run_simulate(args: argparse.Namespace) -> int:
    """Handler of `trace simulate`; returns the process exit code."""
    try:
        policies = _parse_policies(args.policy)
        sizes = _parse_sizes(args.cache_experts)
        trace = load_trace(args.trace)
        if args.tokens is not None:
            if args.tokens <= 0:
                raise ValueError("--tokens must be positive")
            trace = trace.slice_tokens(0, args.tokens)
        for size in sizes:
            validate_cache_size(trace, size)
        expert_bytes = _expert_bytes(trace, args.expert_bytes)
    except (OSError, ValueError, KeyError) as error:
        message = str(error) if not isinstance(error, KeyError) else f"trace is missing field {error}"
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USAGE
    results = simulate(trace, policies, sizes, expert_bytes)
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        print(f"{trace.model or args.trace}: {trace.num_tokens} tokens, {trace.num_layers} layers, "
              f"top-{trace.top_k} of {trace.num_experts}, {expert_bytes} bytes/expert")
        print(format_table(results))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: `python -m engine.trace_cli trace simulate ...`."""
    parser = argparse.ArgumentParser(prog="moe-serve")
    add_trace_parser(parser.add_subparsers(dest="command", required=True))
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
