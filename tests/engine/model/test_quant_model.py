"""Quantized experts through the engine (`expert_dtype`): loading in each format (MXFP4 checkpoints
kept 4-bit), offloading that leaves the greedy tokens unchanged, and the torch path against the C kernel."""

from __future__ import annotations

import pytest
import torch

from moe_serve.engine.builder import build_engine
from moe_serve.engine.config import EngineConfig
from moe_serve.engine.errors import ModelLoadError
from moe_serve.engine.model.cpu_kernels import kernel_flavour
from moe_serve.engine.model.loader import load_model
from moe_serve.engine.model.moe_model import MoEModel
from moe_serve.engine.model.mxfp4 import MXFP4Expert
from moe_serve.engine.model.quant import MODEL_DTYPE, MXFP4_FORMAT, WeightKind, parse_expert_dtype
from moe_serve.engine.offload.provider import OffloadedExperts
from moe_serve.engine.types import ExpertKey
from tests.helpers import (
    MIN_FRACTION,
    engine_logits,
    make_mxfp4_checkpoint,
    make_tiny_checkpoint,
    parity_prompts,
    run_to_completion,
    workload,
)

FORMATS = ("int8", "int4-g32", "int4-g64-sym", "mxfp4")


def quantized_engine(path, expert_dtype: str, packed: bool | None = None, **overrides):
    """An engine whose experts are stored as `expert_dtype` (`--expert-dtype`); `packed=False`
    rebuilds its model over the same parts with the experts run in the torch path."""
    overrides.setdefault("dtype", "float32")
    config = EngineConfig(model=str(path), max_num_batched_tokens=16, expert_dtype=expert_dtype, **overrides)
    engine = build_engine(config, show_progress=False)
    if packed is not None:
        model = engine.runner.model
        engine.runner.model = MoEModel(model.spec, model.dense, model.experts, model.device, packed=packed,
                                       expert_format=model.expert_format)
    return engine


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    return make_tiny_checkpoint("mixtral", tmp_path_factory.mktemp("mixtral"), num_hidden_layers=4)


@pytest.mark.parametrize("name", FORMATS)
def test_loading_quantizes_every_expert_into_its_stored_layout(mixtral, name: str) -> None:
    fmt = parse_expert_dtype(name)
    loaded = load_model(mixtral, dtype="float32", show_progress=False, expert_dtype=name)
    assert loaded.expert_format == fmt
    spec = loaded.spec
    hidden, ffn = spec.hidden_size, spec.moe_intermediate_size
    expected = fmt.matrix_layouts(2 * ffn, hidden) + fmt.matrix_layouts(hidden, ffn)
    stored = loaded.weights.experts[ExpertKey(1, 3)]
    assert [(tuple(t.shape), t.dtype) for t in stored] == expected
    plain = load_model(mixtral, dtype="float32", show_progress=False).weights.experts[ExpertKey(1, 3)]
    assert all(torch.equal(a, b) for a, b in zip(fmt.decode(stored, hidden, ffn, torch.float32),
                                                   fmt.decode(fmt.encode(plain), hidden, ffn, torch.float32)))


def test_an_unknown_expert_dtype_is_refused(mixtral) -> None:
    with pytest.raises(ModelLoadError, match="unknown expert dtype 'int3'"):
        load_model(mixtral, show_progress=False, expert_dtype="int3")
    with pytest.raises(ValueError, match="expert_dtype"):
        EngineConfig(expert_dtype="int4-g48")


@pytest.mark.parametrize(("name", "dtype"), [("int8", "float32"), ("int4-g32", "bfloat16"),
                                             ("int4-g64-sym", "float32"), ("mxfp4", "bfloat16")])
def test_offloading_keeps_the_quantized_models_greedy_tokens(mixtral, name: str, dtype: str) -> None:
    resident = quantized_engine(mixtral, name, dtype=dtype, offload="off")
    offloaded = quantized_engine(mixtral, name, dtype=dtype, expert_cache_fraction=MIN_FRACTION)
    assert isinstance(offloaded.runner.model.experts, OffloadedExperts)
    assert offloaded.runner.model.experts.cache.store.expert_nbytes < 2**10 + sum(
        t.numel() * t.element_size() for t in load_model(mixtral, dtype=dtype, show_progress=False,
                                                         expert_dtype=name).weights.experts[ExpertKey(0, 0)])
    assert run_to_completion(offloaded, workload()) == run_to_completion(resident, workload())


@pytest.mark.skipif(kernel_flavour() == "torch", reason="needs the C kernels to compare with")
@pytest.mark.parametrize("name", FORMATS)
def test_the_torch_path_computes_what_the_kernel_computes(mixtral, name: str) -> None:
    kernel = quantized_engine(mixtral, name)
    torch_path = quantized_engine(mixtral, name, packed=False)
    prompts = parity_prompts(kernel.vocab_size)
    # the kernels quantize the activations per row too, the torch path keeps them (measured 2.4e-4 to 4.3e-4)
    for ours, theirs in zip(engine_logits(kernel, prompts), engine_logits(torch_path, prompts), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=2e-3, atol=2e-3)


def test_slots_are_sized_for_the_quantized_expert(mixtral) -> None:
    sizes = {}
    for name in ("model", "int8", "int4-g32", "mxfp4"):
        engine = quantized_engine(mixtral, name, expert_cache_fraction=MIN_FRACTION)
        cache = engine.runner.model.experts.cache
        sizes[name] = cache.store.expert_nbytes
        assert cache.store.nbytes == sizes[name] * 4 * 8
    assert sizes["int8"] < sizes["model"] / 3 and sizes["int4-g32"] < sizes["model"] / 5
    assert sizes["mxfp4"] < sizes["model"] / 6


@pytest.fixture(scope="module")
def mxfp4_checkpoint(tmp_path_factory):
    return make_mxfp4_checkpoint(tmp_path_factory.mktemp("gpt-oss-mxfp4"), num_hidden_layers=4)


def test_auto_keeps_an_mxfp4_checkpoint_4_bit_and_model_expands_it_lazily(mxfp4_checkpoint) -> None:
    auto = load_model(mxfp4_checkpoint, dtype="float32", show_progress=False, expert_dtype="auto")
    assert auto.expert_format is MXFP4_FORMAT and auto.expert_format.kind is WeightKind.MXFP4
    codes = auto.weights.experts[ExpertKey(1, 2)]
    assert [t.dtype for t in codes] == [torch.uint8] * 4 + [torch.float32] * 2  # codes and scales x 2, biases
    lazy = load_model(mxfp4_checkpoint, dtype="float32", show_progress=False, expert_dtype="model")
    assert lazy.expert_format is MODEL_DTYPE and isinstance(lazy.weights.experts[ExpertKey(1, 2)], MXFP4Expert)
    spec = auto.spec
    decoded = MXFP4_FORMAT.decode(codes, spec.hidden_size, spec.moe_intermediate_size, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(decoded, lazy.weights.experts[ExpertKey(1, 2)], strict=True))


@pytest.mark.parametrize("offload", [dict(offload="off"), dict(expert_cache_fraction=MIN_FRACTION)])
def test_gpt_oss_served_from_4_bit_experts_gives_the_expanded_models_tokens(mxfp4_checkpoint, offload) -> None:
    """gpt-oss' biased, clamped experts run in torch, dequantized one expert at a time from the codes
    in the host tier and the slots; the values are exact, so the tokens are the expanded model's."""
    four_bit = quantized_engine(mxfp4_checkpoint, "auto", **offload)
    assert four_bit.runner.model.expert_format is MXFP4_FORMAT
    if "expert_cache_fraction" in offload:
        store = four_bit.runner.model.experts.cache.store
        assert store.layouts[0].dtype is torch.uint8
    expanded = quantized_engine(mxfp4_checkpoint, "model", offload="off")
    assert not expanded.runner.model.expert_format.quantized
    assert run_to_completion(four_bit, workload()) == run_to_completion(expanded, workload())
