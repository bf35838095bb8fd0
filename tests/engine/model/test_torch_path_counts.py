"""The torch path's cost per MoE layer and decode step, counted on the CPU with the C kernels off (the code
CUDA runs): host syncs <= 1, and a number of ops that does not grow with the batch (`benchmarks.torch_ops`)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.torch_ops import Geometry, per_layer
from moe_serve.cache_policies.native_build import LoadOnce
from moe_serve.engine.model import cpu_kernels

SMALL = Geometry(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, moe_intermediate_size=16, vocab_size=128)


@pytest.fixture
def torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The C kernels off for this test, whatever this process loaded before."""
    monkeypatch.setattr(cpu_kernels, "_kernels", LoadOnce(lambda: None))


@pytest.mark.slow  # ~30 s on a loaded 2-core box: four models profiled
@pytest.mark.usefixtures("torch_path")
def test_one_sync_and_a_batch_independent_op_count_per_moe_layer() -> None:
    cpu = torch.device("cpu")
    one, sixteen = (per_layer(SMALL, 1, batch, 20, cpu, torch.float32) for batch in (1, 16))
    assert one["syncs_per_layer"] == sixteen["syncs_per_layer"] == 1, (one, sixteen)
    # Qwen3-like routing (128 experts, top-8), fp32: the bounds, and a count that no longer grows with
    # the distinct experts a batch routes to (figures: docs/gpu_path.md)
    assert one["compute_ops_per_layer"] <= 30, one["compute_ops_by_name"]
    assert sixteen["compute_ops_per_layer"] <= 40, sixteen["compute_ops_by_name"]
    assert abs(sixteen["compute_ops_per_layer"] - one["compute_ops_per_layer"]) <= 2, (one, sixteen)
