"""C++/CUDA copy engine for expert weights, its Python wrapper and a pure-torch fallback."""

from cuda_ext.api import CopyBackend, CopyEngine, CopyPair, CopyPriority, CopyTicket
from cuda_ext.loader import default_backend, load_copy_engine

__all__ = [
    "CopyBackend",
    "CopyEngine",
    "CopyPair",
    "CopyPriority",
    "CopyTicket",
    "default_backend",
    "load_copy_engine",
]
