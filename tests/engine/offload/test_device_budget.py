"""The automatic expert budget on a CUDA device (free memory after the dense weights, less the KV cache
and the working reserve) and start-up refusing a set-up that cannot fit, with the device measurement faked."""

from __future__ import annotations

import pytest
import torch

from moe_serve.engine.config import EngineConfig
from moe_serve.engine.errors import ModelLoadError
from moe_serve.engine.offload.provider import DeviceBudget, device_budget, size_expert_cache, wants_offload

GIB = 2**30
MIXTRAL_EXPERT = 336 * 2**20  # one Mixtral-8x7B expert in bf16
# a 24 GiB card running Mixtral: ~23.5 GiB free with the CUDA context up, 3.0 GiB of dense weights placed
MIXTRAL_ON_24GB = DeviceBudget(free_nbytes=int(20.5 * GIB), total_nbytes=24 * GIB, kv_nbytes=4 * GIB,
                               reserve_nbytes=int(1.37 * GIB))


def test_without_a_budget_flag_the_cache_takes_what_the_device_has_left() -> None:
    sizing = size_expert_cache(256, 2, MIXTRAL_EXPERT, None, None, MIXTRAL_ON_24GB)
    assert sizing.num_slots == MIXTRAL_ON_24GB.expert_nbytes // MIXTRAL_EXPERT == 46
    assert size_expert_cache(16, 2, MIXTRAL_EXPERT, None, None, MIXTRAL_ON_24GB).num_slots == 16  # all fit
    assert size_expert_cache(256, 2, MIXTRAL_EXPERT, None, None, None).num_slots == 256  # CPU: no device bound


def test_a_cache_budget_the_device_cannot_hold_is_refused_saying_what_fits() -> None:
    with pytest.raises(ModelLoadError) as refused:  # the gpu-24gb profile's 16 GiB cache
        size_expert_cache(256, 2, MIXTRAL_EXPERT, 16.0, None, MIXTRAL_ON_24GB)
    message = str(refused.value)
    assert "expert_cache_gb=16.0" in message and "does not fit on the device" in message
    assert "expert_cache_gb <= 15.094" in message and "expert_cache_fraction <= 0.1797" in message
    assert "moe-serve plan --model DIR --gpu-gb 24.0" in message
    assert size_expert_cache(256, 2, MIXTRAL_EXPERT, 15.094, None, MIXTRAL_ON_24GB).num_slots == 46


def test_a_kv_cache_that_leaves_no_room_for_one_step_of_experts_is_refused_naming_the_kv_that_would() -> None:
    budget = DeviceBudget(free_nbytes=6 * GIB, total_nbytes=8 * GIB, kv_nbytes=4 * GIB, reserve_nbytes=GIB)
    with pytest.raises(ModelLoadError) as refused:  # needs 8 experts (2.6 GiB), has 1 GiB
        size_expert_cache(256, 8, MIXTRAL_EXPERT, None, None, budget)
    assert "smaller than one step can need: at least 8 expert slots" in str(refused.value)
    assert "kv_cache_gb <= 2.375" in str(refused.value)


def test_the_offload_decision_follows_the_device_budget() -> None:
    experts = 20 * GIB
    assert wants_offload(EngineConfig(offload="auto"), experts, MIXTRAL_ON_24GB)
    assert not wants_offload(EngineConfig(offload="auto"), 10 * GIB, MIXTRAL_ON_24GB)
    assert not wants_offload(EngineConfig(offload="auto"), experts, None)  # CPU: everything resident in RAM
    assert wants_offload(EngineConfig(offload="auto", expert_cache_fraction=0.5), GIB, MIXTRAL_ON_24GB)
    with pytest.raises(ModelLoadError, match=r"offload=off: the experts \(20.00 GiB\) do not fit"):
        wants_offload(EngineConfig(offload="off"), experts, MIXTRAL_ON_24GB)


def test_the_budget_counts_the_allocators_cached_memory_as_free(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * GIB, 24 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 5 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 3 * GIB)  # 2 GiB cached, reusable
    budget = device_budget(torch.device("cuda"), kv_nbytes=4 * GIB, reserve_nbytes=GIB)
    assert budget == DeviceBudget(12 * GIB, 24 * GIB, 4 * GIB, GIB) and budget.expert_nbytes == 7 * GIB
    assert device_budget(torch.device("cpu"), 4 * GIB, GIB) is None
