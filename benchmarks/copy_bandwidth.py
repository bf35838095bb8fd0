"""Copy bandwidth (GB/s) for expert-sized copies: each copy-engine backend vs torch copy_ vs memcpy.

    python -m benchmarks.copy_bandwidth [--sizes-mib 1 4 16] [--copies 32] [--json]

On CUDA the engines copy pinned host -> device and are compared with the pinned peak (one big
torch copy); on CPU they copy RAM -> RAM and are compared with numpy memcpy in the same run.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable

import numpy as np
import torch

from moe_serve.cuda_ext import CopyBackend, CopyPriority, load_copy_engine

logger = logging.getLogger(__name__)
MIB = 1 << 20


def best_seconds(run: Callable[[], None], repeats: int) -> float:
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--copies", type=int, default=32, help="copies in flight per measurement")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    backends = [CopyBackend.CUDA, CopyBackend.TORCH] if cuda else [CopyBackend.CPU_EXTENSION, CopyBackend.TORCH]
    engines = {}
    for backend in backends:
        try:
            engines[backend.value] = load_copy_engine(device, num_workers=args.workers, backend=backend)
        except Exception as error:  # report what is available, skip the rest
            logger.warning("backend %s unavailable: %s", backend.value, error)
    rows = []
    for size in args.sizes_mib:
        nbytes = size * MIB
        srcs = [torch.randint(0, 256, (nbytes,), dtype=torch.uint8, pin_memory=cuda) for _ in range(args.copies)]
        dsts = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(args.copies)]
        pairs = list(zip(srcs, dsts))
        total = nbytes * args.copies
        results: dict[str, float] = {}
        for name, engine in engines.items():
            def run_engine(engine=engine) -> None:
                for ticket in engine.submit(pairs, CopyPriority.DEMAND):
                    ticket.synchronize()
            results[f"engine:{name}"] = total / best_seconds(run_engine, args.repeats) / 1e9

        def run_torch() -> None:
            for src, dst in pairs:
                dst.copy_(src, non_blocking=cuda)
            if cuda:
                torch.cuda.synchronize()
        results["torch copy_"] = total / best_seconds(run_torch, args.repeats) / 1e9
        if cuda:
            big_src = torch.empty(total, dtype=torch.uint8, pin_memory=True)
            big_dst = torch.empty(total, dtype=torch.uint8, device=device)
            results["peak"] = total / best_seconds(lambda: (big_dst.copy_(big_src, non_blocking=True),
                                                            torch.cuda.synchronize()), args.repeats) / 1e9
        else:
            np_pairs = [(src.numpy(), dst.numpy()) for src, dst in pairs]

            def run_memcpy() -> None:
                for src_np, dst_np in np_pairs:
                    np.copyto(dst_np, src_np)
            results["peak"] = total / best_seconds(run_memcpy, args.repeats) / 1e9
        for method, gbps in results.items():
            rows.append({"size_mib": size, "method": method if method != "peak" else
                         ("pinned cudaMemcpy peak" if cuda else "numpy memcpy"),
                         "gb_per_s": round(gbps, 2), "pct_of_peak": round(100 * gbps / results["peak"], 1)})
    for engine in engines.values():
        engine.shutdown()
    if args.json:
        print(json.dumps({"device": str(device), "copies_in_flight": args.copies, "rows": rows}, indent=2))
        return
    print(f"device={device} copies_in_flight={args.copies} workers={args.workers}")
    print(f"{'size MiB':>8}  {'method':<24} {'GB/s':>8} {'% peak':>7}")
    for row in rows:
        print(f"{row['size_mib']:>8}  {row['method']:<24} {row['gb_per_s']:>8.2f} {row['pct_of_peak']:>7.1f}")


if __name__ == "__main__":
    main()
