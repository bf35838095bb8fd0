"""Torch ops and host syncs per MoE decoder layer and decode step on the torch path (the code CUDA runs).

A Qwen3-MoE-like model (128 routed experts, top-8, grouped-query attention with per-head q/k norms;
small hidden sizes: the counts do not depend on them) with random weights, all experts resident,
the C kernels off (MOE_SERVE_CPU_KERNEL=0, so every product, norm, rope, routing and attention
call is torch's, as on a GPU). Each batch size decodes one step of B sequences holding `--context`
tokens, after a warm-up step. Per layer figures are the difference between a model of
`--layers` + 2 and one of `--layers` layers, divided by 2, so the per-step parts (embedding, rotary
tables, final norm) drop out:

- ops: top-level aten operators recorded by `torch.profiler` (an operator called by another
  operator is not counted again), each one a dispatcher call and on a GPU usually a kernel launch;
- compute ops: those of them that are not views (`view`, `slice`, `transpose`, `chunk`, ... and a
  `to`/`reshape`/`contiguous` that copies nothing): the ones that can launch a kernel;
- syncs: calls that read a tensor's values on the host (`item`, `tolist`, `cpu`,
  `bool`/`int`/`float` of a tensor, `.to("cpu")`) or whose output shape depends on the values
  (`nonzero`, `unique`, `masked_select`, `bincount`, `repeat_interleave` without
  `output_size`, boolean-mask indexing), counted by a `TorchFunctionMode`; on a GPU each one
  waits for the device to drain.

`--attention` instead times decode attention alone (`paged_attention`, torch path) at each context
of `--contexts`, B sequences, Qwen3-30B-A3B's heads (32 query, 4 kv, 128 dims), shuffled block tables.

    MOE_SERVE_CPU_KERNEL=0 python -m benchmarks.torch_ops [--batches 1,16] [--context 64] [--layers 2] [--by-op]
    MOE_SERVE_CPU_KERNEL=0 python -m benchmarks.torch_ops --attention [--contexts 256,2048] [--batch 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

BLOCK_SIZE = 16
HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.__bool__,
              torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__}
SHAPE_FROM_VALUES = {torch.nonzero, torch.Tensor.nonzero, torch.unique, torch.Tensor.unique, torch.masked_select,
                     torch.Tensor.masked_select, torch.bincount, torch.Tensor.bincount, torch.argwhere}
VIEW_OPS = {"aten::" + name for name in (
    "view", "slice", "select", "unsqueeze", "squeeze", "transpose", "t", "permute", "expand", "split",
    "split_with_sizes", "chunk", "unbind", "narrow", "as_strided", "alias", "detach", "mT", "numpy_T",
    "resolve_conj", "resolve_neg", "view_as", "lift_fresh", "unflatten", "_reshape_alias", "unsafe_view")}
MAYBE_VIEW_OPS = {"aten::to", "aten::reshape", "aten::flatten", "aten::contiguous", "aten::expand_as"}


@dataclass(frozen=True)
class Geometry:
    """Qwen3-30B-A3B's routing and attention layout at a reduced width."""

    hidden_size: int = 256
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 32
    num_experts: int = 128
    top_k: int = 8
    moe_intermediate_size: int = 64
    vocab_size: int = 512


class SyncCounter(TorchFunctionMode):
    """Counts the torch calls that make the host wait for a device's results (see the module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in HOST_READS or func in SHAPE_FROM_VALUES:
            self.calls[func.__name__] += 1
        elif func is torch.repeat_interleave or func is torch.Tensor.repeat_interleave:
            if kwargs.get("output_size") is None:
                self.calls["repeat_interleave"] += 1
        elif func is torch.Tensor.to and _to_host(args, kwargs):
            self.calls["to(cpu)"] += 1
        elif func is torch.Tensor.__getitem__ and _bool_index(args[1]):
            self.calls["getitem[bool mask]"] += 1
        return func(*args, **kwargs)


def _to_host(args: tuple, kwargs: dict) -> bool:
    """`.to` onto the host from a device (on the CPU itself every tensor is already there: `cpu()` counts instead)."""
    device = kwargs.get("device", args[1] if len(args) > 1 else None)
    return isinstance(device, (str, torch.device)) and torch.device(device).type == "cpu" and args[0].device.type != "cpu"


def _bool_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def build_model(geometry: Geometry, num_layers: int, device: torch.device, dtype: torch.dtype) -> Any:
    """A Qwen3-MoE-like `MoEModel` of `num_layers` MoE layers, random weights, every expert resident."""
    from transformers import Qwen3MoeConfig

    from benchmarks.mla_decode import RandomWeights, _to
    from moe_serve.engine.model.checkpoint import expert_weights, layer_weights
    from moe_serve.engine.model.experts import ResidentExperts
    from moe_serve.engine.model.moe_model import MoEModel
    from moe_serve.engine.model.registry import spec_from_config
    from moe_serve.engine.model.weights import DenseWeights

    config = Qwen3MoeConfig(
        vocab_size=geometry.vocab_size, hidden_size=geometry.hidden_size, intermediate_size=4 * geometry.hidden_size,
        moe_intermediate_size=geometry.moe_intermediate_size, num_hidden_layers=num_layers,
        num_attention_heads=geometry.num_heads, num_key_value_heads=geometry.num_kv_heads, head_dim=geometry.head_dim,
        num_experts=geometry.num_experts, num_experts_per_tok=geometry.top_k, norm_topk_prob=True,
        max_position_embeddings=4096, architectures=["Qwen3MoeForCausalLM"],
    )
    spec = spec_from_config(config)
    src = RandomWeights(config)
    layers, experts = [], {}
    for layer in range(num_layers):
        layers.append(layer_weights(spec, src, layer, dtype))
        experts.update(expert_weights(spec, src, layer, dtype))
    dense = _to(DenseWeights(src.get("model.embed_tokens.weight", dtype), layers, src.get("model.norm.weight", dtype),
                             src.get("lm_head.weight", dtype)), device)
    return MoEModel(spec, dense, ResidentExperts(experts, device), device)


def count_step(model: Any, batch: int, context: int,
               dtype: torch.dtype) -> tuple[Counter[str], Counter[str], Counter[str]]:
    """One decode step of `batch` sequences at `context` tokens (after a warm-up step): the top-level
    aten ops by name, the compute ops among them, and the host syncs by call."""
    from moe_serve.engine.model.attention import AttentionMetadata

    spec, device = model.spec, model.device
    blocks_per_seq = -(-(context + 2) // BLOCK_SIZE)
    tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(batch)]
    num_slots = batch * blocks_per_seq * BLOCK_SIZE
    shapes = spec.kv_entry_shapes
    caches = [tuple(torch.randn(num_slots, *shape).to(device, dtype) for shape in shapes) for _ in range(spec.num_layers)]
    generator = torch.Generator().manual_seed(0)

    def step(position: int) -> None:
        meta = AttentionMetadata.build(tables, [position + 1] * batch, [1] * batch, BLOCK_SIZE, device)
        ids = torch.randint(0, spec.vocab_size, (batch,), generator=generator).to(device)
        model.forward(ids, torch.full((batch,), position, device=device), meta, caches)

    step(context - 1)  # warm-up: rotary tables, first-call paths
    meta_ready = AttentionMetadata.build(tables, [context + 1] * batch, [1] * batch, BLOCK_SIZE, device)
    ids = torch.randint(0, spec.vocab_size, (batch,), generator=generator).to(device)
    positions = torch.full((batch,), context, device=device)
    syncs = SyncCounter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof, syncs:
        model.forward(ids, positions, meta_ready, caches)
    ops: Counter[str] = Counter()
    compute: Counter[str] = Counter()
    for event in prof.events():
        if event.name.startswith("aten::") and not _inside_aten(event):
            ops[event.name] += 1
            if _computes(event):
                compute[event.name] += 1
    return ops, compute, syncs.calls


def _computes(event: Any) -> bool:
    """Whether an operator (or one it calls) does more than make a view."""
    if event.name in VIEW_OPS:
        return False
    if event.name in MAYBE_VIEW_OPS:
        return any(_computes(child) for child in event.cpu_children)
    return True


def _inside_aten(event: Any) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def per_layer(geometry: Geometry, layers: int, batch: int, context: int, device: torch.device,
              dtype: torch.dtype) -> dict[str, Any]:
    """Ops and syncs per MoE layer: (model of layers + 2) - (model of layers), halved."""
    small_ops, small_compute, small_syncs = count_step(build_model(geometry, layers, device, dtype), batch, context,
                                                       dtype)
    big_ops, big_compute, big_syncs = count_step(build_model(geometry, layers + 2, device, dtype), batch, context,
                                                 dtype)
    op_diff = {name: (big_ops[name] - small_ops[name]) / 2 for name in big_ops | small_ops}
    compute_diff = {name: (big_compute[name] - small_compute[name]) / 2 for name in big_compute | small_compute}
    sync_diff = {name: (big_syncs[name] - small_syncs[name]) / 2 for name in big_syncs | small_syncs}
    return {
        "batch": batch,
        "ops_per_layer": sum(op_diff.values()),
        "compute_ops_per_layer": sum(compute_diff.values()),
        "syncs_per_layer": sum(sync_diff.values()),
        "ops_per_step_outside_layers": sum(small_ops.values()) - layers * sum(op_diff.values()),
        "ops_by_name": {k: v for k, v in sorted(op_diff.items(), key=lambda kv: -kv[1]) if v},
        "compute_ops_by_name": {k: v for k, v in sorted(compute_diff.items(), key=lambda kv: -kv[1]) if v},
        "syncs_by_name": {k: v for k, v in sync_diff.items() if v},
    }


def time_decode_attention(contexts: list[int], batch: int, repeats: int) -> list[dict[str, Any]]:
    """Median microseconds of one decode `paged_attention` call (one layer) per context length."""
    from moe_serve.engine.model.attention import AttentionMetadata, paged_attention

    heads, kv_heads, head_dim = 32, 4, 128
    generator = torch.Generator().manual_seed(0)
    results = []
    for context in contexts:
        per_seq = -(-(context + 1) // BLOCK_SIZE)
        order = torch.randperm(batch * per_seq, generator=generator)
        tables = order.view(batch, per_seq).tolist()
        slots = batch * per_seq * BLOCK_SIZE
        k_cache, v_cache = (torch.randn(slots, kv_heads, head_dim, generator=generator) for _ in range(2))
        meta = AttentionMetadata.build(tables, [context + 1] * batch, [1] * batch, BLOCK_SIZE, torch.device("cpu"))
        q = torch.randn(batch, heads, head_dim, generator=generator)
        k, v = torch.randn(batch, kv_heads, head_dim), torch.randn(batch, kv_heads, head_dim)
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            paged_attention(q, k, v, k_cache, v_cache, meta, head_dim**-0.5)
            seconds.append(time.perf_counter() - start)
        results.append({"context": context, "batch": batch, "median_us": round(statistics.median(seconds) * 1e6, 1)})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--by-op", action="store_true", help="also print each operator's count per layer")
    parser.add_argument("--attention", action="store_true", help="time decode attention instead of counting ops")
    parser.add_argument("--contexts", default="256,2048")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    os.environ["MOE_SERVE_CPU_KERNEL"] = "0"  # before the kernels' first use: the torch path
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.attention:
        for result in time_decode_attention([int(c) for c in args.contexts.split(",")], args.batch, args.repeats):
            print(json.dumps(result))
        return
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    results = [per_layer(Geometry(), args.layers, int(b), args.context, torch.device(args.device), dtype)
               for b in args.batches.split(",")]
    for result in results:
        print(f"batch {result['batch']:3d}: {result['ops_per_layer']:.1f} torch ops "
              f"({result['compute_ops_per_layer']:.1f} not views) and {result['syncs_per_layer']:.1f} host syncs "
              f"per MoE layer and decode step ({result['ops_per_step_outside_layers']:.0f} ops per step outside "
              "the layers)")
        if args.by_op:
            print("  compute ops:", json.dumps(result["compute_ops_by_name"]))
            print("  view ops:", json.dumps({k: v - result["compute_ops_by_name"].get(k, 0)
                                             for k, v in result["ops_by_name"].items()
                                             if v != result["compute_ops_by_name"].get(k, 0)}))
            print("  syncs:", json.dumps(result["syncs_by_name"]))
    print(json.dumps([{k: v for k, v in r.items() if not k.endswith("by_name")} for r in results]))


if __name__ == "__main__":
    main()
