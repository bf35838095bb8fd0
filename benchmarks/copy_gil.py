"""Copy time with a busy Python thread vs idle: does completing a copy need the GIL?

Each round submits --copies copies of --size-mib MiB from one host slab into another, through
fresh views made for that submit and dropped right after it (as the expert cache does), and
waits once for the round. Rounds alternate A (idle), B (another Python thread runs a tight
pure-Python loop the whole round) and C (the same loop in another process: the same load on the
cores without sharing this process's GIL, the control), --pairs times each; prints the median
round time of each and the ratios to A (target: B within 1.2x of A; B well above C means the
copies wait for the GIL, C above A means the cores are short). The copies are DEMAND copies (a wait promotes a
queued PREFETCH copy, which would reorder the round) and one worker runs them in submit order, so
the round's one wait is on its last ticket and this thread takes the GIL back once.

    python -m benchmarks.copy_gil [--backend cpu] [--copies 32] [--size-mib 16] [--pairs 9] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time

import torch

from moe_serve.cuda_ext import CopyBackend, CopyEngine, CopyPriority, load_copy_engine

MIB = 1 << 20


class BusyThread:
    """A Python thread spinning in a pure-Python loop (it holds the GIL but for forced switches)."""

    def __init__(self) -> None:
        self._stop = False
        self._thread = threading.Thread(target=self._spin, daemon=True)

    def _spin(self) -> None:
        count = 0
        while not self._stop:
            count += 1

    def __enter__(self) -> BusyThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join()


class BusyProcess:
    """The same pure-Python loop in a child process (no GIL shared with this one)."""

    def __enter__(self) -> BusyProcess:
        self._process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.2)  # past the interpreter's start-up
        return self

    def __exit__(self, *exc: object) -> None:
        self._process.kill()
        self._process.wait()


def copy_round(engine: CopyEngine, src: torch.Tensor, dst: torch.Tensor, copies: int, nbytes: int) -> float:
    """Seconds to submit `copies` copies through fresh views and see them all done."""
    start = time.perf_counter()
    tickets = engine.submit([(src[i * nbytes:(i + 1) * nbytes], dst[i * nbytes:(i + 1) * nbytes])
                             for i in range(copies)], CopyPriority.DEMAND)
    tickets[-1].synchronize()
    for ticket in tickets:
        if not ticket.done():
            ticket.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default=CopyBackend.CPU_EXTENSION.value,
                        choices=[CopyBackend.CPU_EXTENSION.value, CopyBackend.TORCH.value])
    parser.add_argument("--copies", type=int, default=32)
    parser.add_argument("--size-mib", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=9, help="A B C cycles of rounds")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    nbytes = args.size_mib * MIB
    src = torch.randint(0, 256, (args.copies * nbytes,), dtype=torch.uint8)
    dst = torch.zeros_like(src).fill_(1)  # touch every page before timing
    engine = load_copy_engine(torch.device("cpu"), num_workers=args.workers, backend=args.backend)
    copy_round(engine, src, dst, args.copies, nbytes)  # warm-up
    idle, busy, control = [], [], []
    for _ in range(args.pairs):
        idle.append(copy_round(engine, src, dst, args.copies, nbytes))
        with BusyThread():
            busy.append(copy_round(engine, src, dst, args.copies, nbytes))
        with BusyProcess():
            control.append(copy_round(engine, src, dst, args.copies, nbytes))
    engine.shutdown()
    if not torch.equal(src, dst):
        sys.exit("copied bytes differ from the source")
    result = {"backend": engine.backend.value, "workers": args.workers, "copies": args.copies,
              "size_mib": args.size_mib, "pairs": args.pairs, "switch_interval_ms": sys.getswitchinterval() * 1e3,
              "idle_ms": round(statistics.median(idle) * 1e3, 2), "busy_ms": round(statistics.median(busy) * 1e3, 2),
              "control_ms": round(statistics.median(control) * 1e3, 2)}
    result["ratio"] = round(result["busy_ms"] / result["idle_ms"], 3)
    result["control_ratio"] = round(result["control_ms"] / result["idle_ms"], 3)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"backend={result['backend']} workers={args.workers} {args.copies} x {args.size_mib} MiB per round, "
          f"{args.pairs} A/B/C cycles")
    print(f"idle median {result['idle_ms']:.2f} ms, busy Python thread median {result['busy_ms']:.2f} ms "
          f"({result['ratio']:.2f}x), busy process (control) median {result['control_ms']:.2f} ms "
          f"({result['control_ratio']:.2f}x)")


if __name__ == "__main__":
    main()
