"""Copy engine: the CPU extension against the torch fallback (the reference), queue semantics, and
loading a prebuilt extension without a compiler wherever the package is installed."""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from moe_serve.cuda_ext import CopyBackend, CopyEngine, CopyError, CopyPriority, load_copy_engine
from moe_serve.cuda_ext.native import (
    CPU_SOURCES,
    CSRC_DIR,
    CXX_FLAGS,
    DEFAULT_CUDA_ARCHS,
    TORCH_BATON,
    build_lock,
    cuda_arch_list,
    cxx_standard,
    fingerprint,
    load_extension,
    prebuilt,
)

CPU_BACKENDS = [CopyBackend.CPU_EXTENSION, CopyBackend.TORCH]
MIB = 1 << 20


def random_bytes(nbytes: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=generator)


@pytest.fixture(params=CPU_BACKENDS, ids=lambda backend: backend.value)
def backend(request: pytest.FixtureRequest) -> CopyBackend:
    return request.param


def make_engine(backend: CopyBackend, num_workers: int) -> Iterator[CopyEngine]:
    engine = load_copy_engine(torch.device("cpu"), num_workers=num_workers, backend=backend)
    yield engine
    engine.shutdown()


@pytest.fixture
def engine(backend: CopyBackend) -> Iterator[CopyEngine]:
    yield from make_engine(backend, num_workers=2)


@pytest.fixture
def single_worker(backend: CopyBackend) -> Iterator[CopyEngine]:
    yield from make_engine(backend, num_workers=1)


def test_backends_copy_identical_bytes_and_never_touch_sources() -> None:
    generator = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 300_000, (200,), generator=generator).tolist()
    sources = [random_bytes(n, generator) for n in sizes]
    originals = [src.clone() for src in sources]
    results = {}
    for backend in CPU_BACKENDS:
        engine = load_copy_engine(torch.device("cpu"), num_workers=3, backend=backend)
        dsts = [torch.zeros(n, dtype=torch.uint8) for n in sizes]
        priorities = [CopyPriority.DEMAND, CopyPriority.PREFETCH]
        tickets = [ticket for i in range(0, len(sizes), 25)
                   for ticket in engine.submit(list(zip(sources[i:i + 25], dsts[i:i + 25])), priorities[i % 2])]
        for ticket in tickets:
            ticket.wait()
            assert ticket.done() and not ticket.cancelled()
        engine.shutdown()
        results[backend] = dsts
    for i, original in enumerate(originals):
        assert torch.equal(sources[i], original)
        assert torch.equal(results[CopyBackend.CPU_EXTENSION][i], original)
        assert torch.equal(results[CopyBackend.TORCH][i], results[CopyBackend.CPU_EXTENSION][i])


def test_completions_arrive_out_of_order(engine: CopyEngine) -> None:
    generator = torch.Generator().manual_seed(1)
    big_src = random_bytes(192 * MIB, generator)
    small_srcs = [random_bytes(4096, generator) for _ in range(8)]
    big_ticket = engine.submit([(big_src, torch.empty_like(big_src))], CopyPriority.PREFETCH)[0]
    small_tickets = engine.submit([(src, torch.empty_like(src)) for src in small_srcs], CopyPriority.PREFETCH)
    for ticket in small_tickets:
        ticket.wait()
    assert not big_ticket.done(), "the second worker should finish the small copies first"
    big_ticket.wait()
    assert big_ticket.done()


def test_demand_overtakes_queued_prefetches(single_worker: CopyEngine) -> None:
    generator = torch.Generator().manual_seed(2)
    blocker = random_bytes(64 * MIB, generator)
    prefetch_srcs = [random_bytes(4 * MIB, generator) for _ in range(16)]
    demand_src = random_bytes(4 * MIB, generator)
    demand_dst = torch.zeros_like(demand_src)
    single_worker.submit([(blocker, torch.empty_like(blocker))], CopyPriority.PREFETCH)
    prefetches = single_worker.submit([(src, torch.empty_like(src)) for src in prefetch_srcs], CopyPriority.PREFETCH)
    demand = single_worker.submit([(demand_src, demand_dst)], CopyPriority.DEMAND)[0]
    demand.wait()
    finished_prefetches = sum(ticket.done() for ticket in prefetches)
    assert not prefetches[-1].done()
    assert finished_prefetches <= 2
    assert torch.equal(demand_dst, demand_src)
    for ticket in prefetches:
        ticket.wait()


def test_promote_moves_a_queued_prefetch_ahead(single_worker: CopyEngine) -> None:
    generator = torch.Generator().manual_seed(3)
    blocker = random_bytes(64 * MIB, generator)
    # 10 copies of 8 MiB stand between the promoted one and tickets[-2]: a window of several
    # milliseconds for this thread to look, even on a loaded machine
    srcs = [random_bytes(8 * MIB, generator) for _ in range(12)]
    single_worker.submit([(blocker, torch.empty_like(blocker))], CopyPriority.PREFETCH)
    tickets = single_worker.submit([(src, torch.empty_like(src)) for src in srcs], CopyPriority.PREFETCH)
    assert single_worker.promote(tickets[-1])
    tickets[-1].wait()
    assert not tickets[-2].done()
    for ticket in tickets:
        ticket.wait()
    assert not single_worker.promote(tickets[0]), "a finished copy cannot be promoted"


def test_cancel_drops_only_queued_copies(single_worker: CopyEngine) -> None:
    generator = torch.Generator().manual_seed(4)
    blocker = random_bytes(64 * MIB, generator)
    src = random_bytes(MIB, generator)
    dst = torch.zeros_like(src)
    first = single_worker.submit([(blocker, torch.empty_like(blocker))], CopyPriority.PREFETCH)[0]
    queued = single_worker.submit([(src, dst)], CopyPriority.PREFETCH)[0]
    assert single_worker.cancel(queued)
    assert queued.cancelled() and not queued.done()
    assert not single_worker.cancel(queued)
    queued.wait()
    first.wait()
    assert not single_worker.cancel(first)
    assert int(dst.count_nonzero()) == 0, "a cancelled copy must not write"


def test_many_python_threads_submit_at_once(engine: CopyEngine) -> None:
    num_threads, per_thread = 8, 40
    errors: list[BaseException] = []
    barrier = threading.Barrier(num_threads)

    def submitter(seed: int) -> None:
        try:
            generator = torch.Generator().manual_seed(seed)
            pairs = [(random_bytes(int(n), generator), torch.zeros(int(n), dtype=torch.uint8))
                     for n in torch.randint(1, 50_000, (per_thread,), generator=generator)]
            barrier.wait()
            tickets = [engine.submit([pair], CopyPriority(seed % 2 if i % 3 else 0))[0]
                       for i, pair in enumerate(pairs)]
            for ticket, (src, dst) in zip(tickets, pairs):
                ticket.wait()
                assert torch.equal(src, dst)
        except BaseException as error:  # re-raised in the main thread below
            errors.append(error)

    threads = [threading.Thread(target=submitter, args=(seed,)) for seed in range(num_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


def test_shutdown_cancels_queued_copies_and_rejects_new_ones(backend: CopyBackend) -> None:
    engine = load_copy_engine(torch.device("cpu"), num_workers=1, backend=backend)
    big = torch.zeros(64 * MIB, dtype=torch.uint8)
    tickets = engine.submit([(big, torch.empty_like(big)) for _ in range(8)], CopyPriority.PREFETCH)
    engine.shutdown()
    engine.shutdown()
    assert all(ticket.done() or ticket.cancelled() for ticket in tickets)
    assert any(ticket.cancelled() for ticket in tickets)
    with pytest.raises(RuntimeError, match="shut down"):
        engine.submit([(big, torch.empty_like(big))], CopyPriority.DEMAND)


@pytest.mark.parametrize("src, dst, message", [
    (torch.zeros(8, dtype=torch.float32), torch.zeros(8, dtype=torch.float32), "uint8"),
    (torch.zeros(8, dtype=torch.uint8), torch.zeros(9, dtype=torch.uint8), "bytes"),
    (torch.zeros(4, 4, dtype=torch.uint8).t(), torch.zeros(4, 4, dtype=torch.uint8), "contiguous"),
])
def test_bad_copies_are_rejected(engine: CopyEngine, src: torch.Tensor, dst: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        engine.submit([(src, dst)], CopyPriority.DEMAND)


def test_default_backend_on_cpu_is_the_extension(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="moe_serve.cuda_ext"):
        engine = load_copy_engine(torch.device("cpu"))
    engine.shutdown()
    assert engine.backend is CopyBackend.CPU_EXTENSION
    assert any("backend=cpu" in record.getMessage() for record in caplog.records)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_backend_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="CUDA"):
        load_copy_engine(torch.device("cpu"), backend=CopyBackend.CUDA)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_source_compiles_with_nvcc(tmp_path: Path) -> None:
    from torch.utils.cpp_extension import include_paths

    csrc = Path(__file__).resolve().parents[2] / "cuda_ext" / "csrc"
    command = ["nvcc", "-c", f"-std={cxx_standard()}", "-O3", "-DMOE_WITH_CUDA", "-Xcompiler", "-Wall,-Wextra,-Werror",
               *(f"-I{path}" for path in include_paths()),
               str(csrc / "copy_engine_cuda.cu"), "-o", str(tmp_path / "copy_engine_cuda.o")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "copy_engine_cuda.o").stat().st_size > 0


def test_a_killed_builds_stale_torch_lock_does_not_block_the_next_build(tmp_path: Path) -> None:
    (tmp_path / TORCH_BATON).touch()  # left behind by a build that was killed mid-way
    with build_lock(tmp_path):
        assert not (tmp_path / TORCH_BATON).exists()
        with open(tmp_path / "moe-serve-build.lock", "w") as other:  # another process's attempt
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(tmp_path / "moe-serve-build.lock", "w") as other:  # released on exit
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


@pytest.mark.parametrize("backend", CPU_BACKENDS, ids=lambda backend: backend.value)
def test_a_copy_failing_on_the_worker_fails_only_its_ticket(backend: CopyBackend) -> None:
    engine = load_copy_engine(torch.device("cpu"), num_workers=1, backend=backend)
    generator = torch.Generator().manual_seed(5)
    srcs = [random_bytes(n, generator) for n in (MIB // 16, 8 * MIB, MIB // 16)]
    dsts = [torch.zeros_like(src) for src in srcs]
    engine.set_link_gbps(0.01)  # the 8 MiB copy takes ~0.8 s, so the last one is surely still queued below
    engine.inject_failures(1, "injected fault")  # the next copy to start raises on the worker thread
    failing, *others = engine.submit(list(zip(srcs, dsts)), CopyPriority.PREFETCH)
    assert others[-1].done() is False and not others[-1].failed(), "pending (behind 8 MiB) is not failed"
    with pytest.raises(CopyError, match="injected fault"):
        failing.wait()
    assert failing.failed() and not failing.cancelled()
    with pytest.raises(CopyError, match="injected fault"):
        failing.done()
    with pytest.raises(CopyError, match="injected fault"):
        failing.synchronize()
    for ticket in others:
        ticket.wait()
        assert ticket.done() and not ticket.failed()
    assert int(dsts[0].count_nonzero()) == 0
    assert all(torch.equal(src, dst) for src, dst in zip(srcs[1:], dsts[1:]))
    later = engine.submit([(srcs[0], dsts[0])], CopyPriority.DEMAND)[0]
    later.wait()
    assert torch.equal(srcs[0], dsts[0]), "the engine goes on after a failure"
    engine.shutdown()


def test_copies_complete_while_python_holds_the_gil() -> None:
    """The workers never take the GIL: with the switch interval at 100 s this thread keeps the
    GIL while it polls, and copies through views that only the engine still references (the
    expert cache's pattern: their release used to need the GIL) complete all the same."""
    engine = load_copy_engine(torch.device("cpu"), num_workers=2, backend=CopyBackend.CPU_EXTENSION)
    src = torch.arange(64 * MIB, dtype=torch.int64).to(torch.uint8)
    dst = torch.zeros_like(src)
    chunk = 4 * MIB
    interval = sys.getswitchinterval()
    sys.setswitchinterval(100.0)
    try:
        tickets = engine.submit([(src[i:i + chunk], dst[i:i + chunk]) for i in range(0, src.numel(), chunk)],
                                CopyPriority.PREFETCH)
        deadline = time.perf_counter() + 10.0
        while not all(ticket.done() for ticket in tickets) and time.perf_counter() < deadline:
            pass
        finished = sum(ticket.done() for ticket in tickets)
    finally:
        sys.setswitchinterval(interval)
    assert finished == len(tickets), f"{finished} of {len(tickets)} copies completed without the GIL"
    assert torch.equal(src, dst)
    engine.shutdown()


def test_demand_overtakes_a_running_prefetch_within_a_chunk() -> None:
    engine = load_copy_engine(torch.device("cpu"), num_workers=1, backend=CopyBackend.CPU_EXTENSION,
                              chunk_bytes=MIB)
    big_src = torch.ones(256 * MIB, dtype=torch.uint8)
    big_dst = torch.zeros_like(big_src).fill_(0)  # touch every page: the copy is memcpy-bound
    demand_src = torch.full((MIB,), 7, dtype=torch.uint8)
    demand_dst = torch.zeros_like(demand_src)
    big = engine.submit([(big_src, big_dst)], CopyPriority.PREFETCH)[0]
    deadline = time.perf_counter() + 10.0
    while int(big_dst[0]) == 0 and time.perf_counter() < deadline:  # its first chunk landed: it runs
        time.sleep(0.0001)
    demand = engine.submit([(demand_src, demand_dst)], CopyPriority.DEMAND)[0]
    demand.wait()
    assert not big.done(), "the DEMAND copy waited for the whole 256 MiB PREFETCH copy"
    assert not engine.cancel(big), "a started (parked) copy cannot be cancelled"
    assert torch.equal(demand_dst, demand_src)
    big.wait()
    assert torch.equal(big_dst, big_src), "the parked copy resumes where it stopped"
    engine.shutdown()


def test_promoted_parked_copy_runs_next(single_worker: CopyEngine) -> None:
    generator = torch.Generator().manual_seed(6)
    srcs = [random_bytes(8 * MIB, generator) for _ in range(8)]
    dsts = [torch.zeros_like(src) for src in srcs]
    tickets = single_worker.submit(list(zip(srcs, dsts)), CopyPriority.PREFETCH)
    assert single_worker.promote(tickets[-1]) or tickets[-1].done()
    tickets[-1].wait()
    for ticket in tickets:
        ticket.wait()
    assert all(torch.equal(src, dst) for src, dst in zip(srcs, dsts))


def test_the_cxx_standard_is_torchs_and_a_gpu_less_cuda_build_gets_default_archs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert not any(flag.startswith("-std") for flag in CXX_FLAGS), "torch's own -std must not be overridden"
    assert cxx_standard() in {"c++17", "c++20"}
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with cuda_arch_list():
        assert os.environ["TORCH_CUDA_ARCH_LIST"] == DEFAULT_CUDA_ARCHS
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.9")
    with cuda_arch_list():
        assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.9"


def test_a_builds_fingerprint_follows_source_contents_and_flags_not_their_location(tmp_path: Path) -> None:
    copies = []
    for place in ("site-packages", "src"):
        (tmp_path / place).mkdir()
        copies.append([Path(shutil.copy(CSRC_DIR / name, tmp_path / place / name)) for name in CPU_SOURCES])
    assert fingerprint(copies[0], CXX_FLAGS) == fingerprint(copies[1], CXX_FLAGS)
    assert fingerprint(copies[0], CXX_FLAGS) != fingerprint(copies[0], [*CXX_FLAGS, "-DMOE_WITH_CUDA"])
    copies[1][0].write_bytes(copies[1][0].read_bytes() + b"\n// edited\n")
    assert fingerprint(copies[0], CXX_FLAGS) != fingerprint(copies[1], CXX_FLAGS)


def test_a_prebuilt_extension_loads_with_no_compiler_and_no_jit(tmp_path: Path) -> None:
    """What the runtime image does: the stamped build is imported directly (torch's JIT, which would
    look for a compiler and rebuild, is made to fail here) and the engine copies."""
    load_extension(False)  # built and stamped (once per cache dir)
    assert prebuilt(False) is not None
    script = (
        "import torch, torch.utils.cpp_extension as ext\n"
        "def refuse(*a, **k): raise SystemExit('torch JIT called')\n"
        "ext.load = refuse\n"
        "from moe_serve.cuda_ext import CopyPriority, load_copy_engine\n"
        "from moe_serve.cuda_ext.build import main\n"
        "assert main(['--check']) == 0\n"
        "engine = load_copy_engine(torch.device('cpu'), backend='cpu')\n"
        "src = torch.arange(256, dtype=torch.uint8); dst = torch.zeros_like(src)\n"
        "engine.submit([(src, dst)], CopyPriority.DEMAND)[0].synchronize()\n"
        "assert torch.equal(src, dst); engine.shutdown(); print('loaded', engine.backend.value)\n"
    )
    env = {**os.environ, "PATH": str(tmp_path), "CXX": str(tmp_path / "no-compiler")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and "loaded cpu" in result.stdout, result.stdout + result.stderr


def test_the_image_check_fails_when_no_prebuilt_flavour_matches(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    from moe_serve.cuda_ext.build import main

    monkeypatch.setenv("MOE_SERVE_EXT_DIR", str(tmp_path))  # an empty cache: nothing prebuilt
    assert main(["--check"]) == 1


def _timed_copies(engine: CopyEngine, count: int, nbytes: int) -> float:
    pairs = [(torch.zeros(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)) for _ in range(count)]
    start = time.perf_counter()
    for ticket in engine.submit(pairs, CopyPriority.DEMAND):
        ticket.synchronize()
    return time.perf_counter() - start


def test_the_link_throttle_bounds_every_workers_copies_together_and_counts_busy_time(backend: CopyBackend) -> None:
    """Two workers, 4 x 4 MiB at 0.5 GB/s: at least 33.5 ms whichever worker copies what; the busy
    time is that paced time; unthrottled again, the same copies are far quicker."""
    engine = load_copy_engine(torch.device("cpu"), num_workers=2, backend=backend, link_gbps=0.5)
    try:
        assert engine.link_gbps() == 0.5
        paced = 4 * 4 * MIB / 0.5e9
        elapsed = _timed_copies(engine, 4, 4 * MIB)
        assert elapsed >= 0.98 * paced
        assert engine.link_busy_seconds() == pytest.approx(paced, rel=0.02)
        engine.set_link_gbps(None)
        assert engine.link_gbps() is None
        busy = engine.link_busy_seconds()
        assert _timed_copies(engine, 4, 4 * MIB) < paced
        assert 0 < engine.link_busy_seconds() - busy < paced
        with pytest.raises(ValueError, match="> 0 GB/s"):
            engine.set_link_gbps(0.0)
    finally:
        engine.shutdown()
