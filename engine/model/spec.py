"""ModelSpec: the architecture-independent description our MoE runtime executes.

Each supported Hugging Face architecture (see `engine.models.registry`) turns its config
into a ModelSpec and names its weights; the runtime in `engine.models.moe_model` only
reads the spec: the attention kind (grouped-query or multi-head latent), the rope and its
scaling, which layers attend through a sliding window and whether attention has sinks, which
layers are MoE layers (the others have a dense MLP), how the router scores and picks experts,
the routed experts' activation and biases, and the shared expert. Nothing here imports torch.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

from moe_serve.engine.errors import ModelLoadError


class QKNorm(enum.Enum):
    """Where a model normalises queries and keys before rotary embedding."""

    NONE = "none"
    PER_HEAD = "per_head"  # Qwen3-MoE: RMSNorm over head_dim
    FULL = "full"  # OLMoE: RMSNorm over the whole projection


class RopeScaling(enum.Enum):
    """The rope types of transformers' `rope_parameters` that we implement."""

    DEFAULT = "default"
    LINEAR = "linear"
    DYNAMIC = "dynamic"  # dynamic NTK: equal to DEFAULT up to max_position_embeddings, which we never exceed
    YARN = "yarn"
    LLAMA3 = "llama3"


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding of the first `rotary_dim` dims of each query/key head (see engine.models.rope)."""

    scaling: RopeScaling
    theta: float
    rotary_dim: int
    max_position_embeddings: int
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None  # YaRN: None derives it from factor (and mscale, mscale_all_dim)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    interleaved: bool = False  # DeepSeek: dims (2i, 2i+1) rotate together; the loader de-interleaves the weights


class AttentionKind(enum.Enum):
    """How a layer attends (and what its KV cache holds)."""

    GQA = "gqa"  # multi-head / grouped-query attention: per-head keys and values
    MLA = "mla"  # DeepSeek's multi-head latent attention: one compressed latent and one rope key per token


@dataclass(frozen=True)
class LatentAttentionSpec:
    """Multi-head latent attention's ranks and head dims (DeepSeek-V2/V3)."""

    q_lora_rank: int | None  # None: a plain q projection (DeepSeek-V2-Lite)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int


class RouterScoring(enum.Enum):
    """What the router turns its logits into before the top-k."""

    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"
    SOFTMAX_OF_TOPK = "softmax_of_topk"  # gpt-oss: the top-k logits, then a softmax over those k only


class GroupScoring(enum.Enum):
    """How group-limited routing ranks a group of experts."""

    MAX = "max"  # DeepSeek-V2 group_limited_greedy: the group's best expert
    TOP2_SUM = "top2_sum"  # DeepSeek-V3, GLM-4.5: the sum of the group's two best (bias-corrected) scores


@dataclass(frozen=True)
class RoutingSpec:
    """The router: scores, optional group-limited choice and correction bias, the weights' scaling."""

    scoring: RouterScoring = RouterScoring.SOFTMAX
    norm_topk_prob: bool = False
    scaling_factor: float = 1.0  # routed_scaling_factor, applied after any renormalisation
    num_groups: int = 1  # n_group: experts split into groups; only the best topk_groups groups compete
    topk_groups: int = 1
    group_scoring: GroupScoring = GroupScoring.MAX
    correction_bias: bool = False  # e_score_correction_bias: added to the scores for the choice only
    in_fp32: bool = False  # router weights (and logits) kept in fp32 whatever the model's dtype
    round_weights: bool = True  # routing weights rounded to the activations' dtype (DeepSeek, GLM keep fp32)
    logit_bias: bool = False  # gpt-oss: the router linear's bias, added to the logits (choice and weights)

    @property
    def is_plain_softmax(self) -> bool:
        """Softmax top-k (optionally renormalised) and nothing else: what the C routing kernel computes."""
        return (self.scoring is RouterScoring.SOFTMAX and self.num_groups == 1 and not self.correction_bias
                and self.scaling_factor == 1.0 and not self.in_fp32 and not self.logit_bias)


class ExpertActivation(enum.Enum):
    """The routed experts' gated activation of (gate, up)."""

    SWIGLU = "swiglu"  # silu(gate) * up
    CLAMPED_SWIGLU = "clamped_swiglu"  # gpt-oss: gate, up clamped to `limit`; (up + 1) * gate * sigmoid(alpha * gate)


@dataclass(frozen=True)
class ExpertMLPSpec:
    """The routed experts' MLP beyond the plain bias-free SwiGLU (the C expert kernel's case)."""

    activation: ExpertActivation = ExpertActivation.SWIGLU
    biases: bool = False  # gate_up and down biases (gpt-oss)
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

    @property
    def is_plain(self) -> bool:
        """SwiGLU without biases: what the C expert kernel computes on packed experts."""
        return self.activation is ExpertActivation.SWIGLU and not self.biases


@dataclass(frozen=True)
class ExpertWeightNames:
    """Hub weight names of one layer's routed expert (format with layer=, expert=)."""

    gate: str
    up: str
    down: str


@dataclass(frozen=True)
class FusedExpertWeightNames:
    """Hub weight names of one layer's routed experts stacked in one tensor each (format with layer=):
    gpt-oss' `gate_up_proj` [E, D, 2F] (gate and up interleaved along 2F) and `down_proj` [E, F, D],
    each with a `_bias` ([E, 2F], [E, D]); in MXFP4 checkpoints `_blocks` and `_scales` instead of the
    weight itself (see `engine.models.mxfp4`)."""

    gate_up: str
    down: str


@dataclass(frozen=True)
class ModelSpec:
    """Every number and switch of the math that the runtime needs.

    Layers are decoder layers 0..num_layers-1; `moe_layers` lists the ones with routed experts
    (the rest have a dense MLP of `dense_intermediate_size`). Everything about experts (expert
    keys, caches, prefetch, routing traces) counts MoE layers only: MoE layer i is decoder layer
    `moe_layers[i]`."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # query/key head dim (MLA: qk_nope_head_dim + qk_rope_head_dim)
    rms_norm_eps: float
    rope: RopeSpec
    attention_scale: float  # the softmax scale of q.k
    max_position_embeddings: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    routing: RoutingSpec
    qkv_bias: bool
    o_bias: bool
    qk_norm: QKNorm
    clip_qkv: float | None
    shared_expert_intermediate_size: int
    tie_word_embeddings: bool
    router_name: str  # e.g. "model.layers.{layer}.mlp.gate.weight"
    expert_names: ExpertWeightNames | FusedExpertWeightNames
    shared_expert_prefix: str | None  # e.g. "model.layers.{layer}.mlp.shared_expert"
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    moe_layers: tuple[int, ...]
    dense_intermediate_size: int = 0
    shared_expert_gated: bool = False  # Qwen2-MoE: the shared expert is scaled by sigmoid(gate(x))
    router_bias_name: str | None = None  # e.g. "model.layers.{layer}.mlp.gate.e_score_correction_bias"
    attention: AttentionKind = AttentionKind.GQA
    mla: LatentAttentionSpec | None = None
    layer_windows: tuple[int | None, ...] = ()  # per decoder layer: its sliding window in tokens, None (or no
    # entry) for full attention; a query attends the `window` most recent tokens, itself included
    attention_sinks: bool = False  # gpt-oss: a learned logit per head joins each query's softmax (`sinks`)
    expert_mlp: ExpertMLPSpec = ExpertMLPSpec()
    mxfp4_experts: bool = False  # the routed experts are stored in MXFP4 (dequantized expert by expert at load)

    def window(self, layer: int) -> int | None:
        """Decoder layer `layer`'s sliding window (None: full attention)."""
        return self.layer_windows[layer] if layer < len(self.layer_windows) else None

    @property
    def num_moe_layers(self) -> int:
        """Layers with routed experts: the layer count of expert keys, caches and traces."""
        return len(self.moe_layers)

    def moe_index(self, layer: int) -> int | None:
        """The MoE-layer index of decoder layer `layer` (None: a dense layer)."""
        try:
            return self.moe_layers.index(layer)
        except ValueError:
            return None

    @property
    def kv_entry_shapes(self) -> tuple[tuple[int, int], ...]:
        """Per token and layer, the shapes of what the paged KV cache stores: keys and values
        [Hkv, Dh]; with MLA one [1, kv_lora_rank + qk_rope_head_dim] entry (the latent and the rope key)."""
        if self.mla is not None:
            return ((1, self.mla.kv_lora_rank + self.mla.qk_rope_head_dim),)
        return ((self.num_kv_heads, self.head_dim), (self.num_kv_heads, self.head_dim))


def config_value(config: Any, name: str, default: Any = None) -> Any:
    """Read a field from a transformers config (attribute) or a plain dict."""
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def rope_parameters_of(config: Any) -> dict[str, Any]:
    """The rope parameters as one dict: transformers' `rope_parameters`, or the legacy
    `rope_scaling` plus `rope_theta` and `partial_rotary_factor` fields."""
    params = config_value(config, "rope_parameters")
    if not isinstance(params, dict):
        params = dict(config_value(config, "rope_scaling") or {})
    params = dict(params)
    params.setdefault("rope_theta", config_value(config, "rope_theta", 10000.0))
    partial = config_value(config, "partial_rotary_factor")
    if partial is not None:
        params.setdefault("partial_rotary_factor", partial)
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


def rope_of(config: Any, head_dim: int, interleaved: bool = False) -> RopeSpec:
    """The RopeSpec of a config whose rotated head dim is `head_dim` (times partial_rotary_factor);
    rope types we do not implement are refused naming the field."""
    params = rope_parameters_of(config)
    name = params["rope_type"]
    try:
        scaling = RopeScaling(name)
    except ValueError:
        supported = ", ".join(repr(s.value) for s in RopeScaling)
        raise ModelLoadError(f"unsupported rope_type {name!r} (rope_parameters): supported are {supported}") from None
    max_positions = int(config_value(config, "max_position_embeddings", 4096))
    rotary_dim = int(head_dim * float(params.get("partial_rotary_factor") or 1.0))
    require(rotary_dim % 2 == 0 and 0 < rotary_dim <= head_dim,
            f"partial_rotary_factor gives {rotary_dim} rotary dims of {head_dim}: must be even and positive")
    original = params.get("original_max_position_embeddings")
    if scaling in (RopeScaling.YARN, RopeScaling.LLAMA3) and original is None:
        original = config_value(config, "original_max_position_embeddings", max_positions)
    factor = params.get("factor")
    if factor is None:
        require(scaling in (RopeScaling.DEFAULT, RopeScaling.YARN), f"rope_type {name!r} needs a factor (rope_parameters)")
        factor = max_positions / original if scaling is RopeScaling.YARN else 1.0
    return RopeSpec(
        scaling=scaling,
        theta=float(params["rope_theta"]),
        rotary_dim=rotary_dim,
        max_position_embeddings=max_positions,
        factor=float(factor),
        original_max_position_embeddings=None if original is None else int(original),
        attention_factor=None if params.get("attention_factor") is None else float(params["attention_factor"]),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=None if params.get("mscale") is None else float(params["mscale"]),
        mscale_all_dim=None if params.get("mscale_all_dim") is None else float(params["mscale_all_dim"]),
        truncate=bool(params.get("truncate", True)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        interleaved=interleaved,
    )


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context stretched `scale` times."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def eos_ids_of(config: Any) -> tuple[int, ...]:
    """eos_token_id as a tuple (configs store an int, a list or nothing)."""
    eos = config_value(config, "eos_token_id")
    if eos is None:
        return ()
    if isinstance(eos, int):
        return (eos,)
    return tuple(int(e) for e in eos)


def require(condition: bool, message: str) -> None:
    """Refuse a config the runtime does not implement, with a clear message."""
    if not condition:
        raise ModelLoadError(message)


def base_fields(config: Any, rotary_head_dim: int | None = None, interleaved_rope: bool = False,
                quantizations: tuple[str, ...] = ()) -> dict[str, Any]:
    """Fields every supported architecture reads the same way (the rope over `rotary_head_dim`,
    by default the head dim); a quantization_config is refused unless its quant_method is one of
    `quantizations`."""
    hidden = int(config_value(config, "hidden_size"))
    num_heads = int(config_value(config, "num_attention_heads"))
    head_dim = int(config_value(config, "head_dim") or hidden // num_heads)
    act = config_value(config, "hidden_act", "silu")
    require(act == "silu", f"unsupported hidden_act {act!r}: only 'silu' is implemented")
    require(not config_value(config, "use_sliding_window", False), "sliding-window attention is not implemented")
    quantization = config_value(config, "quantization_config")
    require(quantization is None or _quant_method(quantization) in quantizations,
            f"quantization_config {_quant_method(quantization)!r} is not supported: "
            f"only unquantized fp32/bf16/fp16 checkpoints load{''.join(' (or ' + q + ')' for q in quantizations)}")
    return {
        "vocab_size": int(config_value(config, "vocab_size")),
        "hidden_size": hidden,
        "num_layers": int(config_value(config, "num_hidden_layers")),
        "num_heads": num_heads,
        "num_kv_heads": int(config_value(config, "num_key_value_heads") or num_heads),
        "head_dim": head_dim,
        "rms_norm_eps": float(config_value(config, "rms_norm_eps", 1e-6)),
        "rope": rope_of(config, rotary_head_dim or head_dim, interleaved_rope),
        "attention_scale": head_dim**-0.5,
        "max_position_embeddings": int(config_value(config, "max_position_embeddings", 4096)),
        "tie_word_embeddings": bool(config_value(config, "tie_word_embeddings", False)),
        "bos_token_id": config_value(config, "bos_token_id"),
        "eos_token_ids": eos_ids_of(config),
    }


def _quant_method(quantization: Any) -> str:
    method = config_value(quantization, "quant_method") if quantization is not None else None
    return str(method or quantization)
