"""A decode step's host-side preparation on CUDA without host syncs: the attention metadata's index
tensors uploaded from pinned memory without blocking, the rope tables sized from the host-known
longest context. Checked with CUDA's sync debug mode (a synchronizing call raises); skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
import transformers

from moe_serve.engine.model.attention import AttentionMetadata
from moe_serve.engine.model.rope import RotaryEmbedding
from moe_serve.engine.model.spec import rope_of

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda")
TABLES, CONTEXTS, QUERIES, BLOCK = [[3, 0], [5, 1, 2], [4]], [7, 11, 1], [1, 1, 1], 4


class synchronizing_calls_raise:
    """Within the block, a synchronizing CUDA call raises RuntimeError."""

    def __enter__(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")

    def __exit__(self, *exc: object) -> None:
        torch.cuda.set_sync_debug_mode("default")


def test_metadata_uploads_without_a_host_sync_and_equals_the_cpu_build() -> None:
    AttentionMetadata.build(TABLES, CONTEXTS, QUERIES, BLOCK, CUDA)  # first use: CUDA and pinned allocator set up
    with synchronizing_calls_raise():
        meta = AttentionMetadata.build(TABLES, CONTEXTS, QUERIES, BLOCK, CUDA)
    expected = AttentionMetadata.build(TABLES, CONTEXTS, QUERIES, BLOCK, torch.device("cpu"))
    for name in ("slot_mapping", "gather_slots", "gather_blocks", "key_pos", "query_index", "mask", "context_lens",
                 "query_pos", "real_rows"):
        got = getattr(meta, name)
        assert got.device.type == "cuda" and torch.equal(got.cpu(), getattr(expected, name)), name
    assert meta.max_context_len == expected.max_context_len == 11


def test_rope_tables_sized_from_the_host_bound_need_no_sync_and_reading_positions_does() -> None:
    config = transformers.Qwen3MoeConfig(hidden_size=64, num_attention_heads=4, head_dim=16,
                                         max_position_embeddings=8192)
    rotary = RotaryEmbedding(rope_of(config, 16), CUDA)
    positions = torch.tensor([6, 10, 0], device=CUDA)
    expected = RotaryEmbedding(rope_of(config, 16), torch.device("cpu")).tables(positions.cpu())
    rotary.tables(positions, 11)  # the first growth uploads the tables
    with synchronizing_calls_raise():
        cos, sin = rotary.tables(positions, 11)
        with pytest.raises(RuntimeError):
            rotary.tables(positions)  # positions.max() read back: the sync the bound avoids
    assert torch.allclose(cos.cpu(), expected[0]) and torch.allclose(sin.cpu(), expected[1])
