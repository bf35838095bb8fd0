"""Hybrid miss handling through the engine: computing misses from the host tier (`host`) or per
miss (`auto`, over a throttled copy engine) keeps the all-resident greedy tokens for every
architecture, also where a layer mixes copied and host-computed misses; the counters say how each
miss was handled."""

from __future__ import annotations

import pytest
import torch

from moe_serve.engine.builder import build_engine
from moe_serve.engine.config import EngineConfig, MissHandling
from moe_serve.engine.offload.hybrid import MissPlanner
from moe_serve.engine.offload.miss_cost import ComputeRate, MissRates
from moe_serve.engine.offload.provider import OffloadedExperts, miss_handling
from tests.helpers import ARCHITECTURES, MIN_FRACTION, NEW_ARCHITECTURES, run_to_completion, run_workload, workload

# 4 MoE layers of 8 experts each: the minimum cache (one layer) is a quarter of the experts
NUM_MOE_LAYERS = 4
LAYERS = {arch: 4 if arch == "gpt_oss" else 5 for arch in NEW_ARCHITECTURES} | dict.fromkeys(ARCHITECTURES, 4)
HANDLINGS = {"host": {"miss_handling": "host"}, "auto": {"miss_handling": "auto", "expert_link_gbps": 0.5}}


@pytest.fixture(scope="module")
def reference(checkpoint_factory):
    """(arch, dtype) -> (checkpoint, the all-resident tokens of the workload), each computed once."""
    made: dict[tuple[str, str], tuple] = {}

    def get(arch: str, dtype: str = "float32") -> tuple:
        if (arch, dtype) not in made:
            path = checkpoint_factory(arch, num_hidden_layers=LAYERS[arch])
            made[arch, dtype] = path, run_workload(path, offload="off", dtype=dtype)[0]
        return made[arch, dtype]

    return get


def offloaded(path, **overrides) -> tuple[dict, OffloadedExperts]:
    tokens, engine = run_workload(path, **{"expert_cache_fraction": MIN_FRACTION, "prefetch": "none", **overrides})
    experts = engine.runner.model.experts
    assert isinstance(experts, OffloadedExperts)
    experts.cache.check_invariants()
    return tokens, experts


@pytest.mark.parametrize("handling", sorted(HANDLINGS))
@pytest.mark.parametrize("arch", sorted(LAYERS))
def test_greedy_tokens_equal_the_all_resident_run(reference, arch: str, handling: str) -> None:
    path, expected = reference(arch)
    tokens, experts = offloaded(path, **HANDLINGS[handling])
    assert experts.miss_handling is MissHandling(handling)
    stats = experts.cache.stats()
    assert tokens == expected
    assert sum(stats.host_misses.values()) > 0
    if handling == "host":  # no miss takes a slot or crosses the link
        assert stats.host_misses == stats.misses and not any(stats.bytes_copied.values())
        assert experts.cache.num_occupied_slots == 0


@pytest.mark.parametrize("arch", ["qwen2_moe", "deepseek_v3", "gpt_oss"])
@pytest.mark.parametrize("handling", sorted(HANDLINGS))
def test_bf16_keeps_the_bf16_all_resident_tokens(reference, arch: str, handling: str) -> None:
    """Host-tier experts hold the same bytes as a slot and run through the same kernels (bit-exact
    on the CPU: the packed path sums in one fixed order; the torch path computes the batch whole)."""
    path, expected = reference(arch, "bfloat16")
    tokens, _ = offloaded(path, dtype="bfloat16", **HANDLINGS[handling])
    assert tokens == expected


def test_host_counters_measure_the_host_work_and_the_link(reference) -> None:
    path, _ = reference("mixtral")
    _, host = offloaded(path, miss_handling="host")
    stats = host.cache.stats()
    assert stats.host_compute_seconds > 0 and stats.link_busy_seconds == 0
    _, copy = offloaded(path, miss_handling="copy", expert_link_gbps=0.5)
    stats = copy.cache.stats()
    assert not stats.host_misses and stats.host_compute_seconds == 0
    paced = sum(stats.bytes_copied.values()) / 0.5e9  # every copied byte crossed the throttled link
    assert stats.link_busy_seconds == pytest.approx(paced, rel=0.05)


def test_auto_on_a_cpu_computes_every_miss_on_the_host_at_any_link(reference) -> None:
    """On a CPU the device is a second thread on the same cores (overlap 0): a copy only adds its
    link time, however fast the link."""
    path, _ = reference("mixtral")
    for gbps in (0.001, 100.0):
        _, experts = offloaded(path, miss_handling="auto", expert_link_gbps=gbps)
        stats = experts.cache.stats()
        assert stats.host_misses == stats.misses and not any(stats.bytes_copied.values())


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v2", "gpt_oss"])
def test_auto_mixing_copies_and_host_work_in_a_layer_keeps_the_tokens(reference, arch: str) -> None:
    """A planner that models a device computing beside the host over a fast link copies part of a
    layer's misses and computes the rest on the host, and the tokens stay the all-resident ones."""
    path, expected = reference(arch)
    engine = build_engine(EngineConfig(model=str(path), dtype="float32", max_num_batched_tokens=16,
                                       expert_cache_fraction=MIN_FRACTION, prefetch="none", miss_handling="auto",
                                       expert_link_gbps=100.0), show_progress=False)
    experts = engine.runner.model.experts
    assert isinstance(experts, OffloadedExperts)
    cache = experts.cache
    side_by_side = MissRates(100e9, ComputeRate.from_bandwidth(1e9), ComputeRate.from_bandwidth(1e9), overlap=1.0)
    planner = MissPlanner(side_by_side, cache.store.expert_nbytes, cache.store.experts_per_layer,
                          cache.num_slots / NUM_MOE_LAYERS, device_is_host=False)
    experts.set_miss_handling(MissHandling.AUTO, planner)
    assert run_to_completion(engine, workload()) == expected
    stats = cache.stats()
    host = sum(stats.host_misses.values())
    assert 0 < host < sum(stats.misses.values()) and any(stats.bytes_copied.values())
    cache.check_invariants()


def test_auto_copies_on_a_cpu_without_a_link_to_weigh_and_decides_per_miss_on_cuda() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert miss_handling(EngineConfig(), cpu) is MissHandling.COPY
    assert miss_handling(EngineConfig(expert_link_gbps=8.0), cpu) is MissHandling.AUTO
    assert miss_handling(EngineConfig(miss_handling="host"), cpu) is MissHandling.HOST
    assert miss_handling(EngineConfig(), cuda) is MissHandling.AUTO


def test_host_handling_beside_prefetched_residents_keeps_the_tokens(reference) -> None:
    """Prefetches fill slots (the device's experts) while every miss is computed on the host: both at once."""
    path, expected = reference("qwen2_moe")
    tokens, experts = offloaded(path, miss_handling="host", prefetch="next_layer", prefetch_margin=2)
    stats = experts.cache.stats()
    assert tokens == expected
    assert sum(stats.hits.values()) > 0 and stats.host_misses == stats.misses
