"""The bytes model of `trace simulate --formats`: what a replayed trace's misses cost at each expert
precision, and under each miss handling (`--miss-handling copy,host,auto`).

An expert's bytes in a format are its stored layout's (`engine.model.quant`: codes, scales, zero
points, block padding) for the trace's geometry, gate_up [2F, D] and down [D, F]; `bf16` is the model
dtype at 2 bytes a weight. Without a handling, misses per token come from the cache replay (they do
not depend on the format at a given number of slots) and the stall per token is the bytes copied
over the link, one after the other (`--link-gbps`; no overlap with compute: demand misses, no
prefetch). With a handling, each MoE layer of each token is timed by `engine.offload.miss_cost`
(the live provider's cost model): `copy` copies every miss to the device, `host` computes every
miss on the host from the host tier (nothing enters the cache), `auto` chooses per miss; a copied
expert enters the cache (evicting the policy's victim), and the layer's modelled time is the later
of the device's and the host's finish. Figures: docs/quantization.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from moe_serve.cache_policies import CachePolicy, make_policy
from moe_serve.engine.model.quant import MODEL_DTYPE, ExpertFormat, parse_expert_dtype
from moe_serve.engine.offload.miss_cost import ComputeRate, Miss, MissChoice, MissRates, choose_handling, layer_seconds
from moe_serve.engine.progress import progress
from moe_serve.engine.traces.replay import ReplayResult, layer_rows, validate_cache_size
from moe_serve.engine.traces.trace_file import ModelGeometry, RoutingTrace

HANDLINGS = ("copy", "host", "auto")
MODEL_FORMAT_NAME = "bf16"  # the model dtype, as the formats' baseline


def parse_formats(text: str) -> list[ExpertFormat]:
    """`bf16` (the model dtype) and `--expert-dtype` names (int8, int4[-gG][-sym], mxfp4), comma-separated."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ValueError("--formats needs at least one format")
    formats = []
    for name in names:
        fmt = MODEL_DTYPE if name == MODEL_FORMAT_NAME else parse_expert_dtype(name)
        if fmt is None or (fmt is MODEL_DTYPE and name != MODEL_FORMAT_NAME):
            raise ValueError(f"unknown format {name!r}: use {MODEL_FORMAT_NAME}, int8, int4[-g32|-g64|-g128][-sym] or mxfp4")
        formats.append(fmt)
    return formats


def format_label(fmt: ExpertFormat) -> str:
    return MODEL_FORMAT_NAME if not fmt.quantized else fmt.name


def expert_nbytes(geometry: ModelGeometry, fmt: ExpertFormat) -> int:
    """One routed expert's stored bytes in `fmt` (gate_up [2F, D] and down [D, F], bf16 model dtype)."""
    hidden, ffn = geometry.hidden_size, geometry.moe_intermediate_size
    return fmt.matrix_nbytes(2 * ffn, hidden, torch.bfloat16) + fmt.matrix_nbytes(hidden, ffn, torch.bfloat16)


@dataclass(frozen=True)
class PrecisionResult:
    """One (policy, cache size, format[, handling]) over a trace: per token, the misses, the bytes over
    the link, and the stall (no handling) or modelled MoE seconds (with a handling)."""

    policy: str
    cache_experts: int
    format: str
    handling: str  # "" without a handling
    expert_bytes: int
    tokens: int
    misses_per_token: float
    copies_per_token: float
    bytes_per_token: float
    ms_per_token: float

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def per_format(results: Sequence[ReplayResult], geometry: ModelGeometry, formats: Sequence[ExpertFormat],
               link_gbps: float) -> list[PrecisionResult]:
    """Each replay's misses at every format: bytes per token and the serial copy stall per token."""
    rows = []
    for result in results:
        for fmt in formats:
            nbytes = expert_nbytes(geometry, fmt)
            per_token = result.misses / result.tokens if result.tokens else 0.0
            rows.append(PrecisionResult(result.policy, result.cache_experts, format_label(fmt), "", nbytes,
                                        result.tokens, per_token, per_token, per_token * nbytes,
                                        per_token * nbytes / (link_gbps * 1e9) * 1e3))
    return rows


@dataclass(frozen=True)
class HandlingRates:
    """The machine the handlings are modelled on: link, host and device GB/s (bytes of expert weights
    streamed per second by each side's expert kernel)."""

    link_gbps: float
    host_gbps: float
    device_gbps: float

    def miss_rates(self) -> MissRates:
        return MissRates(self.link_gbps * 1e9, ComputeRate.from_bandwidth(self.host_gbps * 1e9),
                         ComputeRate.from_bandwidth(self.device_gbps * 1e9))


def _handle_layer(rows: list[list[int] | None], policy: CachePolicy, cache_experts: int, handling: str,
                  nbytes: int, rates: MissRates) -> tuple[int, int, float]:
    """One layer's cache under `handling`: (misses, copies, modelled seconds). Each token is one step
    with one row per expert; hits run on the device first."""
    resident: set[int] = set()
    misses = copies = 0
    seconds = 0.0
    for row in rows:
        if row is None:
            policy.on_step()
            continue
        hits = [key for key in row if key in resident]
        missed = [key for key in row if key not in resident]
        for key in hits:
            policy.on_access(key)
        evictable = resident.difference(row)
        device_busy = sum(rates.device.seconds(nbytes, 1) for _ in hits)
        wanted = [Miss(rows=1) for _ in missed]
        if handling == "copy":
            choices = [MissChoice.COPY] * len(missed)
        elif handling == "host":
            choices = [MissChoice.HOST] * len(missed)
        else:
            free = cache_experts - len(resident)
            choices = choose_handling(wanted, nbytes, rates, device_busy_s=device_busy,
                                      max_copies=free + len(evictable))
        seconds += layer_seconds(wanted, choices, nbytes, rates, device_busy_s=device_busy)
        misses += len(missed)
        for key, choice in zip(missed, choices, strict=True):
            if choice is not MissChoice.COPY:
                continue
            copies += 1
            if len(resident) >= cache_experts:
                out = policy.victim(evictable)
                evictable.remove(out)
                resident.remove(out)
                policy.on_evict(out)
            resident.add(key)
            policy.on_insert(key)
            policy.on_access(key)
        policy.on_step()
    return misses, copies, seconds


def simulate_handling(trace: RoutingTrace, policies: Sequence[str], cache_sizes: Sequence[int],
                      geometry: ModelGeometry, formats: Sequence[ExpertFormat], handlings: Sequence[str],
                      rates: HandlingRates, show_progress: bool = False) -> list[PrecisionResult]:
    """Every (cache size, policy, format, handling) over `trace` with the miss cost model."""
    unknown = [h for h in handlings if h not in HANDLINGS]
    if unknown or not handlings:
        raise ValueError(f"unknown miss handling {', '.join(unknown) or '(none)'}; valid: {', '.join(HANDLINGS)}")
    miss_rates = rates.miss_rates()
    layers = [layer_rows(trace, layer) for layer in range(trace.num_layers)]
    out = []
    for cache_experts in cache_sizes:
        validate_cache_size(trace, cache_experts)
        for name in policies:
            for fmt in formats:
                nbytes = expert_nbytes(geometry, fmt)
                for handling in handlings:
                    misses = copies = 0
                    seconds = 0.0
                    desc = f"{name} @ {cache_experts} {format_label(fmt)} {handling}"
                    for rows in progress(layers, show=show_progress, desc=desc, unit="layer"):
                        m, c, s = _handle_layer(rows, make_policy(name), cache_experts, handling, nbytes, miss_rates)
                        misses, copies, seconds = misses + m, copies + c, seconds + s
                    tokens = max(trace.num_tokens, 1)
                    out.append(PrecisionResult(name, cache_experts, format_label(fmt), handling, nbytes,
                                               trace.num_tokens, misses / tokens, copies / tokens,
                                               copies * nbytes / tokens, seconds / tokens * 1e3))
    return out
