"""The offload path on a GPU: a copy read at once on the compute stream, slot reuse while kernels still
read the slot, copies overlapping compute, greedy tokens on CUDA equal to the CPU's for every
architecture (resident and offloaded), exact-size pinning, and the server on --device cuda."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from moe_serve.cache_policies import make_policy
from moe_serve.cuda_ext import CopyBackend, CopyPriority, load_copy_engine
from moe_serve.engine.offload.expert_cache import ExpertCache
from moe_serve.engine.offload.expert_store import HostExpertStore
from moe_serve.engine.offload.provider import OffloadedExperts
from moe_serve.engine.types import ExpertKey
from tests.helpers import ARCHITECTURES, NEW_ARCHITECTURES, run_workload

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
MIB = 1 << 20
REPO_ROOT = Path(__file__).resolve().parents[2]


def checksum(t: torch.Tensor) -> int:
    return int(t.view(torch.int32).sum(dtype=torch.int64))


def test_a_copy_is_read_right_after_wait_on_the_compute_stream() -> None:
    engine = load_copy_engine(torch.device("cuda"), backend=CopyBackend.CUDA)
    src = torch.randint(0, 256, (256 * MIB,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    src = src.pin_memory()
    want = checksum(src)
    dst = torch.empty(src.numel(), dtype=torch.uint8, device="cuda")
    for _ in range(8):
        dst.zero_()
        ticket = engine.submit([(src, dst)], CopyPriority.DEMAND)[0]
        ticket.wait()  # orders the current stream after the copy; the host does not wait for the bytes
        assert checksum(dst) == want  # the read is queued on the compute stream right after the wait
    engine.shutdown()


def test_a_slot_taken_while_queued_kernels_read_it_keeps_their_bytes() -> None:
    rows, cols = 8192, 4096
    generator = torch.Generator().manual_seed(2)
    experts = {ExpertKey(0, e): [torch.randn(rows, cols, generator=generator).to(torch.bfloat16)] for e in range(2)}
    store = HostExpertStore.from_tensors(experts, pin=True)
    assert store.is_pinned
    engine = load_copy_engine(torch.device("cuda"), backend=CopyBackend.CUDA)
    cache = ExpertCache(store, 1, torch.device("cuda"), make_policy("lru"), engine)
    x = torch.randn(cols, 1024, device="cuda", dtype=torch.bfloat16)
    reference = experts[ExpertKey(0, 0)][0].cuda().float() @ x.float()
    (slot,) = cache.acquire([ExpertKey(0, 0)])
    (weight,) = cache.wait(slot)
    total = torch.zeros_like(reference)
    iterations = 200  # tens of ms of GPU work queued on the slot when it is taken away
    for _ in range(iterations):
        total += (weight @ x).float()
    cache.release([ExpertKey(0, 0)])
    (other,) = cache.acquire([ExpertKey(0, 1)])  # evicts expert 0 from the only slot
    cache.wait(other)
    torch.cuda.synchronize()
    error = float((total / iterations - reference).abs().max() / reference.abs().max())
    assert error < 2e-2, "a kernel read the next expert's bytes from the reused slot"
    cache.release([ExpertKey(0, 1)])
    engine.shutdown()


def test_copies_overlap_compute() -> None:
    engine = load_copy_engine(torch.device("cuda"), backend=CopyBackend.CUDA)
    srcs = [torch.ones(256 * MIB, dtype=torch.uint8).pin_memory() for _ in range(4)]
    dsts = [torch.empty(s.numel(), dtype=torch.uint8, device="cuda") for s in srcs]
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)

    def compute(n: int) -> None:
        b = a
        for _ in range(n):
            b = a @ b

    def timed(run) -> float:
        torch.cuda.synchronize()
        started = time.perf_counter()
        run()
        torch.cuda.synchronize()
        return time.perf_counter() - started

    def copy_all() -> None:
        for ticket in engine.submit(list(zip(srcs, dsts)), CopyPriority.DEMAND):
            ticket.synchronize()

    copy_all()
    compute(3)
    copy_s = timed(copy_all)
    per_matmul = timed(lambda: compute(20)) / 20
    n = max(1, int(copy_s / per_matmul))
    compute_s = timed(lambda: compute(n))

    def both() -> None:
        tickets = engine.submit(list(zip(srcs, dsts)), CopyPriority.DEMAND)
        compute(n)
        for ticket in tickets:
            ticket.synchronize()

    both_s = timed(both)
    engine.shutdown()
    hidden = (copy_s + compute_s - both_s) / min(copy_s, compute_s)
    assert hidden > 0.5, f"copy {copy_s:.3f}s + compute {compute_s:.3f}s took {both_s:.3f}s together"


@pytest.mark.parametrize("arch", ARCHITECTURES + NEW_ARCHITECTURES)
def test_greedy_tokens_on_cuda_equal_the_cpus_resident_and_offloaded(arch: str, checkpoint_factory) -> None:
    path = checkpoint_factory(arch)
    cpu, _ = run_workload(path, device="cpu", offload="off")
    resident, _ = run_workload(path, device="cuda", offload="off")
    offloaded, engine = run_workload(path, device="cuda", offload="on", expert_cache_fraction=0.5, prefetch="affinity")
    assert isinstance(engine.runner.model.experts, OffloadedExperts)
    assert engine.runner.model.experts.cache.store.is_pinned
    assert resident == cpu
    assert offloaded == resident  # offloading never changes results


def test_the_server_serves_on_cuda_with_the_cuda_copy_engine_and_drains_on_sigterm(tmp_path: Path) -> None:
    port = 8000 + os.getpid() % 1000
    log_path = tmp_path / "serve.log"
    command = [sys.executable, "-m", "moe_serve.server.cli", "serve", "--device", "cuda", "--offload", "on",
               "--expert-cache-fraction", "0.5", "--port", str(port), "--log-level", "info"]
    with log_path.open("wb") as log:
        server = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, log_path.read_text(errors="replace")[-3000:]
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "not healthy in 240 s"
                time.sleep(1)
        model = json.loads(urllib.request.urlopen(f"{base}/v1/models", timeout=10).read())["data"][0]["id"]
        body = json.dumps({"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}).encode()
        request = urllib.request.Request(f"{base}/v1/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200
            assert json.loads(response.read())["usage"]["completion_tokens"] == 8
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
    log = log_path.read_text(errors="replace")
    assert code == 0, log[-3000:]
    assert "copy engine: backend=cuda" in log
