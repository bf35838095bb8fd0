"""Weight containers of the MoE runtime: dense (always device-resident) and routed experts.

Routed experts are addressable per (layer, expert) so the offload tier can move them one
at a time; everything else lives in `DenseWeights`. Fused layouts are built here once:
q/k/v become one projection, each expert's gate and up become one `gate_up` matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.types import ExpertKey


@dataclass
class AttentionWeights:
    """One layer's attention. qkv: [(H + 2*Hkv) * Dh, D], o: [D, H * Dh]."""

    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None


@dataclass
class SharedExpertWeights:
    """Qwen2-MoE's always-on expert and its sigmoid gate. gate_up: [2S, D], down: [D, S], gate: [1, D]."""

    gate_up: torch.Tensor
    down: torch.Tensor
    gate: torch.Tensor


@dataclass
class LayerWeights:
    """Everything of one decoder layer except its routed experts. router: [E, D]."""

    input_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    attention: AttentionWeights
    router: torch.Tensor
    shared_expert: SharedExpertWeights | None


@dataclass
class DenseWeights:
    """The non-expert weights of the whole model (embeddings, layers, final norm, lm head)."""

    embed_tokens: torch.Tensor
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: torch.Tensor

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
        out = [self.embed_tokens, self.final_norm, self.lm_head]
        for layer in self.layers:
            att = layer.attention
            out += [layer.input_norm, layer.post_attention_norm, layer.router, att.qkv, att.o]
            out += [t for t in (att.qkv_bias, att.o_bias, att.q_norm, att.k_norm) if t is not None]
            if layer.shared_expert is not None:
                out += [layer.shared_expert.gate_up, layer.shared_expert.down, layer.shared_expert.gate]
        return out


ExpertTensors = tuple[torch.Tensor, torch.Tensor]  # (gate_up [2F, D], down [D, F])


@dataclass
class ModelWeights:
    """Dense weights plus every routed expert, keyed by ExpertKey."""

    dense: DenseWeights
    experts: dict[ExpertKey, ExpertTensors]
