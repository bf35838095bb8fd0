"""Supported architectures: each maps a Hugging Face config to a ModelSpec.

Mixtral, Qwen2-MoE (shared expert with a sigmoid gate), Qwen3-MoE (per-head q/k norm,
norm_topk_prob) and OLMoE (full q/k norm, optional clip_qkv). Configs that change the
math in ways we do not implement are refused with a ModelLoadError naming the field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine.errors import ModelLoadError
from engine.models.spec import (
    ExpertWeightNames,
    ModelSpec,
    QKNorm,
    base_fields,
    config_value,
    require,
)

LAYER = "model.layers.{layer}"
HF_MLP_EXPERT = ExpertWeightNames(
    gate=LAYER + ".mlp.experts.{expert}.gate_proj.weight",
    up=LAYER + ".mlp.experts.{expert}.up_proj.weight",
    down=LAYER + ".mlp.experts.{expert}.down_proj.weight",
)


def _require_all_layers_sparse(config: Any) -> None:
    step = config_value(config, "decoder_sparse_step", 1)
    require(step == 1, f"decoder_sparse_step={step} is not supported: every layer must be an MoE layer (1)")
    dense = config_value(config, "mlp_only_layers", []) or []
    require(not dense, f"mlp_only_layers={dense} is not supported: every layer must be an MoE layer")


def mixtral_spec(config: Any) -> ModelSpec:
    """MixtralForCausalLM: top-k of softmax, always renormalised; no biases."""
    window = config_value(config, "sliding_window")
    require(window is None, f"sliding_window={window} is not supported: only full attention is implemented")
    return ModelSpec(
        architecture="MixtralForCausalLM",
        **base_fields(config),
        num_experts=int(config_value(config, "num_local_experts")),
        top_k=int(config_value(config, "num_experts_per_tok")),
        moe_intermediate_size=int(config_value(config, "intermediate_size")),
        norm_topk_prob=True,
        qkv_bias=False,
        o_bias=False,
        qk_norm=QKNorm.NONE,
        clip_qkv=None,
        shared_expert_intermediate_size=0,
        router_name=LAYER + ".block_sparse_moe.gate.weight",
        expert_names=ExpertWeightNames(
            gate=LAYER + ".block_sparse_moe.experts.{expert}.w1.weight",
            up=LAYER + ".block_sparse_moe.experts.{expert}.w3.weight",
            down=LAYER + ".block_sparse_moe.experts.{expert}.w2.weight",
        ),
        shared_expert_prefix=None,
    )


def qwen2_moe_spec(config: Any) -> ModelSpec:
    """Qwen2MoeForCausalLM: q/k/v biases, a shared expert scaled by sigmoid(gate(x))."""
    _require_all_layers_sparse(config)
    return ModelSpec(
        architecture="Qwen2MoeForCausalLM",
        **base_fields(config),
        num_experts=int(config_value(config, "num_experts")),
        top_k=int(config_value(config, "num_experts_per_tok")),
        moe_intermediate_size=int(config_value(config, "moe_intermediate_size")),
        norm_topk_prob=bool(config_value(config, "norm_topk_prob", False)),
        qkv_bias=bool(config_value(config, "qkv_bias", True)),
        o_bias=False,
        qk_norm=QKNorm.NONE,
        clip_qkv=None,
        shared_expert_intermediate_size=int(config_value(config, "shared_expert_intermediate_size", 0)),
        router_name=LAYER + ".mlp.gate.weight",
        expert_names=HF_MLP_EXPERT,
        shared_expert_prefix=LAYER + ".mlp.shared_expert",
    )


def qwen3_moe_spec(config: Any) -> ModelSpec:
    """Qwen3MoeForCausalLM: per-head RMSNorm on q and k, optional attention bias."""
    _require_all_layers_sparse(config)
    bias = bool(config_value(config, "attention_bias", False))
    return ModelSpec(
        architecture="Qwen3MoeForCausalLM",
        **base_fields(config),
        num_experts=int(config_value(config, "num_experts", config_value(config, "num_local_experts", 0))),
        top_k=int(config_value(config, "num_experts_per_tok")),
        moe_intermediate_size=int(config_value(config, "moe_intermediate_size")),
        norm_topk_prob=bool(config_value(config, "norm_topk_prob", False)),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=QKNorm.PER_HEAD,
        clip_qkv=None,
        shared_expert_intermediate_size=0,
        router_name=LAYER + ".mlp.gate.weight",
        expert_names=HF_MLP_EXPERT,
        shared_expert_prefix=None,
    )


def olmoe_spec(config: Any) -> ModelSpec:
    """OlmoeForCausalLM: RMSNorm over the full q and k projections, optional clip_qkv."""
    bias = bool(config_value(config, "attention_bias", False))
    clip = config_value(config, "clip_qkv")
    return ModelSpec(
        architecture="OlmoeForCausalLM",
        **base_fields(config),
        num_experts=int(config_value(config, "num_experts")),
        top_k=int(config_value(config, "num_experts_per_tok")),
        moe_intermediate_size=int(config_value(config, "intermediate_size")),
        norm_topk_prob=bool(config_value(config, "norm_topk_prob", False)),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=QKNorm.FULL,
        clip_qkv=None if clip is None else float(clip),
        shared_expert_intermediate_size=0,
        router_name=LAYER + ".mlp.gate.weight",
        expert_names=HF_MLP_EXPERT,
        shared_expert_prefix=None,
    )


ARCHITECTURES: dict[str, Callable[[Any], ModelSpec]] = {
    "MixtralForCausalLM": mixtral_spec,
    "Qwen2MoeForCausalLM": qwen2_moe_spec,
    "Qwen3MoeForCausalLM": qwen3_moe_spec,
    "OlmoeForCausalLM": olmoe_spec,
}


def spec_from_config(config: Any) -> ModelSpec:
    """Pick the architecture named by `config.architectures` and build its ModelSpec."""
    names = config_value(config, "architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            spec = ARCHITECTURES[name](config)
            require(spec.top_k <= spec.num_experts, f"num_experts_per_tok={spec.top_k} exceeds the {spec.num_experts} experts")
            return spec
    raise ModelLoadError(
        f"unsupported architecture {names or 'unknown'}: supported are {', '.join(sorted(ARCHITECTURES))}"
    )
