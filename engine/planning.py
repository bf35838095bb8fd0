"""`moe-serve plan`: what serving a checkpoint with offloading takes, from its config alone.

Sizes come from the ModelSpec (no weight is read): one routed expert as the host tier stores it
(gate_up and down, with gpt-oss' biases, 64-byte aligned, at the chosen dtype or expert format), the non-expert
weights the device holds (embeddings, attention with its biases and sinks, norms, routers, shared
experts, dense MLPs; routers and biases in fp32 where the loader keeps them), and the KV bytes per
token. The GPU budget is split as serve splits it: the non-expert weights, the KV cache
(`engine.builder.kv_cache_blocks`), a working reserve, and the rest for the expert cache
(`engine.offload.size_expert_cache`); the printed serve flags reproduce exactly that cache.
Expected copies per token: under uniform routing a MoE layer with a share f of its experts
resident misses top_k * (1 - f) experts per token; with a routing trace, the trace's misses
replayed through the cache policy at the per-layer share of the slots.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moe_serve.cache_policies import DEFAULT_POLICY, make_policy
from moe_serve.engine.builder import kv_cache_blocks, model_trace
from moe_serve.engine.config import DType, EngineConfig
from moe_serve.engine.core.kv_cache import KV_BLOCK_SIZE, kv_bytes_per_block
from moe_serve.engine.errors import ModelLoadError
from moe_serve.engine.model.loader import read_spec, resolve_dtype, resolve_expert_format
from moe_serve.engine.model.quant import MODEL_DTYPE, ExpertFormat
from moe_serve.engine.model.spec import ModelSpec, QKNorm
from moe_serve.engine.offload.expert_store import layout_for, min_slots_for_step
from moe_serve.engine.offload.expert_store import size_text as binary_size_text
from moe_serve.engine.offload.provider import size_expert_cache, working_reserve_nbytes
from moe_serve.engine.traces.replay import replay

GIB = 2**30
HOST_RESERVE_BYTES = 2 * GIB  # the process without the host tier: Python, torch, tokenizer, server
PLAN_MAX_MODEL_LEN = 4096
FLAG_STEP_GIB = 1e-6  # the resolution of the printed --kv-cache-gb / --expert-cache-gb (1 KiB)


@dataclass(frozen=True)
class Plan:
    """One checkpoint's sizes and the offloading set-up chosen for a GPU budget (bytes unless named)."""

    architecture: str
    dtype: str
    num_layers: int
    num_moe_layers: int
    num_experts: int  # routed experts over all MoE layers
    expert_nbytes: int  # one routed expert in the host tier
    experts_nbytes: int
    non_expert_nbytes: int
    kv_bytes_per_token: int
    max_model_len: int
    max_num_seqs: int
    kv_cache_gb: float
    kv_cache_nbytes: int
    reserve_nbytes: int
    gpu_nbytes: int
    expert_cache_gb: float
    cache_slots: int
    min_cache_slots: int
    resident_fraction: float
    min_gpu_nbytes: int
    min_host_nbytes: int
    host_tier_file_backed: bool
    routing_model: str  # "uniform", or the trace file replayed
    expected_misses_per_token: float
    expected_bytes_per_token: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def non_expert_nbytes(spec: ModelSpec, dtype: torch.dtype) -> int:
    """Bytes of every weight except the routed experts, as the loader keeps them (a tied lm_head once)."""
    element = _element_size(dtype)
    hidden = spec.hidden_size
    params = spec.vocab_size * hidden * (1 if spec.tie_word_embeddings else 2) + hidden
    fp32_params = 0
    for layer in range(spec.num_layers):
        params += 2 * hidden + _attention_params(spec)
        if spec.moe_index(layer) is None:
            params += 3 * hidden * spec.dense_intermediate_size
            continue
        router = spec.num_experts * hidden
        router_bias = spec.num_experts if spec.router_bias_name is not None else 0
        if spec.routing.in_fp32:
            fp32_params += router + router_bias
        elif spec.routing.logit_bias:  # a logit bias in the router's dtype, a correction bias in fp32
            params += router + router_bias
        else:
            params += router
            fp32_params += router_bias
        if spec.shared_expert_prefix is not None and spec.shared_expert_intermediate_size > 0:
            params += 3 * hidden * spec.shared_expert_intermediate_size + (hidden if spec.shared_expert_gated else 0)
    return params * element + fp32_params * 4


def _attention_params(spec: ModelSpec) -> int:
    hidden, heads = spec.hidden_size, spec.num_heads
    mla = spec.mla
    if mla is not None:
        qk_head = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        if mla.q_lora_rank is None:
            q = hidden * heads * qk_head
        else:
            q = hidden * mla.q_lora_rank + mla.q_lora_rank + mla.q_lora_rank * heads * qk_head
        kv_a = hidden * (mla.kv_lora_rank + mla.qk_rope_head_dim) + mla.kv_lora_rank
        kv_b = mla.kv_lora_rank * heads * (mla.qk_nope_head_dim + mla.v_head_dim)
        return q + kv_a + kv_b + heads * mla.v_head_dim * hidden
    q_width, kv_width = heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    qkv_rows = q_width + 2 * kv_width
    params = qkv_rows * hidden + q_width * hidden
    params += qkv_rows if spec.qkv_bias else 0
    params += hidden if spec.o_bias else 0
    params += heads if spec.attention_sinks else 0
    if spec.qk_norm is QKNorm.PER_HEAD:
        params += 2 * spec.head_dim
    elif spec.qk_norm is QKNorm.FULL:
        params += q_width + kv_width
    return params


def expert_nbytes(spec: ModelSpec, dtype: torch.dtype, expert_format: ExpertFormat = MODEL_DTYPE) -> int:
    """One routed expert as the host tier stores it: (gate_up [2F, D], down [D, F]) in `expert_format`
    (the model dtype: `dtype`; quantized: its packed codes and scales) and with expert biases (gpt-oss)
    their biases [2F], [D] in `dtype`, each tensor 64-byte aligned."""
    hidden, inner = spec.hidden_size, spec.moe_intermediate_size
    if expert_format.quantized:
        layouts = expert_format.matrix_layouts(2 * inner, hidden) + expert_format.matrix_layouts(hidden, inner)
    else:
        layouts = [((2 * inner, hidden), dtype), ((hidden, inner), dtype)]
    if spec.expert_mlp.biases:
        layouts += [((2 * inner,), dtype), ((hidden,), dtype)]
    return layout_for([torch.empty(shape, dtype=t, device="meta") for shape, t in layouts])[1]


def reserve_nbytes(spec: ModelSpec, max_num_batched_tokens: int) -> int:
    """The working reserve serve keeps free on the device (`engine.offload.provider.working_reserve_nbytes`)."""
    return working_reserve_nbytes(spec, max_num_batched_tokens)


def make_plan(model: Path, gpu_gb: float, host_gb: float | None = None, dtype: DType = DType.AUTO,
              max_model_len: int | None = None, max_num_seqs: int = 1, trace: Path | None = None,
              trace_tokens: int | None = None, expert_dtype: str = "auto") -> Plan:
    """The plan for serving the checkpoint config in `model` on a `gpu_gb` GiB GPU (no weight is read);
    the KV cache holds `max_num_seqs` sequences of `max_model_len` (default PLAN_MAX_MODEL_LEN) tokens;
    the experts are stored as `expert_dtype` says (`--expert-dtype`)."""
    max_model_len = max_model_len or PLAN_MAX_MODEL_LEN
    hf_config, spec = read_spec(model)
    torch_dtype = resolve_dtype(dtype.value, hf_config)
    kv_per_token = kv_bytes_per_block(spec, 1, torch_dtype)
    base = EngineConfig(model=str(model), dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs)
    context = min(max_model_len, spec.max_position_embeddings)
    kv_needed = max_num_seqs * -(-context // KV_BLOCK_SIZE) * kv_bytes_per_block(spec, KV_BLOCK_SIZE, torch_dtype)
    kv_gb = _gib_up(kv_needed)
    config = base.model_copy(update={"kv_cache_gb": kv_gb})
    served_len, num_blocks = kv_cache_blocks(spec, config, torch_dtype)
    kv_nbytes = num_blocks * kv_bytes_per_block(spec, KV_BLOCK_SIZE, torch_dtype)
    one_expert = expert_nbytes(spec, torch_dtype, resolve_expert_format(expert_dtype, spec))
    total_experts = spec.num_moe_layers * spec.num_experts
    dense = non_expert_nbytes(spec, torch_dtype)
    reserve = reserve_nbytes(spec, config.max_num_batched_tokens)
    min_slots = min_slots_for_step(spec.num_experts, spec.top_k, config.max_num_batched_tokens)
    fixed = dense + kv_nbytes + reserve
    min_gpu = fixed + min_slots * one_expert
    gpu_nbytes = int(gpu_gb * GIB)
    cache_gb = _gib_down(gpu_nbytes - fixed)
    if cache_gb <= 0 or cache_gb * GIB < min_slots * one_expert:
        raise ModelLoadError(
            f"--gpu-gb {gpu_gb} cannot serve {spec.architecture} at {served_len} tokens: it needs at least "
            f"{min_gpu / GIB:.3f} GiB ({size_text(dense)} non-expert weights, {size_text(kv_nbytes)} KV cache, "
            f"{size_text(reserve)} reserve, {min_slots} experts of {size_text(one_expert)})"
        )
    sizing = size_expert_cache(total_experts, min_slots, one_expert, cache_gb, None)
    fraction = sizing.num_slots / total_experts
    experts_total = total_experts * one_expert
    file_backed = host_gb is not None and experts_total > host_gb * GIB  # as engine.offload.host_tier_dir decides
    if trace is None:
        routing_model = "uniform"
        misses = spec.num_moe_layers * spec.top_k * (1 - fraction)
    else:
        routing_model = str(trace)
        misses = _trace_misses_per_token(trace, spec, sizing.num_slots, trace_tokens)
    return Plan(
        architecture=spec.architecture, dtype=str(torch_dtype).removeprefix("torch."), num_layers=spec.num_layers,
        num_moe_layers=spec.num_moe_layers, num_experts=total_experts, expert_nbytes=one_expert,
        experts_nbytes=experts_total, non_expert_nbytes=dense, kv_bytes_per_token=kv_per_token,
        max_model_len=served_len, max_num_seqs=max_num_seqs, kv_cache_gb=kv_gb, kv_cache_nbytes=kv_nbytes,
        reserve_nbytes=reserve, gpu_nbytes=gpu_nbytes, expert_cache_gb=cache_gb, cache_slots=sizing.num_slots,
        min_cache_slots=min_slots, resident_fraction=fraction, min_gpu_nbytes=min_gpu,
        min_host_nbytes=experts_total + HOST_RESERVE_BYTES, host_tier_file_backed=file_backed,
        routing_model=routing_model, expected_misses_per_token=misses,
        expected_bytes_per_token=misses * one_expert,
    )


def _gib_up(nbytes: int) -> float:
    """`nbytes` in GiB rounded up to FLAG_STEP_GIB: a budget flag that holds at least `nbytes`."""
    steps = math.ceil(nbytes / GIB / FLAG_STEP_GIB)
    while int(round(steps * FLAG_STEP_GIB, 6) * GIB) < nbytes:
        steps += 1
    return round(steps * FLAG_STEP_GIB, 6)


def _gib_down(nbytes: int) -> float:
    """`nbytes` in GiB rounded down to FLAG_STEP_GIB: a budget flag that holds at most `nbytes`."""
    steps = math.floor(nbytes / GIB / FLAG_STEP_GIB)
    while steps > 0 and int(round(steps * FLAG_STEP_GIB, 6) * GIB) > nbytes:
        steps -= 1
    return round(steps * FLAG_STEP_GIB, 6)


def _trace_misses_per_token(path: Path, spec: ModelSpec, num_slots: int, max_tokens: int | None) -> float:
    """Misses per token replaying the trace (its first `max_tokens` tokens when given) through the default
    policy with each layer's share of the slots."""
    trace = model_trace(str(path), spec, "trace")
    if max_tokens is not None:
        trace = trace.slice_tokens(0, max_tokens)
    per_layer = min(spec.num_experts, max(spec.top_k, num_slots // spec.num_moe_layers))
    result = replay(trace, lambda: make_policy(DEFAULT_POLICY), per_layer)
    return result.misses / result.tokens if result.tokens else 0.0


def size_text(nbytes: float) -> str:
    """`nbytes` in the largest binary unit that keeps it at least 1, e.g. 1.50 GiB."""
    return binary_size_text(nbytes, digits=2)


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def format_plan(plan: Plan, model: Path) -> str:
    """The plan as the lines `moe-serve plan` prints."""
    gib = size_text
    host = "file-backed (over --host-gb)" if plan.host_tier_file_backed else "in RAM (pinned)"
    lines = [
        f"{plan.architecture} ({plan.dtype}): {plan.num_layers} layers, {plan.num_moe_layers} MoE layers",
        f"routed experts: {plan.num_experts} x {gib(plan.expert_nbytes)} = {gib(plan.experts_nbytes)}",
        f"non-expert weights: {gib(plan.non_expert_nbytes)}",
        f"KV cache: {plan.kv_bytes_per_token} bytes/token, {gib(plan.kv_cache_nbytes)} for {plan.max_num_seqs} x "
        f"{plan.max_model_len} tokens",
        f"working reserve: {gib(plan.reserve_nbytes)}",
        f"expert cache on {gib(plan.gpu_nbytes)} GPU: {plan.cache_slots} of {plan.num_experts} experts "
        f"({100 * plan.resident_fraction:.1f}% resident, {plan.expert_cache_gb:.6f} GiB)",
        f"smallest GPU: {gib(plan.min_gpu_nbytes)} ({plan.min_cache_slots} cached experts); "
        f"smallest host RAM: {gib(plan.min_host_nbytes)} (host tier {host})",
        f"expected copies ({plan.routing_model} routing): {plan.expected_misses_per_token:.2f} experts/token, "
        f"{gib(plan.expected_bytes_per_token)}/token",
        f"serve: moe-serve serve --model {model} --dtype {plan.dtype} --max-model-len {plan.max_model_len} "
        f"--max-num-seqs {plan.max_num_seqs} --kv-cache-gb {plan.kv_cache_gb:.6f} "
        f"--expert-cache-gb {plan.expert_cache_gb:.6f}",
    ]
    return "\n".join(lines)
