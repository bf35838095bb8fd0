"""Dense linear layers stored low-bit on the CPU path (`--weight-dtype int8 | int4`).

The matrices take the routed experts' formats (`engine.model.quant`) and kernels: int8 (symmetric
codes, one fp32 scale per output channel) in the integer dot-product layout, run with the
activations quantized per row at every product (q = round(x / s), s = max|x| / 127; the products
summed exactly in int32, then scaled by the weight's and the row's scales); int4 (group 64 with zero
points) with the same integer dot products, summed exactly per group and scaled once per group. Owns quantizing a dense matrix at load, the layouts' sizes, the
embedding lookup in a quantized tied lm_head, and the plain torch references the kernels are
tested against. Measured: docs/quantization.md.
"""

from __future__ import annotations

import torch

from moe_serve.engine.model.packed import PACK_WIDTH, Matrix, PackedMatrix, QuantMatrix
from moe_serve.engine.model.quant import (
    E8M0_BIAS,
    FP4_VALUES,
    INT4_DEFAULT_GROUP,
    ExpertFormat,
    QuantizedMatrix,
    WeightKind,
    dequantize,
    pack,
    unpack,
)

WEIGHT_DTYPES = ("model", "int8", "int4")  # `--weight-dtype`
DENSE_FORMATS = {"int8": ExpertFormat("int8", WeightKind.INT8),
                 "int4": ExpertFormat(f"int4-g{INT4_DEFAULT_GROUP}", WeightKind.INT4, INT4_DEFAULT_GROUP, True)}


def _format(weight_dtype: str) -> ExpertFormat:
    if weight_dtype not in DENSE_FORMATS:
        raise ValueError(f"weight dtype {weight_dtype!r} does not quantize: use {' or '.join(DENSE_FORMATS)}")
    return DENSE_FORMATS[weight_dtype]


def quantize_dense(weight: torch.Tensor, weight_dtype: str) -> QuantMatrix:
    """weight [N, K] stored as `weight_dtype` ("int8" or "int4"), for activations of weight's dtype."""
    fmt = _format(weight_dtype)
    logical = fmt.quantize(weight)
    return QuantMatrix(fmt.kind, pack(logical), weight.shape[0], weight.shape[1], logical.group, weight.dtype)


def dense_layouts(rows: int, cols: int, weight_dtype: str) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of each stored tensor of a [rows, cols] matrix as `weight_dtype` stores it."""
    return _format(weight_dtype).matrix_layouts(rows, cols)


def dequantize_dense(matrix: QuantMatrix) -> torch.Tensor:
    """The reference: the weight [rows, cols] the stored codes stand for, in fp32."""
    return dequantize(unpack(WeightKind(matrix.kind), matrix.tensors, matrix.rows, matrix.cols, matrix.group))


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's per-row activation quantization of x [T, K]: integer codes [T, K] (as fp32) and
    scales [T] (max|x| / 127; a zero row has scale 0 and codes 0)."""
    x = x.float()
    scales = x.abs().amax(dim=1) / 127
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.where(scales[:, None] > 0, torch.round(x / safe[:, None]), torch.zeros_like(x)).clamp(-127, 127)
    return codes, scales


def int8_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The int8 kernels' product in plain torch, fp32: x [T, K] quantized per row, the integer sums
    with the codes [N, K] exact (in fp64), then (sum * scales [N]) * row scale in fp32, the kernels'
    order, so their bits."""
    x_codes, row_scales = quantize_activations(x)
    sums = (x_codes.double() @ codes.double().T).float()
    return sums * scales * row_scales[:, None]


def int4_linear(x: torch.Tensor, matrix: QuantizedMatrix) -> torch.Tensor:
    """The 4-bit kernels' product in plain torch, fp32: x [T, K] quantized per row; per group g of
    inputs the integer sum of (code - zero) * q (INT4; MXFP4: 2 x its E2M1 value times q), exact (in
    fp64); the groups added in order as total + sum * scale (MXFP4: 2^(e - 128)) in fp32; times the
    row scale. The kernels' order, so their bits."""
    x_codes, row_scales = quantize_activations(x)
    rows, cols = matrix.codes.shape
    per_column = torch.arange(cols) // matrix.group
    if matrix.kind is WeightKind.INT4:
        zeros = matrix.zeros if matrix.zeros is not None else torch.full(matrix.scales.shape, 8, dtype=torch.uint8)
        values = matrix.codes.double() - zeros.double()[:, per_column]
        scales = matrix.scales.float()
    else:
        values = torch.tensor(FP4_VALUES, dtype=torch.float64)[matrix.codes.long()] * 2
        scales = torch.exp2(matrix.scales.float() - (E8M0_BIAS + 1))
    total = torch.zeros(x.shape[0], rows)
    for g in range(scales.shape[1]):
        columns = slice(g * matrix.group, min((g + 1) * matrix.group, cols))
        total = total + (x_codes[:, columns].double() @ values[:, columns].T).float() * scales[:, g]
    return total * row_scales[:, None]


def reference_linear(x: torch.Tensor, matrix: QuantMatrix, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] @ matrix.T (+ bias) as the kernels define it, in plain torch, in x's dtype: INT8 by
    `int8_linear`, INT4 by `int4_linear` (the kernels' bits)."""
    logical = unpack(WeightKind(matrix.kind), matrix.tensors, matrix.rows, matrix.cols, matrix.group)
    if matrix.kind == WeightKind.INT8:
        out = int8_linear(x, logical.codes, logical.scales[:, 0])
    else:
        out = int4_linear(x, logical)
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
    if matrix.kind == WeightKind.INT8:  # codes [B, ceil(K / 4), 16, 4], scales [B, 1, 16]
        codes, scales, _ = matrix.tensors
        rows = codes[block, :, lane, :].reshape(len(ids), -1)[:, :matrix.cols].float() * scales[block, 0, lane, None]
        return rows.to(matrix.dtype)
    if matrix.kind != WeightKind.INT4:
        return dequantize_dense(matrix)[ids].to(matrix.dtype)
    codes, scale, *zeros = matrix.tensors  # nibbles [B, ceil(K / 8), 64], fp16 scales and uint8 zeros [B, G, 16]
    nibbles = codes.view(codes.shape[0], codes.shape[1], PACK_WIDTH, 4)[block, :, lane]  # [T, ceil(K / 8), 4]
    values = torch.stack([nibbles & 0x0F, nibbles >> 4], dim=2).reshape(len(ids), -1)[:, :matrix.cols].float()
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
