"""Rope scalings (default, linear, dynamic NTK, YaRN, llama3, partial rotary) against transformers'
rope init functions and rotary embedding classes, on real config classes."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeRotaryEmbedding
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRotaryEmbedding

from moe_serve.engine.errors import ModelLoadError
from moe_serve.engine.model.rope import RotaryEmbedding, attention_factor, inverse_frequencies
from moe_serve.engine.model.spec import rope_of

SMALL = dict(hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=512)
SCALED = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    "yarn-untruncated-betas": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64,
                               "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False},
    "yarn-attention_factor": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                              "attention_factor": 0.75},
    "yarn-no-factor": {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 128},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
}


@pytest.mark.parametrize("name", sorted(SCALED))
def test_scaled_inverse_frequencies_and_attention_factor_match_transformers(name: str) -> None:
    config = transformers.Qwen3MoeConfig(**SMALL, rope_parameters={"rope_theta": 50000.0, **SCALED[name]})
    expected_freq, expected_factor = ROPE_INIT_FUNCTIONS[config.rope_parameters["rope_type"]](config)
    rope = rope_of(config, 16)
    assert torch.allclose(inverse_frequencies(rope), expected_freq, rtol=1e-6, atol=0)
    assert attention_factor(rope) == pytest.approx(expected_factor, rel=1e-12)


def test_deepseek_yarn_with_mscale_matches_transformers() -> None:
    """DeepSeek-V3's published rope: YaRN factor 40 from 4096 positions, mscale = mscale_all_dim."""
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    config = transformers.DeepseekV3Config(hidden_size=64, num_attention_heads=4, qk_rope_head_dim=16,
                                           max_position_embeddings=163840, rope_parameters=yarn)
    expected_freq, expected_factor = ROPE_INIT_FUNCTIONS["yarn"](config)
    rope = rope_of(config, 16)
    assert torch.allclose(inverse_frequencies(rope), expected_freq, rtol=1e-6, atol=0)
    assert attention_factor(rope) == pytest.approx(expected_factor, rel=1e-12)


@pytest.mark.parametrize("rope_parameters", [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128},
], ids=["default", "yarn"])
def test_cos_sin_tables_match_the_rotary_embedding_classes(rope_parameters) -> None:
    """The tables (attention factor included) at any position, growing past the first chunk, and
    partial rotary (GLM-4.5: the first half of each head)."""
    positions = torch.tensor([0, 1, 7, 5000, 300, 8191])
    cases = [
        (transformers.Qwen3MoeConfig(**{**SMALL, "max_position_embeddings": 8192}, rope_parameters=rope_parameters),
         Qwen3MoeRotaryEmbedding, 16),
        (transformers.Glm4MoeConfig(**{**SMALL, "max_position_embeddings": 8192},
                                    rope_parameters={**rope_parameters, "partial_rotary_factor": 0.5}),
         Glm4MoeRotaryEmbedding, 16),
    ]
    for config, reference_class, head_dim in cases:
        expected_cos, expected_sin = reference_class(config)(torch.zeros(1), positions[None])
        rope = rope_of(config, head_dim)
        cos, sin = RotaryEmbedding(rope, torch.device("cpu")).tables(positions)
        assert cos.shape == (len(positions), expected_cos.shape[-1]) == (len(positions), rope.rotary_dim)
        assert torch.allclose(cos, expected_cos[0], atol=1e-6) and torch.allclose(sin, expected_sin[0], atol=1e-6)


def test_unsupported_rope_types_are_refused_naming_the_field() -> None:
    config = transformers.Qwen3MoeConfig(**SMALL, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
        "original_max_position_embeddings": 128})
    with pytest.raises(ModelLoadError, match=r"^unsupported rope_type 'longrope' \(rope_parameters\): supported are"):
        rope_of(config, 16)


def test_tables_sized_from_the_host_bound_equal_those_sized_from_the_positions() -> None:
    """The step's host-known bound (its longest context) grows the tables as reading the positions does,
    to the same rows: the per-step read-back of positions.max() is not needed."""
    config = transformers.Qwen3MoeConfig(**{**SMALL, "max_position_embeddings": 8192},
                                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    rope = rope_of(config, 16)
    by_positions, by_bound = RotaryEmbedding(rope, torch.device("cpu")), RotaryEmbedding(rope, torch.device("cpu"))
    for positions, bound in ((torch.tensor([0, 1, 2]), 3), (torch.tensor([4095, 7000]), 7001), (torch.tensor([9]), 7001)):
        expected = by_positions.tables(positions)
        got = by_bound.tables(positions, bound)
        assert by_bound.cos.shape == by_positions.cos.shape
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("flavour", ["torch", "c-avx2"])
def test_tables_are_cast_once_per_step_where_rope_runs_in_torch(monkeypatch: pytest.MonkeyPatch, flavour: str) -> None:
    """In the activations' dtype where `rope` runs in torch (each layer's cast becomes a no-op), fp32 for the
    C kernel; the same values either way."""
    from moe_serve.engine.model import rope as rope_module

    monkeypatch.setattr(rope_module, "kernel_flavour", lambda: flavour)
    config = transformers.Qwen3MoeConfig(**SMALL, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    rotary = RotaryEmbedding(rope_of(config, 16), torch.device("cpu"))
    positions = torch.tensor([3, 0, 200])
    cos32, sin32 = rotary.tables(positions, 201)
    cos, sin = rotary.tables(positions, 201, torch.bfloat16)
    assert cos.dtype == sin.dtype == (torch.bfloat16 if flavour == "torch" else torch.float32)
    assert torch.equal(cos, cos32.to(cos.dtype)) and torch.equal(sin, sin32.to(sin.dtype))
