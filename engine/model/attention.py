"""Paged causal attention over a varlen batch of sequences.

A step's tokens are flattened ([T, ...]); each sequence contributes `query_len` new tokens
at the end of its `context_len` tokens. New keys/values are written into the paged cache
at `slot_mapping`, then each sequence's context is gathered block by block (one `index_select` of
whole cache blocks through the block table, from its first live block: the leading blocks the block
manager freed after they slid out of every window are skipped) into a padded [B, Kmax] view, and one
SDPA call serves prefill, chunked prefill and decode alike. Grouped-query heads are folded into the
query axis ([B, Hkv, G * Q, Dh] against the kv heads) instead of `enable_gqa`, which SDPA serves
only with its math backend when a mask is given. On a CPU, decode-only steps go to the C kernel
instead, which reads the cache in place. A step that mixes decodes with prefill chunks is attended
in two parts (`AttentionMetadata.parts`), the decodes and the chunks, each with its own metadata:
padded together, every decode would carry the longest chunk's query rows (a 256-token chunk beside
8 decodes: 9x the attention work).
A sliding-window layer masks the keys older than its window (`AttentionMetadata.mask_for`); with
attention sinks (gpt-oss) a learned logit per head joins each query's softmax and takes its share of
the probability without contributing a value; both run in torch.
Multi-head latent attention (DeepSeek) caches one entry per token, the compressed latent and the
rope key, and attends with queries absorbed into latent space (`paged_latent_attention`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from moe_serve.engine.model.cpu_kernels import (
    decode_attention,
    kernel_decode_attention,
    kernel_flavour,
    linear,
    rms_norm,
)
from moe_serve.engine.model.rope import apply_rope
from moe_serve.engine.model.spec import ModelSpec, QKNorm
from moe_serve.engine.model.weights import AttentionWeights


@dataclass
class AttentionMetadata:
    """Index tensors for one step. T tokens, B sequences, Q = max query len, K = max context len."""

    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    gather_slots: torch.Tensor  # [B, K] cache slot of each gathered key (padded with 0)
    gather_blocks: torch.Tensor  # [B, ceil(K / block_size)] cache block holding each gathered run of keys
    block_size: int
    key_pos: torch.Tensor  # [B, K] absolute position of each gathered key (its first live position onwards)
    query_index: torch.Tensor  # [T] position of each token in the flattened [B * Q] query layout
    mask: torch.Tensor  # [B, 1, Q, K] True where a query may attend a key
    context_lens: torch.Tensor  # [B] keys gathered per sequence (its live cached context plus the new tokens)
    num_seqs: int
    max_query_len: int
    query_pos: torch.Tensor  # [B, Q] absolute position of each query row
    real_rows: torch.Tensor  # [B, Q] False for padding query rows
    max_context_len: int  # the longest context_len, host-side: every position of the step is below it
    # a step mixing decodes and prefill chunks: (the step's token rows, their metadata) of the decodes,
    # then of the chunks; attended part by part (empty: in one piece)
    parts: tuple[tuple[torch.Tensor, AttentionMetadata], ...] = ()
    _window_masks: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def mask_for(self, window: int | None) -> torch.Tensor:
        """The mask of a layer attending the `window` most recent positions (itself included), or
        `mask` for full attention (None). Padding query rows keep one key so no row is empty."""
        if window is None:
            return self.mask
        if window not in self._window_masks:
            recent = self.key_pos[:, None, :] > self.query_pos[:, :, None] - window  # [B, Q, K]
            windowed = self.mask & recent[:, None]
            windowed[:, 0, :, 0] |= ~self.real_rows
            self._window_masks[window] = windowed
        return self._window_masks[window]

    @classmethod
    def build(
        cls,
        block_tables: Sequence[Sequence[int]],
        context_lens: Sequence[int],
        query_lens: Sequence[int],
        block_size: int,
        device: torch.device,
    ) -> AttentionMetadata:
        """Index tensors for sequences whose last `query_lens[i]` of `context_lens[i]` tokens are new.
        A table's leading FREED entries (negative: slid out of every window) are never gathered. A step
        mixing decodes and prefill chunks also gets its two `parts` (each built here, and neither mixed)."""
        num_seqs = len(context_lens)
        width = max(len(table) for table in block_tables)
        tables = torch.tensor([list(table) + [0] * (width - len(table)) for table in block_tables], dtype=torch.long)
        ctx_t = torch.tensor(context_lens)
        q_t = torch.tensor(query_lens)
        # each sequence's keys start at its first live block
        start = (tables < 0).cumprod(dim=1).sum(dim=1) * block_size  # [B]
        max_q, max_k = max(query_lens), int((ctx_t - start).max())
        key_pos = start[:, None] + torch.arange(max_k)[None, :]  # [B, K]
        valid = key_pos < ctx_t[:, None]
        held = key_pos.clamp(max=width * block_size - 1)
        gather = tables.gather(1, held // block_size) * block_size + held % block_size
        gather.masked_fill_(~valid, 0)
        # query row r of sequence i sits at absolute position ctx - q + r; rows r >= q are padding
        query_pos = (ctx_t - q_t)[:, None] + torch.arange(max_q)[None, :]  # [B, Q]
        real = torch.arange(max_q)[None, :] < q_t[:, None]
        first_block = (tables < 0).cumprod(dim=1).sum(dim=1)  # [B]
        block_cols = (first_block[:, None] + torch.arange(-(-max_k // block_size))[None, :]).clamp(max=width - 1)
        blocks = tables.gather(1, block_cols).clamp(min=0)  # columns past a table's end read block 0 (masked)
        slot_mapping = gather.gather(1, (query_pos - start[:, None]).clamp(max=max_k - 1))[real]
        query_index = torch.arange(num_seqs * max_q).view(num_seqs, max_q)[real]
        mask = (key_pos[:, None, :] <= query_pos[:, :, None]) & valid[:, None, :]
        mask[:, :, 0] = True  # padding query rows attend one key instead of none (their output is dropped)
        meta = cls(
            slot_mapping=_upload(slot_mapping, device),
            gather_slots=_upload(gather, device),
            gather_blocks=_upload(blocks, device),
            block_size=block_size,
            key_pos=_upload(key_pos, device),
            query_index=_upload(query_index, device),
            mask=_upload(mask[:, None], device),
            context_lens=_upload(ctx_t - start, device),
            num_seqs=num_seqs,
            max_query_len=max_q,
            query_pos=_upload(query_pos, device),
            real_rows=_upload(real, device),
            max_context_len=max(context_lens),
        )
        decodes = [i for i, n in enumerate(query_lens) if n == 1]
        if 0 < len(decodes) < num_seqs:
            chunks = [i for i, n in enumerate(query_lens) if n > 1]
            first_row = [0]
            for n in query_lens:
                first_row.append(first_row[-1] + n)
            meta.parts = tuple(
                (_upload(torch.tensor([r for i in part for r in range(first_row[i], first_row[i + 1])]), device),
                 cls.build([block_tables[i] for i in part], [context_lens[i] for i in part],
                           [query_lens[i] for i in part], block_size, device))
                for part in (decodes, chunks))
        return meta


def _upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-built index tensor on `device`: on CUDA copied from pinned memory without blocking the host
    (the caching host allocator keeps the pinned block until the copy is done), elsewhere as is."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def self_attention(spec: ModelSpec, w: AttentionWeights, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                   meta: AttentionMetadata, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   window: int | None) -> torch.Tensor:
    """A grouped-query attention layer: x [T, D] -> [T, D], writing the tokens' keys and values into the
    caches [S, Hkv, Dh]. Queries and keys stay one [T, H + Hkv, Dh] tensor through the per-head q/k
    norm and the rope (one call each instead of two)."""
    num_tokens, heads, kv_heads, head_dim = x.shape[0], spec.num_heads, spec.num_kv_heads, spec.head_dim
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = linear(x, w.qkv, w.qkv_bias)
    if spec.qk_norm is QKNorm.FULL:
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        qk = torch.cat([rms_norm(q, w.q_norm, spec.rms_norm_eps), rms_norm(k, w.k_norm, spec.rms_norm_eps)], dim=-1)
        qkv = torch.cat([qk, v], dim=-1)
    if spec.clip_qkv is not None:
        qkv = qkv.clamp(-spec.clip_qkv, spec.clip_qkv)
    qk = qkv[:, :q_size + kv_size].view(num_tokens, heads + kv_heads, head_dim)
    if spec.qk_norm is QKNorm.PER_HEAD:
        # one norm over both (computed in fp32, rounded, then weighted, as the reference models do per head)
        norms = torch.cat([w.q_norm.expand(heads, head_dim), w.k_norm.expand(kv_heads, head_dim)])  # [H + Hkv, Dh]
        qk = norms * F.rms_norm(qk.float(), (head_dim,), eps=spec.rms_norm_eps).to(qk.dtype)
    qk = apply_rope(qk, *rotary)
    v = qkv[:, q_size + kv_size:].view(num_tokens, kv_heads, head_dim)
    out = paged_attention(qk[:, :heads], qk[:, heads:], v, k_cache, v_cache, meta, spec.attention_scale, window,
                          w.sinks)
    return linear(out, w.o, w.o_bias)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [T, H, Dh]; k, v: [T, Hkv, Dh]; caches: [S, Hkv, Dh]. Returns [T, H * Dh]. With `window`
    each query attends its `window` most recent positions only; `sinks` [H] are per-head logits
    that join each query's softmax with a zero value."""
    if meta.parts:
        return _by_parts(meta, (q, k, v), lambda part, *rows: paged_attention(
            *rows, k_cache, v_cache, part, scale, window, sinks))
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    if window is None and sinks is None and meta.max_query_len == 1 and q.is_cpu and kernel_flavour() != "torch":
        q_rows = q.contiguous()  # decode (one query per sequence) in the C kernel, which reads q's rows whole
        if kernel_decode_attention(q_rows, k_cache):
            return decode_attention(q_rows, k_cache, v_cache, meta.gather_slots, meta.context_lens, scale)
    keys = gather_context(k_cache, meta).transpose(1, 2)  # [B, Hkv, K, Dh]
    values = gather_context(v_cache, meta).transpose(1, 2)
    mask = meta.mask_for(window)
    if sinks is not None:
        keys, values, mask = _with_sinks(keys, values, mask, sinks)
    return _attend(q, keys, values, meta, scale, mask)


def _by_parts(meta: AttentionMetadata, inputs: tuple[torch.Tensor, ...],
              attend: Callable[..., torch.Tensor]) -> torch.Tensor:
    """`attend(part, *rows)` on each part of a mixed step (`meta.parts`), the step's per-token `inputs`
    taken at the part's rows, and the parts' outputs put back at those rows."""
    out: torch.Tensor | None = None
    for rows, part in meta.parts:
        piece = attend(part, *(tensor[rows] for tensor in inputs))
        if out is None:
            out = piece.new_empty(inputs[0].shape[0], piece.shape[1])
        out[rows] = piece
    assert out is not None
    return out


def gather_context(cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """Each sequence's live context from a paged cache [S, heads, Dh] as [B, K, heads, Dh]: whole
    blocks copied through the block table (`index_select`), not one slot at a time."""
    slots, heads, head_dim = cache.shape
    if slots % meta.block_size:  # not a whole number of blocks: slot by slot
        return cache[meta.gather_slots]
    blocks = cache.view(-1, meta.block_size, heads, head_dim).index_select(0, meta.gather_blocks.flatten())
    return blocks.view(meta.num_seqs, -1, heads, head_dim)[:, :meta.gather_slots.shape[1]]


def _with_sinks(keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One more key and value, both zero, whose logit is each head's sink: an additive mask
    [B, H, Q, K + 1] (0 or -inf over the context, the sink in the last column)."""
    batch, _, queries, _ = mask.shape
    zero = keys.new_zeros(*keys.shape[:2], 1, keys.shape[-1])
    keys = torch.cat([keys, zero], dim=2)
    values = torch.cat([values, values.new_zeros(*values.shape[:2], 1, values.shape[-1])], dim=2)
    context = torch.zeros(mask.shape, dtype=keys.dtype, device=keys.device).masked_fill_(~mask, float("-inf"))
    sink_column = sinks.to(keys.dtype)[None, :, None, None].expand(batch, -1, queries, 1)
    return keys, values, torch.cat([context.expand(batch, sinks.shape[0], queries, -1), sink_column], dim=-1)


def paged_latent_attention(
    q: torch.Tensor,
    entry: torch.Tensor,
    cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    value_dim: int,
) -> torch.Tensor:
    """Multi-head latent attention over a paged cache of one entry per token: the latent (its first
    `value_dim` = C dims, which are also the values) and the rope key. q: [T, H, C + Dr] (queries
    absorbed into latent space, then their rope part); entry: [T, 1, C + Dr]; cache: [S, 1, C + Dr].
    Returns the attended latents [T, H * C]."""
    if meta.parts:
        return _by_parts(meta, (q, entry), lambda part, *rows: paged_latent_attention(
            *rows, cache, part, scale, value_dim))
    cache.index_copy_(0, meta.slot_mapping, entry)
    keys = gather_context(cache, meta).transpose(1, 2)  # [B, 1, K, C + Dr]
    _, num_heads, head_dim = q.shape
    # The heads share the one latent key head: fold them into the query axis (one head of H * Q
    # queries) instead of letting SDPA broadcast the keys to every head (14x slower on the CPU).
    queries = q.new_zeros(meta.num_seqs * meta.max_query_len, num_heads, head_dim)
    queries[meta.query_index] = q
    queries = queries.view(meta.num_seqs, 1, meta.max_query_len, num_heads, head_dim).transpose(2, 3)
    queries = queries.reshape(meta.num_seqs, 1, num_heads * meta.max_query_len, head_dim)  # [B, 1, H * Q, C + Dr]
    mask = meta.mask.unsqueeze(2).expand(-1, -1, num_heads, -1, -1).reshape(
        meta.num_seqs, 1, num_heads * meta.max_query_len, meta.mask.shape[-1])  # [B, 1, H * Q, K]
    out = F.scaled_dot_product_attention(queries, keys, keys[..., :value_dim], attn_mask=mask, scale=scale)
    out = out.view(meta.num_seqs, num_heads, meta.max_query_len, value_dim).transpose(1, 2)  # [B, Q, H, C]
    return out.reshape(meta.num_seqs * meta.max_query_len, num_heads * value_dim)[meta.query_index]


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, meta: AttentionMetadata,
            scale: float, mask: torch.Tensor) -> torch.Tensor:
    """One SDPA call over the gathered context: q [T, H, Dk], keys [B, Hkv, K, Dk], values
    [B, Hkv, K, Dv], mask boolean [B, 1, Q, K] or additive [B, H, Q, K]. Returns [T, H * Dv].
    The G = H / Hkv query heads sharing a kv head are folded into its query axis (head h = kv * G + g)."""
    _, num_heads, head_dim = q.shape
    batch, queries, kv_heads = meta.num_seqs, meta.max_query_len, keys.shape[1]
    group = num_heads // kv_heads
    unpadded = q.shape[0] == batch * queries  # every sequence has Q new tokens (decode): rows already in place
    if unpadded:
        padded = q
    else:
        padded = q.new_zeros(batch * queries, num_heads, head_dim)
        padded[meta.query_index] = q
    folded = padded.view(batch, queries, kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    folded = folded.reshape(batch, kv_heads, group * queries, head_dim)  # [B, Hkv, G * Q, Dk]
    if mask.shape[1] == 1:  # one mask for every head: the same for each of the G folded groups
        mask = mask.expand(batch, group, queries, mask.shape[-1]).reshape(batch, 1, group * queries, -1)
    else:  # per head [B, H, Q, K]: head kv * G + g is row block g of kv head kv
        mask = mask.reshape(batch, kv_heads, group * queries, mask.shape[-1])
    out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask, scale=scale)  # [B, Hkv, G * Q, Dv]
    out = out.view(batch, kv_heads, group, queries, -1).permute(0, 3, 1, 2, 4)  # [B, Q, Hkv, G, Dv]
    out = out.reshape(batch * queries, num_heads * values.shape[-1])
    return out if unpadded else out[meta.query_index]
