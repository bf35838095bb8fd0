"""Rotary position embeddings: inverse frequencies per rope scaling, and the cos/sin tables.

`inverse_frequencies` and `attention_factor` follow transformers' rope init functions
(`transformers.modeling_rope_utils`) for the default, linear, dynamic NTK, YaRN and llama3
types; the attention factor (YaRN's) multiplies cos and sin. `RotaryEmbedding` serves the
tables of a step's positions, grown on demand so a 128k-context config costs nothing up front;
`apply_rope` rotates the first R dims of each head (all of them unless the rotary is partial).
"""

from __future__ import annotations

import math

import torch

from moe_serve.engine.model.cpu_kernels import kernel_flavour, rope
from moe_serve.engine.model.spec import RopeScaling, RopeSpec, yarn_mscale

TABLE_CHUNK = 4096  # positions added to the tables at a time


def _default_inverse_frequencies(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def attention_factor(rope: RopeSpec) -> float:
    """The factor cos and sin are multiplied by: YaRN's (given, or derived from factor and mscale), else 1."""
    if rope.scaling is not RopeScaling.YARN:
        return 1.0
    if rope.attention_factor is not None:
        return rope.attention_factor
    if rope.mscale and rope.mscale_all_dim:
        return yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
    return yarn_mscale(rope.factor)


def _yarn_inverse_frequencies(rope: RopeSpec) -> torch.Tensor:
    dim, base = rope.rotary_dim, rope.theta
    original = rope.original_max_position_embeddings or rope.max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no singular ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (rope.factor * pos_freqs)
    keep = 1 - ramp  # 1: extrapolate (high frequencies), 0: interpolate (low ones)
    return interpolation * (1 - keep) + extrapolation * keep


def _llama3_inverse_frequencies(rope: RopeSpec) -> torch.Tensor:
    inv_freq = _default_inverse_frequencies(rope.theta, rope.rotary_dim)
    old_context = rope.original_max_position_embeddings or rope.max_position_embeddings
    low_wavelen, high_wavelen = old_context / rope.low_freq_factor, old_context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_context / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def inverse_frequencies(rope: RopeSpec) -> torch.Tensor:
    """fp32 [rotary_dim / 2]: the angle per position of each rotated pair."""
    if rope.scaling is RopeScaling.LINEAR:
        return _default_inverse_frequencies(rope.theta, rope.rotary_dim) / rope.factor
    if rope.scaling is RopeScaling.YARN:
        return _yarn_inverse_frequencies(rope)
    if rope.scaling is RopeScaling.LLAMA3:
        return _llama3_inverse_frequencies(rope)
    # DEFAULT, and DYNAMIC below max_position_embeddings (where its base is unchanged)
    return _default_inverse_frequencies(rope.theta, rope.rotary_dim)


class RotaryEmbedding:
    """cos/sin tables for rotate-half rotary embeddings. R rotary dims, P positions."""

    def __init__(self, rope: RopeSpec, device: torch.device) -> None:
        self.inv_freq = inverse_frequencies(rope)
        self.factor = attention_factor(rope)
        self.max_positions = rope.max_position_embeddings
        self.device = device
        self.cos = torch.empty(0, rope.rotary_dim, device=device)
        self.sin = torch.empty(0, rope.rotary_dim, device=device)

    def _grow(self, positions: int) -> None:
        """Extend the tables to cover `positions` positions (each row is computed once, so a
        position's row never depends on when it was first needed)."""
        start = self.cos.shape[0]
        end = min(max(positions, start + TABLE_CHUNK), max(self.max_positions, positions))
        freqs = torch.arange(start, end, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)  # [P, R]
        self.cos = torch.cat([self.cos, (emb.cos() * self.factor).to(self.device)])
        self.sin = torch.cat([self.sin, (emb.sin() * self.factor).to(self.device)])

    def tables(self, positions: torch.Tensor, num_positions: int | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, R] at positions [T]: looked up once per step, used by every layer. `num_positions`
        bounds the positions from the host (the step's longest context, `AttentionMetadata.max_context_len`)
        so the tables grow without reading the positions back; None reads their maximum (a host sync on a
        device). `dtype`, the activations': where `rope` runs in torch (a device, or the C kernels off) the
        step's rows are cast to it here, once, instead of in every layer (the same values); the C
        kernel reads fp32 tables."""
        if num_positions is not None:
            needed = num_positions
        else:
            needed = int(positions.max()) + 1 if positions.numel() else 0
        if needed > self.cos.shape[0]:
            self._grow(needed)
        cos, sin = self.cos[positions], self.sin[positions]
        if dtype is not torch.float32 and (self.device.type != "cpu" or kernel_flavour() == "torch"):
            return cos.to(dtype), sin.to(dtype)
        return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding of the first R dims of each head of x [T, heads, Dh] with the
    tables cos, sin [T, R]; the other dims pass through. Returns a new tensor."""
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return rope(x, cos, sin)
    return torch.cat([rope(x[..., :rotary_dim].contiguous(), cos, sin), x[..., rotary_dim:]], dim=-1)
