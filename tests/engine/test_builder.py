"""The builder's hardware-dependent defaults."""

from __future__ import annotations

from pathlib import Path

import torch

from moe_serve.engine.builder import build_engine, prefetch_mode
from moe_serve.engine.config import EngineConfig, PrefetchMode
from moe_serve.engine.prefetch.speculators import AffinitySpeculator
from tests.helpers import make_tiny_checkpoint


def test_auto_prefetch_is_none_on_cpu_and_affinity_on_cuda() -> None:
    config = EngineConfig()
    assert config.prefetch is PrefetchMode.AUTO
    assert prefetch_mode(config, torch.device("cpu")) is PrefetchMode.NONE
    assert prefetch_mode(config, torch.device("cuda")) is PrefetchMode.AFFINITY
    for mode in (PrefetchMode.NONE, PrefetchMode.NEXT_LAYER, PrefetchMode.AFFINITY, PrefetchMode.LOGISTIC):
        assert prefetch_mode(EngineConfig(prefetch=mode), torch.device("cpu")) is mode


def test_offloading_on_cpu_by_default_loads_on_demand_only(tmp_path: Path) -> None:
    path = make_tiny_checkpoint("mixtral", tmp_path / "ckpt")
    engine = build_engine(EngineConfig(model=str(path), device="cpu", offload="on", expert_cache_fraction=0.5),
                          show_progress=False)
    assert engine.runner.model.speculator is None
    chosen = build_engine(EngineConfig(model=str(path), device="cpu", offload="on", expert_cache_fraction=0.5,
                                       prefetch="affinity"), show_progress=False)
    assert isinstance(chosen.runner.model.speculator, AffinitySpeculator)
