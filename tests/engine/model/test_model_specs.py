"""Config -> ModelSpec: which layers are MoE layers, DeepSeek's scales and latent cache (against
what transformers builds from the same config, tiny or as published), and configs we do not
implement refused with one line naming the field."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from moe_serve.engine.errors import ModelLoadError
from moe_serve.engine.model.registry import spec_from_config
from moe_serve.engine.model.rope import attention_factor
from tests.helpers import tiny_config

VOCAB = 64


def _transformers_moe_layers(config) -> tuple[int, ...]:
    model = transformers.AutoModelForCausalLM.from_config(config)
    return tuple(i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts"))


def _config(arch: str, **overrides):
    config = tiny_config(arch, VOCAB, **overrides)
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    return config


@pytest.mark.parametrize(("arch", "overrides"), [
    ("qwen2_moe", dict(num_hidden_layers=6, mlp_only_layers=[0, 3])),
    ("qwen3_moe", dict(num_hidden_layers=6, decoder_sparse_step=3)),
    ("qwen2_moe", dict(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[1])),
])
def test_moe_layers_are_the_layers_transformers_gives_experts(arch: str, overrides: dict) -> None:
    config = _config(arch, **overrides)
    spec = spec_from_config(config)
    assert spec.moe_layers == _transformers_moe_layers(config)
    assert [spec.moe_index(layer) for layer in spec.moe_layers] == list(range(spec.num_moe_layers))
    assert all(spec.moe_index(layer) is None for layer in range(spec.num_layers) if layer not in spec.moe_layers)


@pytest.mark.parametrize(("arch", "overrides", "message"), [
    ("qwen3_moe", dict(quantization_config={"quant_method": "fp8"}),
     r"^quantization_config 'fp8' is not supported: only unquantized fp32/bf16/fp16 checkpoints load$"),
    ("qwen2_moe", dict(mlp_only_layers=[0, 1]), r"^the config has no MoE layer"),
    ("qwen3_moe", dict(hidden_act="gelu"), r"^unsupported hidden_act 'gelu'"),
])
def test_unsupported_configs_are_refused_in_one_line_naming_the_field(arch: str, overrides: dict,
                                                                       message: str) -> None:
    with pytest.raises(ModelLoadError, match=message) as error:
        spec_from_config(_config(arch, **overrides))
    assert "\n" not in str(error.value)


# config.json fields as published on the Hub (abridged to what the math reads; `type` is the legacy rope key)
DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "attention_bias": False,
    "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 10944,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "moe_intermediate_size": 1408, "moe_layer_freq": 1,
    "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16,
    "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "routed_scaling_factor": 1.0, "scoring_func": "softmax", "topk_group": 1, "topk_method": "greedy",
    "torch_dtype": "bfloat16", "v_head_dim": 128, "vocab_size": 102400,
}
DEEPSEEK_V2 = {**DEEPSEEK_V2_LITE, "hidden_size": 5120, "intermediate_size": 12288, "n_group": 8,
               "n_routed_experts": 160, "num_attention_heads": 128, "num_hidden_layers": 60, "q_lora_rank": 1536,
               "routed_scaling_factor": 16.0, "topk_group": 3, "topk_method": "group_limited_greedy",
               "moe_intermediate_size": 1536, "num_experts_per_tok": 6}
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "attention_bias": False,
    "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "moe_intermediate_size": 2048, "moe_layer_freq": 1,
    "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_group": 4,
    "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "v_head_dim": 128, "vocab_size": 129280,
}
DEEPSEEK_V3_FP8 = {**DEEPSEEK_V3, "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                                          "quant_method": "fp8", "weight_block_size": [128, 128]}}


def _published(config_json: dict, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config_json))
    return transformers.AutoConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("config_json", [DEEPSEEK_V2_LITE, DEEPSEEK_V2, DEEPSEEK_V3],
                         ids=["DeepSeek-V2-Lite", "DeepSeek-V2", "DeepSeek-V3-bf16"])
def test_published_deepseek_configs_give_transformers_layers_scales_and_latent_cache(config_json, tmp_path) -> None:
    config = _published(config_json, tmp_path)
    spec = spec_from_config(config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    attention = model.model.layers[0].self_attn
    assert spec.moe_layers == tuple(i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts"))
    assert spec.attention_scale == pytest.approx(attention.scaling, rel=1e-12)
    assert attention_factor(spec.rope) == pytest.approx(model.model.rotary_emb.attention_scaling, rel=1e-12)
    assert spec.rope.rotary_dim == config_json["qk_rope_head_dim"] and spec.rope.interleaved
    assert spec.kv_entry_shapes == ((1, config_json["kv_lora_rank"] + config_json["qk_rope_head_dim"]),)
    routing = spec.routing
    assert routing.scaling_factor == config_json["routed_scaling_factor"]
    assert (routing.num_groups, routing.topk_groups) == (
        (1, 1) if config_json["topk_method"] == "greedy" else (config_json["n_group"], config_json["topk_group"]))
    assert routing.correction_bias == (config_json["scoring_func"] == "sigmoid")


@pytest.mark.parametrize(("config_json", "message"), [
    (DEEPSEEK_V3_FP8, r"^quantization_config 'fp8' is not supported"),
    ({**DEEPSEEK_V2_LITE, "moe_layer_freq": 2}, r"^moe_layer_freq=2 is not supported"),
    ({**DEEPSEEK_V2_LITE, "norm_topk_prob": True}, r"^norm_topk_prob=True is not supported for DeepSeek-V2"),
    ({**DEEPSEEK_V2_LITE, "topk_method": "noaux_tc"}, r"^topk_method='noaux_tc' is not supported for DeepSeek-V2"),
    ({**DEEPSEEK_V3, "scoring_func": "softmax"}, r"^scoring_func='softmax' is not supported for DeepSeek-V3"),
    ({**DEEPSEEK_V3, "n_group": 7}, r"^n_group=7 must divide the 256 routed experts"),
    ({**DEEPSEEK_V2, "num_experts_per_tok": 61}, r"^num_experts_per_tok=61 exceeds the 60 experts of topk_group=3"),
], ids=["fp8", "moe_layer_freq", "v2-norm_topk_prob", "v2-topk_method", "v3-scoring_func", "n_group", "top_k"])
def test_unsupported_deepseek_configs_are_refused_naming_the_field(config_json, message: str, tmp_path) -> None:
    with pytest.raises(ModelLoadError, match=message) as error:
        spec_from_config(_published(config_json, tmp_path))
    assert "\n" not in str(error.value)
