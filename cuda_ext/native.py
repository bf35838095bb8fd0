"""Builds (JIT, cached under the user's cache dir) and wraps the C++/CUDA copy-engine extension.

One extension per flavour: `moe_copy_engine_cpu` (bindings + CPU worker threads) and
`moe_copy_engine_cuda` (the same plus the CUDA copy streams). The loaded module is cached
per flavour for the life of the process.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from moe_serve.cuda_ext.api import CopyBackend, CopyEngine, CopyPair, CopyPriority, CopyTicket, check_copies

logger = logging.getLogger(__name__)

CSRC_DIR = Path(__file__).resolve().parent / "csrc"
CPU_SOURCES = ("bindings.cpp", "copy_engine_cpu.cpp")
CUDA_SOURCES = ("copy_engine_cuda.cu",)
CXX_FLAGS = ["-O3", "-std=c++17"]
TORCH_BATON = "lock"  # torch.utils.cpp_extension's build lock file in the build directory


def cache_root() -> Path:
    """Where compiled native code is cached: $MOE_SERVE_EXT_DIR or <cache>/moe-serve/ext."""
    root = os.environ.get("MOE_SERVE_EXT_DIR")
    if root is None:
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(cache) / "moe-serve" / "ext")
    return Path(root)


def build_dir(with_cuda: bool) -> Path:
    """Where the compiled extension is cached: <cache_root>/<flavour>."""
    directory = cache_root() / ("cuda" if with_cuda else "cpu")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@functools.cache
def load_extension(with_cuda: bool) -> ModuleType:
    """Compiles on first use (ninja; a later process reuses the build) and imports the module."""
    from torch.utils import cpp_extension

    sources = [CSRC_DIR / name for name in CPU_SOURCES]
    flags = list(CXX_FLAGS)
    if with_cuda:
        sources += [CSRC_DIR / name for name in CUDA_SOURCES]
        flags.append("-DMOE_WITH_CUDA")
    name = "moe_copy_engine_cuda" if with_cuda else "moe_copy_engine_cpu"
    directory = build_dir(with_cuda)
    with build_lock(directory):
        if is_stale(directory / f"{name}.so", sources):
            logger.info("building the copy engine (%s; first start only, may take a few minutes) in %s",
                        "cuda" if with_cuda else "cpu", directory)
        return cpp_extension.load(
            name=name,
            sources=[str(source) for source in sources],
            extra_cflags=flags,
            extra_cuda_cflags=flags,
            build_directory=str(directory),
            with_cuda=with_cuda,
            verbose=False,
        )


def is_stale(library: Path, sources: Sequence[Path]) -> bool:
    """Whether `library` is missing or older than one of its sources (a build is coming)."""
    if not library.exists():
        return True
    built = library.stat().st_mtime
    return any(source.stat().st_mtime > built for source in sources)


@contextlib.contextmanager
def build_lock(directory: Path) -> Iterator[None]:
    """Exclusive use of a build directory across processes. torch's own lock is a file that a
    killed build leaves behind, after which every later build waits on it forever; this one is
    an flock the OS drops with its process, and whoever holds it removes torch's stale file."""
    with open(directory / "moe-serve-build.lock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            (directory / TORCH_BATON).unlink(missing_ok=True)  # every builder here holds the flock first
            yield
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


class NativeCopyTicket(CopyTicket):
    """Wraps the extension's ticket; `wait` passes the current CUDA stream on a CUDA engine."""

    def __init__(self, handle: Any, device: torch.device | None) -> None:
        self.handle = handle
        self._device = device

    def done(self) -> bool:
        return bool(self.handle.done())

    def cancelled(self) -> bool:
        return bool(self.handle.cancelled())

    def wait(self) -> None:
        stream = torch.cuda.current_stream(self._device).cuda_stream if self._device is not None else 0
        self.handle.wait(stream)

    def synchronize(self) -> None:
        self.handle.synchronize()


class NativeCopyEngine(CopyEngine):
    """The C++ engine: CPU worker threads (memcpy) or CUDA copy streams (cudaMemcpyAsync + events)."""

    def __init__(self, backend: CopyBackend, device: torch.device, num_workers: int) -> None:
        if backend is CopyBackend.TORCH:
            raise ValueError("the torch backend is not native")
        with_cuda = backend is CopyBackend.CUDA
        module = load_extension(with_cuda)
        self.backend = backend
        self._device = torch.device("cuda", device.index or 0) if with_cuda else None
        device_index = self._device.index if self._device is not None else -1
        self._engine = module.CopyEngine(backend.value, device_index, num_workers)

    def submit(self, copies: Sequence[CopyPair], priority: CopyPriority) -> list[CopyTicket]:
        check_copies(copies)
        handles = self._engine.submit(list(copies), int(CopyPriority(priority)))
        return [NativeCopyTicket(handle, self._device) for handle in handles]

    def cancel(self, ticket: CopyTicket) -> bool:
        assert isinstance(ticket, NativeCopyTicket)
        return bool(self._engine.cancel(ticket.handle))

    def promote(self, ticket: CopyTicket) -> bool:
        assert isinstance(ticket, NativeCopyTicket)
        return bool(self._engine.promote(ticket.handle))

    def shutdown(self) -> None:
        self._engine.shutdown()
