"""Lazy public names for the engine's subpackages: `from moe_serve.engine.traces import RoutingTrace`
imports only the module that defines the name, so light tools (trace replay, the scheduler) keep
importing without torch."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any


def lazy_exports(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package` resolving each public name from its submodule."""

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(import_module(f"{package}.{module}"), name)

    return __getattr__
