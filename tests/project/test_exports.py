"""Every package's public names (`__all__`, lazy or not) resolve."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"server": "moe_serve.server", "engine": "moe_serve.engine",
           "cache_policies": "moe_serve.cache_policies", "cuda_ext": "moe_serve.cuda_ext"}
PACKAGES = sorted(
    ".".join((package, *init.parent.relative_to(ROOT / folder).parts))
    for folder, package in FOLDERS.items() for init in (ROOT / folder).rglob("__init__.py")
)


@pytest.mark.parametrize("name", PACKAGES)
def test_exported_names_resolve(name: str) -> None:
    package = importlib.import_module(name)
    for exported in getattr(package, "__all__", ()):
        assert getattr(package, exported) is not None, f"{name}.{exported}"
