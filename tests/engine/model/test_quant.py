"""Low-bit expert formats: the reference quantization, the packed layout, byte sizes, and the C
expert kernel against the plain-torch reference dequantization for every format."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_serve.cache_policies.native_build import LoadOnce, cpu_flags
from moe_serve.engine.model import cpu_kernels
from moe_serve.engine.model.cpu_kernels import ExpertRows, expert_ffn, kernel_flavour
from moe_serve.engine.model.dense_quant import int4_linear, int8_linear
from moe_serve.engine.model.mxfp4 import dequantize as dequantize_published_mxfp4
from moe_serve.engine.model.quant import (
    MODEL_DTYPE,
    ExpertFormat,
    WeightKind,
    dequantize,
    mxfp4_from_published,
    pack,
    parse_expert_dtype,
    quantize_mxfp4,
    unpack,
)
from tests.helpers import quantize_mxfp4 as quantize_published_mxfp4

FORMATS = ("int8", "int4-g32", "int4-g64", "int4-g128", "int4-g64-sym", "mxfp4")


def _group(fmt: ExpertFormat, cols: int) -> int:
    return cols if fmt.kind is WeightKind.INT8 else fmt.group


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("shape", [(1, 1), (17, 33), (48, 200), (5, 129)])
def test_packing_round_trips_and_sizes_count_the_real_bytes(name: str, shape: tuple[int, int]) -> None:
    fmt = parse_expert_dtype(name)
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0]))
    quantized = fmt.quantize(weight)
    stored = pack(quantized)
    assert [(tuple(t.shape), t.dtype) for t in stored] == fmt.matrix_layouts(*shape)
    assert sum(t.numel() * t.element_size() for t in stored) == fmt.matrix_nbytes(*shape, torch.bfloat16)
    back = unpack(fmt.kind, stored, *shape, _group(fmt, shape[1]))
    assert torch.equal(back.codes, quantized.codes) and torch.equal(back.scales, quantized.scales)
    assert (back.zeros is None) == (quantized.zeros is None) == (not fmt.zero_points)
    if back.zeros is not None:
        assert torch.equal(back.zeros, quantized.zeros)


@pytest.mark.parametrize("name", ["int8", "int4-g32", "int4-g128", "int4-g64-sym"])
def test_integer_codes_are_within_half_a_step_of_the_weight(name: str) -> None:
    """Half a step; with zero points a group's extremes up to one step (the rounded zero point shifts the grid)."""
    fmt = parse_expert_dtype(name)
    weight = torch.randn(40, 300, generator=torch.Generator().manual_seed(1)) * 0.02
    quantized = fmt.quantize(weight)
    step = quantized.scales.float()[:, torch.arange(300) // _group(fmt, 300)]
    error = (dequantize(quantized) - weight).abs()
    bound = step if fmt.zero_points else step / 2
    assert bool((error <= bound * (1 + 1e-3)).all())
    if fmt.kind is WeightKind.INT4:
        assert int(quantized.codes.max()) <= 15 and quantized.scales.dtype is torch.float16


def test_int4_zero_points_represent_zero_exactly_and_fit_one_sided_groups() -> None:
    weight = torch.rand(4, 64) + 0.5  # every value positive: the range is widened to hold 0
    quantized = parse_expert_dtype("int4-g32").quantize(weight)
    assert bool((quantized.zeros == 0).all())
    assert torch.equal(dequantize(parse_expert_dtype("int4-g32").quantize(torch.zeros(2, 32))), torch.zeros(2, 32))


def test_mxfp4_matches_the_published_layout_and_its_dequantization() -> None:
    """Quantizing gives the gpt-oss checkpoint's codes and exponents; the codes read back from the
    published layout dequantize to what `engine.model.mxfp4` (checked against transformers) gives."""
    weight = torch.randn(24, 128, generator=torch.Generator().manual_seed(2)) * 0.05
    blocks, scales = quantize_published_mxfp4(weight)
    ours = quantize_mxfp4(weight)
    published = mxfp4_from_published(blocks, scales)
    assert torch.equal(ours.scales, published.scales)
    assert torch.equal(dequantize(ours), dequantize(published))  # codes may differ only as -0 / +0
    assert torch.equal(dequantize(published), dequantize_published_mxfp4(blocks, scales, torch.float32))


def test_names_of_the_option() -> None:
    assert parse_expert_dtype("auto") is None and parse_expert_dtype("model") is MODEL_DTYPE
    assert parse_expert_dtype("int4") == ExpertFormat("int4-g64", WeightKind.INT4, 64, True)
    assert parse_expert_dtype("int4-g128-sym") == ExpertFormat("int4-g128-sym", WeightKind.INT4, 128, False)
    for bad in ("int4-g48", "int2", "fp8", "int4-sym-g32"):
        with pytest.raises(ValueError, match="unknown expert dtype"):
            parse_expert_dtype(bad)


@pytest.mark.parametrize("name", FORMATS)
def test_decode_keeps_biases_and_dequantizes_each_matrix(name: str) -> None:
    fmt = parse_expert_dtype(name)
    gen = torch.Generator().manual_seed(4)
    gate_up, down, biases = torch.randn(24, 40, generator=gen), torch.randn(40, 12, generator=gen), \
        (torch.randn(24, generator=gen), torch.randn(40, generator=gen))
    stored = fmt.encode((gate_up, down, *biases))
    assert len(stored) == 2 * fmt.tensors_per_matrix + 2
    got = fmt.decode(stored, hidden=40, ffn=12, dtype=torch.bfloat16)
    assert torch.equal(got[0], dequantize(fmt.quantize(gate_up), torch.bfloat16))
    assert torch.equal(got[1], dequantize(fmt.quantize(down), torch.bfloat16))
    assert got[2] is biases[0] and got[3] is biases[1]


# -- the C kernel against the reference ----------------------------------------------------------

needs_kernel = pytest.mark.skipif(kernel_flavour() == "torch", reason="no C compiler here: torch serves every call")


def _problem(tokens: int, hidden: int, ffn: int, experts: int = 5, top_k: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    weights = [(torch.randn(2 * ffn, hidden, generator=gen) * 0.1, torch.randn(hidden, ffn, generator=gen) * 0.1)
               for _ in range(experts)]
    x = torch.randn(tokens, hidden, generator=gen)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    return x, ids, torch.rand(tokens, top_k, generator=gen), weights


def _kernel(fmt: ExpertFormat, x, ids, routing, stored, ffn: int, split: bool = False) -> torch.Tensor:
    top_k = ids.shape[1]
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=len(stored)).tolist()
    starts = [sum(counts[:e]) for e in range(len(counts))]
    groups = [(starts[e], starts[e] + c, *stored[e]) for e, c in enumerate(counts) if c]
    rows = ExpertRows(x, order // top_k, order, routing.flatten()[order], ffn)
    out = torch.zeros(flat.numel(), x.shape[1])
    for part in ([[g] for g in reversed(groups)] if split else [groups]):
        expert_ffn(rows, out, part, fmt)
    return out


def _reference(fmt: ExpertFormat, x, ids, routing, stored, hidden: int, ffn: int) -> torch.Tensor:
    """Plain torch, one (token, slot) row at a time, as the kernels compute each format: the activations
    quantized per row, exact integer sums (`dense_quant.int8_linear`, `dense_quant.int4_linear`)."""
    top_k = ids.shape[1]
    logical = [[unpack(fmt.kind, m, rows, cols, _group(fmt, cols)) for m, rows, cols in
                zip(fmt.matrices(s)[:2], (2 * ffn, hidden), (hidden, ffn), strict=True)] for s in stored]
    if fmt.kind is WeightKind.INT8:
        products = [[lambda v, q=q: int8_linear(v[None], q.codes, q.scales[:, 0])[0] for q in pair] for pair in logical]
    else:
        products = [[lambda v, q=q: int4_linear(v[None], q)[0] for q in pair] for pair in logical]
    out = torch.zeros(ids.numel(), hidden)
    for row, expert in enumerate(ids.flatten().tolist()):
        gate_up, down = products[expert]
        gate, up = gate_up(x[row // top_k]).chunk(2)
        out[row] = down(F.silu(gate) * up) * routing.flatten()[row]
    return out


@needs_kernel
@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize(("hidden", "ffn"), [(40, 12), (96, 72), (200, 33)])
def test_kernel_matches_the_reference_dequantization(name: str, hidden: int, ffn: int) -> None:
    """Odd shapes (outputs not a multiple of the 16-output block, K not a multiple of the group) and
    batches of 1 to 64 tokens."""
    fmt = parse_expert_dtype(name)
    x, ids, routing, weights = _problem(64, hidden, ffn, seed=hidden)
    stored = [fmt.encode(w) for w in weights]
    for tokens in (1, 2, 7, 31, 64):
        args = (x[:tokens], ids[:tokens], routing[:tokens], stored)
        expected = _reference(fmt, *args, hidden, ffn)
        # silu's last bit (C expf vs torch) may move an activation code by one step
        torch.testing.assert_close(_kernel(fmt, *args, ffn), expected, rtol=2e-3, atol=2e-3 * expected.abs().max())


@needs_kernel
@pytest.mark.parametrize("name", FORMATS)
def test_kernel_rows_do_not_depend_on_batch_or_grouping(name: str) -> None:
    fmt = parse_expert_dtype(name)
    x, ids, routing, weights = _problem(20, 64, 40, seed=3)
    stored = [fmt.encode(w) for w in weights]
    batched = _kernel(fmt, x, ids, routing, stored, 40)
    assert torch.equal(_kernel(fmt, x, ids, routing, stored, 40, split=True), batched)
    for t in (0, 7, 19):
        alone = _kernel(fmt, x[t:t + 1], ids[t:t + 1], routing[t:t + 1], stored, 40)
        assert torch.equal(alone, batched[2 * t:2 * t + 2])


@needs_kernel
def test_kernel_refuses_stored_tensors_of_another_format() -> None:
    x, ids, routing, weights = _problem(2, 40, 12)
    int4 = parse_expert_dtype("int4-g32")
    stored = [int4.encode(w) for w in weights]
    with pytest.raises(ValueError, match="mxfp4 expert weights must be"):
        _kernel(parse_expert_dtype("mxfp4"), x, ids, routing, stored, 12)
    with pytest.raises(ValueError, match="int4-g32-sym expert weights must be"):
        _kernel(parse_expert_dtype("int4-g32-sym"), x, ids, routing, stored, 12)


@needs_kernel
def test_the_portable_and_avx2_builds_give_the_vector_builds_bits(monkeypatch) -> None:
    if kernel_flavour() == "c" or not {"fma", "avx2", "f16c"} <= cpu_flags():
        pytest.skip("needs a CPU with AVX2, FMA and F16C and a vector build to compare with")
    x, ids, routing, weights = _problem(9, 72, 40, seed=5)
    problems = [(parse_expert_dtype(name), [parse_expert_dtype(name).encode(w) for w in weights]) for name in FORMATS]
    vector = [_kernel(fmt, x, ids, routing, stored, 40) for fmt, stored in problems]
    for flags in (["-mavx2", "-mfma", "-mf16c"], ["-mfma"]):
        library = cpu_kernels.open_library(cpu_kernels.build_library(flags))
        monkeypatch.setattr(cpu_kernels, "_kernels", LoadOnce(lambda library=library: (library, "c")))
        for (fmt, stored), tiled in zip(problems, vector, strict=True):
            assert torch.equal(_kernel(fmt, x, ids, routing, stored, 40), tiled), (flags, fmt.name)
