"""Hybrid miss handling through the engine: computing misses from the host tier (`host`) or per
miss (`auto`, over a throttled copy engine) keeps the all-resident greedy tokens for every
architecture; the counters say how each miss was handled; `auto` follows the link."""

from __future__ import annotations

import pytest
import torch

from moe_serve.engine.config import EngineConfig, MissHandling
from moe_serve.engine.offload.provider import OffloadedExperts, miss_handling
from tests.helpers import ARCHITECTURES, MIN_FRACTION, NEW_ARCHITECTURES, run_workload

# 4 MoE layers of 8 experts each: the minimum cache (one layer) is a quarter of the experts
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
    tokens, engine = run_workload(path, expert_cache_fraction=MIN_FRACTION, prefetch="none", **overrides)
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


def test_auto_computes_on_the_host_over_a_slow_link_and_copies_over_a_fast_one(reference) -> None:
    """A tiny expert's copy costs ~10 ms at 1 MB/s: every miss stays on the host. At 100 GB/s a
    step's misses outnumber what the host finishes first, and some are copied."""
    path, _ = reference("mixtral")
    _, slow = offloaded(path, miss_handling="auto", expert_link_gbps=0.001)
    stats = slow.cache.stats()
    assert stats.host_misses == stats.misses
    _, fast = offloaded(path, miss_handling="auto", expert_link_gbps=100.0)
    stats = fast.cache.stats()
    copied = sum(stats.misses.values()) - sum(stats.host_misses.values())
    assert copied > 0 and sum(stats.host_misses.values()) > 0


def test_auto_copies_on_a_cpu_without_a_link_to_weigh_and_cuda_copies_every_miss() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert miss_handling(EngineConfig(), cpu) is MissHandling.COPY
    assert miss_handling(EngineConfig(expert_link_gbps=8.0), cpu) is MissHandling.AUTO
    assert miss_handling(EngineConfig(miss_handling="host"), cpu) is MissHandling.HOST
    assert miss_handling(EngineConfig(miss_handling="host"), cuda) is MissHandling.COPY
