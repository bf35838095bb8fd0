"""Hub weight names -> the runtime's weight containers, as the spec says.

`layer_weights` assembles one decoder layer's non-expert weights (attention, norms, and a
dense MLP or the router with its shared expert), `expert_weights` the layer's routed experts,
keyed by MoE-layer index. q/k/v and each gate/up pair are fused here; MLA's kv_b is split per
head for the absorbed path and interleaved rope dims are de-interleaved. Experts stacked per layer
(gpt-oss) are split per expert, their interleaved gate/up rows reordered gate first, and MXFP4 experts
dequantized one expert at a time. Reads through any
`TensorReader` (the loader's memory-mapped safetensors).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from moe_serve.engine.model.mxfp4 import MXFP4Expert
from moe_serve.engine.model.spec import AttentionKind, FusedExpertWeightNames, ModelSpec, QKNorm
from moe_serve.engine.model.weights import (
    AttentionWeights,
    ExpertTensors,
    LatentAttentionWeights,
    LayerWeights,
    MLPWeights,
)
from moe_serve.engine.types import ExpertKey


class TensorReader(Protocol):
    """Name -> tensor lookup over a checkpoint."""

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The named tensor cast to `dtype` (contiguous); a one-line ModelLoadError when missing."""
        ...


def _mlp(src: TensorReader, prefix: str, dtype: torch.dtype, gated: bool = False) -> MLPWeights:
    """The SwiGLU MLP under `prefix` (gate_proj, up_proj, down_proj; with `gated` Qwen2-MoE's `{prefix}_gate`)."""
    return MLPWeights(
        gate_up=torch.cat([src.get(f"{prefix}.gate_proj.weight", dtype), src.get(f"{prefix}.up_proj.weight", dtype)]),
        down=src.get(f"{prefix}.down_proj.weight", dtype),
        gate=src.get(f"{prefix}_gate.weight", dtype) if gated else None,
    )


def _deinterleave(rope_rows: torch.Tensor) -> torch.Tensor:
    """Rows of an interleaved rope (pairs 2i, 2i+1 rotate together) reordered evens first, then odds:
    rotate-half rope on the reordered projections gives the same q.k (both sides reordered alike)."""
    return torch.cat([rope_rows[0::2], rope_rows[1::2]])


def _attention(spec: ModelSpec, src: TensorReader, prefix: str, dtype: torch.dtype) -> AttentionWeights:
    with_norm = spec.qk_norm is not QKNorm.NONE
    heads = {"q": spec.num_heads, "k": spec.num_kv_heads, "v": spec.num_kv_heads}

    def projection(name: str, kind: str) -> torch.Tensor:  # q/k rows with an interleaved rope de-interleaved
        tensor = src.get(f"{prefix}.{name}_proj.{kind}", dtype)
        if not spec.rope.interleaved or name == "v":
            return tensor
        per_head = tensor.view(heads[name], spec.head_dim, -1)
        rotary = spec.rope.rotary_dim
        rotated = _deinterleave(per_head[:, :rotary].transpose(0, 1)).transpose(0, 1)
        return torch.cat([rotated, per_head[:, rotary:]], dim=1).reshape(tensor.shape)

    return AttentionWeights(
        qkv=torch.cat([projection(n, "weight") for n in "qkv"]),
        qkv_bias=torch.cat([projection(n, "bias") for n in "qkv"]) if spec.qkv_bias else None,
        o=src.get(f"{prefix}.o_proj.weight", dtype),
        o_bias=src.get(f"{prefix}.o_proj.bias", dtype) if spec.o_bias else None,
        q_norm=src.get(f"{prefix}.q_norm.weight", dtype) if with_norm else None,
        k_norm=src.get(f"{prefix}.k_norm.weight", dtype) if with_norm else None,
        sinks=src.get(f"{prefix}.sinks", dtype) if spec.attention_sinks else None,
    )


def _latent_attention(spec: ModelSpec, src: TensorReader, prefix: str, dtype: torch.dtype) -> LatentAttentionWeights:
    mla = spec.mla
    assert mla is not None
    heads, nope, rope_dim, rank = spec.num_heads, mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.kv_lora_rank
    lora = mla.q_lora_rank is not None
    q = src.get(f"{prefix}.{'q_b_proj' if lora else 'q_proj'}.weight", dtype).view(heads, nope + rope_dim, -1)
    kv_a = src.get(f"{prefix}.kv_a_proj_with_mqa.weight", dtype)
    if spec.rope.interleaved:
        q = torch.cat([q[:, :nope], _deinterleave(q[:, nope:].transpose(0, 1)).transpose(0, 1)], dim=1)
        kv_a = torch.cat([kv_a[:rank], _deinterleave(kv_a[rank:])])
    kv_b = src.get(f"{prefix}.kv_b_proj.weight", dtype).view(heads, nope + mla.v_head_dim, rank)
    return LatentAttentionWeights(
        q=q.reshape(heads * (nope + rope_dim), -1).contiguous(),
        q_a=src.get(f"{prefix}.q_a_proj.weight", dtype) if lora else None,
        q_a_norm=src.get(f"{prefix}.q_a_layernorm.weight", dtype) if lora else None,
        kv_a=kv_a.contiguous(),
        kv_a_norm=src.get(f"{prefix}.kv_a_layernorm.weight", dtype),
        k_up=kv_b[:, :nope].contiguous(),
        v_up=kv_b[:, nope:].contiguous(),
        o=src.get(f"{prefix}.o_proj.weight", dtype),
    )


def layer_weights(spec: ModelSpec, src: TensorReader, layer: int, dtype: torch.dtype) -> LayerWeights:
    """Decoder layer `layer`'s weights except its routed experts."""
    prefix = f"model.layers.{layer}"
    if spec.attention is AttentionKind.MLA:
        attention: AttentionWeights | LatentAttentionWeights = _latent_attention(spec, src, f"{prefix}.self_attn", dtype)
    else:
        attention = _attention(spec, src, f"{prefix}.self_attn", dtype)
    router = shared = mlp = router_bias = None
    if spec.moe_index(layer) is None:
        mlp = _mlp(src, f"{prefix}.mlp", dtype)
    else:
        router_dtype = torch.float32 if spec.routing.in_fp32 else dtype
        router = src.get(spec.router_name.format(layer=layer), router_dtype)
        if spec.router_bias_name is not None:  # a logit bias in the router's dtype, a correction bias in fp32
            bias_dtype = router_dtype if spec.routing.logit_bias else torch.float32
            router_bias = src.get(spec.router_bias_name.format(layer=layer), bias_dtype).reshape(-1)
        if spec.shared_expert_prefix is not None and spec.shared_expert_intermediate_size > 0:
            shared = _mlp(src, spec.shared_expert_prefix.format(layer=layer), dtype, spec.shared_expert_gated)
    return LayerWeights(
        input_norm=src.get(f"{prefix}.input_layernorm.weight", dtype),
        post_attention_norm=src.get(f"{prefix}.post_attention_layernorm.weight", dtype),
        attention=attention,
        router=router,
        shared_expert=shared,
        mlp=mlp,
        router_bias=router_bias,
    )


def expert_weights(spec: ModelSpec, src: TensorReader, layer: int,
                   dtype: torch.dtype) -> Iterator[tuple[ExpertKey, ExpertTensors | MXFP4Expert]]:
    """Decoder layer `layer`'s routed experts as (gate_up, down) (and biases), keyed by its MoE-layer
    index (nothing for a dense layer); MXFP4 experts as `MXFP4Expert`, dequantized when read."""
    moe_layer = spec.moe_index(layer)
    if moe_layer is None:
        return
    names = spec.expert_names
    if isinstance(names, FusedExpertWeightNames):
        yield from _stacked_experts(spec, src, names, layer, moe_layer, dtype)
        return
    for expert in range(spec.num_experts):
        fmt = {"layer": layer, "expert": expert}
        gate_up = torch.cat([src.get(names.gate.format(**fmt), dtype), src.get(names.up.format(**fmt), dtype)])
        yield ExpertKey(moe_layer, expert), (gate_up, src.get(names.down.format(**fmt), dtype))


def _gate_first(interleaved: torch.Tensor) -> torch.Tensor:
    """Rows (or a bias) whose gate and up alternate (gate 2i, up 2i+1) as [gate; up]."""
    return torch.cat([interleaved[0::2], interleaved[1::2]]).contiguous()


def _stacked_experts(spec: ModelSpec, src: TensorReader, names: FusedExpertWeightNames, layer: int, moe_layer: int,
                     dtype: torch.dtype) -> Iterator[tuple[ExpertKey, ExpertTensors | MXFP4Expert]]:
    """gpt-oss: one layer's experts from tensors stacked over experts, as (gate_up [2F, D], down [D, F],
    gate_up_bias [2F], down_bias [D]); MXFP4 experts stay 4-bit, dequantized when read (`MXFP4Expert`)."""
    gate_up_name, down_name = names.gate_up.format(layer=layer), names.down.format(layer=layer)
    gate_up_bias, down_bias = src.get(gate_up_name + "_bias", dtype), src.get(down_name + "_bias", dtype)
    if spec.mxfp4_experts:  # blocks [E, out, in / 32, 16] and scales [E, out, in / 32]
        (gu_blocks, gu_scales), (d_blocks, d_scales) = [
            (src.get(f"{name}_blocks", torch.uint8), src.get(f"{name}_scales", torch.uint8))
            for name in (gate_up_name, down_name)]
        for expert in range(spec.num_experts):  # gate/up rows reordered before dequantizing (it is per row)
            yield ExpertKey(moe_layer, expert), MXFP4Expert(
                (_gate_first(gu_blocks[expert]), _gate_first(gu_scales[expert])), (d_blocks[expert], d_scales[expert]),
                _gate_first(gate_up_bias[expert]), down_bias[expert].contiguous(), dtype)
        return
    gate_up_all, down_all = src.get(gate_up_name, dtype), src.get(down_name, dtype)  # [E, D, 2F], [E, F, D]
    for expert in range(spec.num_experts):
        yield ExpertKey(moe_layer, expert), (_gate_first(gate_up_all[expert].t()), down_all[expert].t().contiguous(),
                                             _gate_first(gate_up_bias[expert]), down_bias[expert].contiguous())
