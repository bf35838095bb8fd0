"""Invariant 2: each architecture (and each generic feature: rope scalings, dense layers) matches
transformers' logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch

from moe_serve.engine.builder import build_engine
from moe_serve.engine.config import EngineConfig
from moe_serve.engine.core.request import EngineRequest
from moe_serve.engine.core.sampling_params import SamplingParams
from moe_serve.engine.model.packed import PackedMatrix
from tests.helpers import (
    ARCHITECTURES,
    NEW_ARCHITECTURES,
    VARIANTS,
    engine_logits,
    hf_model,
    hf_next_tokens,
    make_tiny_checkpoint,
    parity_prompts,
    run_to_completion,
)


@pytest.fixture(scope="module", params=ARCHITECTURES + NEW_ARCHITECTURES + tuple(VARIANTS))
def arch_checkpoint(request, checkpoint_factory):
    """(name, checkpoint dir) for each architecture and each feature variant."""
    return request.param, checkpoint_factory(request.param)


def test_logits_match_transformers(arch_checkpoint) -> None:
    _, path = arch_checkpoint
    engine = build_engine(EngineConfig(model=str(path), dtype="float32"), show_progress=False)
    oracle = hf_model(path)
    prompts = parity_prompts(engine.vocab_size)
    with torch.inference_mode():
        for prompt, got in zip(prompts, engine_logits(engine, prompts), strict=True):
            expected = oracle(torch.tensor([prompt])).logits[0]
            assert (got - expected).abs().max().item() <= 1e-4


def test_tied_embeddings_match_transformers_with_one_packed_table(tmp_path) -> None:
    path = make_tiny_checkpoint("mixtral", tmp_path / "tied", tie_word_embeddings=True)
    engine = build_engine(EngineConfig(model=str(path), dtype="float32"), show_progress=False)
    dense = engine.runner.model.dense
    if isinstance(dense.lm_head, PackedMatrix):  # the C kernels: the embedding lookups read the packed lm_head
        assert dense.embed_tokens is dense.lm_head
    oracle = hf_model(path)
    prompts = parity_prompts(engine.vocab_size)
    with torch.inference_mode():
        for prompt, got in zip(prompts, engine_logits(engine, prompts), strict=True):
            assert (got - oracle(torch.tensor([prompt])).logits[0]).abs().max().item() <= 1e-4


def test_bf16_is_as_close_to_the_fp32_logits_as_transformers_bf16(arch_checkpoint) -> None:
    """In bf16 (through the C kernels on packed weights) the engine's error against the fp32
    oracle is no larger than transformers' own bf16 error, give or take."""
    _, path = arch_checkpoint
    engine = build_engine(EngineConfig(model=str(path), dtype="bfloat16"), show_progress=False)
    truth, theirs = hf_model(path), hf_model(path, torch.bfloat16)
    prompts = parity_prompts(engine.vocab_size)
    with torch.inference_mode():
        for prompt, ours in zip(prompts, engine_logits(engine, prompts), strict=True):
            expected = truth(torch.tensor([prompt])).logits[0]
            their_error = (theirs(torch.tensor([prompt])).logits[0].float() - expected).abs().max().item()
            our_error = (ours - expected).abs().max().item()
            assert our_error <= 2 * their_error + 1e-3, (our_error, their_error)


def test_greedy_tokens_match_transformers_for_32_steps(arch_checkpoint) -> None:
    _, path = arch_checkpoint
    engine = build_engine(EngineConfig(model=str(path), dtype="float32"), show_progress=False)
    oracle = hf_model(path)
    prompts = parity_prompts(engine.vocab_size)
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    requests = [EngineRequest(f"r{i}", p, params) for i, p in enumerate(prompts)]
    tokens = run_to_completion(engine, {0: requests})
    for i, prompt in enumerate(prompts):
        assert len(tokens[f"r{i}"]) == 32
        assert tokens[f"r{i}"] == hf_next_tokens(oracle, prompt, tokens[f"r{i}"])
