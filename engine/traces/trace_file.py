"""Routing traces: one in-memory structure, its loaders (npz, Mixtral jsonl), its writer and slicing.

A trace records, for every token and every MoE layer, the set of routed experts chosen:
`expert_ids[t, l, :]` (uint8/int, shape [T, L, K]). Tokens are grouped into prompts
(requests) by `offsets` ([P+1], prompt p covers rows offsets[p]:offsets[p+1]). Rows whose
record is absent from the source (the jsonl traces miss a few (token, layer) pairs) are
flagged False in `present` ([T, L]); replay skips them. No torch import.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelGeometry:
    """Size of one routed expert of a known model (gate, up and down projections)."""

    name: str
    hidden_size: int
    moe_intermediate_size: int
    num_matrices: int
    bytes_per_param: float
    num_experts: int

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert's weights as stored on the host."""
        return int(self.hidden_size * self.moe_intermediate_size * self.num_matrices * self.bytes_per_param)


KNOWN_GEOMETRIES: tuple[ModelGeometry, ...] = (
    ModelGeometry("deepseek-v2-lite", 2048, 1408, 3, 1.0, 64),
    ModelGeometry("mixtral-8x7b", 4096, 14336, 3, 1.0, 8),
)


def geometry_for(model: str) -> ModelGeometry | None:
    """The known geometry whose name occurs in `model` (a model id or a trace file name)."""
    lowered = model.lower()
    for geometry in KNOWN_GEOMETRIES:
        if geometry.name in lowered:
            return geometry
    return None


@dataclass
class RoutingTrace:
    """Experts routed per token and MoE layer, grouped into prompts."""

    expert_ids: np.ndarray  # T tokens, L layers, K active: int expert index
    offsets: np.ndarray  # P+1 int64 prompt boundaries
    prompt_ids: np.ndarray  # P int32 source prompt numbers
    num_experts: int
    model: str = ""
    present: np.ndarray | None = None  # T, L bool; None means every row is present
    tasks: list[str] | None = None  # P task labels
    request_ids: list[str] | None = None  # P request ids

    def __post_init__(self) -> None:
        if self.expert_ids.ndim != 3:
            raise ValueError(f"expert_ids must be [T, L, K], got shape {self.expert_ids.shape}")
        if self.offsets.ndim != 1 or len(self.offsets) != len(self.prompt_ids) + 1:
            raise ValueError("offsets must have one more entry than prompt_ids")
        if self.offsets[0] != 0 or self.offsets[-1] != self.num_tokens or np.any(np.diff(self.offsets) < 0):
            raise ValueError("offsets must rise from 0 to the number of tokens")
        if self.present is not None and self.present.shape != self.expert_ids.shape[:2]:
            raise ValueError("present must be [T, L]")
        for name in ("tasks", "request_ids"):
            labels = getattr(self, name)
            if labels is not None and len(labels) != self.num_prompts:
                raise ValueError(f"{name} must have one entry per prompt")

    @property
    def num_tokens(self) -> int:
        return int(self.expert_ids.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.expert_ids.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.expert_ids.shape[2])

    @property
    def num_prompts(self) -> int:
        return int(len(self.prompt_ids))

    @property
    def geometry(self) -> ModelGeometry | None:
        return geometry_for(self.model) if self.model else None

    def slice_prompts(self, start: int, stop: int) -> RoutingTrace:
        """Prompts [start, stop) (Python slice semantics, negative indices allowed)."""
        first, last, _ = slice(start, stop).indices(self.num_prompts)
        last = max(first, last)
        row_lo, row_hi = int(self.offsets[first]), int(self.offsets[last])
        return replace(
            self,
            expert_ids=self.expert_ids[row_lo:row_hi],
            offsets=self.offsets[first : last + 1] - row_lo,
            prompt_ids=self.prompt_ids[first:last],
            present=None if self.present is None else self.present[row_lo:row_hi],
            tasks=None if self.tasks is None else self.tasks[first:last],
            request_ids=None if self.request_ids is None else self.request_ids[first:last],
        )

    def slice_tokens(self, start: int, stop: int) -> RoutingTrace:
        """Token rows [start, stop); prompts cut by the range keep their overlapping part."""
        row_lo, row_hi, _ = slice(start, stop).indices(self.num_tokens)
        row_hi = max(row_lo, row_hi)
        clipped = np.clip(self.offsets, row_lo, row_hi) - row_lo
        keep = np.flatnonzero(np.diff(clipped) > 0)
        offsets = np.concatenate([[0], clipped[keep + 1]]).astype(np.int64)
        return replace(
            self,
            expert_ids=self.expert_ids[row_lo:row_hi],
            offsets=offsets,
            prompt_ids=self.prompt_ids[keep],
            present=None if self.present is None else self.present[row_lo:row_hi],
            tasks=None if self.tasks is None else [self.tasks[i] for i in keep],
            request_ids=None if self.request_ids is None else [self.request_ids[i] for i in keep],
        )


def load_trace(path: str | Path) -> RoutingTrace:
    """Load an npz (this project's schema) or a Mixtral-style jsonl routing trace."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trace file not found: {path}")
    if path.suffix == ".npz":
        return _load_npz(path)
    if path.suffix in (".jsonl", ".json"):
        return _load_jsonl(path)
    raise ValueError(f"unknown trace format {path.suffix!r} (expected .npz or .jsonl)")


def _load_npz(path: Path) -> RoutingTrace:
    with np.load(path, allow_pickle=False) as data:
        expert_ids = data["expert_ids"]
        model = str(data["model"]) if "model" in data.files else path.stem
        geometry = geometry_for(model)
        if "num_experts" in data.files:
            num_experts = int(data["num_experts"])
        elif geometry is not None:
            num_experts = geometry.num_experts
        else:
            num_experts = int(expert_ids.max(initial=0)) + 1
        return RoutingTrace(
            expert_ids=expert_ids,
            offsets=data["offsets"].astype(np.int64),
            prompt_ids=data["prompt_ids"].astype(np.int32),
            num_experts=num_experts,
            model=model,
            present=data["present"].astype(bool) if "present" in data.files else None,
            tasks=[str(s) for s in data["tasks"]] if "tasks" in data.files else None,
            request_ids=[str(s) for s in data["request_ids"]] if "request_ids" in data.files else None,
        )


def _load_jsonl(path: Path) -> RoutingTrace:
    """Records {problem_id, layer, experts, token_idx, ...}; first record wins on duplicates."""
    rows: dict[tuple[int, int, int], list[int]] = {}
    duplicates = 0
    with path.open() as handle:
        for line in handle:
            if not line.strip():
                continue
            record = json.loads(line)
            where = (int(record["problem_id"]), int(record["token_idx"]), int(record["layer"]))
            if where in rows:
                duplicates += 1
                continue
            rows[where] = [int(e) for e in record["experts"]]
    if not rows:
        raise ValueError(f"no routing records in {path}")
    problems = sorted({p for p, _, _ in rows})
    num_layers = max(layer for _, _, layer in rows) + 1
    top_k = max(len(experts) for experts in rows.values())
    lengths = {p: 0 for p in problems}
    for p, token, _ in rows:
        lengths[p] = max(lengths[p], token + 1)
    offsets = np.concatenate([[0], np.cumsum([lengths[p] for p in problems])]).astype(np.int64)
    base = {p: int(offsets[i]) for i, p in enumerate(problems)}
    expert_ids = np.zeros((int(offsets[-1]), num_layers, top_k), dtype=np.uint8)
    present = np.zeros((int(offsets[-1]), num_layers), dtype=bool)
    for (p, token, layer), experts in rows.items():
        if len(experts) != top_k:
            continue
        expert_ids[base[p] + token, layer] = experts
        present[base[p] + token, layer] = True
    missing = int((~present).sum())
    if missing or duplicates:
        logger.info("%s: %d (token, layer) records missing, %d duplicates ignored", path.name, missing, duplicates)
    geometry = geometry_for(path.stem)
    return RoutingTrace(
        expert_ids=expert_ids,
        offsets=offsets,
        prompt_ids=np.asarray(problems, dtype=np.int32),
        num_experts=geometry.num_experts if geometry else int(expert_ids.max(initial=0)) + 1,
        model=path.stem,
        present=None if missing == 0 else present,
    )


def save_trace(path: str | Path, trace: RoutingTrace) -> None:
    """Write `trace` in the npz schema (optional arrays only when the trace has them)."""
    arrays: dict[str, np.ndarray] = {
        "expert_ids": np.asarray(trace.expert_ids, dtype=np.uint8 if trace.num_experts <= 256 else np.int32),
        "offsets": np.asarray(trace.offsets, dtype=np.int64),
        "prompt_ids": np.asarray(trace.prompt_ids, dtype=np.int32),
        "num_experts": np.asarray(trace.num_experts, dtype=np.int64),
    }
    if trace.model:
        arrays["model"] = np.asarray(trace.model)
    if trace.present is not None:
        arrays["present"] = np.asarray(trace.present, dtype=bool)
    if trace.tasks is not None:
        arrays["tasks"] = np.asarray(trace.tasks, dtype=np.str_)
    if trace.request_ids is not None:
        arrays["request_ids"] = np.asarray(trace.request_ids, dtype=np.str_)
    with open(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)
