"""ModelSpec: the architecture-independent description our MoE runtime executes.

Each supported Hugging Face architecture (see `engine.models.registry`) turns its config
into a ModelSpec and names its weights; the runtime in `engine.models.moe_model` only
reads the spec. Nothing here imports torch.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from engine.errors import ModelLoadError


class QKNorm(enum.Enum):
    """Where a model normalises queries and keys before rotary embedding."""

    NONE = "none"
    PER_HEAD = "per_head"  # Qwen3-MoE: RMSNorm over head_dim
    FULL = "full"  # OLMoE: RMSNorm over the whole projection


@dataclass(frozen=True)
class ExpertWeightNames:
    """Hub weight names of one layer's routed expert (format with layer=, expert=)."""

    gate: str
    up: str
    down: str


@dataclass(frozen=True)
class ModelSpec:
    """Every number and switch of the math that the runtime needs."""

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: QKNorm
    clip_qkv: float | None
    shared_expert_intermediate_size: int
    tie_word_embeddings: bool
    router_name: str  # e.g. "model.layers.{layer}.mlp.gate.weight"
    expert_names: ExpertWeightNames
    shared_expert_prefix: str | None  # e.g. "model.layers.{layer}.mlp.shared_expert"
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]


def config_value(config: Any, name: str, default: Any = None) -> Any:
    """Read a field from a transformers config (attribute) or a plain dict."""
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def rope_theta_of(config: Any) -> float:
    """Rope base from either the v5 `rope_parameters` dict or the legacy fields; refuse scaling."""
    params = config_value(config, "rope_parameters")
    if isinstance(params, dict):
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise ModelLoadError(f"unsupported rope_type {rope_type!r}: only 'default' rotary embeddings are implemented")
        return float(params.get("rope_theta", config_value(config, "rope_theta", 10000.0)))
    scaling = config_value(config, "rope_scaling")
    if scaling:
        raise ModelLoadError(f"unsupported rope_scaling {scaling!r}: only unscaled rotary embeddings are implemented")
    return float(config_value(config, "rope_theta", 10000.0))


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


def base_fields(config: Any) -> dict[str, Any]:
    """Fields every supported architecture reads the same way."""
    hidden = int(config_value(config, "hidden_size"))
    num_heads = int(config_value(config, "num_attention_heads"))
    head_dim = config_value(config, "head_dim") or hidden // num_heads
    act = config_value(config, "hidden_act", "silu")
    require(act == "silu", f"unsupported hidden_act {act!r}: only 'silu' is implemented")
    require(not config_value(config, "use_sliding_window", False), "sliding-window attention is not implemented")
    return {
        "vocab_size": int(config_value(config, "vocab_size")),
        "hidden_size": hidden,
        "num_layers": int(config_value(config, "num_hidden_layers")),
        "num_heads": num_heads,
        "num_kv_heads": int(config_value(config, "num_key_value_heads") or num_heads),
        "head_dim": int(head_dim),
        "rms_norm_eps": float(config_value(config, "rms_norm_eps", 1e-6)),
        "rope_theta": rope_theta_of(config),
        "max_position_embeddings": int(config_value(config, "max_position_embeddings", 4096)),
        "tie_word_embeddings": bool(config_value(config, "tie_word_embeddings", False)),
        "bos_token_id": config_value(config, "bos_token_id"),
        "eos_token_ids": eos_ids_of(config),
    }
