"""Compiling one C source into a cached shared library, and loading it once per process, torch-free:
the native cache policy builds with it, and so do the CPU kernels (`engine.model.cpu_kernels`) and the
copy extension's cache root."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    """Where compiled native code is cached: $MOE_SERVE_EXT_DIR or <cache>/moe-serve/ext."""
    root = os.environ.get("MOE_SERVE_EXT_DIR")
    if root is None:
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(cache) / "moe-serve" / "ext")
    return Path(root)


def cpu_flags() -> set[str]:
    """This CPU's feature flags as /proc/cpuinfo lists them (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def compile_library(source: Path, flags: Sequence[str], folder: str, what: str) -> Path:
    """`source` compiled with `flags` into <cache_root>/`folder` (cached by source and flags, so a
    prebuilt library needs no compiler here), compiling first if missing. Raises OSError without a
    compiler, CalledProcessError when compiling fails. `what` names the library in the log line."""
    code = source.read_bytes()
    digest = hashlib.sha256(code + " ".join(flags).encode()).hexdigest()[:16]
    directory = cache_root() / folder
    target = directory / f"{source.stem}-{digest}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError(f"no C compiler (cc or gcc) on PATH and no prebuilt {target.name} in {directory}")
    directory.mkdir(parents=True, exist_ok=True)
    logger.info("building %s (first start only) in %s", what, directory)
    with tempfile.NamedTemporaryFile(dir=directory, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        subprocess.run([compiler, *flags, str(source), "-o", str(partial), "-lm"], check=True,
                       capture_output=True, text=True)
        os.replace(partial, target)  # atomic: a concurrent process sees the whole library or none
    finally:
        partial.unlink(missing_ok=True)
    return target


def build_failure(exc: OSError | subprocess.CalledProcessError) -> str:
    """Why `compile_library` (or loading its result) failed, in one line for a fallback's log."""
    if isinstance(exc, subprocess.CalledProcessError):
        lines = (exc.stderr or "").strip().splitlines()
        return f"compiling failed: {lines[-1] if lines else exc}"
    return f"unavailable: {exc}"


class LoadOnce(Generic[T]):
    """What `load` returns (None: unavailable, e.g. no compiler), computed on the first `get` and then
    kept for the process; concurrent first calls load once."""

    def __init__(self, load: Callable[[], T | None]) -> None:
        self._load = load
        self._lock = threading.Lock()
        self._value: T | None = None
        self._loaded = False

    def get(self) -> T | None:
        if self._loaded:  # every call after the first (the kernels' hot path): no lock
            return self._value
        with self._lock:
            if not self._loaded:
                self._value = self._load()
                self._loaded = True
        return self._value
