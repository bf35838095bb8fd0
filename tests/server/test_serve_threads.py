"""The server's default torch thread count leaves one core to the event loop."""

from __future__ import annotations

import pytest

from moe_serve.server import serve


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 1), (16, 15)])
def test_the_default_torch_threads_leave_one_core_free(monkeypatch, cores: int, threads: int) -> None:
    monkeypatch.setattr(serve.os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert serve.default_torch_threads() == threads
