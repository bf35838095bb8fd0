"""C++/CUDA copy engine for expert weights, its Python wrapper and a pure-torch fallback."""

from moe_serve.cuda_ext.api import CopyBackend, CopyEngine, CopyError, CopyPair, CopyPriority, CopyTicket
from moe_serve.cuda_ext.loader import default_backend, load_copy_engine

__all__ = [
    "CopyBackend",
    "CopyEngine",
    "CopyError",
    "CopyPair",
    "CopyPriority",
    "CopyTicket",
    "default_backend",
    "load_copy_engine",
]
