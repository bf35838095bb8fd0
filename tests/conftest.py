"""Shared fixtures: tiny random checkpoints of every architecture, built once per session, and
the native code built before any test that starts a server; the property tests' settings profile."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

from tests.helpers import ARCHITECTURES, make_tiny_checkpoint

TRACES_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "traces"

# Property tests draw the same examples on every run unless HYPOTHESIS_PROFILE=random asks for a fresh
# search: a run (CI's included) passes or fails on the code alone, and a slow machine trips no deadline.
settings.register_profile("deterministic", derandomize=True, database=None, deadline=None)
settings.register_profile("random", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))


@pytest.fixture(autouse=True)
def native_code_before_live_servers(request: pytest.FixtureRequest) -> None:
    """A test that starts a server (marked e2e) runs once the native code is built, so that its
    start-up timeout covers loading only (see tests/e2e/conftest.py); other tests skip this."""
    if request.node.get_closest_marker("e2e") is not None:
        from tests.e2e.conftest import build_native_code

        build_native_code()


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory: pytest.TempPathFactory):
    """Returns make(arch, **overrides) -> Path, caching identical requests for the session."""
    made: dict[tuple, Path] = {}

    def make(arch: str, **overrides) -> Path:
        key = (arch, tuple(sorted(overrides.items())))
        if key not in made:
            directory = tmp_path_factory.mktemp(f"ckpt-{arch}")
            made[key] = make_tiny_checkpoint(arch, directory, **overrides)
        return made[key]

    return make


@pytest.fixture(scope="session", params=ARCHITECTURES)
def arch_checkpoint(request: pytest.FixtureRequest, checkpoint_factory) -> tuple[str, Path]:
    """(arch, checkpoint dir) for each supported architecture."""
    return request.param, checkpoint_factory(request.param)
