"""DeepSeek's multi-head latent attention (MLA) with the absorbed-weight path.

Each token's keys and values are one compressed latent c (kv_lora_rank C, RMS-normed) plus one
rope key shared by every head; the paged cache stores exactly that ([C + Dr] per token and
layer), never the expanded per-head keys and values. kv_b's key half is absorbed into the
queries (q_nope_h @ W_UK_h: a query in latent space) and its value half is applied to the
attended latents (W_UV_h @ sum p c), so attention itself runs over the latents, with every
head sharing them as one kv head. Shapes: T tokens, H heads, C latent rank, Dn/Dr/Dv nope,
rope and value head dims.
"""

from __future__ import annotations

import torch

from moe_serve.engine.model.attention import AttentionMetadata, paged_latent_attention
from moe_serve.engine.model.cpu_kernels import linear, rms_norm
from moe_serve.engine.model.rope import apply_rope
from moe_serve.engine.model.spec import ModelSpec
from moe_serve.engine.model.weights import LatentAttentionWeights

LATENT_NORM_EPS = 1e-6  # the q_a and kv_a RMSNorms use the default eps whatever rms_norm_eps says


def latent_attention(
    spec: ModelSpec,
    w: LatentAttentionWeights,
    x: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor],
    meta: AttentionMetadata,
    cache: torch.Tensor,
) -> torch.Tensor:
    """x [T, D] -> the layer's attention output [T, D]; writes the tokens' latents into `cache` [S, 1, C + Dr]."""
    mla = spec.mla
    assert mla is not None
    num_tokens, num_heads = x.shape[0], spec.num_heads
    nope, rope_dim, rank = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.kv_lora_rank
    q_in = x if w.q_a is None else rms_norm(linear(x, w.q_a), w.q_a_norm, LATENT_NORM_EPS)
    q = linear(q_in, w.q).view(num_tokens, num_heads, nope + rope_dim)
    q_nope, q_rope = q.split([nope, rope_dim], dim=-1)
    latent, k_rope = linear(x, w.kv_a).split([rank, rope_dim], dim=-1)
    latent = rms_norm(latent.contiguous(), w.kv_a_norm, LATENT_NORM_EPS)  # [T, C]
    q_rope = apply_rope(q_rope.contiguous(), *rotary)  # [T, H, Dr]
    k_rope = apply_rope(k_rope.reshape(num_tokens, 1, rope_dim).contiguous(), *rotary)  # [T, 1, Dr]
    q_latent = torch.bmm(q_nope.transpose(0, 1), w.k_up).transpose(0, 1)  # [T, H, C]
    attended = paged_latent_attention(
        torch.cat([q_latent, q_rope], dim=-1), torch.cat([latent[:, None, :], k_rope], dim=-1), cache, meta,
        spec.attention_scale, rank,
    ).view(num_tokens, num_heads, rank)
    values = torch.bmm(attended.transpose(0, 1), w.v_up.transpose(1, 2)).transpose(0, 1)  # [T, H, Dv]
    return linear(values.reshape(num_tokens, num_heads * mla.v_head_dim), w.o)
