"""CUDA copy engine: bytes against the torch reference, priority, chunked overtaking, failures on the
dispatcher, stream ordering, the expert cache on a GPU."""

from __future__ import annotations

import time

import pytest
import torch

from moe_serve.cache_policies import make_policy
from moe_serve.cuda_ext import CopyBackend, CopyError, CopyPriority, load_copy_engine
from moe_serve.engine.offload.expert_cache import ExpertCache
from moe_serve.engine.offload.expert_store import HostExpertStore
from moe_serve.engine.types import ExpertKey

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
MIB = 1 << 20


@pytest.mark.parametrize("backend", [CopyBackend.CUDA, CopyBackend.TORCH])
def test_host_to_device_copies_match_the_source(backend: CopyBackend) -> None:
    engine = load_copy_engine(torch.device("cuda"), num_workers=2, backend=backend)
    generator = torch.Generator().manual_seed(0)
    sources = [torch.randint(0, 256, (int(n),), dtype=torch.uint8, generator=generator).pin_memory()
               for n in torch.randint(1, 2 * MIB, (64,), generator=generator)]
    dsts = [torch.empty(src.numel(), dtype=torch.uint8, device="cuda") for src in sources]
    tickets = engine.submit(list(zip(sources, dsts)), CopyPriority.PREFETCH)
    for ticket in tickets:
        ticket.wait()
    torch.cuda.current_stream().synchronize()
    assert all(ticket.done() for ticket in tickets)
    for src, dst in zip(sources, dsts):
        assert torch.equal(dst.cpu(), src)
    engine.shutdown()


def test_demand_overtakes_queued_prefetches_on_cuda() -> None:
    engine = load_copy_engine(torch.device("cuda"), num_workers=1, backend=CopyBackend.CUDA)
    srcs = [torch.ones(32 * MIB, dtype=torch.uint8).pin_memory() for _ in range(24)]
    prefetches = engine.submit([(src, torch.empty(src.numel(), dtype=torch.uint8, device="cuda")) for src in srcs],
                               CopyPriority.PREFETCH)
    demand = engine.submit([(srcs[0], torch.empty(srcs[0].numel(), dtype=torch.uint8, device="cuda"))],
                           CopyPriority.DEMAND)[0]
    demand.synchronize()
    assert not prefetches[-1].done()
    engine.shutdown()


def test_demand_overtakes_a_running_prefetch_on_cuda() -> None:
    engine = load_copy_engine(torch.device("cuda"), num_workers=1, backend=CopyBackend.CUDA, chunk_bytes=4 * MIB)
    big_src = torch.ones(512 * MIB, dtype=torch.uint8).pin_memory()
    big_dst = torch.zeros(big_src.numel(), dtype=torch.uint8, device="cuda")
    demand_src = torch.full((4 * MIB,), 7, dtype=torch.uint8).pin_memory()
    demand_dst = torch.zeros(demand_src.numel(), dtype=torch.uint8, device="cuda")
    big = engine.submit([(big_src, big_dst)], CopyPriority.PREFETCH)[0]
    time.sleep(0.002)  # the dispatcher has issued its first chunks
    demand = engine.submit([(demand_src, demand_dst)], CopyPriority.DEMAND)[0]
    demand.synchronize()
    assert not big.done(), "the DEMAND copy waited for the whole 512 MiB PREFETCH copy"
    big.synchronize()
    assert torch.equal(demand_dst.cpu(), demand_src) and bool((big_dst == 1).all())
    engine.shutdown()


def test_a_failing_copy_on_the_dispatcher_fails_only_its_ticket() -> None:
    engine = load_copy_engine(torch.device("cuda"), num_workers=1, backend=CopyBackend.CUDA)
    srcs = [torch.full((MIB,), i + 1, dtype=torch.uint8).pin_memory() for i in range(3)]
    dsts = [torch.zeros(MIB, dtype=torch.uint8, device="cuda") for _ in srcs]
    engine.inject_failures(1, "injected fault")
    failing, *others = engine.submit(list(zip(srcs, dsts)), CopyPriority.PREFETCH)
    with pytest.raises(CopyError, match="injected fault"):
        failing.synchronize()
    assert failing.failed()
    for ticket in others:
        ticket.synchronize()
    assert all(torch.equal(dst.cpu(), src) for src, dst in zip(srcs[1:], dsts[1:]))
    assert int(dsts[0].count_nonzero()) == 0
    engine.shutdown()


def test_expert_cache_on_cuda_returns_host_bytes() -> None:
    experts = {ExpertKey(0, e): [torch.randn(64, 32), torch.randn(32, 64)] for e in range(8)}
    store = HostExpertStore.from_tensors(experts, pin=True)
    assert store.is_pinned
    engine = load_copy_engine(torch.device("cuda"))
    cache = ExpertCache(store, 4, torch.device("cuda"), make_policy("lru"), engine)
    for step in range(4):
        keys = [ExpertKey(0, (step * 3 + i) % 8) for i in range(3)]
        cache.prefetch([ExpertKey(0, (step * 3 + 3) % 8)])
        for slot in cache.acquire(keys):
            for view, original in zip(cache.wait(slot), experts[slot.key]):
                assert torch.equal(view.cpu(), original)
        cache.release(keys)
        cache.check_invariants()
    engine.shutdown()
