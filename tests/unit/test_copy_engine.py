"""Copy engine: the CPU extension against the torch fallback (the reference), queue semantics."""

from __future__ import annotations

import fcntl
import logging
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from moe_serve.cuda_ext import CopyBackend, CopyEngine, CopyPriority, load_copy_engine
from moe_serve.cuda_ext.native import TORCH_BATON, build_lock

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
    command = ["nvcc", "-c", "-std=c++17", "-O3", "-DMOE_WITH_CUDA",
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
