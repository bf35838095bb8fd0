"""Routing override for benchmarks: a live model routes as a recorded trace says.

Offloading and prefetching behave the way routing lets them, and a random-weight model
routes nothing like a trained one. `TraceRouter` makes the model take each token's experts
from a real routing trace (`RoutingTrace`, e.g. ../shared/traces) so a model with real
geometry but random weights moves the experts a real model would. Each request gets the
next prompt of the trace (round robin); its token at position p routes, at MoE layer l, to
the experts recorded for row offsets[prompt] + p (wrapping at the end of the trace), so
decode continues through real consecutive-token routing. The model's routers still weight
the chosen experts. Generated text is meaningless: this is for measuring, never for serving.
"""

from __future__ import annotations

import numpy as np
import torch

from moe_serve.engine.core.step import StepLayout
from moe_serve.engine.traces.trace_file import RoutingTrace


class TraceRouter:
    """Replays `trace` layer by layer (the model's layer l takes the trace's layer `first_layer + l`)."""

    def __init__(self, trace: RoutingTrace, num_layers: int, num_experts: int, top_k: int,
                 first_layer: int = 0) -> None:
        if trace.top_k != top_k:
            raise ValueError(f"the trace routes to {trace.top_k} experts per token, the model to {top_k}")
        if trace.num_experts > num_experts:
            raise ValueError(f"the trace has {trace.num_experts} experts per layer, the model only {num_experts}")
        if not 0 <= first_layer or first_layer + num_layers > trace.num_layers:
            raise ValueError(f"the model's {num_layers} layers from trace layer {first_layer} do not fit "
                             f"the trace's {trace.num_layers} layers")
        rows = np.arange(trace.num_tokens)
        if trace.present is not None:  # replay only tokens recorded at every layer
            rows = rows[trace.present[:, first_layer : first_layer + num_layers].all(axis=1)]
        if len(rows) == 0:
            raise ValueError("the trace has no token recorded at every replayed layer")
        ids = trace.expert_ids[rows, first_layer : first_layer + num_layers].astype(np.int64)
        self._ids = torch.from_numpy(np.ascontiguousarray(ids))  # [N, L, K]
        kept = np.searchsorted(rows, trace.offsets[:-1])  # first replayed row of each prompt
        self._prompt_starts = np.unique(kept[kept < len(rows)]).tolist()
        self._next_prompt = 0
        self._start_of: dict[str, int] = {}
        self._rows = torch.zeros(0, dtype=torch.long)

    def restart(self, prompt: int = 0) -> None:
        """The next new request replays the trace's `prompt`-th prompt, and later ones the following prompts
        (benchmarks replay the same prompts under each setting); requests already assigned keep theirs."""
        self._next_prompt = prompt

    def begin_step(self, layout: StepLayout) -> None:
        """This step's tokens in batch order: each request's positions from its chunk's start."""
        chunks = []
        for chunk in layout:
            first = self._start_of.get(chunk.seq_id)
            if first is None:
                first = self._prompt_starts[self._next_prompt % len(self._prompt_starts)]
                self._next_prompt += 1
                self._start_of[chunk.seq_id] = first
            chunks.append(torch.arange(first + chunk.start, first + chunk.start + chunk.num_tokens) % len(self._ids))
        self._rows = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.long)

    def end_step(self) -> None:
        """Nothing to do: the rows stay until the next step's layout."""

    def forget(self, seq_id: str, completed: bool) -> None:
        """The request finished: drop its assignment."""
        self._start_of.pop(seq_id, None)

    def __call__(self, layer: int) -> torch.Tensor:
        """Expert ids [T, K] of this step's tokens at the model's layer `layer`."""
        return self._ids[self._rows, layer]
