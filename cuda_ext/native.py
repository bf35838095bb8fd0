"""Builds (JIT, cached under the user's cache dir) and wraps the C++/CUDA copy-engine extension.

One extension per flavour: `moe_copy_engine_cpu` (bindings + CPU worker threads) and
`moe_copy_engine_cuda` (the same plus the CUDA copy streams). The loaded module is cached
per flavour for the life of the process. The C++ standard is the one torch's extension builder
passes (no -std of ours after it); a CUDA build with no visible GPU and no TORCH_CUDA_ARCH_LIST
gets DEFAULT_CUDA_ARCHS (torch's own default reads the visible GPUs and fails without one).
Each build leaves a stamp of what it was built from (source contents, flags, torch and Python
versions, not paths); a library whose stamp matches is imported directly, without torch's JIT,
so a prebuilt extension loads wherever the package is installed and with no compiler present.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import inspect
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from moe_serve.cache_policies.native_build import cache_root
from moe_serve.cuda_ext.api import (
    CopyBackend,
    CopyEngine,
    CopyError,
    CopyPair,
    CopyPriority,
    CopyTicket,
    check_copies,
    link_bytes_per_s,
)

logger = logging.getLogger(__name__)

CSRC_DIR = Path(__file__).resolve().parent / "csrc"
CPU_SOURCES = ("bindings.cpp", "copy_engine_cpu.cpp")
CUDA_SOURCES = ("copy_engine_cuda.cu",)
CXX_FLAGS = ["-O3"]
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"  # Ampere, Ada, Hopper; PTX for anything newer
TORCH_BATON = "lock"  # torch.utils.cpp_extension's build lock file in the build directory


def build_dir(with_cuda: bool) -> Path:
    """Where the compiled extension is cached: <cache_root>/<flavour>."""
    directory = cache_root() / ("cuda" if with_cuda else "cpu")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def cxx_standard() -> str:
    """The -std value torch's extension builder passes (e.g. c++20), for compiles outside it."""
    from torch.utils import cpp_extension

    found = re.findall(r"'-std=(c\+\+\d+)'", inspect.getsource(cpp_extension._write_ninja_file_to_build_library))
    if found:
        return found[0]
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return "c++20" if (major, minor) >= (2, 14) else "c++17"


@contextlib.contextmanager
def cuda_arch_list() -> Iterator[None]:
    """Sets TORCH_CUDA_ARCH_LIST to DEFAULT_CUDA_ARCHS for the build if it is unset and no GPU is visible."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST") or torch.cuda.device_count() > 0:
        yield
        return
    logger.info("no GPU visible: building the CUDA copy engine for TORCH_CUDA_ARCH_LIST=%s", DEFAULT_CUDA_ARCHS)
    os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    try:
        yield
    finally:
        del os.environ["TORCH_CUDA_ARCH_LIST"]


def extension_name(with_cuda: bool) -> str:
    return "moe_copy_engine_cuda" if with_cuda else "moe_copy_engine_cpu"


def _sources_and_flags(with_cuda: bool) -> tuple[list[Path], list[str]]:
    sources = [CSRC_DIR / name for name in CPU_SOURCES]
    flags = list(CXX_FLAGS)
    if with_cuda:
        sources += [CSRC_DIR / name for name in CUDA_SOURCES]
        flags.append("-DMOE_WITH_CUDA")
    return sources, flags


def fingerprint(sources: Sequence[Path], flags: Sequence[str]) -> str:
    """What a build is made from, independent of where the sources are: their names and contents,
    the flags, torch's version and CUDA version, and the Python ABI."""
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    digest.update(repr((list(flags), torch.__version__, torch.version.cuda, sys.implementation.cache_tag)).encode())
    return digest.hexdigest()


def prebuilt(with_cuda: bool) -> Path | None:
    """The built library when its stamp matches the current sources and toolchain, else None."""
    sources, flags = _sources_and_flags(with_cuda)
    directory = build_dir(with_cuda)
    library = directory / f"{extension_name(with_cuda)}.so"
    stamp = library.with_suffix(".stamp")
    if library.exists() and stamp.exists() and stamp.read_text().strip() == fingerprint(sources, flags):
        return library
    return None


def import_prebuilt(with_cuda: bool) -> ModuleType:
    """Imports the prebuilt library without compiling anything; raises if none matches the sources."""
    library = prebuilt(with_cuda)
    if library is None:
        raise RuntimeError(f"no prebuilt {extension_name(with_cuda)} in {build_dir(with_cuda)} matches these "
                           f"sources and torch {torch.__version__}; run python -m moe_serve.cuda_ext.build")
    spec = importlib.util.spec_from_file_location(extension_name(with_cuda), library)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def load_extension(with_cuda: bool) -> ModuleType:
    """Imports the prebuilt module when its stamp matches; else compiles it (ninja, torch's JIT),
    stamps the build and imports it."""
    from torch.utils import cpp_extension

    sources, flags = _sources_and_flags(with_cuda)
    name = extension_name(with_cuda)
    directory = build_dir(with_cuda)
    with build_lock(directory), cuda_arch_list() if with_cuda else contextlib.nullcontext():
        if prebuilt(with_cuda) is not None:
            return import_prebuilt(with_cuda)
        if is_stale(directory / f"{name}.so", sources):
            logger.info("building the copy engine (%s; first start only, may take a few minutes) in %s",
                        "cuda" if with_cuda else "cpu", directory)
        module = cpp_extension.load(
            name=name,
            sources=[str(source) for source in sources],
            extra_cflags=flags,
            extra_cuda_cflags=flags,
            build_directory=str(directory),
            with_cuda=with_cuda,
            verbose=False,
        )
        if Path(module.__file__).resolve() == (directory / f"{name}.so").resolve():  # not a renamed re-load
            (directory / f"{name}.stamp").write_text(fingerprint(sources, flags) + "\n")
        return module


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
    """Wraps the extension's ticket; `wait` passes the current CUDA stream on a CUDA engine; the
    extension's CopyFailed becomes CopyError."""

    def __init__(self, handle: Any, device: torch.device | None, copy_failed: type[Exception]) -> None:
        self.handle = handle
        self._device = device
        self._copy_failed = copy_failed

    def done(self) -> bool:
        try:
            return bool(self.handle.done())
        except self._copy_failed as error:
            raise CopyError(str(error)) from None

    def failed(self) -> bool:
        return bool(self.handle.failed())

    def cancelled(self) -> bool:
        return bool(self.handle.cancelled())

    def wait(self) -> None:
        stream = torch.cuda.current_stream(self._device).cuda_stream if self._device is not None else 0
        try:
            self.handle.wait(stream)
        except self._copy_failed as error:
            raise CopyError(str(error)) from None

    def synchronize(self) -> None:
        try:
            self.handle.synchronize()
        except self._copy_failed as error:
            raise CopyError(str(error)) from None


class NativeCopyEngine(CopyEngine):
    """The C++ engine: CPU worker threads (memcpy) or CUDA copy streams (cudaMemcpyAsync + events).
    Large copies move `chunk_bytes` at a time (default 8 MiB); a DEMAND copy overtakes a running
    PREFETCH copy at its next chunk. The CPU backend paces each chunk to `link_gbps` (None:
    unthrottled)."""

    def __init__(self, backend: CopyBackend, device: torch.device, num_workers: int,
                 chunk_bytes: int | None = None, link_gbps: float | None = None) -> None:
        if backend is CopyBackend.TORCH:
            raise ValueError("the torch backend is not native")
        with_cuda = backend is CopyBackend.CUDA
        module = load_extension(with_cuda)
        self.backend = backend
        self._device = torch.device("cuda", device.index or 0) if with_cuda else None
        device_index = self._device.index if self._device is not None else -1
        chunking = {} if chunk_bytes is None else {"chunk_bytes": chunk_bytes}
        self._check_throttle(link_gbps)
        self._engine = module.CopyEngine(backend.value, device_index, num_workers, **chunking,
                                         link_bytes_per_s=link_bytes_per_s(link_gbps))
        self._copy_failed: type[Exception] = module.CopyFailed

    def submit(self, copies: Sequence[CopyPair], priority: CopyPriority) -> list[CopyTicket]:
        check_copies(copies)
        handles = self._engine.submit(list(copies), int(CopyPriority(priority)))
        return [NativeCopyTicket(handle, self._device, self._copy_failed) for handle in handles]

    def cancel(self, ticket: CopyTicket) -> bool:
        assert isinstance(ticket, NativeCopyTicket)
        return bool(self._engine.cancel(ticket.handle))

    def promote(self, ticket: CopyTicket) -> bool:
        assert isinstance(ticket, NativeCopyTicket)
        return bool(self._engine.promote(ticket.handle))

    def inject_failures(self, count: int, message: str) -> None:
        """Test hook: the next `count` copies to run fail with `message` on the engine's thread."""
        self._engine.fail_next(count, message)

    def set_link_gbps(self, gbps: float | None) -> None:
        self._check_throttle(gbps)
        self._engine.set_link_rate(link_bytes_per_s(gbps))

    def link_gbps(self) -> float | None:
        return self._engine.link_rate() / 1e9 or None

    def link_busy_seconds(self) -> float:
        return float(self._engine.link_busy_seconds())

    def _check_throttle(self, gbps: float | None) -> None:
        if gbps is not None and self.backend is CopyBackend.CUDA:
            raise ValueError("the CUDA copy engine moves over the real link: it cannot be throttled")

    def shutdown(self) -> None:
        self._engine.shutdown()
