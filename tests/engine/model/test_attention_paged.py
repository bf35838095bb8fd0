"""Paged attention on the torch path against a float64 per-sequence reference: grouped-query heads folded
into the query axis, whole blocks gathered through shuffled block tables, mixed prefill and decode,
sliding windows, sinks and latent attention."""

from __future__ import annotations

import pytest
import torch

from moe_serve.engine.model.attention import (
    AttentionMetadata,
    gather_context,
    paged_attention,
    paged_latent_attention,
)

BLOCK, HEADS, KV_HEADS, DIM = 4, 8, 2, 16


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: range, scale: float,
              window: int | None, sinks: torch.Tensor | None) -> torch.Tensor:
    """One sequence: q [Q, H, D] at `positions` over keys, values [K, Hkv, D] at 0..K-1 -> [Q, H * D]."""
    group = q.shape[1] // keys.shape[1]
    k, v = keys.double().repeat_interleave(group, 1), values.double().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    key_pos = torch.arange(keys.shape[0])
    query_pos = torch.tensor(list(positions))
    allowed = key_pos[None, :] <= query_pos[:, None]
    if window is not None:
        allowed &= key_pos[None, :] > query_pos[:, None] - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.double()[:, None, None].expand(-1, len(query_pos), 1)], dim=-1)
    probs = scores.softmax(-1)[..., : keys.shape[0]]
    return torch.einsum("hqk,khd->qhd", probs, v).reshape(len(query_pos), -1)


def layout(context_lens: list[int], seed: int) -> tuple[list[list[int]], int]:
    """Shuffled block tables covering each context, and the cache's slot count (a whole number of blocks)."""
    needed = [-(-n // BLOCK) for n in context_lens]
    order = torch.randperm(sum(needed) + 3, generator=torch.Generator().manual_seed(seed)).tolist()
    tables, start = [], 0
    for n in needed:
        tables.append(order[start:start + n])
        start += n
    return tables, (sum(needed) + 3) * BLOCK


@pytest.mark.parametrize("window,with_sinks", [(None, False), (5, False), (None, True), (6, True)])
def test_paged_attention_matches_the_reference(window: int | None, with_sinks: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    context_lens, query_lens = [9, 1, 17, 6], [1, 1, 5, 6]  # decode, a first token, a chunk, a whole prompt
    tables, slots = layout(context_lens, seed=1)
    k_cache, v_cache = torch.randn(slots, KV_HEADS, DIM, generator=generator), torch.randn(slots, KV_HEADS, DIM,
                                                                                           generator=generator)
    sinks = torch.randn(HEADS, generator=generator) if with_sinks else None
    meta = AttentionMetadata.build(tables, context_lens, query_lens, BLOCK, torch.device("cpu"))
    total = sum(query_lens)
    q = torch.randn(total, HEADS, DIM, generator=generator)
    k, v = torch.randn(total, KV_HEADS, DIM, generator=generator), torch.randn(total, KV_HEADS, DIM, generator=generator)
    out = paged_attention(q, k, v, k_cache, v_cache, meta, 0.3, window, sinks)
    row = 0
    for table, ctx, n in zip(tables, context_lens, query_lens):
        slot_of = [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(ctx)]
        expected = reference(q[row:row + n], k_cache[slot_of], v_cache[slot_of], range(ctx - n, ctx), 0.3, window,
                             sinks)
        torch.testing.assert_close(out[row:row + n].double(), expected, rtol=1e-5, atol=1e-5)
        row += n


def test_a_mixed_step_attends_its_decodes_and_its_chunks_apart() -> None:
    """Decodes interleaved with prefill chunks: two parts (the decodes' rows, then the chunks'), each
    padded only to its own longest query, and every row still equal to the per-sequence reference."""
    generator = torch.Generator().manual_seed(5)
    context_lens, query_lens = [9, 4, 12, 7], [5, 1, 6, 1]
    tables, slots = layout(context_lens, seed=6)
    k_cache, v_cache = (torch.randn(slots, KV_HEADS, DIM, generator=generator) for _ in range(2))
    meta = AttentionMetadata.build(tables, context_lens, query_lens, BLOCK, torch.device("cpu"))
    (decode_rows, decodes), (chunk_rows, chunks) = meta.parts
    assert decode_rows.tolist() == [5, 12] and decodes.max_query_len == 1 and decodes.num_seqs == 2
    assert chunk_rows.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11] and chunks.max_query_len == 6
    uniform = AttentionMetadata.build(tables, context_lens, [1, 1, 1, 1], BLOCK, torch.device("cpu"))
    assert uniform.parts == ()
    q = torch.randn(sum(query_lens), HEADS, DIM, generator=generator)
    k, v = (torch.randn(sum(query_lens), KV_HEADS, DIM, generator=generator) for _ in range(2))
    out = paged_attention(q, k, v, k_cache, v_cache, meta, 0.3)
    row = 0
    for table, ctx, n in zip(tables, context_lens, query_lens):
        slot_of = [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(ctx)]
        expected = reference(q[row:row + n], k_cache[slot_of], v_cache[slot_of], range(ctx - n, ctx), 0.3, None, None)
        torch.testing.assert_close(out[row:row + n].double(), expected, rtol=1e-5, atol=1e-5)
        row += n


def test_blocks_are_gathered_whole_and_equal_the_slot_gather() -> None:
    context_lens = [3, 13, 8]
    tables, slots = layout(context_lens, seed=2)
    tables[1][0] = -1  # a block freed after it slid out of every window: never gathered
    cache = torch.randn(slots, KV_HEADS, DIM)
    meta = AttentionMetadata.build(tables, context_lens, [1, 1, 1], BLOCK, torch.device("cpu"))
    assert meta.gather_blocks.shape == (3, -(-meta.gather_slots.shape[1] // BLOCK))
    gathered = gather_context(cache, meta)
    valid = meta.key_pos < torch.tensor(context_lens)[:, None]
    torch.testing.assert_close(gathered[valid], cache[meta.gather_slots][valid], rtol=0, atol=0)
    odd = torch.randn(slots + 1, KV_HEADS, DIM)  # not a whole number of blocks: the slot gather
    torch.testing.assert_close(gather_context(odd, meta), odd[meta.gather_slots], rtol=0, atol=0)


def test_latent_attention_reads_the_block_gathered_cache() -> None:
    generator = torch.Generator().manual_seed(3)
    rank, rope_dim, heads = 12, 4, 3
    context_lens, query_lens = [7, 10], [1, 3]
    tables, slots = layout(context_lens, seed=4)
    cache = torch.randn(slots, 1, rank + rope_dim, generator=generator)
    meta = AttentionMetadata.build(tables, context_lens, query_lens, BLOCK, torch.device("cpu"))
    q = torch.randn(4, heads, rank + rope_dim, generator=generator)
    entry = torch.randn(4, 1, rank + rope_dim, generator=generator)
    out = paged_latent_attention(q, entry, cache, meta, 0.2, rank)
    row = 0
    for table, ctx, n in zip(tables, context_lens, query_lens):
        slot_of = [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(ctx)]
        keys = cache[slot_of]
        expected = reference(q[row:row + n], keys, keys[..., :rank], range(ctx - n, ctx), 0.2, None, None)
        got = out[row:row + n].view(n, heads, rank)
        torch.testing.assert_close(got.double(), expected.view(n, heads, -1), rtol=1e-5, atol=1e-5)
        row += n


def test_metadata_carries_the_longest_context_from_the_host() -> None:
    """`max_context_len` bounds every position of the step (the rope tables are sized from it, not
    from a device read-back)."""
    context_lens, query_lens = [5, 9, 2], [1, 3, 2]
    tables, _ = layout(context_lens, seed=3)
    meta = AttentionMetadata.build(tables, context_lens, query_lens, BLOCK, torch.device("cpu"))
    positions = [p for n, q in zip(context_lens, query_lens, strict=True) for p in range(n - q, n)]
    assert meta.max_context_len == 9 == max(positions) + 1
