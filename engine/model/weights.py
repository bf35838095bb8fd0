"""Weight containers of the MoE runtime: dense (always device-resident) and routed experts.

Routed experts are addressable per (MoE layer, expert) so the offload tier can move them one
at a time; everything else lives in `DenseWeights`. The layouts are fused at load
(`engine.models.checkpoint`): q/k/v become one projection, each gate and up one `gate_up`
matrix; for the CPU kernels every matrix a product reads is then packed (`pack_dense`, `pack_expert`),
the dense ones optionally stored low-bit (`--weight-dtype`, `engine.model.dense_quant`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from moe_serve.engine.host_memory import Arena
from moe_serve.engine.model.dense_quant import dense_layouts, matrix_rows, matrix_tensors, quantize_dense
from moe_serve.engine.model.packed import Matrix, PackedMatrix, QuantMatrix, pack_blocks, packed_shape
from moe_serve.engine.types import ExpertKey

logger = logging.getLogger(__name__)


@dataclass
class AttentionWeights:
    """One layer's attention. qkv: [(H + 2*Hkv) * Dh, D], o: [D, H * Dh]; sinks: [H] (gpt-oss)."""

    MATRICES: ClassVar[tuple[str, ...]] = ("qkv", "o")  # the fields a product reads

    qkv: Matrix
    qkv_bias: torch.Tensor | None
    o: Matrix
    o_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    sinks: torch.Tensor | None = None


@dataclass
class LatentAttentionWeights:
    """One layer's multi-head latent attention (DeepSeek), its rope dims de-interleaved at load.
    C latent rank, Q q_lora_rank (D without q LoRA), Dn/Dr/Dv nope/rope/value head dims.
    q: [H * (Dn + Dr), Q] after q_a [Q, D] and its norm [Q] (q LoRA only); kv_a: [C + Dr, D] (the
    latent, then the rope key); kv_a_norm: [C]; kv_b split per head: k_up [H, Dn, C] (absorbed into
    the queries) and v_up [H, Dv, C] (applied to the attended latents); o: [D, H * Dv]."""

    MATRICES: ClassVar[tuple[str, ...]] = ("q", "q_a", "kv_a", "o")

    q: Matrix
    q_a: Matrix | None
    q_a_norm: torch.Tensor | None
    kv_a: Matrix
    kv_a_norm: torch.Tensor
    k_up: torch.Tensor
    v_up: torch.Tensor
    o: Matrix


@dataclass
class MLPWeights:
    """A SwiGLU MLP: a dense layer's MLP, or an MoE layer's always-on shared expert (Qwen2-MoE
    scales it by sigmoid(gate x)). gate_up: [2F, D], down: [D, F], gate: [1, D]."""

    gate_up: Matrix
    down: Matrix
    gate: Matrix | None = None


@dataclass
class LayerWeights:
    """Everything of one decoder layer except its routed experts. An MoE layer has a router [E, D]
    (and maybe a shared expert, and DeepSeek-V3's fp32 correction bias [E]); a dense layer an mlp."""

    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    attention: AttentionWeights | LatentAttentionWeights
    router: Matrix | None
    shared_expert: MLPWeights | None
    mlp: MLPWeights | None = None
    router_bias: torch.Tensor | None = None


@dataclass
class DenseWeights:
    """The non-expert weights of the whole model (embeddings, layers, final norm, lm head).
    A tied, packed lm_head is also the embedding table (`embed`)."""

    embed_tokens: Matrix
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: Matrix

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embedding rows of input_ids [T]: [T, D]."""
        return matrix_rows(self.embed_tokens, input_ids)

    def nbytes(self) -> int:
        """Bytes held by the dense weights (a tied lm_head is counted once)."""
        seen: set[int] = set()
        total = 0
        for tensor in self._tensors():
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += tensor.numel() * tensor.element_size()
        return total

    def _tensors(self) -> list[torch.Tensor]:
        out = [*matrix_tensors(self.embed_tokens), self.final_norm, *matrix_tensors(self.lm_head)]
        for layer in self.layers:
            attention = [getattr(layer.attention, f.name) for f in dataclasses.fields(layer.attention)]
            out += [layer.input_norm, layer.post_attention_norm]
            out += [t for m in (*attention, layer.router, layer.router_bias, *_mlp_matrices(layer.shared_expert),
                                *_mlp_matrices(layer.mlp))
                    if m is not None for t in matrix_tensors(m)]
        return out


def _mlp_matrices(mlp: MLPWeights | None) -> tuple[Matrix | None, ...]:
    return () if mlp is None else (mlp.gate_up, mlp.down, mlp.gate)


def _map_matrices(dense: DenseWeights, fn: Callable[[Matrix], Matrix],
                  gate_fn: Callable[[Matrix], Matrix] | None = None) -> DenseWeights:
    """`dense` with fn applied to every matrix a product reads (the attention's `MATRICES`, shared
    experts, dense MLPs, lm_head) and gate_fn (default fn) to the routers and shared-expert gates;
    the embedding table, norms, biases and MLA's per-head up-projections stay as they are."""
    gate_fn = fn if gate_fn is None else gate_fn

    def mlp(weights: MLPWeights | None) -> MLPWeights | None:
        if weights is None:
            return None
        return MLPWeights(fn(weights.gate_up), fn(weights.down), None if weights.gate is None else gate_fn(weights.gate))

    layers = []
    for layer in dense.layers:
        att = layer.attention
        matrices = {name: fn(getattr(att, name)) for name in att.MATRICES if getattr(att, name) is not None}
        layers.append(dataclasses.replace(
            layer, router=None if layer.router is None else gate_fn(layer.router), shared_expert=mlp(layer.shared_expert),
            mlp=mlp(layer.mlp), attention=dataclasses.replace(att, **matrices),
        ))
    return DenseWeights(dense.embed_tokens, layers, dense.final_norm, fn(dense.lm_head))


def pack_dense(dense: DenseWeights, weight_dtype: str = "model") -> DenseWeights:
    """The same weights with every matrix a product reads packed, all in one huge-page advised
    arena; a tied lm_head stays shared with the embedding table (looked up in the packed blocks).
    With `weight_dtype` "int8" or "int4" (`engine.model.dense_quant`) the attention projections,
    shared experts, dense MLPs and lm_head are quantized instead; routers and shared-expert gates,
    which pick experts, keep the model dtype."""
    quantized = weight_dtype != "model"
    plain: list[torch.Tensor] = []
    to_quantize: list[torch.Tensor] = []

    def collect(into: list[torch.Tensor]) -> Callable[[Matrix], Matrix]:
        def add(matrix: Matrix) -> Matrix:
            if isinstance(matrix, torch.Tensor):
                into.append(matrix)
            return matrix
        return add

    _map_matrices(dense, collect(to_quantize if quantized else plain), collect(plain))
    layouts = [(packed_shape(*m.shape), m.dtype) for m in plain]
    layouts += [layout for m in to_quantize for layout in dense_layouts(*m.shape, weight_dtype)]
    arena = Arena(Arena.bytes_for(layouts))

    def pack(matrix: Matrix) -> Matrix:
        if not isinstance(matrix, torch.Tensor):
            return matrix
        return PackedMatrix.pack(matrix, arena.take(packed_shape(*matrix.shape), matrix.dtype))

    def quantize(matrix: Matrix) -> Matrix:
        if not isinstance(matrix, torch.Tensor):
            return matrix
        stored = quantize_dense(matrix, weight_dtype)  # one matrix at a time: its temporaries are freed
        tensors = tuple(arena.take(tuple(t.shape), t.dtype).copy_(t) for t in stored.tensors)
        return dataclasses.replace(stored, tensors=tensors)

    packed = _map_matrices(dense, quantize if quantized else pack, pack)
    if quantized:
        before = sum(m.numel() * m.element_size() for m in to_quantize)
        after = sum(m.nbytes() for m in _quantized(packed))
        logger.info("dense weights: %d matrices stored %s (%.1f MiB -> %.1f MiB), routers at the model dtype",
                    len(to_quantize), weight_dtype, before / 2**20, after / 2**20)
    tied = isinstance(dense.embed_tokens, torch.Tensor) and isinstance(dense.lm_head, torch.Tensor) \
        and dense.embed_tokens.data_ptr() == dense.lm_head.data_ptr()
    return dataclasses.replace(packed, embed_tokens=packed.lm_head) if tied else packed


def _quantized(dense: DenseWeights) -> list[QuantMatrix]:
    found: list[QuantMatrix] = []

    def add(matrix: Matrix) -> Matrix:
        if isinstance(matrix, QuantMatrix):
            found.append(matrix)
        return matrix

    _map_matrices(dense, add)
    return found


# (gate_up [2F, D], down [D, F]), then with biased experts (gpt-oss) (gate_up_bias [2F], down_bias [D]);
# packed for the CPU kernels (bias-free SwiGLU experts only): their blocks, see `pack_expert`
ExpertTensors = tuple[torch.Tensor, ...]


def pack_expert(tensors: ExpertTensors, arena: Arena | None = None) -> ExpertTensors:
    """One routed expert's (gate_up, down) as packed blocks ([ceil(2F/16), D, 16], [ceil(D/16), F, 16]),
    carved out of `arena` when given."""
    def pack(weight: torch.Tensor) -> torch.Tensor:
        return pack_blocks(weight, None if arena is None else arena.take(packed_shape(*weight.shape), weight.dtype))

    gate_up, down = tensors
    return pack(gate_up), pack(down)


def packed_experts_nbytes(experts: dict[ExpertKey, ExpertTensors]) -> int:
    """The arena size that holds every expert packed."""
    return Arena.bytes_for([(packed_shape(*t.shape), t.dtype) for pair in experts.values() for t in pair])


@dataclass
class ModelWeights:
    """Dense weights plus every routed expert, keyed by ExpertKey."""

    dense: DenseWeights
    experts: dict[ExpertKey, ExpertTensors]
