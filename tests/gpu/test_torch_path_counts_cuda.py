"""The torch path on a GPU: torch ops and host syncs per MoE layer and decode step within the issue's
bounds (Qwen3-like: 128 experts, top-8), counted by `benchmarks.torch_ops` on CUDA and by CUDA's own sync
debug mode, and decode attention that never needs SDPA's math backend (grouped-query heads included)."""

from __future__ import annotations

import warnings

import pytest
import torch

from benchmarks.torch_ops import Geometry, build_model, count_step, per_layer
from moe_serve.engine.model.attention import AttentionMetadata, paged_attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("batch,bound", [(1, 30), (16, 40)])
def test_compute_ops_per_moe_layer_within_bound(batch: int, bound: int) -> None:
    result = per_layer(Geometry(), 2, batch, 64, CUDA, torch.float32)  # as counted on the CPU (bf16: docs/gpu_path.md)
    assert result["compute_ops_per_layer"] <= bound, result
    assert result["syncs_per_layer"] <= 1, result


def _cuda_syncs(layers: int) -> int:
    """Synchronizing calls CUDA's sync debug mode reports in `count_step` (two decode steps)."""
    model = build_model(Geometry(), layers, CUDA, torch.bfloat16)
    count_step(model, 4, 64, torch.bfloat16)  # warm-up (allocations, first-call paths)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            count_step(model, 4, 64, torch.bfloat16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def test_cuda_reports_at_most_one_sync_per_moe_layer() -> None:
    """(4 layers - 2 layers) / (2 layers x 2 steps): the per-step syncs (metadata uploads, rotary tables) drop out."""
    assert (_cuda_syncs(4) - _cuda_syncs(2)) / 4 <= 1


@pytest.mark.parametrize("context", [256, 2048])
def test_gqa_decode_attention_runs_without_the_math_backend(context: int) -> None:
    block, batch, heads, kv_heads, dim = 16, 4, 32, 4, 128
    per_seq = -(-(context + 1) // block)
    tables = torch.randperm(batch * per_seq).view(batch, per_seq).tolist()
    k_cache = torch.randn(batch * per_seq * block, kv_heads, dim, device=CUDA, dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    meta = AttentionMetadata.build(tables, [context + 1] * batch, [1] * batch, block, CUDA)
    q = torch.randn(batch, heads, dim, device=CUDA, dtype=torch.bfloat16)
    k, v = torch.randn(batch, kv_heads, dim, device=CUDA, dtype=torch.bfloat16), torch.randn(
        batch, kv_heads, dim, device=CUDA, dtype=torch.bfloat16)
    reference = paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), meta, dim**-0.5).float()
    torch.backends.cuda.enable_math_sdp(False)
    try:
        out = paged_attention(q, k, v, k_cache, v_cache, meta, dim**-0.5)
    finally:
        torch.backends.cuda.enable_math_sdp(True)
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-2)
