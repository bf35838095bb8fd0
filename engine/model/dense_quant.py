"""Dense linear layers stored low-bit on the CPU path (`--weight-dtype int8 | int4`).

int8: symmetric codes with one fp32 scale per output channel (`quant.quantize_int8`) in the integer
dot-product layout the C kernel `linear_q8` reads: blocks of 16 outputs, [ceil(K / 4), 16, 4] per
block (per step of 4 inputs, each output's 4 codes side by side: one 512-bit vector), zero padded,
plus each output's int32 sum of codes. The activations are quantized per row at every product
(q = round(x / s), s = max|x| / 127), the products summed exactly in int32, and the sum scaled by
the weight's and the row's scales. int4: the experts' int4 format (`quant`, group 64 with zero
points), run by the experts' dequantize-in-registers kernel. Owns quantizing a matrix at load, the
layouts' sizes, the embedding lookup in a quantized tied lm_head, and the plain torch references
the kernels are tested against. Measured: docs/quantization.md.
"""

from __future__ import annotations

import torch

from moe_serve.engine.model.packed import PACK_WIDTH, Matrix, PackedMatrix, QuantMatrix
from moe_serve.engine.model.quant import (
    INT4_DEFAULT_GROUP,
    ExpertFormat,
    WeightKind,
    dequantize,
    pack,
    quantize_int8,
    unpack,
)

WEIGHT_DTYPES = ("model", "int8", "int4")  # `--weight-dtype`
DOT_STEP = 4  # inputs per 32-bit lane of the dot-product instructions (the kernel's Q8_STEP)
INT4_DENSE = ExpertFormat(f"int4-g{INT4_DEFAULT_GROUP}", WeightKind.INT4, INT4_DEFAULT_GROUP, True)


def quantize_dense(weight: torch.Tensor, weight_dtype: str) -> QuantMatrix:
    """weight [N, K] stored as `weight_dtype` ("int8" or "int4"), for activations of weight's dtype."""
    if weight_dtype == "int8":
        return quantize_int8_dot(weight)
    if weight_dtype == "int4":
        return quantize_expert_layout(weight, INT4_DENSE)
    raise ValueError(f"unknown weight dtype {weight_dtype!r}: allowed are {', '.join(WEIGHT_DTYPES[1:])}")


def quantize_int8_dot(weight: torch.Tensor) -> QuantMatrix:
    """Per-output-channel int8 in the dot-product layout: codes int8 [B, ceil(K / 4), 16, 4], scales
    fp32 [B * 16], sums int32 [B * 16] (B = ceil(N / 16); padding outputs and inputs are zero)."""
    rows, cols = weight.shape
    logical = quantize_int8(weight)
    blocks, steps = -(-rows // PACK_WIDTH), -(-cols // DOT_STEP)
    padded = torch.zeros(blocks * PACK_WIDTH, steps * DOT_STEP, dtype=torch.int8)
    padded[:rows, :cols] = logical.codes
    codes = padded.view(blocks, PACK_WIDTH, steps, DOT_STEP).transpose(1, 2).contiguous()
    scales = torch.zeros(blocks * PACK_WIDTH)
    scales[:rows] = logical.scales[:, 0]
    sums = padded.sum(dim=1, dtype=torch.int32)
    return QuantMatrix(WeightKind.INT8_DOT, (codes, scales, sums), rows, cols, cols, weight.dtype)


def quantize_expert_layout(weight: torch.Tensor, expert_format: ExpertFormat) -> QuantMatrix:
    """weight [N, K] in a quantized expert format's packed layout (`quant.pack`), read by the
    dequantize-in-registers kernel."""
    logical = expert_format.quantize(weight)
    return QuantMatrix(expert_format.kind, pack(logical), weight.shape[0], weight.shape[1], logical.group, weight.dtype)


def dense_layouts(rows: int, cols: int, weight_dtype: str) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of each stored tensor of a [rows, cols] matrix as `weight_dtype` stores it."""
    if weight_dtype == "int8":
        blocks = -(-rows // PACK_WIDTH)
        return [((blocks, -(-cols // DOT_STEP), PACK_WIDTH, DOT_STEP), torch.int8),
                ((blocks * PACK_WIDTH,), torch.float32), ((blocks * PACK_WIDTH,), torch.int32)]
    if weight_dtype == "int4":
        return INT4_DENSE.matrix_layouts(rows, cols)
    raise ValueError(f"unknown weight dtype {weight_dtype!r}: allowed are {', '.join(WEIGHT_DTYPES[1:])}")


def _int8_dot_codes(matrix: QuantMatrix) -> torch.Tensor:
    """The logical int8 codes [rows, cols] of an INT8_DOT matrix."""
    codes = matrix.tensors[0]
    blocks, steps = codes.shape[:2]
    return codes.transpose(1, 2).reshape(blocks * PACK_WIDTH, steps * DOT_STEP)[:matrix.rows, :matrix.cols]


def dequantize_dense(matrix: QuantMatrix) -> torch.Tensor:
    """The reference: the weight [rows, cols] the stored codes stand for, in fp32."""
    if matrix.kind == WeightKind.INT8_DOT:
        return _int8_dot_codes(matrix).float() * matrix.tensors[1][:matrix.rows, None]
    return dequantize(unpack(WeightKind(matrix.kind), matrix.tensors, matrix.rows, matrix.group))


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's per-row activation quantization of x [T, K]: integer codes [T, K] (as fp32) and
    scales [T] (max|x| / 127; a zero row has scale 0 and codes 0)."""
    x = x.float()
    scales = x.abs().amax(dim=1) / 127
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.where(scales[:, None] > 0, torch.round(x / safe[:, None]), torch.zeros_like(x)).clamp(-127, 127)
    return codes, scales


def reference_linear(x: torch.Tensor, matrix: QuantMatrix, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] @ matrix.T (+ bias) as the kernels define it, in plain torch, in x's dtype. INT8_DOT:
    the activations quantized per row, the integer sums exact (in fp64), then
    (sum * weight scale) * row scale (+ bias) in fp32, the kernel's order, so its bits; the other
    kinds: the dequantized weight in fp32 (the kernel's fp32 sums, in another order)."""
    if matrix.kind == WeightKind.INT8_DOT:
        codes, row_scales = quantize_activations(x)
        sums = (codes.double() @ _int8_dot_codes(matrix).double().T).float()
        out = sums * matrix.tensors[1][:matrix.rows] * row_scales[:, None]
    else:
        out = x.float() @ dequantize_dense(matrix).T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def matrix_rows(matrix: Matrix, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` [T] of a weight matrix as [T, K] in its (activations') dtype: an embedding lookup,
    also in a tied lm_head that is packed or stored low-bit (its rows dequantized)."""
    if isinstance(matrix, torch.Tensor):
        return matrix[ids]
    if isinstance(matrix, PackedMatrix):
        return matrix.rows_at(ids)
    block, lane = ids // PACK_WIDTH, ids % PACK_WIDTH
    if matrix.kind == WeightKind.INT8_DOT:
        codes, scales, _ = matrix.tensors
        rows = codes[block, :, lane, :].reshape(len(ids), -1)[:, :matrix.cols].float() * scales[ids, None]
        return rows.to(matrix.dtype)
    if matrix.kind != WeightKind.INT4:
        return dequantize_dense(matrix)[ids].to(matrix.dtype)
    codes, scale, *zeros = matrix.tensors  # nibbles [B, K, 8], fp16 scales and uint8 zeros [B, G, 16]
    nibbles = codes[block, :, lane % 8]
    values = torch.where((lane < 8)[:, None], nibbles & 0x0F, nibbles >> 4).float()
    per_column = torch.arange(matrix.cols) // matrix.group
    zero = zeros[0][block, :, lane].float() if zeros else torch.full((len(ids), scale.shape[1]), 8.0)
    rows = (values - zero[:, per_column]) * scale[block, :, lane].float()[:, per_column]
    return rows.to(matrix.dtype)


def matrix_tensors(matrix: Matrix) -> tuple[torch.Tensor, ...]:
    """The tensors that hold a weight matrix in any layout."""
    if isinstance(matrix, torch.Tensor):
        return (matrix,)
    if isinstance(matrix, PackedMatrix):
        return (matrix.blocks,)
    return matrix.tensors
