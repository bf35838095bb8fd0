"""Continuous batching, chunked prefill, preemption and abort against the single-request run."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from types import SimpleNamespace

import pytest
import torch
from prometheus_client import CollectorRegistry

from moe_serve.engine.builder import build_engine
from moe_serve.engine.config import EngineConfig
from moe_serve.engine.core.async_engine import AsyncLLMEngine
from moe_serve.engine.core.request import EngineRequest
from moe_serve.engine.core.sampling_params import FinishReason, SamplingParams
from moe_serve.engine.errors import ContextLengthExceededError, InvalidRequestError, QueueFullError
from moe_serve.engine.offload.slot_pool import RESIDENCY_REFRESH_S
from moe_serve.server.metrics import register_metrics
from moe_serve.server.routes import health_body
from tests.helpers import run_to_completion

# one 16-token block of the tiny Mixtral: keys+values x 2 layers x 16 tokens x 2 kv heads x 8 dims x fp32
KV_BLOCK_BYTES = 2 * 2 * 16 * 2 * 8 * 4


def _engine(path, **overrides):
    overrides.setdefault("dtype", "float32")
    return build_engine(EngineConfig(model=str(path), **overrides), show_progress=False)


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _prompt(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def mixtral(checkpoint_factory):
    return checkpoint_factory("mixtral")


def _alone(path, prompt, max_tokens, **overrides) -> list[int]:
    engine = _engine(path, **overrides)
    return run_to_completion(engine, {0: [EngineRequest("solo", prompt, _greedy(max_tokens))]})["solo"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batched_requests_arriving_and_finishing_at_different_steps_match_solo_runs(mixtral, dtype: str) -> None:
    engine = _engine(mixtral, dtype=dtype)
    vocab = engine.vocab_size
    specs = [(5, 20, 0), (17, 6, 0), (2, 12, 3), (30, 9, 5), (8, 15, 11)]  # (prompt len, max tokens, arrival)
    arrivals: dict[int, list[EngineRequest]] = {}
    for i, (n, m, step) in enumerate(specs):
        arrivals.setdefault(step, []).append(EngineRequest(f"r{i}", _prompt(n, i, vocab), _greedy(m)))
    batched = run_to_completion(engine, arrivals)
    for i, (n, m, _) in enumerate(specs):
        assert batched[f"r{i}"] == _alone(mixtral, _prompt(n, i, vocab), m, dtype=dtype)


def test_chunked_prefill_gives_the_same_tokens(mixtral) -> None:
    prompt = _prompt(70, 7, 300)
    engine = _engine(mixtral, max_num_batched_tokens=16)
    chunked = run_to_completion(engine, {0: [EngineRequest("c", prompt, _greedy(10))]})["c"]
    assert chunked == _alone(mixtral, prompt, 10)


def test_preemption_when_kv_cache_is_full_gives_the_same_tokens(mixtral) -> None:
    engine = _engine(mixtral, kv_cache_gb=12 * KV_BLOCK_BYTES / 2**30, max_model_len=64)
    assert engine.blocks.num_blocks == 12
    prompts = [_prompt(30, s, engine.vocab_size) for s in range(4)]
    requests = [EngineRequest(f"p{i}", p, _greedy(30)) for i, p in enumerate(prompts)]
    tokens = run_to_completion(engine, {0: requests})
    assert engine.scheduler.num_preemptions > 0
    for i, prompt in enumerate(prompts):
        assert tokens[f"p{i}"] == _alone(mixtral, prompt, 30)
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_abort_frees_kv_blocks_at_once(mixtral) -> None:
    engine = _engine(mixtral)
    engine.add_request(EngineRequest("a", _prompt(40, 1, engine.vocab_size), _greedy(50)))
    engine.step()
    assert engine.blocks.usage > 0
    out = engine.abort("a")
    assert out is not None and out.finish_reason is FinishReason.ABORT
    assert engine.blocks.usage == 0 and not engine.has_unfinished


def test_stop_token_ids_min_tokens_and_max_tokens(mixtral) -> None:
    engine = _engine(mixtral)
    prompt = _prompt(6, 2, engine.vocab_size)
    free_run = _alone(mixtral, prompt, 8)
    stop_id = free_run[3]
    params = SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[stop_id], ignore_eos=True)
    outs = []
    engine.add_request(EngineRequest("s", prompt, params))
    while engine.has_unfinished:
        outs += engine.step()
    tokens = [t for o in outs for t in o.new_token_ids]
    assert tokens == free_run[: free_run.index(stop_id) + 1]
    assert outs[-1].finish_reason is FinishReason.STOP
    engine.add_request(EngineRequest("l", prompt, _greedy(5)))
    last = None
    while engine.has_unfinished:
        for last in engine.step():
            pass
    assert last is not None and last.finish_reason is FinishReason.LENGTH and last.num_output_tokens == 5


def test_seeded_sampling_is_reproducible_and_batch_independent(mixtral) -> None:
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=1234)
    prompt = _prompt(9, 3, 300)
    solo = run_to_completion(_engine(mixtral), {0: [EngineRequest("x", prompt, params)]})["x"]
    others = [EngineRequest(f"o{i}", _prompt(4 + i, 10 + i, 300), SamplingParams(max_tokens=7, temperature=1.0))
              for i in range(3)]
    batched = run_to_completion(_engine(mixtral), {0: others[:2], 1: [EngineRequest("x", prompt, params)],
                                                   3: others[2:]})["x"]
    assert solo == batched


def test_invalid_requests_are_rejected_with_clear_errors(mixtral) -> None:
    engine = _engine(mixtral, max_model_len=32, max_waiting=1)
    with pytest.raises(ContextLengthExceededError, match="maximum context length is 32"):
        engine.add_request(EngineRequest("long", [1] * 40, _greedy(4)))
    with pytest.raises(InvalidRequestError, match="temperature"):
        engine.add_request(EngineRequest("t", [1, 2], SamplingParams(temperature=5.0)))
    with pytest.raises(InvalidRequestError, match="token ids"):
        engine.add_request(EngineRequest("v", [10**6], _greedy(2)))
    engine.add_request(EngineRequest("q1", [1, 2], _greedy(2)))
    with pytest.raises(QueueFullError):
        engine.add_request(EngineRequest("q2", [1, 2], _greedy(2)))


def test_async_engine_streams_and_aborts_on_close(mixtral) -> None:
    engine = _engine(mixtral)
    expected = _alone(mixtral, [5, 6, 7], 6)
    async_engine = AsyncLLMEngine.from_engine(engine)
    async_engine.start(wait=True)

    async def scenario() -> tuple[list[int], float]:
        got = []
        async for out in async_engine.generate(EngineRequest("g", [5, 6, 7], _greedy(6))):
            got += out.new_token_ids
        stream = async_engine.generate(EngineRequest("cancel", [5, 6, 7], _greedy(500)))
        await stream.__anext__()
        await stream.aclose()
        for _ in range(100):
            if async_engine.stats().num_running == 0:
                break
            await asyncio.sleep(0.02)
        return got, async_engine.stats().kv_cache_usage

    try:
        got, usage = asyncio.run(scenario())
    finally:
        async_engine.shutdown()
    assert got == expected
    assert usage == 0.0


def test_the_engine_thread_publishes_one_immutable_snapshot_that_metrics_and_health_read(mixtral) -> None:
    config = EngineConfig(model=str(mixtral), dtype="float32", expert_cache_fraction=0.5)
    async_engine = AsyncLLMEngine.from_engine(build_engine(config, show_progress=False), config)
    async_engine.start(wait=True)

    async def serve() -> list[int]:
        return [t async for out in async_engine.generate(EngineRequest("s", [5, 6, 7], _greedy(4)))
                for t in out.new_token_ids]

    try:
        idle = async_engine.stats()  # published on start, before any step
        assert idle is async_engine.stats()  # read, never rebuilt, by other threads
        assert (idle.num_running, idle.num_waiting, idle.kv_cache_usage) == (0, 0, 0.0)
        assert idle.offload and idle.expert_cache is not None and idle.expert_cache.capacity_bytes > 0
        with pytest.raises(dataclasses.FrozenInstanceError):
            idle.num_running = 1  # type: ignore[misc]
        with pytest.raises(TypeError):
            idle.expert_cache.misses[0] = 1  # type: ignore[index]
        assert len(asyncio.run(serve())) == 4
        served = async_engine.stats()
        time.sleep(RESIDENCY_REFRESH_S + 0.2)  # idle: the engine republishes once the residency settled
        settled = async_engine.stats()
        pool = async_engine._engine.runner.model.experts.cache.pool
    finally:
        async_engine.shutdown()
    assert settled is not served and settled.expert_cache is not None
    resident = {layer: tuple(sorted(key.expert for key in pool.evictable() if key.layer == layer))
                for layer in {key.layer for key in pool.evictable()}}
    assert dict(settled.expert_cache.resident_experts) == resident and resident
    assert served is not idle and (served.num_running, served.num_waiting, served.kv_cache_usage) == (0, 0, 0.0)
    assert served.expert_cache is not None and sum(served.expert_cache.misses.values()) > 0
    # /metrics and /health need nothing of the engine but its config, its state flags and the snapshot
    stand_in = SimpleNamespace(config=config, is_ready=True, is_dead=False, stats=lambda: served)
    registry = CollectorRegistry()
    register_metrics(registry, stand_in, "tiny", "0.0.0")  # type: ignore[arg-type]
    samples = {s.name: s.value for family in registry.collect() for s in family.samples if not s.labels}
    assert samples["moe_serve_expert_cache_capacity_bytes"] == served.expert_cache.capacity_bytes
    assert samples["moe_serve_expert_prefetches_issued_total"] == served.expert_cache.prefetch_issued
    misses = sum(s.value for family in registry.collect() for s in family.samples
                 if s.name == "moe_serve_expert_cache_misses_total")
    assert misses == sum(served.expert_cache.misses.values())
    status, body = health_body(SimpleNamespace(engine=stand_in, served_model_name="tiny"))  # type: ignore[arg-type]
    assert status == 200 and body["num_running"] == 0 and body["kv_cache_usage"] == 0.0


def test_a_request_through_the_async_engine_is_validated_once_on_the_event_loop(mixtral, monkeypatch) -> None:
    engine = _engine(mixtral)
    calls: list[str] = []
    validate = engine.validate
    monkeypatch.setattr(engine, "validate", lambda request: (calls.append(request.request_id), validate(request)))
    async_engine = AsyncLLMEngine.from_engine(engine)
    async_engine.start(wait=True)

    async def serve() -> list[int]:
        with pytest.raises(InvalidRequestError, match="temperature"):  # refused before it is queued
            [out async for out in async_engine.generate(EngineRequest("bad", [5], SamplingParams(temperature=5.0)))]
        return [t async for out in async_engine.generate(EngineRequest("ok", [5, 6, 7], _greedy(3)))
                for t in out.new_token_ids]

    try:
        assert asyncio.run(serve()) == _alone(mixtral, [5, 6, 7], 3)
    finally:
        async_engine.shutdown()
    assert calls == ["bad", "ok"]
