"""CPU kernels, fp32 or bf16: linear layers (also on int8 and 4-bit weights with integer dot products,
`engine.model.dense_quant`), the routed-expert FFN (also on int8, int4 and MXFP4 experts,
`engine.model.quant`, integer dot products on activations quantized per row), decode attention,
RMSNorm, the rotary embedding and the router's top-k, in `csrc/cpu_kernels.c` over the packed layout of
`engine.model.packed`; compiled on first use into the extension cache, called through ctypes
(which releases the GIL). Each output is summed in one fixed order whatever the batch or the
expert grouping, so results do not depend on batching. Plain weights, other devices or
dtypes, no compiler, or MOE_SERVE_CPU_KERNEL=0 go to torch. Design: docs/operations.md.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from moe_serve.cache_policies.native_build import LoadOnce, build_failure, compile_library, cpu_flags
from moe_serve.engine.model.dense_quant import reference_linear
from moe_serve.engine.model.packed import Matrix, PackedMatrix, QuantMatrix, packed_shape
from moe_serve.engine.model.quant import MODEL_DTYPE, ExpertFormat, WeightKind

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_kernels.c"
DISABLE_ENV = "MOE_SERVE_CPU_KERNEL"

INT8_KERNELS = ("c (portable)", "avx2 (vpmaddubsw)", "avx512-vnni (vpdpbusd)")  # by the library's q8_kernel()

_P, _L, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_WEIGHT_KINDS = {torch.float32: 0, torch.bfloat16: 1}  # the kernels' `bf16` flag
_SIGNATURES = {  # name: (argument types, result type)
    "linear": ([_P, _P, _P, _P, _I, _L, _L, _L, _L, _L, _I], _I),
    "linear_quant": ([_P, _I, _L, _P, _P, _P, _I, _L, _L, _L, _L, _L, _I], _I),
    "linear_q8": ([_P, _P, _P, _P, _P, _P, _I, _L, _L, _L, _L, _L, _I], _I),
    "q8_kernel": ([], _I),
    "moe_experts": ([_P, _L, _L, _P, _P, _P, _P, _P, _P, _I, _L, _L, _P, _P, _P, _I], _I),
    "paged_decode_attention": ([_P, _P, _P, _I, _P, _L, _P, _L, _L, _L, _L, ctypes.c_float, _P, _P, _I], _I),
    "rope": ([_P, _L, _P, _P, _P, _L, _L, _L, _I], None),
    "rms_norm": ([_P, _L, _P, _P, _L, _L, ctypes.c_float, _I], None),
    "route": ([_P, _I, _L, _L, _L, _P, _I, _P, _P, _P, _P, _P], _I),
}


def _vector_flags(cpu: set[str]) -> tuple[list[str], str]:
    """The compiler's vector flags for a CPU with these /proc/cpuinfo flags, and the flavour."""
    if not {"avx2", "fma"} <= cpu:
        return [], "c"
    f16c = ["-mf16c"] if "f16c" in cpu else []  # the quantized experts' fp16 scales
    if "avx512f" in cpu:  # 512-bit vectors where the compiler finds a use for them
        vnni = ["-mavx512bw", "-mavx512vnni"] if {"avx512bw", "avx512_vnni"} <= cpu else []  # int8 dot products
        return ["-mavx2", "-mfma", *f16c, "-mavx512f", *vnni, "-mprefer-vector-width=512"], "c-avx512"
    return ["-mavx2", "-mfma", *f16c], "c-avx2"


def build_library(vector: list[str]) -> Path:
    """The kernels compiled with these vector flags (cached by source and flags, so a prebuilt
    library needs no compiler here), compiling first if missing."""
    flags = ["-O3", "-ffp-contract=off", "-fPIC", "-shared", "-fopenmp", *vector]  # no FMA contraction: vector and scalar code round alike
    return compile_library(SOURCE, flags, "kernels", "the CPU kernels")


def open_library(path: Path) -> ctypes.CDLL:
    """Loads a kernels library and declares its functions' signatures."""
    library = ctypes.CDLL(str(path))
    for name, (argtypes, restype) in _SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes = argtypes
        function.restype = restype
    return library


def _open_kernels() -> tuple[ctypes.CDLL, str] | None:
    """The kernels' library, compiled if missing, and its flavour; None (logged): use torch."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        logger.info("CPU kernels: torch (disabled by %s=0)", DISABLE_ENV)
        return None
    try:
        vector, flavour = _vector_flags(cpu_flags())
        library = open_library(build_library(vector))
    except (subprocess.CalledProcessError, OSError) as exc:
        logger.warning("CPU kernels: torch (the C kernels: %s)", build_failure(exc))
        return None
    logger.info("CPU kernels: C (%s), packed weights; int8 and 4-bit weights: %s", flavour,
                INT8_KERNELS[library.q8_kernel()])
    return library, flavour


_kernels = LoadOnce(_open_kernels)


def _load() -> ctypes.CDLL | None:
    """The kernels' library, loaded (compiling if needed) on the first call; None: use torch."""
    kernels = _kernels.get()
    return None if kernels is None else kernels[0]


def kernel_flavour() -> str:
    """Which implementation serves small CPU batches: "c-avx512", "c-avx2", "c" or "torch"."""
    kernels = _kernels.get()
    return "torch" if kernels is None else kernels[1]


def packs_weights(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a model on `device` with weights of `dtype` runs on the C kernels, so its weights
    should be packed at load (fp32 or bf16 on the CPU, with the kernels built)."""
    return device.type == "cpu" and dtype in _WEIGHT_KINDS and _load() is not None


def _plain_f32_cpu(*tensors: torch.Tensor) -> bool:
    for t in tensors:  # a loop, not all(genexpr): this runs for every layer
        if not t.is_cpu or t.dtype != torch.float32 or t.requires_grad:
            return False
    return True


def _weight_kind(weight: torch.Tensor) -> int | None:
    """The kernels' weight flag (0 fp32, 1 bf16) for a CPU weight they can read, else None."""
    if not weight.is_cpu or weight.requires_grad:
        return None
    return _WEIGHT_KINDS.get(weight.dtype)


def linear(x: torch.Tensor, weight: Matrix, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) for x [T, K] and weight [N, K], like `F.linear`. A packed weight runs
    the C kernel (fp32 or bf16, any number of rows; bf16 products are summed in fp32 and each
    result, with its bias, rounded to bf16 once, as torch's CPU GEMM does); a low-bit one its C kernel
    (`quant_linear`); a plain one torch."""
    if isinstance(weight, QuantMatrix):
        return quant_linear(x, weight, bias)
    if not isinstance(weight, PackedMatrix):
        return F.linear(x, weight, bias)
    blocks = weight.blocks
    kind = _weight_kind(blocks)
    n, k = weight.shape
    library = _load()
    if not (library is not None and kind is not None and x.dtype is blocks.dtype and x.dim() == 2 and x.is_cpu
            and x.stride(1) == 1 and blocks.is_contiguous() and blocks.shape == packed_shape(n, k)
            and (bias is None or (bias.shape == (n,) and bias.dtype is blocks.dtype and bias.is_contiguous()
                                  and bias.is_cpu))):
        return F.linear(x, weight.unpack(), bias)
    return _kernel_linear(x, n, k, lambda out: library.linear(
        blocks.data_ptr(), None if bias is None else bias.data_ptr(), x.data_ptr(), out.data_ptr(), kind, n, k,
        x.shape[0], x.stride(0), n, torch.get_num_threads()))


def _kernel_linear(x: torch.Tensor, n: int, k: int, run: Callable[[torch.Tensor], int]) -> torch.Tensor:
    """The [T, N] result of a linear kernel for x [T, K]: checks K, allocates the output and calls
    `run(out)` (a kernel call returning its status) unless there are no rows."""
    if x.shape[1] != k:
        raise ValueError(f"linear: x has {x.shape[1]} columns but weight is {(n, k)}")
    out = x.new_empty(x.shape[0], n)
    if x.shape[0] and run(out) != 0:
        raise MemoryError("linear: out of memory for the kernel's scratch rows")
    return out


def quant_linear(x: torch.Tensor, weight: QuantMatrix, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) for a low-bit weight (`engine.model.dense_quant`): int8 and the 4-bit formats
    on the integer dot-product kernels (activations quantized per row);
    x, bias and the result in the weight's activation dtype (fp32 or bf16). Inputs the kernels do not
    take (another dtype or device, strided rows) get `dense_quant.reference_linear`."""
    n, k = weight.shape
    library = _load()
    kind = _weight_kind(x)
    expected = _dense_layouts(weight.kind, weight.group, len(weight.tensors), n, k)
    if not (library is not None and kind is not None and x.dtype is weight.dtype and x.dim() == 2 and x.stride(1) == 1
            and len(weight.tensors) == len(expected)
            and all(tuple(t.shape) == shape and t.dtype is dtype and t.is_contiguous() and t.is_cpu
                    for t, (shape, dtype) in zip(weight.tensors, expected))
            and (bias is None or (bias.shape == (n,) and bias.dtype is x.dtype and bias.is_contiguous() and bias.is_cpu))):
        return reference_linear(x, weight, bias)
    bias_ptr = None if bias is None else bias.data_ptr()

    def run(out: torch.Tensor) -> int:
        rows, threads = x.shape[0], torch.get_num_threads()
        if weight.kind == WeightKind.INT8:
            codes, scales, sums = weight.tensors
            return library.linear_q8(codes.data_ptr(), scales.data_ptr(), sums.data_ptr(), bias_ptr, x.data_ptr(),
                                     out.data_ptr(), kind, n, k, rows, x.stride(0), n, threads)
        matrix = (ctypes.c_int64 * 3)(*(t.data_ptr() for t in weight.tensors), *([0] * (3 - len(weight.tensors))))
        return library.linear_quant(ctypes.addressof(matrix), weight.kind, weight.group, bias_ptr, x.data_ptr(),
                                    out.data_ptr(), kind, n, k, rows, x.stride(0), n, threads)

    return _kernel_linear(x, n, k, run)


@functools.cache
def _dense_layouts(kind: int, group: int, stored: int, n: int, k: int) -> tuple[tuple[tuple[int, ...], torch.dtype], ...]:
    """(shape, dtype) of each tensor the kernels read for a low-bit [n, k] matrix of weight kind `kind`
    stored as `stored` tensors (int4 with zero points: three); one computation per matrix shape, not per call."""
    zero_points = kind == WeightKind.INT4 and stored == 3
    return tuple(ExpertFormat("", WeightKind(kind), group, zero_points).matrix_layouts(n, k))


def int8_dot_kernel() -> str:
    """The integer dot-product kernel serving int8 and 4-bit weights on this CPU ("torch" without the C kernels)."""
    library = _load()
    return "torch" if library is None else INT8_KERNELS[library.q8_kernel()]


class ExpertRows:
    """The assignment rows of one MoE layer call, grouped by expert, for `expert_ffn`.

    Row r assigns token `tokens[r]` to an expert with routing weight `scale[r]`; its result
    goes to row `dest[r]` of the output. Rows of one expert are contiguous. x (fp32 or bf16)
    is held in fp32, the precision the kernel computes in."""

    def __init__(self, x: torch.Tensor, tokens: torch.Tensor, dest: torch.Tensor, scale: torch.Tensor,
                 ffn: int) -> None:
        rows = tokens.shape[0]
        if not (x.dim() == 2 and x.is_cpu and x.dtype in _WEIGHT_KINDS and dest.shape == scale.shape == (rows,)):
            raise ValueError("ExpertRows needs fp32 or bf16 CPU x [T, H], and tokens, dest, scale of one length")
        self.x = x.float().contiguous()
        self.tokens = tokens.to(torch.int64).contiguous()
        self.dest = dest.to(torch.int64).contiguous()
        self.scale = scale.float().contiguous()
        if rows:  # the kernel trusts the indices: check them once per layer
            low, high = torch.aminmax(self.tokens)
            if int(low) < 0 or int(high) >= x.shape[0]:
                raise ValueError(f"ExpertRows: token indices must be in [0, {x.shape[0]})")
            low, high = torch.aminmax(self.dest)
            if int(low) < 0:
                raise ValueError("ExpertRows: destination rows must be >= 0")
            self.dest_rows = int(high) + 1
        else:
            self.dest_rows = 0
        self.h = torch.empty(rows, 2 * ffn)
        self.act = torch.empty(rows, ffn)
        self.ffn = ffn


ExpertGroup = tuple[int | torch.Tensor, ...]  # (begin, end, *the expert's stored matrices)


def expert_ffn(rows: ExpertRows, out: torch.Tensor, groups: Sequence[ExpertGroup],
               expert_format: ExpertFormat = MODEL_DTYPE) -> None:
    """out[dest[r]] = scale[r] * down(silu(gate x) * up x) for the rows [begin, end) of each
    (begin, end, *matrices) group. In the model dtype the matrices are (gate_up, down) packed
    (`engine.models.weights.pack_expert`: gate_up [2F, H] as [ceil(2F/16), H, 16], down [H, F] as
    [ceil(H/16), F, 16]), all fp32 or all bf16; in a quantized `expert_format` they are the expert's
    stored tensors (`ExpertFormat.encode`, biases excluded). out is fp32. Computed in fp32. Needs the C
    kernels (`packs_weights`)."""
    library = _load()
    if library is None:
        raise RuntimeError("expert_ffn needs the C kernels (packed experts exist only where they load)")
    if not (out.is_contiguous() and out.shape[1] == rows.x.shape[1] and out.shape[0] >= rows.dest_rows
            and _plain_f32_cpu(out)):
        raise ValueError("out must be a contiguous fp32 CPU tensor [rows, hidden] covering every destination row")
    if not groups:
        return
    hidden = rows.x.shape[1]
    if expert_format.quantized:
        kind, group = int(expert_format.kind), expert_format.group
        expected = expert_format.matrix_layouts(2 * rows.ffn, hidden) + expert_format.matrix_layouts(hidden, rows.ffn)
    else:
        dtype = groups[0][2].dtype
        kind, group = _WEIGHT_KINDS.get(dtype), 0
        expected = [(packed_shape(2 * rows.ffn, hidden), dtype), (packed_shape(hidden, rows.ffn), dtype)]
    per_matrix = len(expected) // 2
    n, num_rows = len(groups), rows.tokens.shape[0]
    table = (ctypes.c_int64 * (8 * n))()  # begin[n], end[n], then 6 addresses per group (3 per matrix)
    for i, (begin, end, *matrices) in enumerate(groups):
        # the kernel trusts these: a wrong one would read out of bounds (spelled out: this runs per expert)
        if kind is None or len(matrices) != len(expected) or any(
                tuple(t.shape) != shape or t.dtype is not dtype or not t.is_cpu or not t.is_contiguous()
                for t, (shape, dtype) in zip(matrices, expected)):
            raise ValueError(f"{expert_format.name} expert weights must be contiguous CPU tensors, "
                             "all fp32 or all bf16, of shapes "
                             f"{', '.join(str(shape) for shape, _ in expected)}")
        if not 0 <= begin <= end <= num_rows:
            raise ValueError(f"group rows [{begin}, {end}) outside the {num_rows} assignment rows")
        table[i], table[n + i] = begin, end
        for m in range(2):
            for j, tensor in enumerate(matrices[m * per_matrix:(m + 1) * per_matrix]):
                table[2 * n + 6 * i + 3 * m + j] = tensor.data_ptr()
    base = ctypes.addressof(table)
    status = library.moe_experts(
        rows.x.data_ptr(), hidden, rows.ffn, rows.tokens.data_ptr(), rows.dest.data_ptr(), rows.scale.data_ptr(),
        base, base + 8 * n, base + 16 * n, kind, group,
        n, out.data_ptr(), rows.h.data_ptr(), rows.act.data_ptr(), torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("expert_ffn: out of memory for the kernel's quantized rows")


def kernel_decode_attention(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether `decode_attention` runs the C kernel for these tensors (fp32 or bf16)."""
    if not (q.dim() == 3 and k_cache.dim() == 3 and q.is_contiguous() and k_cache.is_contiguous()
            and q.dtype is k_cache.dtype and _weight_kind(k_cache) is not None and q.is_cpu):
        return False
    return _load() is not None


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                     context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query row per sequence against its cached context: q [B, H, D], caches [S, Hkv, D],
    slots [B, K] (cache slot of each context position, K >= every context length), context_lens [B].
    Returns [B, H * D] in q's dtype (computed in fp32, rounded once). Call only where
    `kernel_decode_attention` said yes."""
    library = _load()
    if library is None:
        raise RuntimeError("decode_attention needs the C kernels (check kernel_decode_attention first)")
    seqs, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    kind = _weight_kind(k_cache)
    if not (kind is not None and v_cache.shape == k_cache.shape and v_cache.dtype is k_cache.dtype
            and v_cache.is_contiguous() and v_cache.is_cpu and k_cache.shape[2] == head_dim and heads % kv_heads == 0):
        raise ValueError("caches must be contiguous fp32 or bf16 CPU [S, Hkv, D] matching q, with Hkv dividing H")
    slots = slots.to(torch.int64).contiguous()
    context_lens = context_lens.to(torch.int64).contiguous()
    if slots.shape[0] != seqs or context_lens.shape != (seqs,) or int(context_lens.max()) > slots.shape[1]:
        raise ValueError("slots must be [B, K] with K >= every context length, context_lens [B]")
    low, high = torch.aminmax(slots)
    if int(low) < 0 or int(high) >= k_cache.shape[0]:
        raise ValueError(f"cache slots must be in [0, {k_cache.shape[0]})")
    out = q.new_empty(seqs, heads * head_dim)
    scratch = torch.empty(seqs * heads, slots.shape[1])
    status = library.paged_decode_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), kind, slots.data_ptr(), slots.shape[1],
        context_lens.data_ptr(), seqs, heads, kv_heads, head_dim, scale, out.data_ptr(), scratch.data_ptr(),
        torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("decode_attention: out of memory for the kernel's scratch rows")
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension, computed in fp32 and cast back like the reference
    implementations (bf16: the normalised row is rounded before the weight multiplies it): one C
    call for fp32 or bf16 CPU rows [T, D], torch otherwise."""
    kind = _weight_kind(x)
    applies = (kind is not None and x.dim() == 2 and x.stride(1) == 1 and weight.shape == x.shape[1:]
               and weight.is_contiguous() and weight.dtype is x.dtype)
    library = _load() if applies else None
    if library is None:
        if x.dtype is torch.float32 and weight.dtype is torch.float32:  # one op, the same bits
            return F.rms_norm(x, x.shape[-1:], weight, eps)
        if x.dtype is torch.bfloat16:  # computed in fp32 inside and rounded once: rms_norm(x.float()).to(bf16)'s bits
            return weight * F.rms_norm(x, x.shape[-1:], eps=eps)
        return weight * F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)
    out = x.new_empty(x.shape)
    library.rms_norm(x.data_ptr(), x.stride(0), weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], eps, kind)
    return out


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding of x [T, heads, Dh] with fp32 cos, sin [T, Dh] (the tables at
    each token's position), like x * cos + rotate_half(x) * sin: one C call for fp32 or bf16 CPU x
    (the same bits as torch's ops in x's dtype), torch otherwise. Returns a new tensor."""
    tokens, heads, head_dim = x.shape
    kind = _weight_kind(x)
    applies = (kind is not None and x.stride(2) == 1 and x.stride(1) == head_dim and head_dim % 2 == 0
               and cos.is_contiguous() and sin.is_contiguous() and cos.shape == sin.shape == (tokens, head_dim)
               and _plain_f32_cpu(cos, sin))
    library = _load() if applies else None
    if library is None:
        half = head_dim // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos[:, None, :].to(x.dtype) + rotated * sin[:, None, :].to(x.dtype)
    out = x.new_empty(tokens, heads, head_dim)
    library.rope(x.data_ptr(), x.stride(0), out.data_ptr(), cos.data_ptr(), sin.data_ptr(), tokens, heads, head_dim, kind)
    return out


class Routing(NamedTuple):
    """One MoE layer's routing, with its (token, slot) assignments grouped by expert.

    Assignment a = t * top_k + slot. `order` lists the assignments sorted (stably) by expert,
    `tokens[i]` is the token of `order[i]` and `scale[i]` its routing weight (fp32, holding
    values of the activations' dtype); `counts[e]` assignments go to expert e."""

    ids: torch.Tensor  # [T, top_k] int64
    counts: list[int]
    order: torch.Tensor  # [T * top_k] int64
    tokens: torch.Tensor  # [T * top_k] int64
    scale: torch.Tensor  # [T * top_k] fp32


def route(logits: torch.Tensor, top_k: int, normalize: bool, act_dtype: torch.dtype,
          override: torch.Tensor | None = None) -> Routing | None:
    """Softmax top-k routing (or the `override` ids [T, top_k]) and the grouping by expert in
    one C call for fp32/bf16 CPU logits [T, E]; None where the kernel does not apply (use the
    torch path). Weights are renormalised to sum 1 with `normalize` and rounded to `act_dtype`."""
    kind = _weight_kind(logits)
    if kind is None or logits.dtype is not act_dtype or logits.dim() != 2 or not logits.is_contiguous():
        return None
    library = _load()
    if library is None:
        return None
    tokens, experts = logits.shape
    if not 0 < top_k <= experts:
        raise ValueError(f"top_k must be in [1, {experts}], got {top_k}")
    if override is not None:
        override = override.to(torch.int64).contiguous()
        if override.shape != (tokens, top_k) or not bool(((override >= 0) & (override < experts)).all()):
            raise ValueError(f"routing override must be [{tokens}, {top_k}] expert ids below {experts}")
    ids = torch.empty(tokens, top_k, dtype=torch.int64)
    counts = torch.empty(experts, dtype=torch.int64)
    order, token = torch.empty(tokens * top_k, dtype=torch.int64), torch.empty(tokens * top_k, dtype=torch.int64)
    scale = torch.empty(tokens * top_k)
    status = library.route(logits.data_ptr(), kind, tokens, experts, top_k,
                           None if override is None else override.data_ptr(), int(normalize), ids.data_ptr(),
                           counts.data_ptr(), order.data_ptr(), token.data_ptr(), scale.data_ptr())
    if status != 0:
        raise MemoryError("route: out of memory for the kernel's scratch rows")
    return Routing(ids, counts.tolist(), order, token, scale)


def main() -> None:
    """`python -m engine.models.cpu_kernels`: compile ahead of time (images); fails if it cannot."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if kernel_flavour() == "torch":
        raise SystemExit("the C kernels could not be built (see the warning above)")


if __name__ == "__main__":
    main()
