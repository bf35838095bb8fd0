"""`moe-serve plan` on tiny checkpoints of every architecture, checked against hand computations.

Expert and non-expert sizes equal the bytes of the checkpoint's own tensors (routed experts
vs everything else; fp32 checkpoints, so stored bytes are loaded bytes), KV bytes per token and
one expert's size follow from the config by hand, a GPU budget of a given number of experts
over the fixed part gives that many slots, the uniform-routing copies follow from the fraction,
a hand-made trace gives its hand-counted misses, and serve built with the printed flags gets
the plan's KV blocks and expert slots.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from moe_serve.engine.builder import build_engine
from moe_serve.engine.config import DType, EngineConfig, OffloadMode
from moe_serve.engine.errors import ModelLoadError
from moe_serve.engine.offload.provider import OffloadedExperts
from moe_serve.engine.planning import GIB, HOST_RESERVE_BYTES, make_plan, reserve_nbytes
from moe_serve.engine.traces.trace_file import RoutingTrace, save_trace
from moe_serve.server.cli import main
from tests.helpers import make_mxfp4_checkpoint, tiny_config

FP32_ROUTERS = ("deepseek_v2", "deepseek_v3", "glm4_moe", "ernie4_5_moe")  # routers, correction biases kept fp32
ALL = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", *FP32_ROUTERS, "gpt_oss")
CONTEXT = 128


def checkpoint_bytes(path: Path) -> tuple[int, int, dict[str, int]]:
    """(routed-expert bytes, other bytes, bytes per tensor name) of a checkpoint's safetensors."""
    sizes: dict[str, int] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                sizes[name] = tensor.numel() * tensor.element_size()
    experts = sum(n for name, n in sizes.items() if ".experts." in name)
    return experts, sum(sizes.values()) - experts, sizes


def hand_geometry(arch: str, vocab_size: int) -> dict[str, int]:
    """From the tiny config: MoE layers, experts per layer, top-k, one fp32 expert, fp32 KV bytes/token."""
    config = tiny_config(arch, vocab_size)
    hidden, layers = config.hidden_size, config.num_hidden_layers
    inner = config.intermediate_size if arch in ("mixtral", "olmoe", "gpt_oss") else config.moe_intermediate_size
    expert_biases = 2 * inner + hidden if arch == "gpt_oss" else 0
    experts = {"mixtral": "num_local_experts", "gpt_oss": "num_local_experts", "ernie4_5_moe": "moe_num_experts",
               "deepseek_v2": "n_routed_experts", "deepseek_v3": "n_routed_experts",
               "glm4_moe": "n_routed_experts"}.get(arch, "num_experts")
    top_k = config.moe_k if arch == "ernie4_5_moe" else config.num_experts_per_tok
    if arch.startswith("deepseek"):
        kv = layers * (config.kv_lora_rank + config.qk_rope_head_dim) * 4
    else:
        head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        kv = layers * 2 * config.num_key_value_heads * head_dim * 4
    dense_layers = getattr(config, "first_k_dense_replace", None) or getattr(config, "moe_layer_start_index", 0)
    return {"moe_layers": layers - dense_layers, "experts": getattr(config, experts), "top_k": top_k,
            "expert": (3 * hidden * inner + expert_biases) * 4, "kv": kv}


@pytest.mark.parametrize("arch", ALL)
def test_sizes_equal_the_checkpoint_and_the_config(arch: str, checkpoint_factory) -> None:
    path = checkpoint_factory(arch)
    plan = make_plan(path, gpu_gb=2, dtype=DType.FLOAT32, max_model_len=CONTEXT)
    experts, others, _ = checkpoint_bytes(path)
    hand = hand_geometry(arch, json.loads((path / "config.json").read_text())["vocab_size"])
    assert plan.experts_nbytes == experts
    assert plan.non_expert_nbytes == others
    assert plan.expert_nbytes == hand["expert"]
    assert plan.num_experts == hand["moe_layers"] * hand["experts"]
    assert plan.kv_bytes_per_token == hand["kv"]
    assert plan.kv_cache_nbytes == CONTEXT * hand["kv"]  # one sequence, whole 16-token blocks
    assert plan.min_host_nbytes == experts + HOST_RESERVE_BYTES


@pytest.mark.parametrize("arch", ["deepseek_v3", "ernie4_5_moe", "mixtral"])
def test_bf16_halves_everything_but_the_fp32_routers_and_biases(arch: str, checkpoint_factory) -> None:
    path = checkpoint_factory(arch)
    plan = make_plan(path, gpu_gb=2, dtype=DType.BFLOAT16, max_model_len=CONTEXT)
    experts, others, sizes = checkpoint_bytes(path)
    kept = sum(n for name, n in sizes.items() if arch in FP32_ROUTERS
               and (name.endswith("mlp.gate.weight") or name.endswith("e_score_correction_bias")))
    assert plan.experts_nbytes == experts // 2
    assert plan.non_expert_nbytes == (others - kept) // 2 + kept
    assert plan.dtype == "bfloat16"


def test_mxfp4_experts_are_sized_as_the_host_tier_holds_them(checkpoint_factory, tmp_path: Path) -> None:
    """auto keeps an MXFP4 checkpoint's experts 4-bit (the engine's own store size); model expands them."""
    from moe_serve.engine.builder import build_engine
    from moe_serve.engine.config import EngineConfig

    plain = make_plan(checkpoint_factory("gpt_oss"), gpu_gb=2, dtype=DType.BFLOAT16, max_model_len=CONTEXT)
    path = make_mxfp4_checkpoint(tmp_path / "mxfp4")
    expanded = make_plan(path, gpu_gb=2, dtype=DType.BFLOAT16, max_model_len=CONTEXT, expert_dtype="model")
    assert (expanded.expert_nbytes, expanded.experts_nbytes, expanded.non_expert_nbytes) == \
        (plain.expert_nbytes, plain.experts_nbytes, plain.non_expert_nbytes)
    four_bit = make_plan(path, gpu_gb=2, dtype=DType.BFLOAT16, max_model_len=CONTEXT)
    engine = build_engine(EngineConfig(model=str(path), dtype="bfloat16", expert_cache_fraction=1.0), show_progress=False)
    assert four_bit.expert_nbytes == engine.runner.model.experts.cache.store.expert_nbytes < plain.expert_nbytes / 2


def budget_for_slots(arch: str, path: Path, slots: float) -> float:
    """The --gpu-gb whose leftover after weights, KV cache and reserve holds `slots` experts."""
    _, others, _ = checkpoint_bytes(path)
    hand = hand_geometry(arch, json.loads((path / "config.json").read_text())["vocab_size"])
    from moe_serve.engine.model.loader import read_spec

    reserve = reserve_nbytes(read_spec(path)[1], EngineConfig().max_num_batched_tokens)
    return (others + CONTEXT * hand["kv"] + reserve + slots * hand["expert"]) / GIB


@pytest.mark.parametrize("arch", ALL)
def test_the_budget_left_for_experts_sets_the_cache_and_the_uniform_copies(arch: str, checkpoint_factory) -> None:
    path = checkpoint_factory(arch)
    hand = hand_geometry(arch, json.loads((path / "config.json").read_text())["vocab_size"])
    total = hand["moe_layers"] * hand["experts"]
    slots = total * 3 // 4  # above the minimum cache (one layer's experts)
    plan = make_plan(path, gpu_gb=budget_for_slots(arch, path, slots + 0.5), dtype=DType.FLOAT32,
                     max_model_len=CONTEXT)
    assert plan.cache_slots == slots
    assert plan.min_cache_slots == hand["experts"]
    assert plan.resident_fraction == pytest.approx(slots / total)
    misses = hand["moe_layers"] * hand["top_k"] * (1 - slots / total)
    assert plan.expected_misses_per_token == pytest.approx(misses)
    assert plan.expected_bytes_per_token == pytest.approx(misses * hand["expert"])
    assert plan.min_gpu_nbytes / GIB == pytest.approx(budget_for_slots(arch, path, hand["experts"]))


def test_a_budget_below_the_minimum_cache_is_refused_naming_the_minimum(checkpoint_factory) -> None:
    path = checkpoint_factory("mixtral")
    too_small = budget_for_slots("mixtral", path, 7)  # the minimum is one layer's 8 experts
    with pytest.raises(ModelLoadError, match=r"cannot serve MixtralForCausalLM .* needs at least"):
        make_plan(path, gpu_gb=too_small, dtype=DType.FLOAT32, max_model_len=CONTEXT)


def test_a_trace_replaces_uniform_routing_with_its_misses(checkpoint_factory, tmp_path: Path) -> None:
    path = checkpoint_factory("deepseek_v2")  # 2 MoE layers of 8 experts, top-3
    tokens = 40
    expert_ids = np.tile(np.array([[0, 1, 2], [5, 6, 7]], dtype=np.uint8), (tokens, 1, 1))  # the same experts always
    save_trace(tmp_path / "t.npz", RoutingTrace(expert_ids, np.array([0, tokens]), np.array([0], dtype=np.int32),
                                                num_experts=8))
    plan = make_plan(path, gpu_gb=budget_for_slots("deepseek_v2", path, 12.5), dtype=DType.FLOAT32,
                     max_model_len=CONTEXT, trace=tmp_path / "t.npz")
    assert plan.expected_misses_per_token == pytest.approx(2 * 3 / tokens)  # the first token's misses only
    assert plan.routing_model == str(tmp_path / "t.npz")
    first_ten = make_plan(path, gpu_gb=budget_for_slots("deepseek_v2", path, 12.5), dtype=DType.FLOAT32,
                          max_model_len=CONTEXT, trace=tmp_path / "t.npz", trace_tokens=10)
    assert first_ten.expected_misses_per_token == pytest.approx(2 * 3 / 10)
    wrong = RoutingTrace(expert_ids[:, :1], np.array([0, tokens]), np.array([0], dtype=np.int32), num_experts=8)
    save_trace(tmp_path / "wrong.npz", wrong)
    with pytest.raises(ModelLoadError, match="has 1 layers x 8 experts, the model 2 x 8"):
        make_plan(path, gpu_gb=2, trace=tmp_path / "wrong.npz")


def test_serve_with_the_printed_flags_gets_the_planned_cache(checkpoint_factory, capsys) -> None:
    path = checkpoint_factory("deepseek_v2")
    gpu_gb = budget_for_slots("deepseek_v2", path, 11.5)
    assert main(["plan", "--model", str(path), "--gpu-gb", str(gpu_gb), "--max-model-len", str(CONTEXT),
                 "--dtype", "float32", "--host-gb", "0.00005"]) == 0
    text = capsys.readouterr().out
    assert "11 of 16 experts (68.8% resident" in text
    assert "host tier file-backed" in text
    flags = text.split("moe-serve serve ", 1)[1].split()
    settings = {flag[2:].replace("-", "_"): value for flag, value in zip(flags[::2], flags[1::2])}
    engine = build_engine(EngineConfig(**settings, offload=OffloadMode.ON, device="cpu"), show_progress=False)
    experts = engine.runner.model.experts
    assert isinstance(experts, OffloadedExperts)
    assert experts.cache.num_slots == 11
    assert engine.scheduler.blocks.num_blocks == CONTEXT // 16


def test_cli_json_and_one_line_errors(checkpoint_factory, capsys, tmp_path: Path) -> None:
    path = checkpoint_factory("glm4_moe")
    assert main(["plan", "--model", str(path), "--gpu-gb", "2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["architecture"] == "Glm4MoeForCausalLM" and plan["resident_fraction"] == 1.0
    assert plan["expected_bytes_per_token"] == 0.0
    assert main(["plan", "--model", str(tmp_path), "--gpu-gb", "2"]) == 1
    assert main(["plan", "--model", str(path), "--gpu-gb", "0.5"]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and errors[0].startswith("moe-serve: error: no config.json")
    assert "cannot serve Glm4MoeForCausalLM" in errors[1]
