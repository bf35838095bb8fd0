"""Dense linear layers stored low-bit (`--weight-dtype int8 | int4`): the C kernels against the plain
torch references for batch 1 to 64 and odd shapes, every build's bits, the stored layouts, and the
quantized model's next-token distributions against the model dtype's."""

from __future__ import annotations

import pytest
import torch

from moe_serve.cache_policies.native_build import LoadOnce, cpu_flags
from moe_serve.engine.builder import build_engine
from moe_serve.engine.config import EngineConfig
from moe_serve.engine.model import cpu_kernels
from moe_serve.engine.model.cpu_kernels import int8_dot_kernel, kernel_flavour, linear
from moe_serve.engine.model.dense_quant import (
    dense_layouts,
    dequantize_dense,
    matrix_rows,
    quantize_activations,
    quantize_dense,
    reference_linear,
)
from moe_serve.engine.model.loader import load_model
from moe_serve.engine.model.packed import PackedMatrix, QuantMatrix
from moe_serve.engine.model.quant import WeightKind, pack, parse_expert_dtype
from moe_serve.engine.model.weights import pack_dense
from tests.helpers import engine_logits, make_tiny_checkpoint, parity_prompts

needs_kernel = pytest.mark.skipif(kernel_flavour() == "torch", reason="the C kernels are not built here")
SHAPES = [(40, 12), (96, 72), (200, 33), (17, 130)]  # outputs not a multiple of 16, inputs not of 4 or 64
BATCHES = (1, 2, 7, 9, 31, 64)
FOUR_BIT = ("int4-g32", "int4-g64", "int4-g128", "int4-g64-sym", "mxfp4")
DTYPES = (torch.float32, torch.bfloat16)


def _problem(n: int, k: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=generator).to(dtype)
    x = torch.randn(max(BATCHES), k, generator=generator).to(dtype)
    return weight, x, torch.randn(n, generator=generator).to(dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_int8_kernel_gives_the_reference_bits(shape: tuple[int, int], dtype: torch.dtype) -> None:
    weight, x, bias = _problem(*shape, dtype)
    matrix = quantize_dense(weight, "int8")
    for rows in BATCHES:
        for b in (None, bias):
            assert torch.equal(linear(x[:rows], matrix, b), reference_linear(x[:rows], matrix, b)), (rows, b is None)


def _four_bit(weight: torch.Tensor, name: str) -> QuantMatrix:
    """weight stored in the 4-bit format `name` (any int4 variant or MXFP4) as a dense matrix."""
    logical = parse_expert_dtype(name).quantize(weight)
    return QuantMatrix(logical.kind, pack(logical), weight.shape[0], weight.shape[1], logical.group, weight.dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", FOUR_BIT)
def test_4bit_kernels_give_the_reference_bits(name: str, shape: tuple[int, int], dtype: torch.dtype) -> None:
    """Integer dot products per group, scaled per group in a fixed order: `dense_quant.int4_linear`'s bits."""
    weight, x, bias = _problem(*shape, dtype, seed=1)
    matrix = _four_bit(weight, name)
    for rows in BATCHES:
        for b in (None, bias):
            assert torch.equal(linear(x[:rows], matrix, b), reference_linear(x[:rows], matrix, b)), (rows, b is None)


@pytest.mark.parametrize("name", FOUR_BIT)
def test_the_4bit_reference_is_the_dequantized_product_on_quantized_activations(name: str) -> None:
    """int4_linear = x's per-row codes times the reference dequantization (`quant.dequantize`), up to fp32 sums."""
    weight, x, _ = _problem(96, 200, torch.float32, seed=6)
    matrix = _four_bit(weight, name)
    codes, scales = quantize_activations(x)
    plain = (codes.double() @ dequantize_dense(matrix).double().T * scales.double()[:, None]).float()
    torch.testing.assert_close(reference_linear(x, matrix), plain, rtol=1e-5, atol=1e-5 * plain.abs().max().item())


@pytest.mark.parametrize("weight_dtype", ("int8", "int4"))
def test_the_references_are_close_to_the_full_precision_product(weight_dtype: str) -> None:
    weight, x, bias = _problem(200, 130, torch.float32, seed=2)
    exact = torch.nn.functional.linear(x, weight, bias)
    error = (reference_linear(x, quantize_dense(weight, weight_dtype), bias) - exact).norm() / exact.norm()
    assert error < (0.02 if weight_dtype == "int8" else 0.12)


def test_activation_quantization_is_per_row_and_keeps_zero_rows_zero() -> None:
    x = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [254.0, 1.0, -127.0]])
    codes, scales = quantize_activations(x)
    torch.testing.assert_close(scales, torch.tensor([1 / 127, 0.0, 2.0]))
    assert codes.tolist() == [[64.0, -127.0, 32.0], [0.0, 0.0, 0.0], [127.0, 0.0, -64.0]]  # 63.5 and -63.5: to even


@needs_kernel
@pytest.mark.parametrize("weight_dtype", ("int8", "int4"))
def test_rows_do_not_depend_on_the_batch(weight_dtype: str) -> None:
    weight, x, bias = _problem(96, 72, torch.float32, seed=3)
    matrix = quantize_dense(weight, weight_dtype)
    batched = linear(x, matrix, bias)
    for row in (0, 13, 63):
        assert torch.equal(linear(x[row:row + 1], matrix, bias)[0], batched[row])


@needs_kernel
def test_the_portable_and_avx2_builds_give_the_vector_builds_bits(monkeypatch) -> None:
    if "fma" not in cpu_flags() or "avx2" not in cpu_flags():
        pytest.skip("needs a CPU with AVX2 and FMA to compare the builds")
    problems = []
    for seed, (n, k) in enumerate(SHAPES):
        weight, x, bias = _problem(n, k, torch.bfloat16, seed=seed)
        problems += [(quantize_dense(weight, "int8"), x[:9], bias)]
        problems += [(_four_bit(weight, name), x[:9], bias) for name in FOUR_BIT]
    vector = [linear(x, matrix, bias) for matrix, x, bias in problems]
    for flags, kernel in ((["-mavx2", "-mfma", "-mf16c"], 1), (["-mfma"], 0)):
        library = cpu_kernels.open_library(cpu_kernels.build_library(flags))
        assert library.q8_kernel() == kernel
        monkeypatch.setattr(cpu_kernels, "_kernels", LoadOnce(lambda library=library: (library, "c")))
        for (matrix, x, bias), expected in zip(problems, vector, strict=True):
            assert torch.equal(linear(x, matrix, bias), expected), (flags, matrix.kind, matrix.shape)


@pytest.mark.parametrize("weight_dtype", ("int8", "int4"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_stored_layouts_and_embedding_rows(weight_dtype: str, dtype: torch.dtype) -> None:
    weight, _, _ = _problem(200, 33, dtype, seed=4)
    matrix = quantize_dense(weight, weight_dtype)
    assert [(tuple(t.shape), t.dtype) for t in matrix.tensors] == dense_layouts(200, 33, weight_dtype)
    assert matrix.kind == (WeightKind.INT8 if weight_dtype == "int8" else WeightKind.INT4)
    ids = torch.tensor([0, 15, 16, 199, 7])
    assert torch.equal(matrix_rows(matrix, ids), dequantize_dense(matrix)[ids].to(dtype))
    large = quantize_dense(torch.randn(256, 1024).to(dtype), weight_dtype)  # per weight: int8 1.008 bytes, int4 0.56
    assert large.nbytes() / (256 * 1024) < (1.01 if weight_dtype == "int8" else 0.57)


@needs_kernel
def test_the_int8_kernel_is_named() -> None:
    assert int8_dot_kernel() in cpu_kernels.INT8_KERNELS


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return make_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("mixtral"), num_hidden_layers=4)


@needs_kernel
def test_pack_dense_quantizes_the_products_but_not_the_routers(mixtral) -> None:
    dense = load_model(mixtral, dtype="bfloat16", show_progress=False).weights.dense
    packed, quantized = pack_dense(dense), pack_dense(dense, "int8")
    layer = quantized.layers[0]
    assert all(isinstance(m, QuantMatrix) for m in (layer.attention.qkv, layer.attention.o, quantized.lm_head))
    assert isinstance(layer.router, PackedMatrix)
    assert layer.attention.qkv.nbytes() < 0.65 * packed.layers[0].attention.qkv.nbytes()  # K = 32: 40 bytes a row, not 64
    assert quantized.nbytes() < packed.nbytes()
    ids = torch.tensor([1, 2, 3])
    torch.testing.assert_close(quantized.embed(ids), dense.embed(ids))  # the embedding table stays (untied here)


def _engine(path, dtype: str, **overrides):
    return build_engine(EngineConfig(model=str(path), dtype=dtype, max_num_batched_tokens=64, **overrides),
                        show_progress=False)


def _kl_and_agreement(path, weight_dtype: str, dtype: str) -> tuple[float, float]:
    """Mean KL of the next-token distribution and top-1 agreement of the `--weight-dtype` engine vs
    the model dtype's, over every prompt position."""
    reference, ours = _engine(path, dtype), _engine(path, dtype, weight_dtype=weight_dtype)
    assert isinstance(ours.runner.model.dense.layers[0].attention.qkv, QuantMatrix)
    prompts = parity_prompts(reference.runner.model.spec.vocab_size)
    expected, got = torch.cat(engine_logits(reference, prompts)), torch.cat(engine_logits(ours, prompts))
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), expected.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1)
    return kl.mean().item(), (got.argmax(-1) == expected.argmax(-1)).float().mean().item()


@needs_kernel
@pytest.mark.parametrize("weight_dtype", ("int8", "int4"))
def test_quantized_dense_weights_keep_the_next_token_distribution(mixtral, weight_dtype: str) -> None:
    kl, agreement = _kl_and_agreement(mixtral, weight_dtype, "bfloat16")
    assert kl < (1e-4 if weight_dtype == "int8" else 1e-3)  # measured: 1.0e-6 and 1.1e-4
    assert agreement >= (0.95 if weight_dtype == "int8" else 0.8)  # measured: 1.0 and 0.91
