"""Checkpoint loading: Hugging Face config + safetensors (single file or sharded) -> ModelWeights.

Tensors are read through safetensors' memory map with the Hub weight names, cast to the
requested dtype, and fused into the runtime's layouts (see `engine.models.checkpoint`); routed
experts are stored in the requested `ExpertFormat` (`engine.model.quant`), quantized one expert at
a time as they are read, and an MXFP4 checkpoint's experts can stay 4-bit.
Every failure (missing directory, unsupported architecture, corrupt or truncated file,
missing tensor) is raised as a ModelLoadError with a one-line message.
"""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from moe_serve.engine.errors import ModelLoadError
from moe_serve.engine.host_memory import Arena
from moe_serve.engine.model.checkpoint import expert_weights, layer_weights
from moe_serve.engine.model.mxfp4 import MXFP4Expert
from moe_serve.engine.model.quant import MODEL_DTYPE, MXFP4_FORMAT, ExpertFormat, parse_expert_dtype
from moe_serve.engine.model.registry import spec_from_config
from moe_serve.engine.model.spec import ModelSpec
from moe_serve.engine.model.weights import DenseWeights, ExpertTensors, LayerWeights, ModelWeights
from moe_serve.engine.progress import progress
from moe_serve.engine.types import ExpertKey

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass
class LoadedModel:
    """A checkpoint ready for the runtime: its spec, its weights, its HF config, and the format its
    routed experts are stored in."""

    spec: ModelSpec
    weights: ModelWeights
    hf_config: Any
    path: Path
    expert_format: ExpertFormat = MODEL_DTYPE


def load_hf_config(path: Path) -> Any:
    """Read `config.json` with transformers' AutoConfig, mapping failures to ModelLoadError."""
    if not path.is_dir():
        raise ModelLoadError(f"model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"no config.json in {path}: not a Hugging Face checkpoint directory")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path))
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {first_line}") from exc


def read_spec(path: Path) -> tuple[Any, ModelSpec]:
    """The checkpoint's HF config and ModelSpec: every check that reads no weights (the directory,
    its config.json, a supported architecture). Cheap enough to run before a server binds its port."""
    hf_config = load_hf_config(path)
    return hf_config, spec_from_config(hf_config)


class TensorSource:
    """Name -> tensor lookup over the (possibly sharded) safetensors files of a checkpoint."""

    def __init__(self, path: Path, stack: ExitStack) -> None:
        files = self._files(path)
        self._handles: dict[str, Any] = {}
        self._location: dict[str, str] = {}
        for file in files:
            try:
                handle = stack.enter_context(safe_open(str(file), framework="pt"))
            except (SafetensorError, OSError, ValueError) as exc:
                raise ModelLoadError(f"corrupt or truncated safetensors file {file.name}: {exc}") from exc
            self._handles[file.name] = handle
            for name in handle.keys():
                self._location[name] = file.name

    @staticmethod
    def _files(path: Path) -> list[Path]:
        index = path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ModelLoadError(f"corrupt {INDEX_FILE}: {exc}") from exc
            files = [path / name for name in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ModelLoadError(f"shards listed in {INDEX_FILE} are missing: {', '.join(missing)}")
            return files
        if (path / SINGLE_FILE).is_file():
            return [path / SINGLE_FILE]
        raise ModelLoadError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")

    def __contains__(self, name: str) -> bool:
        return name in self._location

    def get(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Read one tensor (memory-mapped) and cast it to `dtype`."""
        if name not in self._location:
            raise ModelLoadError(f"checkpoint is missing tensor {name!r}")
        try:
            tensor = self._handles[self._location[name]].get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise ModelLoadError(f"cannot read tensor {name!r}: {exc}") from exc
        return tensor.to(dtype).contiguous()

    def optional(self, name: str, dtype: torch.dtype) -> torch.Tensor | None:
        """Like `get`, but None when the checkpoint has no such tensor."""
        return self.get(name, dtype) if name in self else None


def resolve_dtype(name: str, hf_config: Any) -> torch.dtype:
    """'auto' takes the checkpoint's dtype (fp32, bf16 or fp16); otherwise the named one."""
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name == "auto":
        stored = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or "float32"
        name = str(stored).replace("torch.", "")
    if name not in table:
        raise ModelLoadError(f"unsupported dtype {name!r}: allowed are {', '.join(table)}")
    return table[name]


def resolve_expert_format(name: str, spec: ModelSpec) -> ExpertFormat:
    """The format `expert_dtype` names; `auto` keeps a pre-quantized (MXFP4) checkpoint's experts as
    they are and otherwise takes the model dtype."""
    try:
        chosen = parse_expert_dtype(name)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    if chosen is None:
        return MXFP4_FORMAT if spec.mxfp4_experts else MODEL_DTYPE
    return chosen


def stored_expert(expert: ExpertTensors | MXFP4Expert, expert_format: ExpertFormat) -> ExpertTensors | MXFP4Expert:
    """One expert as `expert_format` stores it. MXFP4 codes stay as they are in MXFP4; in the model
    dtype an MXFP4 expert stays lazy (dequantized when the host tier reads it)."""
    if isinstance(expert, MXFP4Expert):
        if expert_format.kind is MXFP4_FORMAT.kind:
            return expert_format.encode_quantized(*expert.quantized())
        if not expert_format.quantized:
            return expert
        return expert_format.encode(tuple(expert))
    return expert_format.encode(expert)


def load_model(path: Path | str, dtype: str = "auto", show_progress: bool = True,
               expert_dtype: str = "model") -> LoadedModel:
    """Load a supported Hugging Face MoE checkpoint from a local directory, its routed experts in
    the format `expert_dtype` names (`engine.model.quant.EXPERT_DTYPES`)."""
    path = Path(path)
    hf_config, spec = read_spec(path)
    torch_dtype = resolve_dtype(dtype, hf_config)
    expert_format = resolve_expert_format(expert_dtype, spec)
    desc = "loading layers" if not expert_format.quantized else f"loading layers ({expert_format.name} experts)"
    with ExitStack() as stack:
        src = TensorSource(path, stack)
        layers: list[LayerWeights] = []
        experts: dict[ExpertKey, ExpertTensors] = {}
        arena: Arena | None = None  # quantized experts, packed together (out of the heap their temporaries churn)
        for layer in progress(range(spec.num_layers), show=show_progress, desc=desc, unit="layer"):
            layers.append(layer_weights(spec, src, layer, torch_dtype))
            for key, expert in expert_weights(spec, src, layer, torch_dtype):
                stored = stored_expert(expert, expert_format)  # one expert at a time: no second full copy
                if expert_format.quantized:
                    if arena is None:
                        count = spec.num_moe_layers * spec.num_experts
                        arena = Arena(count * Arena.bytes_for([(tuple(t.shape), t.dtype) for t in stored]))
                    stored = tuple(arena.take(tuple(t.shape), t.dtype).copy_(t) for t in stored)
                experts[key] = stored
        embed = src.get("model.embed_tokens.weight", torch_dtype)
        lm_head = embed if spec.tie_word_embeddings else src.get("lm_head.weight", torch_dtype)
        dense = DenseWeights(
            embed_tokens=embed,
            layers=layers,
            final_norm=src.get("model.norm.weight", torch_dtype),
            lm_head=lm_head,
        )
    if embed.shape != (spec.vocab_size, spec.hidden_size):
        raise ModelLoadError(f"embed_tokens has shape {tuple(embed.shape)}, config says ({spec.vocab_size}, {spec.hidden_size})")
    logger.info(
        "loaded %s from %s: %d layers, %d experts/layer (top-%d), dtype %s, experts %s",
        spec.architecture, path, spec.num_layers, spec.num_experts, spec.top_k, torch_dtype, expert_format.name,
    )
    return LoadedModel(spec=spec, weights=ModelWeights(dense=dense, experts=experts), hf_config=hf_config, path=path,
                       expert_format=expert_format)
