"""The shipped YAML profiles (configs/*.yaml): each loads as a ServeConfig, the CPU one
serves and drains on SIGTERM, and the GPU ones either serve or refuse in one line."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from moe_serve.engine.config import DeviceKind, OffloadMode, SchedulingPolicyName
from moe_serve.server.config import ServeConfig, load_config
from tests.e2e.conftest import free_port, wait_until_healthy

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = REPO_ROOT / "configs"
GPU_PROFILES = ("gpu-8gb.yaml", "gpu-12gb.yaml", "gpu-24gb.yaml")
PROFILES = ("cpu.yaml", *GPU_PROFILES)
NO_CUDA = "device 'cuda' was requested but no CUDA device is available"
STARTUP_TIMEOUT_S = 180.0


def _load(name: str) -> ServeConfig:
    return load_config(ServeConfig, CONFIGS / name, {}, environ={})


def _serve(profile: str, port: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "moe_serve.server.cli", "serve", "--config", str(CONFIGS / profile),
               "--port", str(port), "--log-level", "warning"]
    return subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("name", PROFILES)
def test_profile_loads_with_a_budget_and_the_task_table(name: str) -> None:
    config = _load(name)
    assert config.offload is OffloadMode.ON
    # the CPU profile keeps a share of the experts; the GPU ones take what the card has left
    assert config.expert_cache_gb is None and (config.expert_cache_fraction is None) == (name in GPU_PROFILES)
    assert config.scheduling_policy is SchedulingPolicyName.SLO
    assert config.tasks_file is not None and (REPO_ROOT / config.tasks_file).is_file()
    assert config.kv_cache_gb > 0 and config.max_num_seqs >= 1


@pytest.mark.parametrize("name", GPU_PROFILES)
def test_gpu_profiles_ask_for_cuda_with_growing_kv_caches_and_batches(name: str) -> None:
    assert _load(name).device is DeviceKind.CUDA
    for field in ("kv_cache_gb", "max_num_seqs"):
        sizes = [getattr(_load(n), field) for n in GPU_PROFILES]
        assert sizes == sorted(sizes), field


@pytest.mark.parametrize("name", PROFILES)
def test_profile_is_documented(name: str) -> None:
    assert name in (CONFIGS / "README.md").read_text()
    lines = (CONFIGS / name).read_text().splitlines()
    assert lines[0].startswith("#")


@pytest.mark.slow
def test_cpu_profile_serves_and_exits_zero_on_sigterm() -> None:
    port = free_port()
    process = _serve("cpu.yaml", port)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", process, STARTUP_TIMEOUT_S)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()["status"] == "ok"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("name", GPU_PROFILES)
def test_gpu_profile_serves_or_refuses_in_one_line(name: str) -> None:
    import torch

    port = free_port()
    process = _serve(name, port)
    try:
        if torch.cuda.is_available():
            wait_until_healthy(f"http://127.0.0.1:{port}", process, STARTUP_TIMEOUT_S)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0
            return
        _, stderr = process.communicate(timeout=STARTUP_TIMEOUT_S)
        assert process.returncode != 0
        message = stderr.decode().strip()
        assert message == f"moe-serve: error: {NO_CUDA}", message
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
