"""Low-bit formats of the routed experts' weights: int8, int4 and MXFP4, and the model dtype (the
dense layers' `--weight-dtype` takes int8 and int4 from here: `engine.model.dense_quant`).

Owns each format's reference quantization and dequantization (plain torch over the logical
[N, K] codes), its packed layout (what the host tier, the device slots and the C kernels hold:
blocks of `PACK_WIDTH` outputs, k-major like `engine.model.packed`, int8 in steps of 4 inputs for the
integer dot products) and its byte size.
`ExpertFormat` turns one expert's (gate_up, down, *biases) into its stored tensors and back.
Layouts and measured quality/speed: docs/quantization.md.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from moe_serve.engine.model.packed import PACK_WIDTH, pack_blocks, unpack_blocks

if TYPE_CHECKING:  # annotations only: engine.model.weights reads the dense low-bit layouts built from this module
    from moe_serve.engine.model.weights import ExpertTensors

# the 16 E2M1 (FP4) values by their 4-bit code (sign bit first), as in engine.model.mxfp4
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_GROUP = 32  # values per e8m0 scale
E8M0_BIAS = 127
INT4_GROUPS = (32, 64, 128)
INT4_DEFAULT_GROUP = 64
DOT_STEP = 4  # inputs per 32-bit lane of the int8 dot-product instructions (the kernels' Q8_STEP)
NIBBLE_STEP = 2 * DOT_STEP  # inputs per 64-byte step of the 4-bit layout (two dot-product steps)
_FP16_MIN_SCALE = 2.0**-14  # the smallest normal fp16: int4 scales never underflow


class WeightKind(enum.IntEnum):
    """The C kernels' weight kinds (`kind` in csrc/cpu_kernels.c)."""

    FP32 = 0
    BF16 = 1
    INT8 = 2
    INT4 = 3
    MXFP4 = 4


@dataclass(frozen=True)
class QuantizedMatrix:
    """A weight [N, K] as logical codes: `codes` [N, K] (int8 for INT8; 0..15 uint8 for INT4 and
    MXFP4), `scales` [N, groups] (fp32 per row for INT8, fp16 for INT4, e8m0 uint8 for MXFP4) and,
    for INT4 with zero points, `zeros` [N, groups] uint8 (without: the zero point is 8)."""

    kind: WeightKind
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group: int  # K for INT8 (one scale per row)


# -- reference quantization and dequantization (logical layout, plain torch) -------------------

def quantize_int8(weight: torch.Tensor) -> QuantizedMatrix:
    """Symmetric int8, one fp32 scale per output row: code = round(w / s), s = max|w| / 127."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    codes = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return QuantizedMatrix(WeightKind.INT8, codes, scales[:, None].contiguous(), None, w.shape[1])


def _grouped(weight: torch.Tensor, group: int) -> torch.Tensor:
    """weight [N, K] as fp32 [N, ceil(K / group), group], the last group zero padded (a view where K divides)."""
    w = weight.float()
    rows, cols = w.shape
    if cols % group == 0:
        return w.reshape(rows, cols // group, group)
    padded = torch.zeros(rows, -(-cols // group) * group)
    padded[:, :cols] = w
    return padded.view(rows, -1, group)


def quantize_int4(weight: torch.Tensor, group: int, zero_points: bool) -> QuantizedMatrix:
    """Group-wise int4 along K (the last group may be shorter), fp16 scales. With zero points:
    the group's [min, max] (widened to hold 0) over 15 steps, w = (code - zero) * s; without:
    symmetric, s = max|w| / 7, w = (code - 8) * s."""
    rows, cols = weight.shape
    grouped = _grouped(weight, group)
    if zero_points:
        low, high = torch.aminmax(grouped, dim=2)
        low, high = low.clamp(max=0), high.clamp(min=0)
        scales = ((high - low) / 15).clamp(min=_FP16_MIN_SCALE).half()
        zeros = torch.round(-low / scales.float()).clamp(0, 15)
    else:
        scales = (grouped.abs().amax(dim=2) / 7).clamp(min=_FP16_MIN_SCALE).half()
        zeros = torch.full_like(scales, 8, dtype=torch.float32)
    codes = torch.div(grouped, scales.float()[..., None]).add_(zeros[..., None]).round_().clamp_(0, 15)
    codes = codes.view(rows, -1)[:, :cols].to(torch.uint8).contiguous()
    return QuantizedMatrix(WeightKind.INT4, codes, scales, zeros.to(torch.uint8) if zero_points else None, group)


def quantize_mxfp4(weight: torch.Tensor) -> QuantizedMatrix:
    """MXFP4 (OCP microscaling): per 32 values along K an e8m0 exponent bringing the block's largest
    magnitude to at most 6, each value rounded to the nearest E2M1 value (ties to the smaller)."""
    rows, cols = weight.shape
    grouped = _grouped(weight, MXFP4_GROUP)
    amax = grouped.abs().amax(dim=2).clamp(min=2.0**-126)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-E8M0_BIAS, E8M0_BIAS)
    scaled = grouped / torch.exp2(exponent)[..., None]
    midpoints = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    magnitude = torch.bucketize(scaled.abs(), midpoints, out_int32=True)  # ties go to the smaller value
    codes = (magnitude | ((scaled < 0) & (magnitude > 0)).to(torch.int32) << 3).view(rows, -1)
    scales = (exponent + E8M0_BIAS).to(torch.uint8)
    return QuantizedMatrix(WeightKind.MXFP4, codes[:, :cols].to(torch.uint8).contiguous(), scales, None, MXFP4_GROUP)


def mxfp4_from_published(blocks: torch.Tensor, scales: torch.Tensor) -> QuantizedMatrix:
    """The gpt-oss checkpoint layout (blocks uint8 [R, G, 16], two codes a byte, the low nibble first;
    scales uint8 [R, G]) as logical codes [R, G * 32]: the same 4-bit values, nothing expanded."""
    rows, groups, _ = blocks.shape
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).view(rows, groups * MXFP4_GROUP)
    return QuantizedMatrix(WeightKind.MXFP4, codes.contiguous(), scales.contiguous(), None, MXFP4_GROUP)


def dequantize(matrix: QuantizedMatrix, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference: the weight [N, K] each format's codes stand for, computed in fp32."""
    rows, cols = matrix.codes.shape
    device = matrix.codes.device
    per_column = torch.arange(cols, device=device) // matrix.group  # the group of each column
    if matrix.kind is WeightKind.INT8:
        weight = matrix.codes.float() * matrix.scales.float()
    elif matrix.kind is WeightKind.INT4:
        zeros = matrix.zeros.float() if matrix.zeros is not None else torch.full(matrix.scales.shape, 8.0, device=device)
        weight = (matrix.codes.float() - zeros[:, per_column]) * matrix.scales.float()[:, per_column]
    else:
        values = torch.tensor(FP4_VALUES, device=device)[matrix.codes.long()]
        weight = values * torch.exp2(matrix.scales.float() - E8M0_BIAS)[:, per_column]
    return weight.to(dtype)


# -- the packed layout ------------------------------------------------------------------------

def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] (0..15) -> uint8 [ceil(N / 16), ceil(K / 8), 64], the integer dot products' layout:
    per block and step of 8 inputs, byte 4 j + i holds output j's input i (low nibble) and input 4 + i
    (high nibble), so one 64-byte load widens to the two 16-output x 4-input vectors of a dot-product
    instruction; K is padded with code 0 (the kernels' activations are zero there)."""
    rows, cols = codes.shape
    blocks, steps = -(-rows // PACK_WIDTH), -(-cols // NIBBLE_STEP)
    padded = torch.zeros(blocks * PACK_WIDTH, steps * NIBBLE_STEP, dtype=torch.uint8)
    padded[:rows, :cols] = codes
    split = padded.view(blocks, PACK_WIDTH, steps, 2, DOT_STEP).permute(0, 2, 3, 1, 4)  # [B, S, half, 16, 4]
    return (split[:, :, 0] | (split[:, :, 1] << 4)).reshape(blocks, steps, PACK_WIDTH * DOT_STEP).contiguous()


def _unpack_nibbles(packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    blocks, steps = packed.shape[:2]
    pairs = packed.view(blocks, steps, 1, PACK_WIDTH, DOT_STEP)
    split = torch.cat([pairs & 0x0F, pairs >> 4], dim=2)  # [B, S, half, 16, 4]
    return split.permute(0, 3, 1, 2, 4).reshape(blocks * PACK_WIDTH, steps * NIBBLE_STEP)[:rows, :cols]


def _pack_groups(values: torch.Tensor) -> torch.Tensor:
    """Per-(row, group) values [N, G] -> [ceil(N / 16), G, 16]: one block's 16 outputs side by side."""
    return pack_blocks(values)


def _pack_dot(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] -> [ceil(N / 16), ceil(K / 4), 16, 4]: per step of 4 inputs each output's 4 codes
    side by side (one 64-byte vector per block and step, what a dot-product instruction multiplies)."""
    rows, cols = codes.shape
    blocks, steps = -(-rows // PACK_WIDTH), -(-cols // DOT_STEP)
    padded = torch.zeros(blocks * PACK_WIDTH, steps * DOT_STEP, dtype=torch.int8)
    padded[:rows, :cols] = codes
    return padded.view(blocks, PACK_WIDTH, steps, DOT_STEP).transpose(1, 2).contiguous()


def _unpack_dot(packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    blocks, steps = packed.shape[:2]
    return packed.transpose(1, 2).reshape(blocks * PACK_WIDTH, steps * DOT_STEP)[:rows, :cols]


def pack(matrix: QuantizedMatrix) -> tuple[torch.Tensor, ...]:
    """The stored tensors: INT8 (codes int8 [B, ceil(K / 4), 16, 4], scales fp32 [B, 1, 16], the sums of
    each output's codes int32 [B, 1, 16], which the unsigned-by-signed dot products subtract); INT4
    (codes uint8 [B, ceil(K / 8), 64], see `_pack_nibbles`, scales fp16 [B, G, 16], with zero points zeros
    uint8 [B, G, 16]); MXFP4 (codes as INT4's, scales uint8 [B, G, 16]); B = ceil(N / 16), padding
    outputs and inputs zero."""
    if matrix.kind is WeightKind.INT8:
        sums = matrix.codes.sum(dim=1, keepdim=True, dtype=torch.int32)
        return _pack_dot(matrix.codes), _pack_groups(matrix.scales), _pack_groups(sums)
    stored = (_pack_nibbles(matrix.codes), _pack_groups(matrix.scales))
    return stored if matrix.zeros is None else (*stored, _pack_groups(matrix.zeros))


def unpack(kind: WeightKind, stored: tuple[torch.Tensor, ...], rows: int, cols: int, group: int) -> QuantizedMatrix:
    """The logical [rows, cols] codes a `pack` produced (`group` = cols for INT8)."""
    if kind is WeightKind.INT8:
        codes, scales, _ = stored
        return QuantizedMatrix(kind, _unpack_dot(codes, rows, cols), unpack_blocks(scales, rows), None, cols)
    codes, scales, *zeros = stored
    return QuantizedMatrix(kind, _unpack_nibbles(codes, rows, cols), unpack_blocks(scales, rows),
                           unpack_blocks(zeros[0], rows) if zeros else None, group)


# -- formats ----------------------------------------------------------------------------------

_INT4_NAME = re.compile(r"^int4(?:-g(\d+))?(-sym)?$")


@dataclass(frozen=True)
class ExpertFormat:
    """How routed experts are stored. `kind` None: the model dtype (plain or packed, as today);
    otherwise each of an expert's two matrices becomes its `pack`ed tensors, biases stay as they are."""

    name: str
    kind: WeightKind | None = None
    group: int = 0  # INT4 / MXFP4 values per scale
    zero_points: bool = False

    @property
    def quantized(self) -> bool:
        return self.kind is not None

    @property
    def tensors_per_matrix(self) -> int:
        return 1 if self.kind is None else 3 if self.zero_points or self.kind is WeightKind.INT8 else 2

    def quantize(self, weight: torch.Tensor) -> QuantizedMatrix:
        if self.kind is WeightKind.INT8:
            return quantize_int8(weight)
        if self.kind is WeightKind.INT4:
            return quantize_int4(weight, self.group, self.zero_points)
        if self.kind is WeightKind.MXFP4:
            return quantize_mxfp4(weight)
        raise ValueError(f"format {self.name!r} does not quantize")

    def encode(self, tensors: ExpertTensors) -> ExpertTensors:
        """One expert's (gate_up, down, *biases) as stored: each matrix quantized and packed."""
        if self.kind is None:
            return tensors
        gate_up, down, *biases = tensors
        return (*pack(self.quantize(gate_up)), *pack(self.quantize(down)), *biases)

    def encode_quantized(self, gate_up: QuantizedMatrix, down: QuantizedMatrix,
                         biases: tuple[torch.Tensor, ...] = ()) -> ExpertTensors:
        """An expert already in this format's codes (an MXFP4 checkpoint) as stored."""
        return (*pack(gate_up), *pack(down), *biases)

    def matrices(self, stored: ExpertTensors) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...],
                                                       tuple[torch.Tensor, ...]]:
        """The stored tensors split into (gate_up's, down's, the biases)."""
        n = self.tensors_per_matrix
        return tuple(stored[:n]), tuple(stored[n:2 * n]), tuple(stored[2 * n:])

    def decode(self, stored: ExpertTensors, hidden: int, ffn: int, dtype: torch.dtype) -> ExpertTensors:
        """The torch path: (gate_up [2F, D], down [D, F], *biases) dequantized to `dtype` (one expert)."""
        if self.kind is None:
            return stored
        gate_up, down, biases = self.matrices(stored)
        group_up, group_down = (hidden, ffn) if self.kind is WeightKind.INT8 else (self.group, self.group)
        return (dequantize(unpack(self.kind, gate_up, 2 * ffn, hidden, group_up), dtype),
                dequantize(unpack(self.kind, down, hidden, ffn, group_down), dtype), *biases)

    def matrix_layouts(self, rows: int, cols: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """(shape, dtype) of each stored tensor of a quantized [rows, cols] matrix (see `pack`)."""
        blocks = -(-rows // PACK_WIDTH)
        if self.kind is WeightKind.INT8:
            return [((blocks, -(-cols // DOT_STEP), PACK_WIDTH, DOT_STEP), torch.int8),
                    ((blocks, 1, PACK_WIDTH), torch.float32), ((blocks, 1, PACK_WIDTH), torch.int32)]
        groups = -(-cols // self.group)
        scale_dtype = torch.float16 if self.kind is WeightKind.INT4 else torch.uint8
        layouts = [((blocks, -(-cols // NIBBLE_STEP), PACK_WIDTH * DOT_STEP), torch.uint8),
                   ((blocks, groups, PACK_WIDTH), scale_dtype)]
        return layouts + ([((blocks, groups, PACK_WIDTH), torch.uint8)] if self.zero_points else [])

    def matrix_nbytes(self, rows: int, cols: int, model_dtype: torch.dtype) -> int:
        """Bytes of one [rows, cols] matrix as stored (block padding included, alignment not)."""
        if self.kind is None:
            return rows * cols * model_dtype.itemsize
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in self.matrix_layouts(rows, cols))


MODEL_DTYPE = ExpertFormat("model")
MXFP4_FORMAT = ExpertFormat("mxfp4", WeightKind.MXFP4, MXFP4_GROUP)
EXPERT_DTYPES = ("auto", "model", "int8", "int4", "mxfp4")  # the option's names; int4 also as int4-g{32,64,128}[-sym]


def parse_expert_dtype(name: str) -> ExpertFormat | None:
    """The format `--expert-dtype` names (None: `auto`, the checkpoint's own). Raises ValueError."""
    if name == "auto":
        return None
    if name == "model":
        return MODEL_DTYPE
    if name == "int8":
        return ExpertFormat("int8", WeightKind.INT8)
    if name == "mxfp4":
        return MXFP4_FORMAT
    match = _INT4_NAME.match(name)
    if match:
        group = int(match.group(1) or INT4_DEFAULT_GROUP)
        if group in INT4_GROUPS:
            return ExpertFormat(f"int4-g{group}{match.group(2) or ''}", WeightKind.INT4, group, not match.group(2))
    raise ValueError(f"unknown expert dtype {name!r}: allowed are {', '.join(EXPERT_DTYPES)}, "
                     f"int4-g{{{','.join(map(str, INT4_GROUPS))}}}[-sym]")
