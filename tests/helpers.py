"""Tiny random Hugging Face checkpoints for tests, written with transformers' save_pretrained."""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from moe_serve.engine.builder import build_engine
from moe_serve.engine.config import EngineConfig
from moe_serve.engine.core.request import EngineRequest
from moe_serve.engine.core.sampling_params import SamplingParams
from moe_serve.engine.model.attention import AttentionMetadata

ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
# with their features turned on: dense first layers, YaRN (with mscale), group-limited routing, routing
# biases, partial rotary and q/k norms (GLM-4.5), interleaved rope and tied embeddings (ERNIE-4.5)
# gpt-oss: attention sinks, sliding-window layers (a window shorter than the test prompts), YaRN, a biased router,
# biased experts whose clamped SwiGLU clamps (a small limit)
NEW_ARCHITECTURES = ("deepseek_v2", "deepseek_v3", "glm4_moe", "ernie4_5_moe", "gpt_oss")

# the generic features on the architectures above: (arch, config overrides) by name
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # dense MLP layers interleaved with MoE layers (MoE layers 1, 2, 4, 5), YaRN with its attention factor
    "qwen2_moe-dense-yarn": ("qwen2_moe", dict(num_hidden_layers=6, mlp_only_layers=[0, 3], rope_parameters=YARN)),
    # sliding-window attention in every layer, a window shorter than the test prompts
    "mixtral-sliding_window": ("mixtral", dict(sliding_window=4)),
    # every second layer MoE (decoder_sparse_step), llama3 rope
    "qwen3_moe-sparse_step-llama3": ("qwen3_moe", dict(
        num_hidden_layers=4, decoder_sparse_step=2, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
}


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
    elif arch == "glm4_moe":
        cfg = dict(common, num_hidden_layers=3, head_dim=16, intermediate_size=48, moe_intermediate_size=16,
                   n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2,
                   norm_topk_prob=True, routed_scaling_factor=2.5, use_qk_norm=True, attention_bias=True,
                   rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                    "original_max_position_embeddings": 64, "partial_rotary_factor": 0.5})
        cls = transformers.Glm4MoeConfig
    elif arch == "ernie4_5_moe":
        cfg = dict(common, num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, moe_num_experts=8,
                   moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_interval=1,
                   tie_word_embeddings=True)
        cls = transformers.Ernie4_5_MoeConfig
    elif arch in ("deepseek_v2", "deepseek_v3"):
        # MLA with v_head_dim != qk_nope_head_dim, one dense first layer, 4 groups of 2 experts (the best 2 compete),
        # YaRN whose mscale and mscale_all_dim change both the rope's magnitude and the softmax scale
        deepseek_yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 32,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 2.0, "mscale_all_dim": 0.5}
        cfg = dict(common, num_hidden_layers=3, num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=16,
                   n_routed_experts=8, first_k_dense_replace=1, kv_lora_rank=16, qk_nope_head_dim=8,
                   qk_rope_head_dim=8, v_head_dim=12, n_group=4, topk_group=2, rope_parameters=deepseek_yarn)
        if arch == "deepseek_v2":  # V2-Lite's plain q projection, softmax routing (top-3: groups ranked by
            # their best expert limit the choice only when top_k > topk_group)
            cfg.update(q_lora_rank=None, n_shared_experts=2, topk_method="group_limited_greedy", routed_scaling_factor=2.0,
                       num_experts_per_tok=3)
            cls = transformers.DeepseekV2Config
        else:  # q LoRA, sigmoid routing with a correction bias, renormalised
            cfg.update(q_lora_rank=24, n_shared_experts=1, norm_topk_prob=True, routed_scaling_factor=2.5,
                       rope_interleave=True)
            cls = transformers.DeepseekV3Config
    elif arch == "gpt_oss":  # hidden and intermediate sizes multiples of 32: MXFP4 blocks
        layers = overrides.get("num_hidden_layers", 2)
        cfg = dict(common, head_dim=8, intermediate_size=32, num_local_experts=8, sliding_window=4,
                   layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
                   swiglu_limit=0.3, swiglu_alpha=1.5, attention_bias=True,
                   rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32.0,
                                    "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64})
        cls = transformers.GptOssConfig
    else:
        raise ValueError(f"unknown arch {arch!r}; known: {ARCHITECTURES + NEW_ARCHITECTURES}")
    cfg.update(overrides)
    return cls(**cfg)


def make_tiny_checkpoint(arch: str, directory: Path, seed: int = 0, max_shard_size: str | None = None,
                         **overrides: Any) -> Path:
    """Write a tiny random checkpoint of `arch` (or of a named variant in VARIANTS) plus a
    byte-level BPE tokenizer into `directory`."""
    import transformers

    from moe_serve.engine.model.tokenizer_builder import build_byte_level_tokenizer, save_tokenizer

    if arch in VARIANTS:
        arch, variant = VARIANTS[arch]
        overrides = {**copy.deepcopy(variant), **overrides}
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
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:  # routing biases: zero at init
            if name.endswith("e_score_correction_bias"):
                tensor.normal_(std=0.2)
            elif name.endswith(("sinks", "router.weight", "router.bias", "proj_bias")):  # gpt-oss: all near zero
                tensor.normal_(std=1.0 if name.endswith("sinks") else 0.5)
    directory.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    save_tokenizer(tokenizer, directory)
    return directory


FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [..., R, C] -> MXFP4 (blocks uint8 [..., R, C / 32, 16], scales uint8 [..., R, C / 32]) as the
    published gpt-oss checkpoints store it: per block of 32 values an e8m0 exponent (biased by 127) that
    brings the block's largest magnitude to at most 6, each value rounded to the nearest E2M1 code,
    two codes a byte (the low nibble first)."""
    *prefix, rows, cols = weight.shape
    grouped = weight.float().reshape(*prefix, rows, cols // 32, 32)
    amax = grouped.abs().amax(dim=-1).clamp(min=2.0**-126)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = grouped / torch.exp2(exponent)[..., None]
    table = torch.tensor(FP4_VALUES)
    codes = (scaled[..., None] - table).abs().argmin(dim=-1).to(torch.uint8)  # ties: the first (smaller) code
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (exponent + 127).to(torch.uint8)


def make_mxfp4_checkpoint(directory: Path, seed: int = 0, **overrides: Any) -> Path:
    """A tiny gpt-oss checkpoint in the published MXFP4 layout: the experts' `gate_up_proj` and
    `down_proj` replaced by their `_blocks` and `_scales` (quantized from the random weights, stored
    [E, out, in / 32, 16] and [E, out, in / 32]) and quantization_config {'quant_method': 'mxfp4'}."""
    import json

    from safetensors.torch import load_file, save_file

    make_tiny_checkpoint("gpt_oss", directory, seed=seed, **overrides)
    tensors = load_file(directory / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = quantize_mxfp4(tensors.pop(name).transpose(1, 2))  # stored as [E, out, in]
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
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


def hf_next_tokens(model: Any, prompt_ids: list[int], continuation: list[int]) -> list[int]:
    """The oracle's greedy choice after the prompt and after each prefix of `continuation`, from one
    forward over prompt + continuation[:-1]: equal to `continuation` exactly when `continuation` is
    the oracle's greedy continuation (each token its argmax given the tokens before it)."""
    ids = torch.tensor([prompt_ids + continuation[:-1]])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1:]
    return logits.argmax(dim=-1).tolist()


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


# shared by several test modules

PROMPT_LENGTHS = (3, 11, 7, 1)


@contextmanager
def mounted_tmpfs(directory: Path, size_bytes: int, read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of `size_bytes` mounted on `directory` (skips the test where mounting is not permitted)."""
    directory.mkdir(parents=True, exist_ok=True)
    options = f"size={size_bytes}" + (",ro" if read_only else "")
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)],
                                 capture_output=True, text=True, timeout=30)
    except OSError as exc:
        pytest.skip(f"cannot run mount: {exc}")
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True, timeout=30)


MIN_FRACTION = 0.25


def workload() -> dict[int, list[EngineRequest]]:
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in (12, 7, 16)]
    prompts = [list(range(5, 25)), list(range(40, 43)), list(range(100, 131))]
    requests = [EngineRequest(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]
    return {0: requests[:2], 2: requests[2:]}


def run_workload(path, **overrides) -> tuple[dict[str, list[int]], object]:
    overrides.setdefault("dtype", "float32")
    engine = build_engine(EngineConfig(model=str(path), max_num_batched_tokens=16, **overrides), show_progress=False)
    return run_to_completion(engine, workload()), engine


def parity_prompts(vocab_size: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def engine_logits(engine, prompts: list[list[int]]) -> tuple[torch.Tensor, ...]:
    """One prefill forward over every prompt: each prompt's fp32 logits [its length, V]."""
    runner = engine.runner
    tables = []
    for i, prompt in enumerate(prompts):
        engine.blocks.grow(f"p{i}", len(prompt))
        tables.append(engine.blocks.table(f"p{i}"))
    lens = [len(p) for p in prompts]
    meta = AttentionMetadata.build(tables, lens, lens, runner.block_size, runner.model.device)
    ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.cat([torch.arange(n) for n in lens])
    with torch.inference_mode():
        return runner.model.logits(runner.model.forward(ids, positions, meta, runner.kv_caches)).split(lens)
