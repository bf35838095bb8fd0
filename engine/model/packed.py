"""The packed weight layout the CPU kernels read (see csrc/cpu_kernels.c).

A weight matrix [N, K] (N outputs, K inputs) is stored as blocks of `PACK_WIDTH` outputs, each
k-major: blocks[b, k, j] = weight[b * PACK_WIDTH + j, k], with zero rows padding N up to a
multiple of `PACK_WIDTH`. A product then reads each block front to back as one stream and keeps
one accumulator per output in a register, instead of summing each output across vector lanes.
Routed experts are packed as bare block tensors (their sizes come from the model spec, and the
host tier stores them byte for byte); the dense matrices as `PackedMatrix`, which keeps N, or,
stored low-bit (`--weight-dtype`), as `QuantMatrix` (its layouts: `engine.model.dense_quant`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PACK_WIDTH = 16  # outputs per block: the kernels' PACK


def pack_blocks(weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """weight [N, K] -> blocks [ceil(N / PACK_WIDTH), K, PACK_WIDTH], contiguous, same dtype;
    written into `out` (e.g. a view of an `engine.host_memory.Arena`) when given."""
    if weight.dim() != 2:
        raise ValueError(f"only matrices are packed, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    shape = packed_shape(rows, cols)
    if out is None:
        out = torch.empty(shape, dtype=weight.dtype)
    elif tuple(out.shape) != shape or out.dtype != weight.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {weight.dtype} tensor of shape {shape}")
    whole = rows // PACK_WIDTH
    out[:whole].copy_(weight[: whole * PACK_WIDTH].reshape(whole, PACK_WIDTH, cols).transpose(1, 2))
    if whole < shape[0]:  # the last, partial block: zero outputs past N
        tail = out[whole]
        tail.zero_()
        tail[:, : rows - whole * PACK_WIDTH].copy_(weight[whole * PACK_WIDTH:].T)
    return out


def unpack_blocks(blocks: torch.Tensor, rows: int) -> torch.Tensor:
    """The [rows, K] matrix that `pack_blocks` packed into `blocks`."""
    return blocks.transpose(1, 2).reshape(-1, blocks.shape[1])[:rows]


def packed_shape(rows: int, cols: int) -> tuple[int, int, int]:
    """The blocks' shape for a [rows, cols] matrix."""
    return (-(-rows // PACK_WIDTH), cols, PACK_WIDTH)


@dataclass(frozen=True)
class PackedMatrix:
    """A dense weight matrix [rows, K] in the packed layout."""

    blocks: torch.Tensor  # [ceil(rows / PACK_WIDTH), K, PACK_WIDTH]
    rows: int

    @classmethod
    def pack(cls, weight: torch.Tensor, out: torch.Tensor | None = None) -> PackedMatrix:
        return cls(pack_blocks(weight, out), weight.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """The logical shape [rows, K]."""
        return (self.rows, self.blocks.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks.dtype

    def nbytes(self) -> int:
        """Bytes held, padding included."""
        return self.blocks.numel() * self.blocks.element_size()

    def unpack(self) -> torch.Tensor:
        """The matrix in the plain [rows, K] layout (a new tensor)."""
        return unpack_blocks(self.blocks, self.rows)

    def rows_at(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` [T] of the matrix as [T, K] (an embedding lookup in a tied lm_head)."""
        return self.blocks[ids // PACK_WIDTH, :, ids % PACK_WIDTH]


@dataclass(frozen=True)
class QuantMatrix:
    """A dense weight matrix [rows, cols] stored low-bit for the C kernels: its stored `tensors` in
    the layout of weight kind `kind` (`engine.model.quant.WeightKind`, built and read by
    `engine.model.dense_quant`), `group` inputs per scale, and `dtype` the activations' (model) dtype."""

    kind: int
    tensors: tuple[torch.Tensor, ...]
    rows: int
    cols: int
    group: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    def nbytes(self) -> int:
        """Bytes held, padding included."""
        return sum(t.numel() * t.element_size() for t in self.tensors)


Matrix = torch.Tensor | PackedMatrix | QuantMatrix  # a weight matrix in any of the layouts
