"""MXFP4 weights as stored in the published gpt-oss checkpoints, dequantized one expert at a time.

A weight [R, C] is stored as `_blocks` uint8 [R, C / 32, 16] (each byte holds two 4-bit E2M1
values, the low nibble first) and `_scales` uint8 [R, C / 32] (one e8m0 exponent per block of 32
values, biased by 127): value = FP4[nibble] * 2^(scale - 127), the layout transformers'
`integrations/mxfp4.py` reads. Every dequantized value is exact in bf16 and fp32. `MXFP4Expert`
keeps one expert 4-bit until its tensors are read, so loading never holds the whole model dequantized:
each expert is expanded on its way into the host tier (or the resident experts); in the MXFP4 expert
format (`engine.model.quant`) its codes are kept instead (`MXFP4Expert.quantized`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

import torch

from moe_serve.engine.errors import ModelLoadError
from moe_serve.engine.model.quant import QuantizedMatrix, mxfp4_from_published

# the 16 E2M1 values by their 4-bit code (sign bit first)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32  # values per scale
SCALE_BIAS = 127
_CODES = torch.arange(256)
_BYTE_VALUES = torch.tensor(FP4_VALUES)[torch.stack([_CODES & 0x0F, _CODES >> 4], dim=-1)]  # byte -> its 2 values


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks uint8 [R, G, 16], scales uint8 [R, G] -> the weight [R, G * 32] in `dtype`."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape \
            or blocks.shape[-1] != BLOCK // 2:
        raise ModelLoadError(f"MXFP4 blocks {tuple(blocks.shape)} {blocks.dtype} and scales {tuple(scales.shape)} "
                             f"{scales.dtype} do not match: expected uint8 [R, G, 16] and uint8 [R, G]")
    rows, groups, _ = blocks.shape
    values = _BYTE_VALUES.to(blocks.device)[blocks.int()].view(rows, groups, BLOCK)  # [R, G, 32] fp32
    values *= torch.exp2(scales.float() - SCALE_BIAS)[..., None]
    return values.view(rows, groups * BLOCK).to(dtype)


class MXFP4Expert(Sequence[torch.Tensor]):
    """One routed expert as (gate_up, down, gate_up_bias, down_bias), its two matrices kept in MXFP4
    and dequantized to `dtype` each time they are read."""

    def __init__(self, gate_up: tuple[torch.Tensor, torch.Tensor], down: tuple[torch.Tensor, torch.Tensor],
                 gate_up_bias: torch.Tensor, down_bias: torch.Tensor, dtype: torch.dtype) -> None:
        self._matrices = (gate_up, down)  # (blocks, scales) each
        self._biases = (gate_up_bias, down_bias)
        self._dtype = dtype

    def __len__(self) -> int:
        return 4

    @overload
    def __getitem__(self, index: int) -> torch.Tensor: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[torch.Tensor]: ...

    def __getitem__(self, index: int | slice) -> torch.Tensor | Sequence[torch.Tensor]:
        if isinstance(index, slice):
            return tuple(self[i] for i in range(len(self))[index])
        if not -4 <= index < 4:
            raise IndexError(index)
        index %= 4
        if index < 2:
            return dequantize(*self._matrices[index], self._dtype)
        return self._biases[index - 2]

    def quantized(self) -> tuple[QuantizedMatrix, QuantizedMatrix, tuple[torch.Tensor, torch.Tensor]]:
        """(gate_up, down) as MXFP4 codes (nothing expanded) and the two biases."""
        gate_up, down = (mxfp4_from_published(*matrix) for matrix in self._matrices)
        return gate_up, down, self._biases

    @property
    def stored_nbytes(self) -> int:
        """Bytes this expert holds (4-bit blocks, scales, biases)."""
        tensors = [*self._matrices[0], *self._matrices[1], *self._biases]
        return sum(t.numel() * t.element_size() for t in tensors)
