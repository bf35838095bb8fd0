"""Sliding-window KV blocks: when every layer slides, the blocks that slid out of the largest window
are freed after each step, never gathered again, and the greedy tokens stay transformers'."""

from __future__ import annotations

import torch

from moe_serve.engine.builder import build_engine
from moe_serve.engine.config import EngineConfig
from moe_serve.engine.core.block_manager import FREED, BlockManager, blocks_needed, kv_free_window
from moe_serve.engine.core.kv_cache import kv_bytes_per_block
from moe_serve.engine.core.request import EngineRequest
from moe_serve.engine.core.sampling_params import SamplingParams
from moe_serve.engine.model.attention import AttentionMetadata, paged_attention
from tests.helpers import hf_model, hf_next_tokens

WINDOW, BLOCK_SIZE, MAX_MODEL_LEN = 8, 4, 96
PROMPT_LENGTHS = (3, 11, 30, 17)
MAX_TOKENS = 60
# after a step at `c` computed tokens a sequence holds positions from the block of c - W + 1 to c - 1
MAX_LIVE = blocks_needed(WINDOW - 1, BLOCK_SIZE) + 1


def test_kv_free_window_only_when_every_layer_slides() -> None:
    assert kv_free_window((8, 8), 2) == 8
    assert kv_free_window((4, 16, 8), 3) == 16  # the largest window decides
    assert kv_free_window((128, None, 128, None), 4) is None  # gpt-oss: full layers attend everything
    assert kv_free_window((8,), 2) is None  # a layer without an entry is full attention
    assert kv_free_window((), 2) is None


def test_free_slid_out_keeps_positions_and_returns_blocks() -> None:
    blocks = BlockManager(8, 4)
    blocks.grow("a", 14)  # positions 0..13 in 4 blocks
    held = list(blocks.table("a"))
    assert blocks.free_slid_out("a", 10, 8) == 0  # a query at 10 still attends 3..10
    assert blocks.free_slid_out("a", 12, 8) == 1  # a query at 12 attends 5..12: block 0 (0..3) is out
    assert blocks.table("a") == [FREED, *held[1:]]
    assert blocks.num_live("a") == 3 and blocks.num_free == 5
    assert blocks.free_slid_out("a", 12, 8) == 0  # idempotent
    assert blocks.extra_blocks("a", 17) == 1  # positions stay stable: 17 tokens still need a fifth entry
    blocks.free("a")
    assert blocks.num_free == 8  # the freed block is not returned twice


def test_metadata_never_gathers_a_freed_block() -> None:
    """Blocks 0 and 1 were freed by this sequence and reused by another (written with huge values):
    the gathered keys start at the first live block and attention equals the unfreed layout's."""
    torch.manual_seed(0)
    heads, kv_heads, dim, bs, ctx = 4, 2, 8, 4, 14
    k_cache, v_cache = torch.randn(8 * bs, kv_heads, dim), torch.randn(8 * bs, kv_heads, dim)
    q, k, v = torch.randn(1, heads, dim), torch.randn(1, kv_heads, dim), torch.randn(1, kv_heads, dim)
    reference = paged_attention(q, k, v, k_cache.clone(), v_cache.clone(),
                                AttentionMetadata.build([[4, 5, 2, 3]], [ctx], [1], bs, torch.device("cpu")),
                                scale=0.3, window=6)
    k_cache[: 2 * bs], v_cache[: 2 * bs] = 1e4, 1e4  # the freed blocks, now another sequence's
    meta = AttentionMetadata.build([[FREED, FREED, 2, 3]], [ctx], [1], bs, torch.device("cpu"))
    assert meta.key_pos.tolist() == [list(range(8, ctx))]
    assert meta.gather_slots.tolist() == [[2 * bs + i for i in range(bs)] + [3 * bs + i for i in range(ctx - 12)]]
    assert meta.slot_mapping.tolist() == [3 * bs + 1] and meta.context_lens.tolist() == [ctx - 8]
    got = paged_attention(q, k, v, k_cache, v_cache, meta, scale=0.3, window=6)
    torch.testing.assert_close(got, reference)


def _requests(vocab_size: int) -> list[EngineRequest]:
    gen = torch.Generator().manual_seed(3)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return [EngineRequest(f"r{i}", torch.randint(0, vocab_size, (n,), generator=gen).tolist(), params)
            for i, n in enumerate(PROMPT_LENGTHS)]


def _generate(engine, requests: list[EngineRequest], live_bound: int | None = None) -> dict[str, list[int]]:
    """Greedy tokens per request, all added at once; with `live_bound`, asserts after every step that
    no running sequence holds more blocks than that."""
    tokens: dict[str, list[int]] = {}
    for request in requests:
        engine.add_request(request)
        tokens[request.request_id] = []
    while engine.has_unfinished:
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
        if live_bound is not None:
            for seq in engine.scheduler.running:
                assert engine.blocks.num_live(seq.seq_id) <= live_bound, (seq.seq_id, seq.num_computed_tokens)
    return tokens


def test_mixtral_sliding_window_frees_blocks_and_matches_transformers(checkpoint_factory) -> None:
    """Four sequences generate past many windows in a KV cache of one max_model_len sequence (24
    blocks), with chunked prefill: freeing, they never hold more than a window's blocks and nobody is
    preempted (so freed blocks are reused by other sequences); the tokens equal transformers' and
    those of the same engine that frees nothing (and is preempted for it)."""
    path = checkpoint_factory("mixtral", sliding_window=WINDOW)
    config = dict(model=str(path), dtype="float32", max_model_len=MAX_MODEL_LEN,
                  max_num_batched_tokens=16)
    freeing = build_engine(EngineConfig(**config), show_progress=False, block_size=BLOCK_SIZE)
    block_bytes = kv_bytes_per_block(freeing.runner.model.spec, BLOCK_SIZE, torch.float32)
    small = EngineConfig(**config, kv_cache_gb=MAX_MODEL_LEN // BLOCK_SIZE * block_bytes / 2**30)
    freeing, keeping = (build_engine(small, show_progress=False, block_size=BLOCK_SIZE) for _ in range(2))
    keeping.kv_window = None
    assert freeing.kv_window == WINDOW and freeing.blocks.num_blocks == MAX_MODEL_LEN // BLOCK_SIZE
    requests = _requests(freeing.vocab_size)

    got = _generate(freeing, requests, live_bound=MAX_LIVE)
    assert freeing.scheduler.num_preemptions == 0
    assert freeing.blocks.num_free == freeing.blocks.num_blocks
    assert got == _generate(keeping, _requests(keeping.vocab_size))
    assert keeping.scheduler.num_preemptions > 0  # without freeing the same cache does not hold them all
    oracle = hf_model(path)
    for request in requests:
        assert len(got[request.request_id]) == MAX_TOKENS
        assert got[request.request_id] == hf_next_tokens(oracle, request.prompt_token_ids, got[request.request_id])


def test_a_full_attention_layer_frees_nothing(checkpoint_factory) -> None:
    """gpt-oss alternates sliding and full layers: every block stays until the sequence ends."""
    path = checkpoint_factory("gpt_oss")
    engine = build_engine(EngineConfig(model=str(path), dtype="float32"), show_progress=False,
                          block_size=BLOCK_SIZE)
    assert engine.kv_window is None
    for request in _requests(engine.vocab_size)[:2]:
        engine.add_request(request)
    while engine.has_unfinished:
        engine.step()
        for seq in engine.scheduler.running:
            table = engine.blocks.table(seq.seq_id)
            assert FREED not in table and len(table) == blocks_needed(seq.num_computed_tokens, BLOCK_SIZE)
