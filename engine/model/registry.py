"""Supported architectures: each maps a Hugging Face config to a ModelSpec.

Mixtral, Qwen2-MoE (shared expert with a sigmoid gate), Qwen3-MoE (per-head q/k norm,
norm_topk_prob; both with optional dense layers), OLMoE (full q/k norm, optional clip_qkv)
DeepSeek-V2/V3 (multi-head latent attention, ungated shared experts, dense first layers,
group-limited routing; V3 with sigmoid scores and a correction bias), GLM-4.5 (V3's routing with
grouped-query attention, partial rotary, optional q/k norm), ERNIE-4.5 (interleaved rope,
softmax routing with a correction bias) and gpt-oss (attention sinks, alternating sliding-window
and full layers, a biased router, biased experts with a clamped SwiGLU, MXFP4 experts). Configs
that change the math in ways we do not implement are refused with a ModelLoadError naming the field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moe_serve.engine.errors import ModelLoadError
from moe_serve.engine.model.spec import (
    AttentionKind,
    ExpertActivation,
    ExpertMLPSpec,
    ExpertWeightNames,
    FusedExpertWeightNames,
    GroupScoring,
    LatentAttentionSpec,
    ModelSpec,
    QKNorm,
    RopeScaling,
    RopeSpec,
    RouterScoring,
    RoutingSpec,
    base_fields,
    config_value,
    require,
    yarn_mscale,
)

LAYER = "model.layers.{layer}"
HF_MLP_EXPERT = ExpertWeightNames(
    gate=LAYER + ".mlp.experts.{expert}.gate_proj.weight",
    up=LAYER + ".mlp.experts.{expert}.up_proj.weight",
    down=LAYER + ".mlp.experts.{expert}.down_proj.weight",
)


def _qwen_moe_layers(config: Any, num_experts: int) -> tuple[int, ...]:
    """Qwen2/3-MoE: layer l is sparse unless listed in mlp_only_layers, and only every
    decoder_sparse_step-th layer ((l + 1) % step == 0) is."""
    step = int(config_value(config, "decoder_sparse_step", 1) or 1)
    require(step >= 1, f"decoder_sparse_step={step} must be >= 1")
    dense = set(config_value(config, "mlp_only_layers", []) or [])
    num_layers = int(config_value(config, "num_hidden_layers"))
    return tuple(layer for layer in range(num_layers)
                 if num_experts > 0 and layer not in dense and (layer + 1) % step == 0)


def mixtral_spec(config: Any) -> ModelSpec:
    """MixtralForCausalLM: top-k of softmax, always renormalised; no biases; every layer attends
    through `sliding_window` when it is set."""
    window = config_value(config, "sliding_window")
    require(window is None or (isinstance(window, int) and window >= 1),
            f"sliding_window={window!r} must be a positive integer or null")
    base = base_fields(config)
    return ModelSpec(
        architecture="MixtralForCausalLM",
        **base,
        num_experts=int(config_value(config, "num_local_experts")),
        top_k=int(config_value(config, "num_experts_per_tok")),
        moe_intermediate_size=int(config_value(config, "intermediate_size")),
        routing=RoutingSpec(norm_topk_prob=True),
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
        moe_layers=tuple(range(base["num_layers"])),
        layer_windows=(window,) * base["num_layers"] if window is not None else (),
    )


def qwen2_moe_spec(config: Any) -> ModelSpec:
    """Qwen2MoeForCausalLM: q/k/v biases, a shared expert scaled by sigmoid(gate(x)), dense
    layers by decoder_sparse_step / mlp_only_layers."""
    num_experts = int(config_value(config, "num_experts"))
    return ModelSpec(
        architecture="Qwen2MoeForCausalLM",
        **base_fields(config),
        num_experts=num_experts,
        top_k=int(config_value(config, "num_experts_per_tok")),
        moe_intermediate_size=int(config_value(config, "moe_intermediate_size")),
        routing=RoutingSpec(norm_topk_prob=bool(config_value(config, "norm_topk_prob", False))),
        qkv_bias=bool(config_value(config, "qkv_bias", True)),
        o_bias=False,
        qk_norm=QKNorm.NONE,
        clip_qkv=None,
        shared_expert_intermediate_size=int(config_value(config, "shared_expert_intermediate_size", 0)),
        router_name=LAYER + ".mlp.gate.weight",
        expert_names=HF_MLP_EXPERT,
        shared_expert_prefix=LAYER + ".mlp.shared_expert",
        shared_expert_gated=True,
        moe_layers=_qwen_moe_layers(config, num_experts),
        dense_intermediate_size=int(config_value(config, "intermediate_size", 0)),
    )


def qwen3_moe_spec(config: Any) -> ModelSpec:
    """Qwen3MoeForCausalLM: per-head RMSNorm on q and k, optional attention bias, dense layers
    by decoder_sparse_step / mlp_only_layers."""
    bias = bool(config_value(config, "attention_bias", False))
    num_experts = int(config_value(config, "num_experts", config_value(config, "num_local_experts", 0)))
    return ModelSpec(
        architecture="Qwen3MoeForCausalLM",
        **base_fields(config),
        num_experts=num_experts,
        top_k=int(config_value(config, "num_experts_per_tok")),
        moe_intermediate_size=int(config_value(config, "moe_intermediate_size")),
        routing=RoutingSpec(norm_topk_prob=bool(config_value(config, "norm_topk_prob", False))),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=QKNorm.PER_HEAD,
        clip_qkv=None,
        shared_expert_intermediate_size=0,
        router_name=LAYER + ".mlp.gate.weight",
        expert_names=HF_MLP_EXPERT,
        shared_expert_prefix=None,
        moe_layers=_qwen_moe_layers(config, num_experts),
        dense_intermediate_size=int(config_value(config, "intermediate_size", 0)),
    )


def olmoe_spec(config: Any) -> ModelSpec:
    """OlmoeForCausalLM: RMSNorm over the full q and k projections, optional clip_qkv."""
    bias = bool(config_value(config, "attention_bias", False))
    clip = config_value(config, "clip_qkv")
    base = base_fields(config)
    return ModelSpec(
        architecture="OlmoeForCausalLM",
        **base,
        num_experts=int(config_value(config, "num_experts")),
        top_k=int(config_value(config, "num_experts_per_tok")),
        moe_intermediate_size=int(config_value(config, "intermediate_size")),
        routing=RoutingSpec(norm_topk_prob=bool(config_value(config, "norm_topk_prob", False))),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=QKNorm.FULL,
        clip_qkv=None if clip is None else float(clip),
        shared_expert_intermediate_size=0,
        router_name=LAYER + ".mlp.gate.weight",
        expert_names=HF_MLP_EXPERT,
        shared_expert_prefix=None,
        moe_layers=tuple(range(base["num_layers"])),
    )


def _deepseek_routing(config: Any, version: int, num_experts: int, top_k: int) -> RoutingSpec:
    """V2: softmax top-k (group-limited by the best expert of each group with topk_method
    group_limited_greedy), never renormalised; V3: sigmoid scores, a correction bias for the
    choice, groups ranked by their two best scores, optionally renormalised. Both scale the
    weights by routed_scaling_factor."""
    method = config_value(config, "topk_method")
    scoring = config_value(config, "scoring_func")
    n_group = int(config_value(config, "n_group") or 1)
    topk_group = int(config_value(config, "topk_group") or 1)
    scaling = float(config_value(config, "routed_scaling_factor", 1.0))
    if version == 2:
        require(scoring in (None, "softmax"), f"scoring_func={scoring!r} is not supported for DeepSeek-V2: only 'softmax'")
        require(method in ("greedy", "group_limited_greedy"),
                f"topk_method={method!r} is not supported for DeepSeek-V2: only 'greedy' and 'group_limited_greedy'")
        require(not config_value(config, "norm_topk_prob", False),
                "norm_topk_prob=True is not supported for DeepSeek-V2 (transformers ignores it, the original code "
                "renormalises instead of scaling)")
        if method == "greedy":
            n_group = topk_group = 1
        routing = RoutingSpec(RouterScoring.SOFTMAX, False, scaling, n_group, topk_group, GroupScoring.MAX,
                              correction_bias=False, in_fp32=True, round_weights=False)
    else:
        require(scoring in (None, "sigmoid"), f"scoring_func={scoring!r} is not supported for DeepSeek-V3: only 'sigmoid'")
        require(method in (None, "noaux_tc"), f"topk_method={method!r} is not supported for DeepSeek-V3: only 'noaux_tc'")
        routing = _sigmoid_group_routing(config, scaling, n_group, topk_group)
    _check_groups(routing, num_experts, top_k)
    return routing


def _sigmoid_group_routing(config: Any, scaling: float, n_group: int, topk_group: int) -> RoutingSpec:
    """DeepSeek-V3 and GLM-4.5: sigmoid scores, bias-corrected group-limited choice, fp32 weights."""
    return RoutingSpec(RouterScoring.SIGMOID, bool(config_value(config, "norm_topk_prob", True)), scaling, n_group,
                       topk_group, GroupScoring.TOP2_SUM, correction_bias=True, in_fp32=True, round_weights=False)


def _check_groups(routing: RoutingSpec, num_experts: int, top_k: int) -> None:
    groups, kept = routing.num_groups, routing.topk_groups
    require(groups >= 1 and num_experts % groups == 0, f"n_group={groups} must divide the {num_experts} routed experts")
    require(1 <= kept <= groups, f"topk_group={kept} must be between 1 and n_group={groups}")
    per_group = num_experts // groups
    require(top_k <= kept * per_group,
            f"num_experts_per_tok={top_k} exceeds the {kept * per_group} experts of topk_group={kept} groups")
    require(routing.group_scoring is not GroupScoring.TOP2_SUM or groups == 1 or per_group >= 2,
            f"n_group={groups} leaves fewer than 2 experts per group (groups are ranked by their two best)")


def _mla_softmax_scale(rope: RopeSpec, qk_head_dim: int) -> float:
    """DeepSeek's softmax scale: qk_head_dim^-0.5, times yarn_mscale(factor, mscale_all_dim)^2 under a scaled rope."""
    scale = qk_head_dim**-0.5
    if rope.scaling is not RopeScaling.DEFAULT and rope.mscale_all_dim:
        scale *= yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2
    return scale


def _shared_expert_moe(config: Any, shared_key: str) -> dict[str, Any]:
    """The ModelSpec fields of a DeepSeek-style MoE block (DeepSeek, GLM-4.5, ERNIE-4.5): the router at
    mlp.gate, routed experts under mlp.experts, `config[shared_key]` ungated shared experts of
    moe_intermediate_size each, fused under mlp.shared_experts, dense layers of intermediate_size, no
    output bias, no qkv clipping."""
    shared = int(config_value(config, shared_key, 0) or 0)
    moe_intermediate = int(config_value(config, "moe_intermediate_size"))
    return dict(
        moe_intermediate_size=moe_intermediate,
        o_bias=False,
        clip_qkv=None,
        shared_expert_intermediate_size=shared * moe_intermediate,
        router_name=LAYER + ".mlp.gate.weight",
        expert_names=HF_MLP_EXPERT,
        shared_expert_prefix=LAYER + ".mlp.shared_experts" if shared else None,
        dense_intermediate_size=int(config_value(config, "intermediate_size", 0)),
    )


def _deepseek_spec(config: Any, version: int) -> ModelSpec:
    """DeepseekV2/V3ForCausalLM: multi-head latent attention (interleaved rope on the rope dims,
    DeepSeek's YaRN softmax scale), first_k_dense_replace dense layers, ungated shared experts."""
    freq = config_value(config, "moe_layer_freq", 1)
    require(freq == 1, f"moe_layer_freq={freq} is not supported: every layer from first_k_dense_replace on is MoE (1)")
    require(not config_value(config, "attention_bias", False), "attention_bias=True is not supported for DeepSeek")
    require(not config_value(config, "mlp_bias", False), "mlp_bias=True is not supported for DeepSeek")
    q_lora = config_value(config, "q_lora_rank")
    mla = LatentAttentionSpec(
        q_lora_rank=None if q_lora is None else int(q_lora),
        kv_lora_rank=int(config_value(config, "kv_lora_rank")),
        qk_nope_head_dim=int(config_value(config, "qk_nope_head_dim")),
        qk_rope_head_dim=int(config_value(config, "qk_rope_head_dim")),
        v_head_dim=int(config_value(config, "v_head_dim")),
    )
    interleaved = version == 2 or bool(config_value(config, "rope_interleave", True))
    base = base_fields(config, rotary_head_dim=mla.qk_rope_head_dim, interleaved_rope=interleaved)
    qk_head_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim
    base.update(head_dim=qk_head_dim, num_kv_heads=base["num_heads"],
                attention_scale=_mla_softmax_scale(base["rope"], qk_head_dim))
    num_experts = int(config_value(config, "n_routed_experts"))
    top_k = int(config_value(config, "num_experts_per_tok"))
    first_moe = int(config_value(config, "first_k_dense_replace", 0) or 0)
    return ModelSpec(
        architecture=f"DeepseekV{version}ForCausalLM",
        **base,
        **_shared_expert_moe(config, "n_shared_experts"),
        num_experts=num_experts,
        top_k=top_k,
        routing=_deepseek_routing(config, version, num_experts, top_k),
        qkv_bias=False,
        qk_norm=QKNorm.NONE,
        moe_layers=tuple(range(first_moe, base["num_layers"])),
        router_bias_name=LAYER + ".mlp.gate.e_score_correction_bias" if version == 3 else None,
        attention=AttentionKind.MLA,
        mla=mla,
    )


def deepseek_v2_spec(config: Any) -> ModelSpec:
    """DeepseekV2ForCausalLM (V2, V2-Lite, V2.5)."""
    return _deepseek_spec(config, 2)


def deepseek_v3_spec(config: Any) -> ModelSpec:
    """DeepseekV3ForCausalLM (V3, R1, Moonlight, Kimi-K2 shapes)."""
    return _deepseek_spec(config, 3)


def glm4_moe_spec(config: Any) -> ModelSpec:
    """Glm4MoeForCausalLM (GLM-4.5, GLM-4.5-Air): partial rotary, optional per-head q/k norm, q/k/v
    biases, first_k_dense_replace dense layers, DeepSeek-V3's routing, ungated shared experts."""
    bias = bool(config_value(config, "attention_bias", False))
    num_experts = int(config_value(config, "n_routed_experts"))
    top_k = int(config_value(config, "num_experts_per_tok"))
    routing = _sigmoid_group_routing(config, float(config_value(config, "routed_scaling_factor", 1.0)),
                                     int(config_value(config, "n_group") or 1), int(config_value(config, "topk_group") or 1))
    _check_groups(routing, num_experts, top_k)
    base = base_fields(config)
    return ModelSpec(
        architecture="Glm4MoeForCausalLM",
        **base,
        **_shared_expert_moe(config, "n_shared_experts"),
        num_experts=num_experts,
        top_k=top_k,
        routing=routing,
        qkv_bias=bias,
        qk_norm=QKNorm.PER_HEAD if config_value(config, "use_qk_norm", False) else QKNorm.NONE,
        moe_layers=tuple(range(int(config_value(config, "first_k_dense_replace", 0) or 0), base["num_layers"])),
        router_bias_name=LAYER + ".mlp.gate.e_score_correction_bias",
    )


def _ernie_moe_layers(config: Any, num_layers: int) -> tuple[int, ...]:
    """ERNIE-4.5: every moe_layer_interval-th layer from moe_layer_start_index to moe_layer_end_index."""
    bounds = {name: config_value(config, name, default) for name, default in
              (("moe_layer_start_index", 0), ("moe_layer_end_index", -1), ("moe_layer_interval", 1))}
    for name, value in bounds.items():
        require(isinstance(value, int), f"{name}={value!r} is not supported: only one integer (text-only models)")
    start, end, interval = bounds.values()
    end = num_layers - 1 if end == -1 else end
    require(interval >= 1, f"moe_layer_interval={interval} must be >= 1")
    return tuple(layer for layer in range(num_layers) if (layer + 1) % interval == 0 and start <= layer <= end)


def ernie4_5_moe_spec(config: Any) -> ModelSpec:
    """Ernie4_5_MoeForCausalLM (ERNIE-4.5-21B-A3B): interleaved rope, fp32 softmax router whose
    choice adds a correction bias, renormalised; ungated shared experts; moe_layer_* dense layers."""
    require(not config_value(config, "use_bias", False),
            "use_bias=True is not supported for ERNIE-4.5 (biases in every linear layer)")
    base = base_fields(config, interleaved_rope=True)
    num_experts = int(config_value(config, "moe_num_experts", config_value(config, "num_experts", 0)))
    return ModelSpec(
        architecture="Ernie4_5_MoeForCausalLM",
        **base,
        **_shared_expert_moe(config, "moe_num_shared_experts"),
        num_experts=num_experts,
        top_k=int(config_value(config, "moe_k", config_value(config, "num_experts_per_tok", 0))),
        routing=RoutingSpec(RouterScoring.SOFTMAX, norm_topk_prob=True, correction_bias=True, in_fp32=True),
        qkv_bias=False,
        qk_norm=QKNorm.NONE,
        moe_layers=_ernie_moe_layers(config, base["num_layers"]),
        router_bias_name=LAYER + ".mlp.moe_statics.e_score_correction_bias",
    )


GPT_OSS_LAYER_TYPES = {"sliding_attention": True, "full_attention": False}  # layer type -> windowed


def _gpt_oss_windows(config: Any, num_layers: int) -> tuple[int | None, ...]:
    """gpt-oss' layer_types: `sliding_window` tokens for each sliding_attention layer, None for full attention."""
    layer_types = list(config_value(config, "layer_types") or [])
    require(len(layer_types) == num_layers, f"layer_types has {len(layer_types)} entries for {num_layers} layers")
    unknown = sorted({t for t in layer_types if t not in GPT_OSS_LAYER_TYPES})
    require(not unknown, f"layer_types {unknown} are not supported: only {', '.join(GPT_OSS_LAYER_TYPES)}")
    window = config_value(config, "sliding_window")
    if any(GPT_OSS_LAYER_TYPES[t] for t in layer_types):
        require(isinstance(window, int) and window >= 1, f"sliding_window={window!r} must be a positive integer")
    return tuple(window if GPT_OSS_LAYER_TYPES[t] else None for t in layer_types)


def gpt_oss_spec(config: Any) -> ModelSpec:
    """GptOssForCausalLM (gpt-oss-20b, gpt-oss-120b): grouped-query attention with q/k/v/o biases,
    a learned sink logit per head, sliding-window layers by layer_types, YaRN; a biased router whose
    softmax runs over the top-k logits; experts stacked per layer with biases and the clamped SwiGLU,
    stored in MXFP4 (quant_method 'mxfp4') or plain."""
    base = base_fields(config, quantizations=("mxfp4",))
    bias = bool(config_value(config, "attention_bias", True))
    experts = LAYER + ".mlp.experts"
    return ModelSpec(
        architecture="GptOssForCausalLM",
        **base,
        num_experts=int(config_value(config, "num_local_experts")),
        top_k=int(config_value(config, "num_experts_per_tok")),
        moe_intermediate_size=int(config_value(config, "intermediate_size")),
        routing=RoutingSpec(RouterScoring.SOFTMAX_OF_TOPK, logit_bias=True),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=QKNorm.NONE,
        clip_qkv=None,
        shared_expert_intermediate_size=0,
        router_name=LAYER + ".mlp.router.weight",
        expert_names=FusedExpertWeightNames(gate_up=experts + ".gate_up_proj", down=experts + ".down_proj"),
        shared_expert_prefix=None,
        moe_layers=tuple(range(base["num_layers"])),
        router_bias_name=LAYER + ".mlp.router.bias",
        layer_windows=_gpt_oss_windows(config, base["num_layers"]),
        attention_sinks=True,
        expert_mlp=ExpertMLPSpec(ExpertActivation.CLAMPED_SWIGLU, biases=True,
                                 swiglu_alpha=float(config_value(config, "swiglu_alpha", 1.702) or 1.702),
                                 swiglu_limit=float(config_value(config, "swiglu_limit", 7.0))),
        mxfp4_experts=config_value(config, "quantization_config") is not None,
    )


ARCHITECTURES: dict[str, Callable[[Any], ModelSpec]] = {
    "MixtralForCausalLM": mixtral_spec,
    "Qwen2MoeForCausalLM": qwen2_moe_spec,
    "Qwen3MoeForCausalLM": qwen3_moe_spec,
    "OlmoeForCausalLM": olmoe_spec,
    "DeepseekV2ForCausalLM": deepseek_v2_spec,
    "DeepseekV3ForCausalLM": deepseek_v3_spec,
    "Glm4MoeForCausalLM": glm4_moe_spec,
    "Ernie4_5_MoeForCausalLM": ernie4_5_moe_spec,
    "GptOssForCausalLM": gpt_oss_spec,
}


def spec_from_config(config: Any) -> ModelSpec:
    """Pick the architecture named by `config.architectures` and build its ModelSpec."""
    names = config_value(config, "architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            spec = ARCHITECTURES[name](config)
            require(spec.top_k <= spec.num_experts, f"num_experts_per_tok={spec.top_k} exceeds the {spec.num_experts} experts")
            require(spec.num_moe_layers > 0, "the config has no MoE layer: moe-serve serves Mixture-of-Experts models")
            require(spec.num_moe_layers == spec.num_layers or spec.dense_intermediate_size > 0,
                    "intermediate_size is needed for the dense (non-MoE) layers")
            return spec
    raise ModelLoadError(
        f"unsupported architecture {names or 'unknown'}: supported are {', '.join(sorted(ARCHITECTURES))}"
    )
