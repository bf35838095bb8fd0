"""Huge-page advised host buffers, the arena the packed weights live in, and exact-size pinned buffers
(the registration call faked: registering, unregistering, failing)."""

from __future__ import annotations

import gc
import logging

import pytest
import torch

from moe_serve.engine import host_memory
from moe_serve.engine.host_memory import ALIGNMENT, HUGE_PAGE, Arena, PinningError, advised_buffer, pinned_buffer
from moe_serve.engine.model.packed import pack_blocks, packed_shape
from moe_serve.engine.offload.expert_store import HostExpertStore
from moe_serve.engine.types import ExpertKey


def test_an_advised_buffer_is_zeroed_writable_and_outlives_its_mapping_handle() -> None:
    buffer = advised_buffer(3 * 2**20 + 5)
    assert buffer.dtype is torch.uint8 and buffer.numel() == 3 * 2**20 + 5
    assert int(buffer.count_nonzero()) == 0
    buffer[-1] = 7
    gc.collect()  # only the tensor holds the mapping now
    assert int(buffer[-1]) == 7 and advised_buffer(0).numel() == 0


def test_arena_tensors_are_aligned_disjoint_and_bounded() -> None:
    shapes = [((3, 5, 16), torch.float32), ((7,), torch.bfloat16), ((2, 2), torch.float32)]
    arena = Arena(Arena.bytes_for(shapes))
    views = [arena.take(shape, dtype) for shape, dtype in shapes]
    for view, (shape, dtype) in zip(views, shapes, strict=True):
        assert tuple(view.shape) == shape and view.dtype is dtype and view.is_contiguous()
        assert view.data_ptr() % ALIGNMENT == 0
        view.fill_(1)
    assert all(bool((view == 1).all()) for view in views)  # no view overwrote another
    with pytest.raises(ValueError, match="cannot hold"):
        arena.take((1,), torch.float32)


def test_packing_into_an_arena_gives_the_same_blocks() -> None:
    weight = torch.randn(37, 24)
    arena = Arena(Arena.bytes_for([(packed_shape(37, 24), torch.float32)]))
    assert torch.equal(pack_blocks(weight, arena.take(packed_shape(37, 24), torch.float32)), pack_blocks(weight))
    with pytest.raises(ValueError, match="contiguous"):
        pack_blocks(weight, torch.empty(packed_shape(50, 24)))


class FakeRegistration:
    """Records cudaHostRegister/cudaHostUnregister calls; fails every registration when told to."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.registered: list[tuple[int, int]] = []
        self.unregistered: list[int] = []

    def register(self, address: int, nbytes: int) -> None:
        if self.fail:
            raise PinningError("cudaHostRegister of 5 MiB failed with cudaError 2")
        self.registered.append((address, nbytes))

    def unregister(self, address: int) -> None:
        self.unregistered.append(address)


def test_a_pinned_buffer_registers_its_own_size_not_the_next_power_of_two() -> None:
    fake = FakeRegistration()
    nbytes = 5 * 2**20 + 1  # torch's caching host allocator would reserve 8 MiB
    buffer = pinned_buffer(nbytes, fake.register, fake.unregister)
    assert buffer.numel() == nbytes and buffer.dtype is torch.uint8
    ((address, registered),) = fake.registered
    assert address == buffer.data_ptr() and registered == 3 * HUGE_PAGE  # 6 MiB: rounded to a huge page only
    buffer[-1] = 9
    assert int(buffer[-1]) == 9 and fake.unregistered == []


def test_a_pinned_buffer_is_unregistered_once_when_its_last_view_goes() -> None:
    fake = FakeRegistration()
    buffer = pinned_buffer(3 * 2**20, fake.register, fake.unregister)
    address = buffer.data_ptr()
    view = buffer[2**20:]
    del buffer
    gc.collect()
    assert fake.unregistered == []  # a view still reads the memory
    view.fill_(1)
    del view
    gc.collect()
    assert fake.unregistered == [address]


def test_a_failed_pin_leaves_a_pageable_buffer_and_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeRegistration(fail=True)
    with caplog.at_level(logging.WARNING, logger=host_memory.__name__):
        buffer = pinned_buffer(5 * 2**20, fake.register, fake.unregister, what="host expert tier")
    assert buffer.numel() == 5 * 2**20 and int(buffer.count_nonzero()) == 0
    (record,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "could not pin the host expert tier" in record.getMessage() and "pageable" in record.getMessage()
    assert "cudaError 2" in record.getMessage()
    del buffer
    gc.collect()
    assert fake.unregistered == []  # nothing was registered, so nothing is undone


def test_without_a_cuda_runtime_the_real_registration_raises_a_pinning_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA runtime is present")
    with pytest.raises(PinningError):
        host_memory.cuda_host_register(advised_buffer(4096).data_ptr(), 4096)


def test_the_host_expert_tier_is_pinned_at_its_exact_size_and_falls_back_when_pinning_fails(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    experts = {ExpertKey(layer, e): [torch.randn(48, 32), torch.randn(32, 24)] for layer in range(2) for e in range(3)}
    for fail in (False, True):
        fake = FakeRegistration(fail)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(host_memory, "cuda_host_register", fake.register)
        monkeypatch.setattr(host_memory, "cuda_host_unregister", fake.unregister)
        with caplog.at_level(logging.WARNING):
            store = HostExpertStore.from_tensors(experts, pin=True)
        monkeypatch.undo()
        assert store.nbytes == len(experts) * store.expert_nbytes
        assert [nbytes for _, nbytes in fake.registered] == ([] if fail else [HUGE_PAGE])
        assert sum("could not pin the host expert tier" in r.getMessage() for r in caplog.records) == int(fail)
        for key, tensors in experts.items():
            assert all(torch.equal(a, b) for a, b in zip(store.unpack(store.source(key)), tensors, strict=True))
        caplog.clear()
