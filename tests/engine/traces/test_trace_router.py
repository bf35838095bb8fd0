"""TraceRouter: each new request replays the next prompt of the trace; restart() rewinds that."""

from __future__ import annotations

import numpy as np
import torch

from moe_serve.engine.core.step import StepChunk, StepLayout
from moe_serve.engine.traces.trace_file import RoutingTrace
from moe_serve.engine.traces.trace_router import TraceRouter


def _trace() -> RoutingTrace:
    lengths = [3, 4, 5]  # prompt p's token t routes to experts (p, t % 4) at layer 0
    rows = [[[p, 4 + t % 4]] for p, n in enumerate(lengths) for t in range(n)]
    return RoutingTrace(expert_ids=np.asarray(rows, dtype=np.uint8),
                        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                        prompt_ids=np.arange(3, dtype=np.int32), num_experts=8)


def _first_experts(router: TraceRouter, seq_ids: list[str]) -> list[int]:
    chunks = tuple(StepChunk(seq_id, "", 0, range(i, i + 1), True) for i, seq_id in enumerate(seq_ids))
    router.begin_step(StepLayout(chunks))
    return router(0)[:, 0].tolist()


def test_requests_take_the_next_prompts_and_restart_replays_them_again() -> None:
    router = TraceRouter(_trace(), num_layers=1, num_experts=8, top_k=2)
    assert _first_experts(router, ["a", "b"]) == [0, 1]
    router.restart()
    assert _first_experts(router, ["a", "c", "d"]) == [0, 0, 1]  # "a" keeps its prompt; new ones start over
    router.restart(2)
    assert _first_experts(router, ["e"]) == [2]
    assert torch.equal(router(0), torch.tensor([[2, 4]]))
