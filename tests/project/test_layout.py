"""The package's shape: one namespace, one-way imports between modules and between layers."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"server": "moe_serve.server", "engine": "moe_serve.engine",
           "cache_policies": "moe_serve.cache_policies", "cuda_ext": "moe_serve.cuda_ext"}


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the installed packages."""
    out = {}
    for folder, package in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            out[name.removesuffix(".__init__")] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """moe_serve modules `path` imports anywhere in its body (function-level imports too,
    TYPE_CHECKING-only imports excluded: they do not run)."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(target for target in targets if target in modules and target != name)
    return found


def graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_generic_names_are_not_installed(tmp_path: Path) -> None:
    """Outside the checkout only `moe_serve.*` imports: `server`, `engine`, ... stay free."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    for folder, package in FOLDERS.items():
        generic = subprocess.run([sys.executable, "-c", f"import {folder}"], cwd=tmp_path, env=env,
                                 capture_output=True, text=True)
        assert generic.returncode != 0 and "No module named" in generic.stderr, folder
        subprocess.run([sys.executable, "-c", f"import {package}"], cwd=tmp_path, env=env, check=True)


def test_every_package_folder_is_listed_for_the_wheel() -> None:
    """pyproject lists the packages explicitly (package-dir mapping): a subpackage left out would be
    missing from a wheel or a Docker image while an editable install still finds it."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join((package, *init.parent.relative_to(ROOT / folder).parts))
               for folder, package in FOLDERS.items() for init in (ROOT / folder).rglob("__init__.py")}
    assert folders == listed


def test_only_the_server_imports_the_server() -> None:
    offenders = {name: sorted(d for d in deps if d.startswith("moe_serve.server"))
                 for name, deps in graph().items() if not name.startswith("moe_serve.server")}
    assert not {name: deps for name, deps in offenders.items() if deps}


def test_module_imports_have_no_cycles() -> None:
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


# Packages from the bottom up: a module may import its own layer and the layers below it, never above.
# The traces sit on the core: the trace router is one of the model runner's step observers.
LAYERS = (
    ("leaves", ("moe_serve.engine.errors", "moe_serve.engine.types", "moe_serve.engine.progress",
                "moe_serve.engine.host_memory", "moe_serve.engine.config", "moe_serve.engine.exports",
                "moe_serve.cache_policies", "moe_serve.cuda_ext")),
    ("model", ("moe_serve.engine.model",)),
    ("offload", ("moe_serve.engine.offload",)),
    ("core", ("moe_serve.engine.core",)),
    ("traces", ("moe_serve.engine.traces",)),
    ("prefetch", ("moe_serve.engine.prefetch",)),
    ("wiring", ("moe_serve.engine.builder", "moe_serve.engine.planning", "moe_serve.engine.trace_cli",
                "moe_serve.engine")),
    ("server", ("moe_serve.server",)),
)


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest package prefix naming `module`."""
    best, rank = "", -1
    for index, (_, packages) in enumerate(LAYERS):
        for package in packages:
            if (module == package or module.startswith(package + ".")) and len(package) > len(best):
                best, rank = package, index
    assert rank >= 0, f"{module} is in no layer of LAYERS"
    return rank


def test_packages_import_only_their_own_layer_and_the_layers_below() -> None:
    upward = sorted(f"{name} ({LAYERS[layer_of(name)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})"
                    for name, deps in graph().items() for dep in deps if layer_of(dep) > layer_of(name))
    assert not upward, "\n".join(upward)

