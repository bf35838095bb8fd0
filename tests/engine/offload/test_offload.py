"""Invariant 1: offloading never changes results (bit-exact greedy tokens on CPU, fp32 and bf16)."""

from __future__ import annotations

import numpy as np
import pytest

from moe_serve.cache_policies import available_policies
from moe_serve.engine.builder import build_engine
from moe_serve.engine.config import EngineConfig
from moe_serve.engine.core.request import EngineRequest
from moe_serve.engine.core.sampling_params import SamplingParams
from moe_serve.engine.errors import ModelLoadError
from moe_serve.engine.offload.expert_store import HostTierSpaceError
from moe_serve.engine.offload.provider import OffloadedExperts
from moe_serve.engine.prefetch.speculators import LogisticSpeculator
from moe_serve.engine.traces.trace_file import RoutingTrace, save_trace
from tests.helpers import ARCHITECTURES, MIN_FRACTION, mounted_tmpfs, run_workload

NUM_LAYERS = 4  # 4 layers x 8 experts: the minimum cache (one layer, 8 slots) is a quarter of the experts


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch_reference(request, checkpoint_factory):
    path = checkpoint_factory(request.param, num_hidden_layers=NUM_LAYERS)
    tokens, _ = run_workload(path, offload="off")
    return path, tokens


@pytest.mark.parametrize("fraction", [1.0, 0.5, MIN_FRACTION])
@pytest.mark.parametrize("policy", available_policies())
def test_greedy_tokens_equal_the_all_resident_run(arch_reference, fraction: float, policy: str) -> None:
    path, reference = arch_reference
    tokens, engine = run_workload(path, expert_cache_fraction=fraction, cache_policy=policy, prefetch="none")
    experts = engine.runner.model.experts
    assert isinstance(experts, OffloadedExperts)
    stats = experts.cache.stats()
    assert tokens == reference
    if fraction < 1.0:
        assert sum(stats.evictions.values()) > 0  # the cache really was too small for everything
    experts.cache.check_invariants()


@pytest.mark.parametrize("fraction", [0.5, MIN_FRACTION])
@pytest.mark.parametrize("prefetch", ["next_layer", "affinity", "logistic"])
def test_prefetch_keeps_the_all_resident_tokens(arch_reference, fraction: float, prefetch: str) -> None:
    path, reference = arch_reference
    # min score 0: the affinity and logistic speculators guess as soon as they have seen one step's routing
    tokens, engine = run_workload(path, expert_cache_fraction=fraction, prefetch=prefetch, prefetch_margin=2,
                         prefetch_min_score=0.0)
    stats = engine.runner.model.experts.cache.stats()
    assert tokens == reference
    assert stats.prefetch_issued > 0 and stats.prefetch_used > 0


def test_bf16_offloading_keeps_the_bf16_all_resident_tokens(checkpoint_factory) -> None:
    path = checkpoint_factory("qwen2_moe", num_hidden_layers=NUM_LAYERS)
    reference, _ = run_workload(path, offload="off", dtype="bfloat16")
    tokens, engine = run_workload(path, expert_cache_fraction=MIN_FRACTION, prefetch="next_layer", dtype="bfloat16")
    assert tokens == reference
    assert sum(engine.runner.model.experts.cache.stats().evictions.values()) > 0


def test_a_budget_below_one_step_is_refused_with_the_minimum(checkpoint_factory) -> None:
    path = checkpoint_factory("mixtral", num_hidden_layers=NUM_LAYERS)
    with pytest.raises(ModelLoadError, match=r"at least 8 expert slots .*expert_cache_fraction >= 0.2500"):
        build_engine(EngineConfig(model=str(path), expert_cache_fraction=0.2), show_progress=False)


def test_unknown_policy_lists_the_valid_ones(checkpoint_factory) -> None:
    path = checkpoint_factory("mixtral", num_hidden_layers=NUM_LAYERS)
    with pytest.raises(ModelLoadError, match="lru"):
        build_engine(EngineConfig(model=str(path), expert_cache_fraction=0.5, cache_policy="nope"), show_progress=False)


def test_every_engine_step_ends_a_cache_step(checkpoint_factory, monkeypatch) -> None:
    """The policies' step boundaries (and the freshness of preloads) follow the engine's steps."""
    path = checkpoint_factory("mixtral", num_hidden_layers=NUM_LAYERS)
    engine = build_engine(EngineConfig(model=str(path), dtype="float32", expert_cache_fraction=0.5, prefetch="none"),
                          show_progress=False)
    cache = engine.runner.model.experts.cache
    ended = []
    monkeypatch.setattr(cache, "on_step", lambda: ended.append(1))
    engine.add_request(EngineRequest("r", list(range(5, 25)), SamplingParams(max_tokens=5, temperature=0.0)))
    steps = 0
    while engine.has_unfinished:
        engine.step()
        steps += 1
    assert len(ended) == steps > 1


def test_a_host_tier_over_the_host_budget_is_file_backed_and_changes_nothing(arch_reference, tmp_path) -> None:
    path, reference = arch_reference
    tokens, engine = run_workload(path, expert_cache_fraction=0.5, prefetch="none", host_memory_gb=1e-6,
                         host_tier_dir=str(tmp_path))
    store = engine.runner.model.experts.cache.store
    assert store.file_backed and not store.is_pinned
    assert tokens == reference
    assert not list(tmp_path.iterdir())  # the backing file is unlinked once mapped
    _, in_ram = run_workload(path, expert_cache_fraction=0.5, prefetch="none", host_memory_gb=64.0)
    assert not in_ram.runner.model.experts.cache.store.file_backed  # within the budget: plain RAM


def test_an_unusable_host_tier_dir_is_a_clear_load_error(checkpoint_factory, tmp_path) -> None:
    path = checkpoint_factory("mixtral", num_hidden_layers=NUM_LAYERS)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ModelLoadError, match="cannot create the file-backed host tier"):
        build_engine(EngineConfig(model=str(path), expert_cache_fraction=0.5, host_memory_gb=1e-6,
                                  host_tier_dir=str(blocker / "tier")), show_progress=False)


def test_a_host_tier_dir_that_is_a_file_is_a_one_line_load_error(checkpoint_factory, tmp_path) -> None:
    path = checkpoint_factory("mixtral", num_hidden_layers=NUM_LAYERS)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ModelLoadError) as info:
        build_engine(EngineConfig(model=str(path), expert_cache_fraction=0.5, host_memory_gb=1e-6,
                                  host_tier_dir=str(blocker)), show_progress=False)
    assert str(info.value) == (f"cannot create the file-backed host tier in {blocker} (host_tier_dir): "
                               "not a directory")


@pytest.mark.parametrize("problem", ["read-only", "too small"])
def test_a_host_tier_dir_on_an_unusable_file_system_is_a_one_line_load_error(checkpoint_factory, tmp_path,
                                                                             problem: str) -> None:
    path = checkpoint_factory("mixtral", num_hidden_layers=NUM_LAYERS)
    with mounted_tmpfs(tmp_path / "tier", 64 * 1024, read_only=problem == "read-only") as tier:
        with pytest.raises(ModelLoadError) as info:
            build_engine(EngineConfig(model=str(path), expert_cache_fraction=0.5, host_memory_gb=1e-6,
                                      host_tier_dir=str(tier)), show_progress=False)
    message = str(info.value)
    assert "\n" not in message and str(tier) in message and "host_tier_dir" in message
    if problem == "read-only":
        assert message.endswith("Read-only file system")
    else:
        assert isinstance(info.value, HostTierSpaceError)
        assert "No space left on device" in message and "are available there" in message


def test_logistic_prefetch_trains_on_a_trace_of_the_model_and_refuses_another(checkpoint_factory, tmp_path) -> None:
    path = checkpoint_factory("mixtral", num_hidden_layers=NUM_LAYERS)
    rng = np.random.default_rng(0)

    def trace_file(name: str, num_layers: int) -> str:
        ids = np.stack([[rng.choice(8, 2, replace=False) for _ in range(num_layers)] for _ in range(40)])
        file = tmp_path / name
        save_trace(file, RoutingTrace(ids.astype(np.uint8), np.array([0, 20, 40]), np.arange(2, dtype=np.int32), 8))
        return str(file)

    config = dict(model=str(path), expert_cache_fraction=0.5, prefetch="logistic")
    untrained = build_engine(EngineConfig(**config), show_progress=False).runner.model.speculator
    trained = build_engine(EngineConfig(**config, prefetch_trace=trace_file("ok.npz", NUM_LAYERS)),
                           show_progress=False).runner.model.speculator
    assert isinstance(trained, LogisticSpeculator) and isinstance(untrained, LogisticSpeculator)
    assert not np.any(untrained.predictor._weights) and np.any(trained.predictor._weights)
    with pytest.raises(ModelLoadError, match=r"has 5 layers x 8 experts, the model 4 x 8"):
        build_engine(EngineConfig(**config, prefetch_trace=trace_file("other.npz", NUM_LAYERS + 1)), show_progress=False)
    with pytest.raises(ModelLoadError, match="cannot read prefetch_trace"):
        build_engine(EngineConfig(**config, prefetch_trace=str(tmp_path / "missing.npz")), show_progress=False)
