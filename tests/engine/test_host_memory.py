"""Huge-page advised host buffers and the arena the packed weights live in."""

from __future__ import annotations

import gc

import pytest
import torch

from moe_serve.engine.host_memory import ALIGNMENT, Arena, advised_buffer
from moe_serve.engine.model.packed import pack_blocks, packed_shape


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
