"""Our forward pass for decoder-only MoE transformers (Mixtral, Qwen2/3-MoE, OLMoE).

Pure functions over `DenseWeights` plus an `ExpertProvider`; the spec decides biases,
q/k norms, the shared expert and top-k renormalisation. Shapes: T tokens, D hidden,
H heads, Hkv kv heads, Dh head dim, E experts, A active experts per token, F expert
intermediate size, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from engine.models.attention import AttentionMetadata, paged_attention
from engine.models.cpu_kernels import ExpertRows, Routing, expert_ffn, linear, rms_norm, rope
from engine.models.cpu_kernels import route as route_kernel
from engine.models.experts import ExpertProvider
from engine.models.spec import ModelSpec, QKNorm
from engine.models.weights import AttentionWeights, DenseWeights, LayerWeights, SharedExpertWeights

RoutingObserver = Callable[[int, torch.Tensor], None]  # (layer, topk_ids [T, A])
# (layer, the layer's input hidden state [T, D], its topk_ids [T, A]) -> experts of layer + 1 to prefetch
Speculator = Callable[[int, torch.Tensor, torch.Tensor], list[int]]
RoutingOverride = Callable[[int], torch.Tensor]  # layer -> topk_ids [T, A] to use instead of the router's


class RotaryEmbedding:
    """cos/sin tables for rotate-half rotary embeddings. Dh head dim, P positions."""

    def __init__(self, head_dim: int, theta: float, max_positions: int, device: torch.device) -> None:
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)  # [P, Dh]
        self.cos = emb.cos().to(device)
        self.sin = emb.sin().to(device)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, Dh] at positions [T]: looked up once per step, used by every layer."""
        return self.cos[positions], self.sin[positions]


class MoEModel:
    """Runs one step of the model over a flattened batch of tokens. With `packed` the weights are
    in the CPU kernels' packed layout (`engine.models.weights.pack_dense`, `pack_expert`) and the
    routed experts run in the C kernel; otherwise every product runs in torch."""

    def __init__(self, spec: ModelSpec, dense: DenseWeights, experts: ExpertProvider, device: torch.device,
                 packed: bool = False) -> None:
        self.spec = spec
        self.dense = dense
        self.experts = experts
        self.device = device
        self.packed = packed
        self.rotary = RotaryEmbedding(spec.head_dim, spec.rope_theta, spec.max_position_embeddings, device)
        self.scale = spec.head_dim**-0.5
        self.routing_observer: RoutingObserver | None = None
        self.speculator: Speculator | None = None  # None: no next-layer prefetch
        self.routing_override: RoutingOverride | None = None  # benchmarks: replay recorded routing

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """input_ids, positions: [T]. Returns final-normed hidden states [T, D]."""
        x = self.dense.embed(input_ids)
        rotary = self.rotary.tables(positions)
        for layer_idx, layer in enumerate(self.dense.layers):
            h = rms_norm(x, layer.input_norm, self.spec.rms_norm_eps)
            x = x + self._attention(layer.attention, h, rotary, meta, kv_caches[layer_idx])
            h = rms_norm(x, layer.post_attention_norm, self.spec.rms_norm_eps)
            x = x + self._moe(layer_idx, layer, h)
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
        kv_cache: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        spec = self.spec
        num_tokens = x.shape[0]
        q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        qkv = linear(x, w.qkv, w.qkv_bias)
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        if spec.qk_norm is QKNorm.FULL:
            q = rms_norm(q, w.q_norm, spec.rms_norm_eps)
            k = rms_norm(k, w.k_norm, spec.rms_norm_eps)
        if spec.clip_qkv is not None:
            q, k, v = (t.clamp(-spec.clip_qkv, spec.clip_qkv) for t in (q, k, v))
        q = q.reshape(num_tokens, spec.num_heads, spec.head_dim)
        k = k.reshape(num_tokens, spec.num_kv_heads, spec.head_dim)
        v = v.reshape(num_tokens, spec.num_kv_heads, spec.head_dim)
        if spec.qk_norm is QKNorm.PER_HEAD:
            q = rms_norm(q, w.q_norm, spec.rms_norm_eps)
            k = rms_norm(k, w.k_norm, spec.rms_norm_eps)
        q = rope(q, *rotary)
        k = rope(k, *rotary)
        out = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return linear(out, w.o, w.o_bias)

    def route(self, layer_idx: int, layer: LayerWeights, x: torch.Tensor) -> Routing:
        """Router: x [T, D] -> the top-k experts of each token with their weights (softmax
        probabilities, renormalised if the spec says so, in x's dtype), grouped by expert. With a
        routing override the ids come from it and the weights are the router's probabilities at
        those ids. One C call on CPU; torch elsewhere."""
        top_k = self.spec.top_k
        logits = linear(x, layer.router)  # [T, E]
        override = None if self.routing_override is None else self.routing_override(layer_idx)
        routing = route_kernel(logits, top_k, self.spec.norm_topk_prob, x.dtype, override)
        if routing is not None:
            return routing
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        if override is None:
            weights, ids = torch.topk(probs, top_k, dim=-1)
        else:
            ids = override.to(device=x.device, dtype=torch.long)
            weights = probs.gather(1, ids)
        if self.spec.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        flat_ids = ids.flatten()  # [T * A]
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=self.spec.num_experts).tolist()
        return Routing(ids, counts, order, order // top_k, weights.to(x.dtype).float().flatten()[order])

    def _moe(self, layer_idx: int, layer: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        num_tokens, hidden = x.shape
        top_k = self.spec.top_k
        routing = self.route(layer_idx, layer, x)
        if self.routing_observer is not None:
            self.routing_observer(layer_idx, routing.ids)
        counts = routing.counts
        starts = [0] * len(counts)
        for e in range(1, len(counts)):
            starts[e] = starts[e - 1] + counts[e - 1]
        needed = [e for e, c in enumerate(counts) if c]
        # each (token, slot) pair gets its own row, so experts may finish in any order
        # and the final sum over slots is still taken in one fixed order (bit-exact)
        fetched = self.experts.fetch(layer_idx, needed)
        if self.speculator is not None:
            guesses = self.speculator(layer_idx, x, routing.ids)
            if guesses and layer_idx + 1 < self.spec.num_layers:
                self.experts.hint(layer_idx + 1, guesses)
        if self.packed:
            # the kernel computes in fp32 (bf16 weights too); the sum over slots is rounded to x's dtype once
            out = torch.zeros(num_tokens * top_k, hidden)
            rows = ExpertRows(x, routing.tokens, routing.order, routing.scale, self.spec.moe_intermediate_size)
            for ready in fetched:  # one kernel call per group of usable experts
                groups = [(starts[e], starts[e] + counts[e], gate_up, down) for e, (gate_up, down) in ready]
                expert_ffn(rows, out, groups)
        else:
            out = x.new_zeros(num_tokens * top_k, hidden)
            for ready in fetched:
                for expert, (gate_up, down) in ready:
                    first, last = starts[expert], starts[expert] + counts[expert]
                    gate, up = F.linear(x[routing.tokens[first:last]], gate_up).chunk(2, dim=-1)
                    expert_out = F.linear(F.silu(gate) * up, down) * routing.scale[first:last, None]
                    out[routing.order[first:last]] = expert_out.to(out.dtype)
        self.experts.done(layer_idx, needed)
        routed = out.view(num_tokens, top_k, hidden).sum(dim=1).to(x.dtype)
        if layer.shared_expert is not None:
            routed = routed + self._shared_expert(layer.shared_expert, x)
        return routed

    @staticmethod
    def _shared_expert(w: SharedExpertWeights, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear(x, w.gate_up).chunk(2, dim=-1)
        out = linear(F.silu(gate) * up, w.down)
        return torch.sigmoid(linear(x, w.gate)) * out
