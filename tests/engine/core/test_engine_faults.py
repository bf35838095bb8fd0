"""Faults inside the engine: a failed step fails only its requests and frees everything they
held (KV blocks, queue entries, runner state, expert-cache pins); a non-finite row fails alone;
a device fault or repeated failures stop the engine with a reason; task names stay bounded."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import torch

from moe_serve.engine.builder import build_async_engine, build_engine
from moe_serve.engine.config import EngineConfig
from moe_serve.engine.core.async_engine import AsyncLLMEngine
from moe_serve.engine.core.llm_engine import MAX_CONSECUTIVE_FAILED_STEPS, LLMEngine
from moe_serve.engine.core.request import EngineRequest
from moe_serve.engine.core.sampling_params import FinishReason, SamplingParams
from moe_serve.engine.core.tasks import TaskNames
from moe_serve.engine.errors import EngineDeadError, EngineFatalError, EngineStepError, ModelLoadError
from moe_serve.engine.offload.provider import OffloadedExperts
from moe_serve.server.errors import ErrorType, from_engine_error
from tests.helpers import run_to_completion

NUM_LAYERS = 4  # 4 layers x 8 experts: at fraction 0.25 one layer of a prefill needs every slot


@pytest.fixture(scope="module")
def mixtral(checkpoint_factory):
    return checkpoint_factory("mixtral", num_hidden_layers=NUM_LAYERS)


def _engine(path, **overrides) -> LLMEngine:
    overrides.setdefault("dtype", "float32")
    return build_engine(EngineConfig(model=str(path), **overrides), show_progress=False)


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def _request(rid: str, first: int, max_tokens: int = 6) -> EngineRequest:
    return EngineRequest(rid, list(range(first, first + 20)), _greedy(max_tokens))


def _reference(path, requests: list[EngineRequest]) -> dict[str, list[int]]:
    """Each request's greedy tokens on its own, all experts resident."""
    engine = _engine(path, offload="off")
    return {r.request_id: run_to_completion(engine, {0: [r]})[r.request_id] for r in requests}


class RaiseInsideLayer:
    """Wraps an expert provider's `fetch`: raises inside MoE layer `layer` (after the layer acquired
    its experts, before it releases them) whenever it is armed."""

    def __init__(self, fetch: Callable[[int, list[int], list[int]], Any], layer: int) -> None:
        self.fetch = fetch
        self.layer = layer
        self.armed = False

    def __call__(self, layer: int, expert_ids: list[int], rows: list[int]) -> Any:
        groups = self.fetch(layer, expert_ids, rows)
        if self.armed and layer == self.layer:
            self.armed = False
            raise RuntimeError("injected fault inside a MoE layer")
        return groups


def _drain(engine: LLMEngine) -> dict[str, list]:
    """Step until idle; {request id: [tokens, finish reason, error]}."""
    results: dict[str, list] = {}
    while engine.has_unfinished:
        for out in engine.step():
            entry = results.setdefault(out.request_id, [[], None, None])
            entry[0] += out.new_token_ids
            if out.finished:
                entry[1], entry[2] = out.finish_reason, out.error
    return results


def test_a_fault_inside_a_moe_layer_fails_its_step_and_leaks_no_expert_pin(mixtral, monkeypatch) -> None:
    engine = _engine(mixtral, expert_cache_fraction=0.25, prefetch="none", max_num_batched_tokens=64)
    experts = engine.runner.model.experts
    assert isinstance(experts, OffloadedExperts)
    cache = experts.cache
    fault = RaiseInsideLayer(experts.fetch, layer=1)
    monkeypatch.setattr(experts, "fetch", fault)
    after = [_request(f"after{i}", 40 + 30 * i) for i in range(4)]
    expected = _reference(mixtral, after)
    for round_, request in enumerate(after):  # a leaked pin per failed step would soon starve the cache
        engine.add_request(_request(f"a{round_}", 5 + round_))
        engine.add_request(_request(f"b{round_}", 100 + round_))
        fault.armed = True
        outputs = engine.step()
        assert {o.request_id for o in outputs} == {f"a{round_}", f"b{round_}"}
        for output in outputs:
            assert output.finished and output.finish_reason is FinishReason.ABORT
            assert isinstance(output.error, EngineStepError) and "injected fault" in str(output.error)
        assert not engine.has_unfinished and engine.blocks.num_free == engine.blocks.num_blocks
        assert cache.num_pinned_slots == 0
        cache.check_invariants()
        engine.add_request(request)
        assert _drain(engine) == {request.request_id: [expected[request.request_id], FinishReason.LENGTH, None]}
        cache.check_invariants()
        assert cache.num_pinned_slots == 0 and engine.blocks.num_free == engine.blocks.num_blocks
    assert engine.num_failed_steps == len(after)


def test_a_failed_forward_spares_waiting_and_later_requests(mixtral, monkeypatch) -> None:
    engine = _engine(mixtral, offload="off", max_num_seqs=2)
    requests = [_request(name, first) for name, first in (("a", 5), ("b", 60), ("waiting", 120), ("later", 200))]
    expected = _reference(mixtral, requests)
    forward = engine.runner.model.forward
    calls = []

    def forward_failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected forward fault")
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.runner.model, "forward", forward_failing_once)
    for request in requests[:3]:
        engine.add_request(request)
    failed = engine.step()
    assert sorted(o.request_id for o in failed) == ["a", "b"]
    assert all(isinstance(o.error, EngineStepError) for o in failed)
    assert [s.seq_id for s in engine.scheduler.waiting] == ["waiting"] and not engine.scheduler.running
    engine.add_request(requests[3])
    results = _drain(engine)
    assert results == {rid: [expected[rid], FinishReason.LENGTH, None] for rid in ("waiting", "later")}
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_a_non_finite_row_fails_its_request_while_the_batch_goes_on(mixtral, monkeypatch) -> None:
    engine = _engine(mixtral, offload="off")
    requests = [_request("poisoned", 5), _request("healthy", 60)]
    expected = _reference(mixtral, requests[1:])
    logits = engine.runner.model.logits
    poison = [True]

    def logits_with_a_nan_row(hidden: torch.Tensor) -> torch.Tensor:
        out = logits(hidden)
        if poison[0]:
            poison[0] = False
            out[0, 3] = float("nan")  # row 0 is the first scheduled request
        return out

    monkeypatch.setattr(engine.runner.model, "logits", logits_with_a_nan_row)
    for request in requests:
        engine.add_request(request)
    results = _drain(engine)
    tokens, reason, error = results["poisoned"]
    assert tokens == [] and reason is FinishReason.ABORT
    assert isinstance(error, EngineStepError) and "non-finite logits" in str(error)
    assert results["healthy"] == [expected["healthy"], FinishReason.LENGTH, None]
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_repeated_failures_or_a_device_fault_are_fatal(mixtral, monkeypatch) -> None:
    engine = _engine(mixtral, offload="off")

    def broken(*args, **kwargs):
        raise RuntimeError("injected persistent fault")

    monkeypatch.setattr(engine.runner.model, "forward", broken)
    for i in range(MAX_CONSECUTIVE_FAILED_STEPS - 1):
        engine.add_request(_request(f"r{i}", 5))
        assert [type(o.error) for o in engine.step()] == [EngineStepError]
    engine.add_request(_request("last", 5))
    with pytest.raises(EngineFatalError, match=f"{MAX_CONSECUTIVE_FAILED_STEPS} engine steps in a row failed"):
        engine.step()

    device = _engine(mixtral, offload="off")

    def device_fault(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(device.runner.model, "forward", device_fault)
    device.add_request(_request("r", 5))
    with pytest.raises(EngineFatalError, match="the device failed"):
        device.step()


def test_the_async_engine_fails_one_stream_goes_on_then_dies_with_a_reason(mixtral, monkeypatch) -> None:
    engine = _engine(mixtral, offload="off")
    expected = _reference(mixtral, [_request("ok", 60)])["ok"]
    forward = engine.runner.model.forward
    mode = ["fail once"]

    def faulty_forward(*args, **kwargs):
        if mode[0] == "fail once":
            mode[0] = "work"
            raise RuntimeError("injected fault")
        if mode[0] == "device fault":
            raise RuntimeError("CUDA error: device-side assert triggered")
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.runner.model, "forward", faulty_forward)
    async_engine = AsyncLLMEngine.from_engine(engine)
    async_engine.start(wait=True)

    async def tokens(request: EngineRequest) -> list[int]:
        return [t async for out in async_engine.generate(request) for t in out.new_token_ids]

    async def scenario() -> None:
        with pytest.raises(EngineStepError, match="injected fault"):
            await tokens(_request("failed", 5))
        assert await tokens(_request("ok", 60)) == expected
        mode[0] = "device fault"
        with pytest.raises(EngineDeadError, match="fatal error"):
            await tokens(_request("doomed", 5))

    try:
        asyncio.run(scenario())
        assert async_engine.is_dead and not async_engine.is_ready
        assert isinstance(async_engine.fatal_error, EngineFatalError)
        assert async_engine.dead_reason is not None and "\n" not in async_engine.dead_reason
        assert async_engine.dead_reason.startswith("the engine stopped after a fatal error: the device failed")
    finally:
        async_engine.shutdown()


def test_a_load_failure_sets_a_one_line_dead_reason(tmp_path) -> None:
    async_engine = build_async_engine(EngineConfig(model=str(tmp_path / "missing")))
    with pytest.raises(ModelLoadError):
        async_engine.start(wait=True, timeout=60)
    assert async_engine.is_dead and isinstance(async_engine.fatal_error, ModelLoadError)
    assert async_engine.dead_reason is not None and "\n" not in async_engine.dead_reason
    assert async_engine.dead_reason.startswith("the model failed to load: ")


def test_a_step_error_is_a_500_server_error() -> None:
    error = from_engine_error(EngineStepError("the engine step serving this request failed"))
    assert (error.status_code, error.error_type, error.code) == (500, ErrorType.SERVER, "engine_step_failed")


def _serve_names(engine: LLMEngine, names: list[str], batch: int = 1000) -> None:
    """One 1-token request per name, served to the end `batch` at a time."""
    for start in range(0, len(names), batch):
        for i, name in enumerate(names[start:start + batch], start):
            engine.add_request(EngineRequest(f"{name}-{i}", [5], _greedy(1), task=name))
        while engine.has_unfinished:
            engine.step()


def _per_task_sizes(engine: LLMEngine) -> dict[str, int]:
    assert engine.preloader is not None
    return {
        "output lengths": engine.scheduler.lengths.num_tasks,
        "task profiles": engine.preloader.predictor.num_tasks,
        "task names": len(engine.task_names) + len(engine.task_names.table.tasks),
    }


@pytest.mark.slow
def test_ten_thousand_task_names_leave_bounded_per_task_state(mixtral) -> None:
    max_tasks = 8
    engine = _engine(mixtral, expert_cache_fraction=0.5, max_tasks=max_tasks, max_num_seqs=1024,
                     max_num_batched_tokens=2048, max_waiting=1024, task_preload="on")
    _serve_names(engine, [f"client-{i}" for i in range(10_000)])
    sizes = _per_task_sizes(engine)
    assert sizes == {"output lengths": max_tasks, "task profiles": max_tasks, "task names": max_tasks}
    assert engine.stats().num_task_names_folded == 10_000 - (max_tasks - 1)  # `default` is the 8th name
    # names that churn (an idle name gives its place at once) reach every structure: still at most max_tasks
    engine.task_names = TaskNames(engine.scheduler.slo.tasks, max_tasks, idle_s=0.0)
    _serve_names(engine, [f"churn-{i}" for i in range(2_000)])
    assert _per_task_sizes(engine) == sizes
    assert engine.task_names.num_folded == 0
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_a_failed_expert_copy_fails_its_step_and_the_next_use_copies_again(mixtral) -> None:
    """The copy engine fails a demand copy (on its own thread): the step that waits on it fails its
    requests, the slot is freed, and later requests copy that expert again and get the
    all-resident tokens; nothing leaks and the process never aborts."""
    engine = _engine(mixtral, offload="on", expert_cache_fraction=0.5, prefetch="none")
    cache = engine.runner.model.experts.cache
    cache.pool.copy_engine.inject_failures(1, "injected copy failure")
    engine.add_request(_request("first", 1))
    first = _drain(engine)["first"]
    assert isinstance(first[2], EngineStepError) and "injected copy failure" in str(first[2])
    cache.check_invariants()
    later = [_request("a", 3), _request("b", 40)]
    for request in later:
        engine.add_request(request)
    results = _drain(engine)
    assert {rid: entry[0] for rid, entry in results.items()} == _reference(mixtral, later)
    assert all(entry[2] is None for entry in results.values())
    cache.check_invariants()
    assert cache.num_pinned_slots == 0
