"""Tiny random Hugging Face checkpoints for tests, written with transformers' save_pretrained."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def tiny_config(arch: str, vocab_size: int, **overrides: Any) -> Any:
    """A small config of `arch` (2 layers, 8 experts, top-2) with real HF classes."""
    import transformers

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        num_experts_per_tok=2,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    if arch == "mixtral":
        cfg = dict(common, intermediate_size=48, num_local_experts=8, sliding_window=None)
        cls = transformers.MixtralConfig
    elif arch == "qwen2_moe":
        cfg = dict(common, intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                   num_experts=8, norm_topk_prob=False)
        cls = transformers.Qwen2MoeConfig
    elif arch == "qwen3_moe":
        cfg = dict(common, intermediate_size=64, moe_intermediate_size=24, num_experts=8, norm_topk_prob=True,
                   head_dim=16)
        cls = transformers.Qwen3MoeConfig
    elif arch == "olmoe":
        cfg = dict(common, intermediate_size=24, num_experts=8, norm_topk_prob=False, clip_qkv=None)
        cls = transformers.OlmoeConfig
    else:
        raise ValueError(f"unknown arch {arch!r}; known: {ARCHITECTURES}")
    cfg.update(overrides)
    return cls(**cfg)


def make_tiny_checkpoint(arch: str, directory: Path, seed: int = 0, max_shard_size: str | None = None,
                         **overrides: Any) -> Path:
    """Write a tiny random checkpoint of `arch` plus a byte-level BPE tokenizer into `directory`."""
    import transformers

    from engine.tokenizer_builder import build_byte_level_tokenizer, save_tokenizer

    tokenizer = build_byte_level_tokenizer()
    config = tiny_config(arch, len(tokenizer), **overrides)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # HF inits routers to zero for some archs: make routing non-trivial
        for name, param in model.named_parameters():
            if name.endswith("gate.weight") or "norm" in name:
                param.normal_(mean=1.0 if "norm" in name else 0.0, std=0.5 if "norm" not in name else 0.1)
    directory.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    save_tokenizer(tokenizer, directory)
    return directory


def hf_model(directory: Path, dtype: torch.dtype = torch.float32) -> Any:
    """The transformers oracle for a checkpoint, in eval mode, fp32 unless told otherwise."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    return model.eval()


def hf_greedy(model: Any, prompt_ids: list[int], num_tokens: int) -> list[int]:
    """Greedy continuation by the transformers oracle (full recompute each step, no eos stop)."""
    ids = torch.tensor([prompt_ids])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(num_tokens):
            token = int(model(ids).logits[0, -1].argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def run_to_completion(engine: Any, arrivals: dict[int, list[Any]]) -> dict[str, list[int]]:
    """Drive a sync LLMEngine; `arrivals[step]` requests join before that step. Returns tokens per request."""
    tokens: dict[str, list[int]] = {}
    step = 0
    while engine.has_unfinished or any(s >= step for s in arrivals):
        for request in arrivals.get(step, []):
            engine.add_request(request)
            tokens[request.request_id] = []
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
        step += 1
    return tokens
