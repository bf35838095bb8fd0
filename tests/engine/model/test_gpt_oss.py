"""gpt-oss: the published config's spec, MXFP4 dequantization against transformers', and a tiny
MXFP4 checkpoint (published layout) and a plain one through the offload path against transformers.

The plain checkpoint's parity (fp32 logits, bf16 error, greedy tokens) runs in test_model_parity and
its offloaded-equals-resident runs in test_offload_architectures (gpt_oss in NEW_ARCHITECTURES);
here the offloaded tokens are also checked against transformers directly, with prompts and chunked
prefills longer than the sliding window.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from moe_serve.engine.builder import build_engine
from moe_serve.engine.config import EngineConfig
from moe_serve.engine.errors import ModelLoadError
from moe_serve.engine.model.loader import load_model, read_spec
from moe_serve.engine.model.mxfp4 import MXFP4Expert, dequantize
from moe_serve.engine.model.rope import attention_factor, inverse_frequencies
from moe_serve.engine.model.spec import ExpertActivation, RouterScoring
from moe_serve.engine.offload.provider import OffloadedExperts
from moe_serve.engine.types import ExpertKey
from tests.helpers import (
    MIN_FRACTION,
    engine_logits,
    hf_next_tokens,
    make_mxfp4_checkpoint,
    parity_prompts,
    run_workload,
    workload,
)

# openai/gpt-oss-20b's config.json as published (abridged to what the math reads)
GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "attention_bias": True, "eos_token_id": 200002,
    "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096,
    "intermediate_size": 2880, "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072, "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
    "num_key_value_heads": 8, "num_local_experts": 32, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                       "model.embed_tokens", "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05, "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                            "original_max_position_embeddings": 4096, "rope_type": "yarn",
                                            "truncate": False},
    "rope_theta": 150000, "sliding_window": 128, "swiglu_limit": 7.0, "tie_word_embeddings": False,
    "vocab_size": 201088,
}


def _write_config(tmp_path, **changes) -> object:
    (tmp_path / "config.json").write_text(json.dumps({**GPT_OSS_20B, **changes}))
    return tmp_path


def test_published_gpt_oss_20b_config_gives_transformers_layers_rope_and_experts(tmp_path) -> None:
    hf_config, spec = read_spec(_write_config(tmp_path))
    assert spec.layer_windows == tuple(128 if t == "sliding_attention" else None for t in hf_config.layer_types)
    assert spec.layer_windows[:2] == (128, None) and spec.attention_sinks
    assert (spec.num_experts, spec.top_k, spec.moe_layers) == (32, 4, tuple(range(24)))
    assert spec.qkv_bias and spec.o_bias and spec.routing.scoring is RouterScoring.SOFTMAX_OF_TOPK
    assert spec.expert_mlp.activation is ExpertActivation.CLAMPED_SWIGLU and spec.expert_mlp.biases
    assert (spec.expert_mlp.swiglu_alpha, spec.expert_mlp.swiglu_limit) == (1.702, 7.0) and spec.mxfp4_experts
    assert spec.attention_scale == 64**-0.5
    expected_inv_freq, expected_factor = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["yarn"](hf_config)
    assert torch.allclose(inverse_frequencies(spec.rope), expected_inv_freq, rtol=1e-6, atol=0)
    assert attention_factor(spec.rope) == pytest.approx(expected_factor)


@pytest.mark.parametrize(("changes", "message"), [
    (dict(layer_types=["sliding_attention", "chunked_attention"] * 12),
     r"^layer_types \['chunked_attention'\] are not supported: only sliding_attention, full_attention$"),
    (dict(quantization_config={"quant_method": "fp8"}), r"^quantization_config 'fp8' is not supported: "),
])
def test_unsupported_gpt_oss_configs_are_refused_naming_the_field(changes: dict, message: str, tmp_path) -> None:
    with pytest.raises(ModelLoadError, match=message) as error:
        read_spec(_write_config(tmp_path, **changes))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_dequantization_is_transformers_per_expert(dtype: torch.dtype) -> None:
    """Every code and a wide range of exponents: one expert's [out, in] weight equals the transpose
    of transformers' dequantized [E, in, out] stack at that expert."""
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 24, 4, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(100, 140, (3, 24, 4), dtype=torch.uint8, generator=gen)
    expected = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, 128, 24]
    for expert in range(3):
        got = dequantize(blocks[expert], scales[expert], dtype)
        assert got.dtype is dtype and torch.equal(got, expected[expert].t())


@pytest.fixture(scope="module")
def mxfp4_checkpoint(tmp_path_factory):
    """A 4-layer MXFP4 checkpoint and transformers' fp32 model of it (its experts dequantized)."""
    path = make_mxfp4_checkpoint(tmp_path_factory.mktemp("gpt-oss-mxfp4"), num_hidden_layers=4)
    return path, _dequantized_oracle(path, torch.float32)


def _dequantized_oracle(path, dtype: torch.dtype):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, quantization_config=transformers.Mxfp4Config(dequantize=True)).eval()


def test_mxfp4_checkpoint_matches_the_dequantized_transformers_model(mxfp4_checkpoint) -> None:
    path, oracle = mxfp4_checkpoint
    with safe_open(str(path / "model.safetensors"), framework="pt") as stored:
        names = set(stored.keys())
        assert stored.get_tensor("model.layers.0.mlp.experts.gate_up_proj_blocks").dtype is torch.uint8
    assert not any(name.endswith(("experts.gate_up_proj", "experts.down_proj")) for name in names)
    engine = build_engine(EngineConfig(model=str(path), dtype="float32"), show_progress=False)
    prompts = parity_prompts(engine.vocab_size)
    with torch.inference_mode():
        for prompt, got in zip(prompts, engine_logits(engine, prompts), strict=True):
            assert (got - oracle(torch.tensor([prompt])).logits[0]).abs().max().item() <= 1e-4


def test_mxfp4_bf16_is_as_close_to_the_fp32_logits_as_transformers_bf16(mxfp4_checkpoint) -> None:
    path, truth = mxfp4_checkpoint
    theirs = _dequantized_oracle(path, torch.bfloat16)
    engine = build_engine(EngineConfig(model=str(path), dtype="bfloat16"), show_progress=False)
    prompts = parity_prompts(engine.vocab_size)
    with torch.inference_mode():
        for prompt, ours in zip(prompts, engine_logits(engine, prompts), strict=True):
            expected = truth(torch.tensor([prompt])).logits[0]
            their_error = (theirs(torch.tensor([prompt])).logits[0].float() - expected).abs().max().item()
            our_error = (ours - expected).abs().max().item()
            assert our_error <= 2 * their_error + 1e-3, (our_error, their_error)


def test_mxfp4_experts_stay_4_bit_until_read(mxfp4_checkpoint) -> None:
    """Loading keeps each expert's blocks and scales (not the model expanded to fp32); reading one
    gives transformers' dequantized weights, gate rows first."""
    path, oracle = mxfp4_checkpoint
    experts = load_model(path, dtype="float32", show_progress=False).weights.experts
    assert len(experts) == 4 * 8 and all(isinstance(e, MXFP4Expert) for e in experts.values())
    expanded = sum(t.numel() * t.element_size() for t in experts[ExpertKey(0, 0)])
    assert experts[ExpertKey(0, 0)].stored_nbytes < expanded / 4
    hf_experts = oracle.model.layers[3].mlp.experts
    gate_up, down, gate_up_bias, down_bias = experts[ExpertKey(3, 5)]
    interleaved = hf_experts.gate_up_proj[5].t()  # [2F, D], gate and up alternating
    assert torch.equal(gate_up, torch.cat([interleaved[0::2], interleaved[1::2]]))
    assert torch.equal(down, hf_experts.down_proj[5].t())
    hf_bias = hf_experts.gate_up_proj_bias[5]
    assert torch.equal(gate_up_bias, torch.cat([hf_bias[0::2], hf_bias[1::2]]))
    assert torch.equal(down_bias, hf_experts.down_proj_bias[5])


def _assert_transformers_greedy(tokens: dict[str, list[int]], oracle) -> None:
    """Each request of `workload()` got transformers' greedy continuation of its prompt."""
    requests = [request for arrivals in workload().values() for request in arrivals]
    for request in requests:
        got = tokens[request.request_id]
        assert len(got) == request.sampling.max_tokens
        assert got == hf_next_tokens(oracle, request.prompt_token_ids, got)


@pytest.mark.parametrize("offload", [dict(offload="off"), dict(expert_cache_fraction=MIN_FRACTION)])
def test_mxfp4_greedy_tokens_are_transformers_resident_and_offloaded(mxfp4_checkpoint, offload: dict) -> None:
    path, oracle = mxfp4_checkpoint
    tokens, engine = run_workload(path, **offload)
    assert isinstance(engine.runner.model.experts, OffloadedExperts) == ("expert_cache_fraction" in offload)
    _assert_transformers_greedy(tokens, oracle)


@pytest.mark.parametrize("offload", [dict(offload="off"), dict(expert_cache_fraction=0.5),
                                     dict(expert_cache_fraction=MIN_FRACTION, prefetch="next_layer")])
def test_greedy_tokens_are_transformers_past_the_sliding_window(checkpoint_factory, offload: dict) -> None:
    """All-resident and offloaded: prompts of 20 and 31 tokens (prefilled in chunks of 16) and decodes
    far past the 4-token window."""
    path = checkpoint_factory("gpt_oss", num_hidden_layers=4)
    tokens, _ = run_workload(path, **offload)
    _assert_transformers_greedy(tokens, transformers.AutoModelForCausalLM.from_pretrained(path).eval())

