"""Chooses the copy-engine backend for a device and builds the engine."""

from __future__ import annotations

import logging

import torch

from moe_serve.cuda_ext.api import CopyBackend, CopyEngine
from moe_serve.cuda_ext.fallback import TorchCopyEngine
from moe_serve.cuda_ext.native import NativeCopyEngine

logger = logging.getLogger(__name__)


def default_backend(device: torch.device) -> CopyBackend:
    """CUDA for a CUDA device when CUDA is usable, else the CPU extension."""
    if device.type == "cuda" and torch.cuda.is_available():
        return CopyBackend.CUDA
    return CopyBackend.CPU_EXTENSION


def load_copy_engine(device: torch.device, num_workers: int = 2,
                     backend: CopyBackend | str | None = None, chunk_bytes: int | None = None,
                     link_gbps: float | None = None) -> CopyEngine:
    """A copy engine for copies into `device`, logging which backend runs.

    `num_workers` is the worker-thread count (CPU extension, torch fallback) or the number of
    copy streams (CUDA). With `backend=None` the best backend is chosen and a failed build
    falls back to the torch engine with a WARNING; an explicit backend that fails raises.
    `chunk_bytes` sets the native engines' chunk size (None: their default; the torch engine
    copies whole). `link_gbps` throttles a CPU backend's copies to that rate (None: unthrottled;
    `CopyEngine.set_link_gbps`).
    """
    device = torch.device(device)
    chosen = default_backend(device) if backend is None else CopyBackend(backend)
    if chosen is CopyBackend.CUDA and not torch.cuda.is_available():
        raise RuntimeError("copy-engine backend 'cuda' needs a CUDA device, and none is available")
    engine: CopyEngine
    if chosen is CopyBackend.TORCH:
        engine = TorchCopyEngine(num_workers, link_gbps)
    else:
        try:
            engine = NativeCopyEngine(chosen, device, num_workers, chunk_bytes, link_gbps)
        except Exception as error:  # a compiler or toolkit problem: the torch engine still works
            if backend is not None:
                raise
            logger.warning("copy-engine extension (%s) unavailable, using the torch fallback: %s",
                           chosen.value, error)
            engine = TorchCopyEngine(num_workers, link_gbps)
    logger.info("copy engine: backend=%s device=%s workers=%d link=%s", engine.backend.value, device, num_workers,
                "unthrottled" if link_gbps is None else f"{link_gbps:g} GB/s")
    return engine
