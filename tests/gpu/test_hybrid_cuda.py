"""Hybrid miss handling on CUDA: misses computed on the host (torch on the CPU over the pinned host
tier, beside the GPU's batched experts) keep the greedy tokens of copying every miss (fp32)."""

from __future__ import annotations

import pytest
import torch

from moe_serve.engine.config import MissHandling
from moe_serve.engine.offload.provider import OffloadedExperts
from tests.helpers import MIN_FRACTION, run_workload

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
LAYERS = {"mixtral": 4, "deepseek_v2": 5, "gpt_oss": 4}  # 4 MoE layers each: the minimum cache is a quarter


@pytest.mark.parametrize("handling", ["host", "auto"])
@pytest.mark.parametrize("arch", sorted(LAYERS))
def test_host_computed_misses_keep_the_tokens_of_copying_them(checkpoint_factory, arch: str, handling: str) -> None:
    path = checkpoint_factory(arch, num_hidden_layers=LAYERS[arch])
    common = {"device": "cuda", "expert_cache_fraction": MIN_FRACTION, "prefetch": "none"}
    expected, _ = run_workload(path, miss_handling="copy", **common)
    tokens, engine = run_workload(path, miss_handling=handling, **common)
    experts = engine.runner.model.experts
    assert isinstance(experts, OffloadedExperts) and experts.miss_handling is MissHandling(handling)
    stats = experts.cache.stats()
    assert tokens == expected
    if handling == "host":
        assert stats.host_misses == stats.misses and stats.host_compute_seconds > 0
    experts.cache.check_invariants()
