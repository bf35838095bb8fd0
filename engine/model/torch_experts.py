"""One MoE layer's routed experts in torch as two batched matmuls, not a loop over experts.

The torch path (CUDA, or the CPU with the C kernels off). The layer reads its routing ids on the
host once (`ExpertLayout.from_ids`: the one host sync the expert cache needs) and lays out each
needed expert's (token, slot) rows padded to the busiest expert's count C; the rest stays on the
device. `batched_experts` stacks the experts' weights as the provider hands them over, group by
group, then computes gate_up, the activation and down for every expert at once ([N, C, D] x
[N, D, 2F] and [N, C, F] x [N, F, D]), gathers each (token, slot) row back and takes each token's
weighted sum over its slots as one product. The compute runs once every expert has arrived, so its bits do not depend on
how the provider grouped them (offloading stays bit-exact); on a GPU the host does not wait for
the copies (the compute stream waits on their events). Shapes: T tokens, A active experts per
token, N needed experts, C rows per expert, D hidden, F expert intermediate size.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from moe_serve.engine.model.quant import ExpertFormat
from moe_serve.engine.model.spec import ExpertActivation, ExpertMLPSpec
from moe_serve.engine.model.weights import ExpertTensors


@dataclass(frozen=True)
class ExpertLayout:
    """Where one layer's (token, slot) assignments go: assignment a = t * A + slot."""

    needed: list[int]  # experts with at least one assignment: ascending, or one token's in slot order
    counts: list[int]  # assignment rows routed to each needed expert
    # [N, C] token of each padded row (padding rows read token 0; their result is unused), and [T * A] the
    # padded row (n * C + c) of each assignment; None for one token whose experts are in slot order (row = slot)
    gather: torch.Tensor | None
    inverse: torch.Tensor | None
    ids_host: torch.Tensor  # [T, A] the routing ids on the host (for speculators: no second read)

    @classmethod
    def from_ids(cls, ids: torch.Tensor) -> ExpertLayout:
        """The layout of routing ids [T, A] (on any device): reads them on the host once and sends the
        two index tensors back in one copy (none for one token routed to distinct experts)."""
        ids_host = ids.cpu()  # the layer's one host sync
        host = ids_host.numpy().reshape(-1)
        top_k = ids.shape[1]
        if len(ids) == 1 and len(set(host.tolist())) == top_k:  # one token: its experts in slot order, one row each
            return cls(host.tolist(), [1] * top_k, None, None, ids_host)
        order = np.argsort(host, kind="stable")
        needed, starts, counts = np.unique(host[order], return_index=True, return_counts=True)
        width = int(counts.max())
        # the padded row of each assignment taken in expert order: its expert's block, then its rank there
        padded = np.repeat(np.arange(len(needed)) * width - starts, counts) + np.arange(len(order))
        index = np.zeros(len(needed) * width + len(order), dtype=np.int64)
        index[padded] = order // top_k  # gather: each padded row's token
        index[len(needed) * width + order] = padded  # inverse: each assignment's padded row
        device_index = _to_device(torch.from_numpy(index), ids.device)
        gather, inverse = device_index.split([len(needed) * width, len(order)])
        return cls(needed.tolist(), counts.tolist(), gather.view(len(needed), width), inverse, ids_host)

    @property
    def width(self) -> int:
        """C: the padded rows per needed expert (the busiest expert's assignments)."""
        return 1 if self.gather is None else self.gather.shape[1]

    def padded_rows(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """The padded input rows [n, C, D] of x [T, D] for the needed experts at positions `index` (all
        of them when None); one token routed to distinct experts: views of it, no gather."""
        count = len(self.needed) if index is None else index.shape[0]
        if self.gather is None:
            return x.view(1, 1, x.shape[1]).expand(count, 1, x.shape[1])
        return x[self.gather if index is None else self.gather[index]]


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to a GPU through pinned memory, without making the host wait."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def batched_experts(
    spec: ExpertMLPSpec,
    layout: ExpertLayout,
    x: torch.Tensor,
    weights: torch.Tensor,
    groups: Iterable[list[tuple[int, ExpertTensors]]],
    expert_format: ExpertFormat,
    ffn: int,
) -> torch.Tensor:
    """The routed experts' weighted sum [T, D] in x's dtype, for x [T, D] and routing weights [T, A]
    (in x's dtype, or fp32: the products and their sum over the slots in fp32, rounded once), with the experts' weights from `groups` (the provider's fetch: every needed expert once,
    in groups of any composition and order). Quantized experts are dequantized one expert at a time."""
    num_tokens, hidden = x.shape
    stored: dict[int, ExpertTensors] = {}
    for group in groups:
        for expert, tensors in group:
            stored[expert] = expert_format.decode(tensors, hidden, ffn, x.dtype)
    per_expert = [stored[expert] for expert in layout.needed]
    return combine_slots(layout, expert_outputs(spec, layout.padded_rows(x), per_expert), weights, x.dtype)


def expert_outputs(spec: ExpertMLPSpec, rows: torch.Tensor, per_expert: Sequence[ExpertTensors]) -> torch.Tensor:
    """Each expert's padded input rows [N, C, D] and decoded tensors (on the rows' device) -> their
    outputs [N, C, D]: gate_up, the activation and down as batched matmuls (biases when the spec has them)."""
    gate_up = torch.stack([tensors[0] for tensors in per_expert])  # [N, 2F, D]
    down = torch.stack([tensors[1] for tensors in per_expert])  # [N, D, F]
    if spec.biases:
        gate_up_bias = torch.stack([tensors[2] for tensors in per_expert])[:, None, :]  # [N, 1, 2F]
        down_bias = torch.stack([tensors[3] for tensors in per_expert])[:, None, :]  # [N, 1, D]
        h = torch.baddbmm(gate_up_bias, rows, gate_up.mT)
    else:
        h = torch.bmm(rows, gate_up.mT)  # [N, C, 2F]
    gate, up = h.chunk(2, dim=-1)
    if spec.activation is ExpertActivation.CLAMPED_SWIGLU:
        gate = gate.clamp(max=spec.swiglu_limit)
        up = up.clamp(min=-spec.swiglu_limit, max=spec.swiglu_limit)
        act = (up + 1) * (gate * torch.sigmoid(gate * spec.swiglu_alpha))
    else:
        act = F.silu(gate) * up
    return torch.baddbmm(down_bias, act, down.mT) if spec.biases else torch.bmm(act, down.mT)  # [N, C, D]


def combine_slots(layout: ExpertLayout, out: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The padded outputs [N, C, D] of layout.needed -> each token's weighted sum over its slots [T, D] in
    `dtype` (weights [T, A] in `dtype`, or fp32: the products and their sum in fp32, rounded once)."""
    num_tokens, hidden = weights.shape[0], out.shape[-1]
    flat = out.view(-1, hidden)
    assigned = (flat if layout.inverse is None else flat[layout.inverse]).view(num_tokens, -1, hidden)  # [T, A, D]
    if weights.dtype == assigned.dtype:  # the weighted sum over the slots as one [1, A] x [A, D] product per token
        return torch.bmm(weights[:, None, :], assigned).view(num_tokens, hidden)
    return (assigned * weights[..., None]).sum(dim=1).to(dtype)  # fp32 weights (DeepSeek, GLM): sum in fp32
