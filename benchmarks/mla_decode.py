"""Decode tokens/s and KV bytes per token: the engine's latent-cache MLA vs an expanded-K/V MLA.

DeepSeek-V2-Lite geometry (hidden 2048, 16 heads, kv_lora_rank 512, qk_nope_head_dim 128,
qk_rope_head_dim 64, v_head_dim 128, no q LoRA; a dense first layer, then MoE layers of 64
routed + 2 shared experts, top-6, moe_intermediate 1408) with random weights at a reduced layer
count. Both variants are one `MoEModel` over the same weights:

- latent: the engine as it is: the paged cache stores each token's normed latent and rope key
  (kv_lora_rank + qk_rope_head_dim values per token and layer) and decode attends with the
  queries absorbed into latent space (`engine.models.latent_attention`);
- expanded: standard multi-head attention whose paged cache stores every head's key
  (qk_nope + qk_rope dims) and value (v_head_dim), expanded from the latent by kv_b when the
  token is written, as a non-absorbed MLA implementation does (`ExpandedMLAModel` below).

For each context length, B sequences already hold the same random context in both caches (the
expanded cache is the expansion of the latent one, so both variants compute the same function:
their first step's logits are compared) and decode `--steps` tokens each. Rounds alternate
latent, expanded, latent, ... (`--rounds` each); every round is printed and the medians reported.

    python -m benchmarks.mla_decode [--layers 2] [--contexts 256,2048] [--batch 4] [--steps 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from moe_serve.engine.model.attention import AttentionMetadata
from moe_serve.engine.model.checkpoint import expert_weights, layer_weights
from moe_serve.engine.model.cpu_kernels import rms_norm
from moe_serve.engine.model.experts import ResidentExperts
from moe_serve.engine.model.latent_attention import LATENT_NORM_EPS
from moe_serve.engine.model.moe_model import KVCache, MoEModel
from moe_serve.engine.model.registry import spec_from_config
from moe_serve.engine.model.rope import apply_rope
from moe_serve.engine.model.spec import ModelSpec
from moe_serve.engine.model.weights import DenseWeights, LatentAttentionWeights, LayerWeights

BLOCK_SIZE = 16


@dataclass(frozen=True)
class Geometry:
    """The model's shape; the defaults are DeepSeek-V2-Lite's published config."""

    hidden_size: int = 2048
    num_heads: int = 16
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    num_experts: int = 64
    num_shared_experts: int = 2
    top_k: int = 6
    moe_intermediate_size: int = 1408
    intermediate_size: int = 10944
    vocab_size: int = 102400


def make_spec(geometry: Geometry, num_layers: int) -> tuple[ModelSpec, Any]:
    """The engine's spec of a DeepSeek-V2 config with `geometry` (layer 0 dense, as in V2-Lite), and the config."""
    from transformers import DeepseekV2Config

    config = DeepseekV2Config(
        vocab_size=geometry.vocab_size, hidden_size=geometry.hidden_size, intermediate_size=geometry.intermediate_size,
        moe_intermediate_size=geometry.moe_intermediate_size, num_hidden_layers=num_layers,
        num_attention_heads=geometry.num_heads, num_key_value_heads=geometry.num_heads,
        n_routed_experts=geometry.num_experts, n_shared_experts=geometry.num_shared_experts,
        num_experts_per_tok=geometry.top_k, first_k_dense_replace=1, q_lora_rank=None,
        kv_lora_rank=geometry.kv_lora_rank, qk_nope_head_dim=geometry.qk_nope_head_dim,
        qk_rope_head_dim=geometry.qk_rope_head_dim, v_head_dim=geometry.v_head_dim, topk_method="greedy",
        max_position_embeddings=16384, architectures=["DeepseekV2ForCausalLM"],
    )
    return spec_from_config(config), config


ROUTED_EXPERT = re.compile(r"model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight")


class RandomWeights:
    """A TensorReader of random weights with the Hub names and shapes of `config`'s model: read from
    transformers' model built on the meta device (nothing allocated), except the routed experts, which
    transformers holds fused and the Hub stores one matrix per expert ([F, D] gate and up, [D, F] down)."""

    def __init__(self, config: Any, seed: int = 0) -> None:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        self._shapes = {name: tuple(t.shape) for name, t in [*model.named_parameters(), *model.named_buffers()]}
        self._expert_shape = {"gate": (config.moe_intermediate_size, config.hidden_size),
                              "up": (config.moe_intermediate_size, config.hidden_size),
                              "down": (config.hidden_size, config.moe_intermediate_size)}
        self._generator = torch.Generator().manual_seed(seed)

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        expert = ROUTED_EXPERT.fullmatch(name)
        shape = self._expert_shape[expert.group(1)] if expert else self._shapes[name]
        if "norm" in name:
            return torch.ones(shape, dtype=dtype)
        fan_in = shape[-1] if len(shape) > 1 else 1
        return (torch.randn(shape, generator=self._generator) / fan_in**0.5).to(dtype)


@dataclass
class ExpandedMLAWeights:
    """One MLA layer for the expanded path: the latent projections plus kv_b per head, k_up [H, Dn, C]
    and v_up [H, Dv, C] (the same tensors the absorbed path reads, applied to the latents instead)."""

    latent: LatentAttentionWeights


class ExpandedMLAModel(MoEModel):
    """MoEModel whose MLA layers cache expanded per-head keys [S, H, Dn + Dr] and values [S, H, Dv]."""

    def _attention(self, w: Any, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                   meta: AttentionMetadata, kv_cache: KVCache, window: int | None = None) -> torch.Tensor:
        """Expanded MLA over the layer's per-head cache (MLA layers attend the whole context: no window)."""
        spec, lat = self.spec, w.latent
        mla = spec.mla
        assert mla is not None
        num_tokens, heads = x.shape[0], spec.num_heads
        nope, rope_dim = mla.qk_nope_head_dim, mla.qk_rope_head_dim
        q = torch.nn.functional.linear(x, lat.q).view(num_tokens, heads, nope + rope_dim)
        q_nope, q_rope = q.split([nope, rope_dim], dim=-1)
        keys, values = expand(spec, lat, x, rotary)
        k_cache, v_cache = kv_cache
        k_cache.index_copy_(0, meta.slot_mapping, keys)
        v_cache.index_copy_(0, meta.slot_mapping, values)
        queries = torch.cat([q_nope, apply_rope(q_rope.contiguous(), *rotary)], dim=-1)
        out = attend(queries, k_cache[meta.gather_slots].transpose(1, 2), v_cache[meta.gather_slots].transpose(1, 2),
                     meta, spec.attention_scale)
        return torch.nn.functional.linear(out, lat.o)


def expand(spec: ModelSpec, lat: LatentAttentionWeights, x: torch.Tensor,
           rotary: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens x [T, D] -> their expanded keys [T, H, Dn + Dr] and values [T, H, Dv]."""
    mla = spec.mla
    assert mla is not None
    num_tokens, rope_dim = x.shape[0], mla.qk_rope_head_dim
    latent, k_rope = torch.nn.functional.linear(x, lat.kv_a).split([mla.kv_lora_rank, rope_dim], dim=-1)
    latent = rms_norm(latent.contiguous(), lat.kv_a_norm, LATENT_NORM_EPS)
    return expand_latent(spec, lat, latent, apply_rope(k_rope.reshape(num_tokens, 1, rope_dim).contiguous(), *rotary))


def expand_latent(spec: ModelSpec, lat: LatentAttentionWeights, latent: torch.Tensor,
                  k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normed latents [T, C] and roped keys [T, 1, Dr] -> keys [T, H, Dn + Dr] and values [T, H, Dv]."""
    heads = spec.num_heads
    k_nope = torch.einsum("tc,hnc->thn", latent, lat.k_up)
    values = torch.einsum("tc,hvc->thv", latent, lat.v_up)
    return torch.cat([k_nope, k_rope.expand(-1, heads, -1)], dim=-1), values.contiguous()


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, meta: AttentionMetadata,
           scale: float) -> torch.Tensor:
    """SDPA of q [T, H, Dk] over gathered keys [B, H, K, Dk] and values [B, H, K, Dv] -> [T, H * Dv],
    laid out as the engine's paged attention lays out its queries."""
    _, heads, head_dim = q.shape
    queries = q.new_zeros(meta.num_seqs * meta.max_query_len, heads, head_dim)
    queries[meta.query_index] = q
    queries = queries.view(meta.num_seqs, meta.max_query_len, heads, head_dim).transpose(1, 2)
    out = torch.nn.functional.scaled_dot_product_attention(queries, keys, values, attn_mask=meta.mask, scale=scale)
    return out.transpose(1, 2).reshape(meta.num_seqs * meta.max_query_len, heads * values.shape[-1])[meta.query_index]


def build_models(geometry: Geometry, num_layers: int, device: torch.device,
                 dtype: torch.dtype) -> tuple[MoEModel, ExpandedMLAModel]:
    """The two variants over one set of random weights."""
    spec, config = make_spec(geometry, num_layers)
    src = RandomWeights(config)
    layers: list[LayerWeights] = []
    experts = {}
    for layer in range(spec.num_layers):
        layers.append(layer_weights(spec, src, layer, dtype))
        experts.update(expert_weights(spec, src, layer, dtype))
    embed = src.get("model.embed_tokens.weight", dtype)
    dense = DenseWeights(embed, layers, src.get("model.norm.weight", dtype), src.get("lm_head.weight", dtype))
    dense = _to(dense, device)
    provider = ResidentExperts(experts, device)
    latent = MoEModel(spec, dense, provider, device)
    expanded_layers = [dataclasses.replace(layer, attention=ExpandedMLAWeights(layer.attention))
                       for layer in dense.layers]
    expanded_dense = DenseWeights(dense.embed_tokens, expanded_layers, dense.final_norm, dense.lm_head)
    return latent, ExpandedMLAModel(spec, expanded_dense, provider, device)


def _to(dense: DenseWeights, device: torch.device) -> DenseWeights:
    def move(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return obj.to(device)
        if dataclasses.is_dataclass(obj):
            return dataclasses.replace(obj, **{f.name: move(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
        if isinstance(obj, list):
            return [move(o) for o in obj]
        return obj

    return move(dense)


def kv_bytes_per_token(spec: ModelSpec, dtype: torch.dtype) -> dict[str, int]:
    """Per token over all layers: the latent cache's bytes and the expanded cache's."""
    mla = spec.mla
    assert mla is not None
    element = torch.empty((), dtype=dtype).element_size()
    latent = mla.kv_lora_rank + mla.qk_rope_head_dim
    expanded = spec.num_heads * (mla.qk_nope_head_dim + mla.qk_rope_head_dim + mla.v_head_dim)
    return {"latent": spec.num_layers * latent * element, "expanded": spec.num_layers * expanded * element}


def filled_caches(latent_model: MoEModel, expanded: ExpandedMLAModel, batch: int, context: int, steps: int,
                  dtype: torch.dtype) -> tuple[list[KVCache], list[KVCache], list[list[int]]]:
    """Both variants' caches holding the same random `context` tokens per sequence (room for `steps` more)."""
    spec, device = latent_model.spec, latent_model.device
    mla = spec.mla
    assert mla is not None
    blocks_per_seq = -(-(context + steps) // BLOCK_SIZE)
    slots = batch * blocks_per_seq * BLOCK_SIZE
    tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(batch)]
    used = torch.tensor([table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for table in tables
                         for p in range(context)], device=device)
    generator = torch.Generator().manual_seed(1)
    positions = torch.arange(context, device=device).repeat(batch)
    latent_caches, expanded_caches = [], []
    for layer in expanded.dense.layers:
        lat = layer.attention.latent
        latents = torch.randn(len(used), mla.kv_lora_rank, generator=generator).to(device, dtype)
        k_rope = torch.randn(len(used), 1, mla.qk_rope_head_dim, generator=generator).to(device, dtype)
        k_rope = apply_rope(k_rope, *latent_model.rotary.tables(positions))
        cache = torch.zeros(slots, 1, mla.kv_lora_rank + mla.qk_rope_head_dim, dtype=dtype, device=device)
        cache[used] = torch.cat([latents[:, None, :], k_rope], dim=-1)
        keys, values = expand_latent(spec, lat, latents, k_rope)
        k_cache = torch.zeros(slots, spec.num_heads, keys.shape[-1], dtype=dtype, device=device)
        v_cache = torch.zeros(slots, spec.num_heads, values.shape[-1], dtype=dtype, device=device)
        k_cache[used], v_cache[used] = keys, values
        latent_caches.append((cache,))
        expanded_caches.append((k_cache, v_cache))
    return latent_caches, expanded_caches, tables


def decode(model: MoEModel, caches: list[KVCache], tables: list[list[int]], context: int,
           steps: int) -> tuple[float, torch.Tensor]:
    """Decode `steps` tokens for every sequence from position `context`; returns (seconds, first step's logits)."""
    device, batch = model.device, len(tables)
    generator = torch.Generator().manual_seed(2)
    first = None
    _synchronize(device)
    start = time.perf_counter()
    for step in range(steps):
        position = context + step
        meta = AttentionMetadata.build(tables, [position + 1] * batch, [1] * batch, BLOCK_SIZE, device)
        input_ids = torch.randint(model.spec.vocab_size, (batch,), generator=generator).to(device)
        hidden = model.forward(input_ids, torch.full((batch,), position, device=device), meta, caches)
        logits = model.logits(hidden)
        if first is None:
            first = logits
    _synchronize(device)
    assert first is not None
    return time.perf_counter() - start, first


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(geometry: Geometry, num_layers: int, contexts: list[int], batch: int, steps: int, rounds: int,
        device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """Per context length: every round's tokens/s of both variants, their medians, KV bytes per token."""
    latent_model, expanded = build_models(geometry, num_layers, device, dtype)
    kv = kv_bytes_per_token(latent_model.spec, dtype)
    rows = []
    with torch.inference_mode():
        for context in contexts:
            latent_caches, expanded_caches, tables = filled_caches(latent_model, expanded, batch, context, steps, dtype)
            rates: dict[str, list[float]] = {"latent": [], "expanded": []}
            logits = {}
            decode(latent_model, latent_caches, tables, context, 1)  # warm-up (kernels, allocator), untimed
            decode(expanded, expanded_caches, tables, context, 1)
            for index in range(rounds):
                for name, model, caches in (("latent", latent_model, latent_caches),
                                            ("expanded", expanded, expanded_caches)):
                    seconds, logits[name] = decode(model, caches, tables, context, steps)
                    rates[name].append(batch * steps / seconds)
                    print(f"context {context} round {index} {name}: {rates[name][-1]:.2f} tok/s", flush=True)
            difference = (logits["latent"] - logits["expanded"]).abs().max().item()
            scale = logits["expanded"].abs().max().item()
            rows.append({
                "context": context, "batch": batch, "steps": steps, "layers": num_layers,
                "latent_tok_s": statistics.median(rates["latent"]),
                "expanded_tok_s": statistics.median(rates["expanded"]),
                "latent_rounds": rates["latent"], "expanded_rounds": rates["expanded"],
                "latent_kv_bytes_per_token": kv["latent"], "expanded_kv_bytes_per_token": kv["expanded"],
                "max_logit_difference": difference, "max_logit": scale,
            })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (layer 0 dense, the rest MoE)")
    parser.add_argument("--contexts", default="256,2048", help="comma-separated context lengths")
    parser.add_argument("--batch", type=int, default=4, help="sequences decoding together")
    parser.add_argument("--steps", type=int, default=8, help="decode steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per variant, alternating")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="default bfloat16 on CUDA, float32 on a CPU")
    parser.add_argument("--geometry", default=None,
                        help="JSON object overriding Geometry fields (tests: tiny sizes)")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON line at the end")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    geometry = Geometry(**json.loads(args.geometry)) if args.geometry else Geometry()
    rows = run(geometry, args.layers, [int(c) for c in args.contexts.split(",")], args.batch, args.steps,
               args.rounds, device, dtype)
    for row in rows:
        print(f"context {row['context']}: latent {row['latent_tok_s']:.2f} tok/s, expanded {row['expanded_tok_s']:.2f} "
              f"tok/s (medians); KV bytes/token {row['latent_kv_bytes_per_token']} vs "
              f"{row['expanded_kv_bytes_per_token']}; max logit difference {row['max_logit_difference']:.2e} "
              f"of {row['max_logit']:.2e}")
    if args.json:
        print(json.dumps({"geometry": asdict(geometry), "dtype": str(dtype), "device": str(device), "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
