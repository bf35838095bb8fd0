"""The paged KV-cache tensors: per layer, one [slots, *entry] tensor per entry shape of the spec
(keys and values [slots, Hkv, Dh]; MLA's latent with its rope key [slots, 1, kv_lora_rank + rope dims])."""

from __future__ import annotations

import math

import torch

from moe_serve.engine.model.spec import ModelSpec

KV_BLOCK_SIZE = 16  # tokens per KV block (vLLM's default; a sequence wastes under one block)


def kv_bytes_per_block(spec: ModelSpec, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers (everything the cache stores per token)."""
    element = torch.tensor([], dtype=dtype).element_size()
    per_token = sum(math.prod(shape) for shape in spec.kv_entry_shapes)
    return spec.num_layers * block_size * per_token * element


def allocate_kv_cache(
    spec: ModelSpec, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[tuple[torch.Tensor, ...]]:
    """Zeroed cache tensors for every layer."""
    slots = num_blocks * block_size
    return [
        tuple(torch.zeros((slots, *shape), dtype=dtype, device=device) for shape in spec.kv_entry_shapes)
        for _ in range(spec.num_layers)
    ]
