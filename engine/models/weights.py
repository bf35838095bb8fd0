"""Weight containers of the MoE runtime: dense (always device-resident) and routed experts.

Routed experts are addressable per (layer, expert) so the offload tier can move them one
at a time; everything else lives in `DenseWeights`. Fused layouts are built here once:
q/k/v become one projection, each expert's gate and up become one `gate_up` matrix; for the
CPU kernels every matrix a product reads is then packed (`pack_dense`, `pack_expert`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.host_memory import Arena
from engine.models.packed import Matrix, PackedMatrix, pack_blocks, packed_shape
from engine.types import ExpertKey


@dataclass
class AttentionWeights:
    """One layer's attention. qkv: [(H + 2*Hkv) * Dh, D], o: [D, H * Dh]."""

    qkv: Matrix
    qkv_bias: torch.Tensor | None
    o: Matrix
    o_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None


@dataclass
class SharedExpertWeights:
    """Qwen2-MoE's always-on expert and its sigmoid gate. gate_up: [2S, D], down: [D, S], gate: [1, D]."""

    gate_up: Matrix
    down: Matrix
    gate: Matrix


@dataclass
class LayerWeights:
    """Everything of one decoder layer except its routed experts. router: [E, D]."""

    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    attention: AttentionWeights
    router: Matrix
    shared_expert: SharedExpertWeights | None


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
        if isinstance(self.embed_tokens, PackedMatrix):
            return self.embed_tokens.rows_at(input_ids)
        return self.embed_tokens[input_ids]

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
        out = [_storage(self.embed_tokens), self.final_norm, _storage(self.lm_head)]
        for layer in self.layers:
            att = layer.attention
            out += [layer.input_norm, layer.post_attention_norm, _storage(layer.router), _storage(att.qkv),
                    _storage(att.o)]
            out += [t for t in (att.qkv_bias, att.o_bias, att.q_norm, att.k_norm) if t is not None]
            if layer.shared_expert is not None:
                shared = layer.shared_expert
                out += [_storage(shared.gate_up), _storage(shared.down), _storage(shared.gate)]
        return out


def _storage(matrix: Matrix) -> torch.Tensor:
    return matrix.blocks if isinstance(matrix, PackedMatrix) else matrix


def _map_matrices(dense: DenseWeights, fn: Callable[[Matrix], Matrix]) -> DenseWeights:
    """`dense` with fn applied to every matrix a product reads (routers, q/k/v, o, shared experts,
    lm_head); the embedding table, norms and biases stay as they are."""
    layers = []
    for layer in dense.layers:
        att, shared = layer.attention, layer.shared_expert
        if shared is not None:
            shared = SharedExpertWeights(fn(shared.gate_up), fn(shared.down), fn(shared.gate))
        layers.append(dataclasses.replace(
            layer, router=fn(layer.router), shared_expert=shared,
            attention=dataclasses.replace(att, qkv=fn(att.qkv), o=fn(att.o)),
        ))
    return DenseWeights(dense.embed_tokens, layers, dense.final_norm, fn(dense.lm_head))


def pack_dense(dense: DenseWeights) -> DenseWeights:
    """The same weights with every matrix a product reads packed, all in one huge-page advised
    arena; a tied lm_head stays shared with the embedding table (looked up in the packed blocks)."""
    plain: list[torch.Tensor] = []

    def collect(matrix: Matrix) -> Matrix:
        if isinstance(matrix, torch.Tensor):
            plain.append(matrix)
        return matrix

    _map_matrices(dense, collect)
    arena = Arena(Arena.bytes_for([(packed_shape(*m.shape), m.dtype) for m in plain]))

    def pack(matrix: Matrix) -> Matrix:
        if isinstance(matrix, PackedMatrix):
            return matrix
        return PackedMatrix.pack(matrix, arena.take(packed_shape(*matrix.shape), matrix.dtype))

    packed = _map_matrices(dense, pack)
    tied = isinstance(dense.embed_tokens, torch.Tensor) and isinstance(dense.lm_head, torch.Tensor) \
        and dense.embed_tokens.data_ptr() == dense.lm_head.data_ptr()
    return dataclasses.replace(packed, embed_tokens=packed.lm_head) if tied else packed


# (gate_up [2F, D], down [D, F]); packed for the CPU kernels: their blocks, see `pack_expert`
ExpertTensors = tuple[torch.Tensor, torch.Tensor]


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
