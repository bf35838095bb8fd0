"""Our forward pass for decoder-only MoE transformers (every architecture of `engine.models.registry`).

Pure functions over `DenseWeights` plus an `ExpertProvider`; the spec decides the attention
(grouped-query, or latent: `engine.models.latent_attention`; sliding windows and sinks), biases,
q/k norms, the rope, which layers are dense, the router, the routed experts' activation and
biases, and the shared expert. Expert-side callbacks (routing observer, speculator, provider)
see MoE-layer indices. Shapes: T tokens, D hidden, H heads,
Hkv kv heads, Dh head dim, R rotary dims, E experts, A active experts per token, F expert
intermediate size, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from moe_serve.engine.model.attention import AttentionMetadata, self_attention
from moe_serve.engine.model.cpu_kernels import ExpertRows, Routing, expert_ffn, linear, rms_norm
from moe_serve.engine.model.experts import ExpertFetch, ExpertGroup, ExpertProvider
from moe_serve.engine.model.latent_attention import latent_attention
from moe_serve.engine.model.packed import Matrix
from moe_serve.engine.model.quant import MODEL_DTYPE, ExpertFormat
from moe_serve.engine.model.rope import RotaryEmbedding
from moe_serve.engine.model.router import route, route_on_device
from moe_serve.engine.model.spec import ModelSpec
from moe_serve.engine.model.torch_experts import ExpertLayout, batched_experts, combine_slots, expert_outputs
from moe_serve.engine.model.weights import (
    AttentionWeights,
    DenseWeights,
    ExpertTensors,
    LatentAttentionWeights,
    LayerWeights,
    MLPWeights,
)

RoutingObserver = Callable[[int, torch.Tensor], None]  # (MoE layer, topk_ids [T, A])
# (MoE layer l, its input hidden state [T, D], its topk_ids [T, A]) -> experts of MoE layer l + 1 to prefetch
Speculator = Callable[[int, torch.Tensor, torch.Tensor], list[int]]
RoutingOverride = Callable[[int], torch.Tensor]  # MoE layer -> topk_ids [T, A] to use instead of the router's
KVCache = tuple[torch.Tensor, ...]  # one layer's paged cache tensors, shaped by `ModelSpec.kv_entry_shapes`


class MoEModel:
    """Runs one step of the model over a flattened batch of tokens. With `packed` the weights are
    in the CPU kernels' packed layout (`engine.models.weights.pack_dense`, `pack_expert`) and the
    routed experts run in the C kernel when it computes their MLP (`ExpertMLPSpec.is_plain`);
    otherwise every product runs in torch. `expert_format` is how the provider's experts are stored
    (`engine.model.quant`): quantized experts are computed by the C kernel from their codes, or in
    torch dequantized one expert at a time."""

    def __init__(self, spec: ModelSpec, dense: DenseWeights, experts: ExpertProvider, device: torch.device,
                 packed: bool = False, *, speculator: Speculator | None = None,
                 routing_observer: RoutingObserver | None = None,
                 routing_override: RoutingOverride | None = None,
                 expert_format: ExpertFormat = MODEL_DTYPE) -> None:
        """`speculator`: next-layer prefetch (None: demand loads only); `routing_observer` sees each
        MoE layer's routing; `routing_override` (benchmarks) routes as recorded instead of by the routers."""
        self.spec = spec
        self.dense = dense
        self.experts = experts
        self.device = device
        self.packed = packed
        self.packed_experts = packed and spec.expert_mlp.is_plain
        self.expert_format = expert_format
        self.rotary = RotaryEmbedding(spec.rope, device)
        self.moe_index = [spec.moe_index(layer) for layer in range(spec.num_layers)]
        self._speculator = speculator
        self._routing_observer = routing_observer
        self._routing_override = routing_override

    @property
    def speculator(self) -> Speculator | None:
        """The next-layer prefetcher this model was built with (None: demand loads only)."""
        return self._speculator

    @property
    def routing_override(self) -> RoutingOverride | None:
        """The recorded routing this model replays instead of its routers' (None: the routers route)."""
        return self._routing_override

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[KVCache],
    ) -> torch.Tensor:
        """input_ids, positions: [T]. Returns final-normed hidden states [T, D]."""
        x = self.dense.embed(input_ids)
        rotary = self.rotary.tables(positions)
        for layer_idx, layer in enumerate(self.dense.layers):
            h = rms_norm(x, layer.input_norm, self.spec.rms_norm_eps)
            if isinstance(layer.attention, LatentAttentionWeights):
                x = x + latent_attention(self.spec, layer.attention, h, rotary, meta, kv_caches[layer_idx][0])
            else:
                window = self.spec.window(layer_idx)
                x = x + self._attention(layer.attention, h, rotary, meta, kv_caches[layer_idx], window)
            h = rms_norm(x, layer.post_attention_norm, self.spec.rms_norm_eps)
            moe_layer = self.moe_index[layer_idx]
            if moe_layer is None:
                x = x + self._mlp(layer.mlp, h)
            else:
                x = x + self._moe(moe_layer, layer, h)
        return rms_norm(x, self.dense.final_norm, self.spec.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, D] -> fp32 logits [N, V]."""
        return linear(hidden, self.dense.lm_head).float()

    def _attention(
        self,
        w: AttentionWeights,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        kv_cache: KVCache,
        window: int | None,
    ) -> torch.Tensor:
        return self_attention(self.spec, w, x, rotary, meta, kv_cache[0], kv_cache[1], window)

    def route(self, moe_layer: int, layer: LayerWeights, x: torch.Tensor) -> Routing:
        """Router of MoE layer `moe_layer`: x [T, D] -> each token's top-k experts and weights,
        grouped by expert (see `engine.models.router`). With a routing override the ids come from it."""
        override = None if self._routing_override is None else self._routing_override(moe_layer)
        return route(self.spec.routing, self.spec.num_experts, self.spec.top_k, layer.router, layer.router_bias, x,
                     override)

    def _moe(self, moe_layer: int, layer: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        if not self.packed_experts:
            return self._moe_torch(moe_layer, layer, x)
        num_tokens, hidden = x.shape
        top_k = self.spec.top_k
        routing = self.route(moe_layer, layer, x)
        if self._routing_observer is not None:
            self._routing_observer(moe_layer, routing.ids)
        counts = routing.counts
        starts = [0] * len(counts)
        for e in range(1, len(counts)):
            starts[e] = starts[e - 1] + counts[e - 1]
        needed = [e for e, c in enumerate(counts) if c]
        gates = None
        if self.experts.needs_gates:  # each needed expert's largest relative gate weight over its rows
            by_assignment = torch.empty_like(routing.scale)
            by_assignment[routing.order] = routing.scale
            token_mean = by_assignment.view(num_tokens, top_k).mean(dim=1)  # [T]
            relative = routing.scale / token_mean[routing.tokens]
            gates = torch.segment_reduce(relative, "max", lengths=torch.tensor(counts), unsafe=True)[needed].tolist()
        # each (token, slot) pair gets its own row, so experts may finish in any order, on the device
        # or on the host, in any format, and the final sum over slots is still taken in one fixed order (bit-exact)
        fetched = self._fetch(moe_layer, needed, [counts[e] for e in needed], gates)
        self._hint_next(moe_layer, x, routing.ids)
        # the kernel computes in fp32 (bf16 weights too); the sum over slots is rounded to x's dtype once
        out = torch.zeros(num_tokens * top_k, hidden)
        rows = ExpertRows(x, routing.tokens, routing.order, routing.scale, self.spec.moe_intermediate_size)

        def compute(group: ExpertGroup) -> None:  # one kernel call per format in the group, writing only its rows
            low = [(e, tensors) for e, tensors in group if e in fetched.low]
            full = [(e, tensors) for e, tensors in group if e not in fetched.low] if low else group
            for part, expert_format in ((full, self.expert_format), (low, fetched.low_format)):
                if part:
                    assert expert_format is not None
                    expert_ffn(rows, out, [(starts[e], starts[e] + counts[e], *tensors) for e, tensors in part],
                               expert_format)

        # the host tier's experts on the host's worker, while this thread computes the device's
        host_job = self.experts.run_on_host(moe_layer, lambda: compute(fetched.host)) if fetched.host else None
        try:
            shared = self._shared(layer, x)  # while the misses copy
            for ready in fetched.ready:
                compute(ready)
        finally:
            if host_job is not None:
                host_job.result()  # its rows are in `out` once it returns; re-raises its error
        self.experts.done(moe_layer, needed)
        routed = out.view(num_tokens, top_k, hidden).sum(dim=1).to(x.dtype)
        return routed if shared is None else routed + shared

    def _moe_torch(self, moe_layer: int, layer: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        """The torch path (CUDA, or no C kernels): routing stays on the device, the ids are read on the
        host once (the expert cache needs them) and the routed experts run as two batched matmuls;
        experts the provider keeps on the host run beside them on the host worker (`_hybrid_torch`)."""
        override = None if self._routing_override is None else self._routing_override(moe_layer)
        ids, weights = route_on_device(self.spec.routing, self.spec.top_k, layer.router, layer.router_bias, x, override)
        if self._routing_observer is not None:
            self._routing_observer(moe_layer, ids)
        layout = ExpertLayout.from_ids(ids)  # the layer's one host sync
        gates = None
        if self.experts.needs_gates:  # each needed expert's largest relative gate weight (a second host read)
            relative = weights.float() / weights.float().mean(dim=1, keepdim=True)
            largest = torch.zeros(self.spec.num_experts, device=ids.device)
            largest.scatter_reduce_(0, ids.reshape(-1), relative.reshape(-1), "amax")
            gates = largest[layout.needed].tolist()
        fetched = self._fetch(moe_layer, layout.needed, layout.counts, gates)
        self._hint_next(moe_layer, x, layout.ids_host)
        shared = self._shared(layer, x)  # queued ahead of the routed experts, which wait for the misses' copies
        if fetched.host:
            routed = self._hybrid_torch(moe_layer, layout, x, weights, fetched)
        elif fetched.low:  # experts of two formats: each decoded in its own, then the same batched products
            decode = self._decoder(fetched, x)
            stored = {expert: decode(expert, tensors) for group in fetched.ready for expert, tensors in group}
            out = expert_outputs(self.spec.expert_mlp, layout.padded_rows(x), [stored[e] for e in layout.needed])
            routed = combine_slots(layout, out, weights, x.dtype)
        else:
            routed = batched_experts(self.spec.expert_mlp, layout, x, weights, fetched.ready, self.expert_format,
                                     self.spec.moe_intermediate_size)
        self.experts.done(moe_layer, layout.needed)
        return routed if shared is None else routed + shared

    def _hybrid_torch(self, moe_layer: int, layout: ExpertLayout, x: torch.Tensor, weights: torch.Tensor,
                      fetched: ExpertFetch) -> torch.Tensor:
        """The torch path with misses on the host: their padded rows [n, C, D] are read to the host once
        and the host worker computes them from the host tier while this thread computes the device's;
        both land in one [N, C, D] before the sum over slots (bit-exact where both run the same ops: the CPU)."""
        hidden, ffn, decode_host = x.shape[1], self.spec.moe_intermediate_size, self.expert_format.decode
        position = {expert: i for i, expert in enumerate(layout.needed)}
        host_index = torch.tensor([position[expert] for expert, _ in fetched.host], device=x.device)
        host_rows = layout.padded_rows(x, host_index).to(fetched.host[0][1][0].device)  # CUDA: a sync
        host_out: list[torch.Tensor] = []

        def compute_host() -> None:
            per_expert = [decode_host(tensors, hidden, ffn, x.dtype) for _, tensors in fetched.host]
            host_out.append(expert_outputs(self.spec.expert_mlp, host_rows, per_expert))

        host_job = self.experts.run_on_host(moe_layer, compute_host)
        out = x.new_empty(len(layout.needed), layout.width, hidden)  # [N, C, D]
        try:
            decode = self._decoder(fetched, x)
            stored = {expert: decode(expert, tensors) for group in fetched.ready for expert, tensors in group}
            if stored:
                device_experts = sorted(stored)
                device_index = torch.tensor([position[expert] for expert in device_experts], device=x.device)
                out[device_index] = expert_outputs(self.spec.expert_mlp, layout.padded_rows(x, device_index),
                                                   [stored[expert] for expert in device_experts])
        finally:
            host_job.result()  # re-raises its error
        out[host_index] = host_out[0].to(x.device, non_blocking=True)
        return combine_slots(layout, out, weights, x.dtype)

    def _fetch(self, moe_layer: int, needed: list[int], rows: list[int], gates: Sequence[float] | None) -> ExpertFetch:
        if gates is None:
            return self.experts.fetch(moe_layer, needed, rows)
        return self.experts.fetch(moe_layer, needed, rows, gates)

    def _decoder(self, fetched: ExpertFetch, x: torch.Tensor) -> Callable[[int, ExpertTensors], ExpertTensors]:
        """(expert, its stored tensors) -> the torch path's weights in x's dtype, each in the format it came in."""
        hidden, ffn = x.shape[1], self.spec.moe_intermediate_size

        def decode(expert: int, tensors: ExpertTensors) -> ExpertTensors:
            expert_format = fetched.low_format if expert in fetched.low else self.expert_format
            assert expert_format is not None
            return expert_format.decode(tensors, hidden, ffn, x.dtype)

        return decode

    def _hint_next(self, moe_layer: int, x: torch.Tensor, ids: torch.Tensor) -> None:
        """The speculator's guesses for the next MoE layer, handed to the provider to prefetch."""
        if self._speculator is not None:
            guesses = self._speculator(moe_layer, x, ids)
            if guesses and moe_layer + 1 < self.spec.num_moe_layers:
                self.experts.hint(moe_layer + 1, guesses)

    def _shared(self, layer: LayerWeights, x: torch.Tensor) -> torch.Tensor | None:
        """The layer's shared expert on x (None without one), computed once the routed experts' misses are
        loading so the copies overlap it; added to the routed sum after it, as before (the same result)."""
        return None if layer.shared_expert is None else self._mlp(layer.shared_expert, x)

    @staticmethod
    def _mlp(w: MLPWeights, x: torch.Tensor) -> torch.Tensor:
        """A dense layer's SwiGLU MLP, or a shared expert (scaled by sigmoid(gate x) when it has a gate)."""
        gate, up = linear(x, w.gate_up).chunk(2, dim=-1)
        out = linear(F.silu(gate) * up, w.down)
        return out if w.gate is None else torch.sigmoid(linear(x, w.gate)) * out


def moe_routers(spec: ModelSpec, dense: DenseWeights) -> list[Matrix]:
    """The MoE layers' routers, by MoE-layer index (what a router-based speculator needs before the model exists)."""
    return [dense.layers[layer].router for layer in spec.moe_layers]
