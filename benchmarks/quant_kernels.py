"""The C expert kernel per expert format, same run: microseconds per expert call and bytes read.

One MoE layer's experts at DeepSeek-V2-Lite's expert size (hidden 2048, expert FFN 1408 by
default) in each format: bf16 (the model dtype), int8, int4 (each group size) and MXFP4. Each
call computes one expert for `rows` assignment rows (1: decode at batch 1; 16: a batch routing 16
rows to the expert); the experts cycled through hold more bytes than the last-level cache, so
weights come from memory as in a decode step. Formats take turns (round r runs every format
once, in rotating order) and each round's figure and the median are reported. At one thread
(`--threads 1`, the default) time is the calling thread's CPU time (`time.thread_time`: the kernel
runs on that thread), so a loaded, shared machine's descheduling does not count; with more threads
it is wall time.

    python -m benchmarks.quant_kernels [--rows 1,16] [--rounds 5] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from moe_serve.engine.model.cpu_kernels import ExpertRows, expert_ffn, kernel_flavour
from moe_serve.engine.model.quant import MODEL_DTYPE, ExpertFormat, parse_expert_dtype
from moe_serve.engine.model.weights import pack_expert

WORKING_SET_MB = 192  # bf16 MiB of the experts cycled through: past any last-level cache
FORMATS = ("bf16", "int8", "int4-g32", "int4-g64", "int4-g128", "mxfp4")


def expert_set(name: str, hidden: int, ffn: int, count: int) -> tuple[ExpertFormat, list[tuple[torch.Tensor, ...]]]:
    """`count` random experts stored in format `name` (bf16: the packed model-dtype layout)."""
    gen = torch.Generator().manual_seed(0)
    fmt = MODEL_DTYPE if name == "bf16" else parse_expert_dtype(name)
    assert fmt is not None
    experts = []
    for _ in range(count):
        gate_up = (torch.randn(2 * ffn, hidden, generator=gen) * 0.02).bfloat16()
        down = (torch.randn(hidden, ffn, generator=gen) * 0.02).bfloat16()
        experts.append(pack_expert((gate_up, down)) if name == "bf16" else fmt.encode((gate_up.float(), down.float())))
    return fmt, experts


def seconds_per_call(fmt: ExpertFormat, experts: list[tuple[torch.Tensor, ...]], rows: ExpertRows,
                     out: torch.Tensor) -> float:
    """One pass over every expert (each computed for all rows), per call."""
    num_rows = rows.tokens.shape[0]
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    start = clock()
    for expert in experts:
        expert_ffn(rows, out, [(0, num_rows, *expert)], fmt)
    return (clock() - start) / len(experts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=1408)
    parser.add_argument("--rows", default="1,16")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--working-set-mb", type=float, default=WORKING_SET_MB,
                        help="bf16 MiB of experts cycled through (small: cache-resident, the kernels' arithmetic alone)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if kernel_flavour() == "torch":
        raise SystemExit("the C kernels are not available here")
    torch.set_num_threads(args.threads)
    count = max(2, int(args.working_set_mb * 2**20) // (3 * args.hidden * args.ffn * 2))
    names = args.formats.split(",")
    sets = {name: expert_set(name, args.hidden, args.ffn, count) for name in names}
    nbytes = {name: sum(t.numel() * t.element_size() for t in experts[0]) for name, (_, experts) in sets.items()}
    rows_list = [int(r) for r in args.rows.split(",")]
    results = []
    for num_rows in rows_list:
        x = torch.randn(num_rows, args.hidden)
        ids = torch.arange(num_rows)
        rows = ExpertRows(x, ids, ids, torch.ones(num_rows), args.ffn)
        out = torch.zeros(num_rows, args.hidden)
        for name in names:  # warm-up: page in every expert once
            seconds_per_call(*sets[name], rows, out)
        rounds: dict[str, list[float]] = {name: [] for name in names}
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                rounds[name].append(seconds_per_call(*sets[name], rows, out))
        for name in names:
            median = statistics.median(rounds[name])
            results.append({"format": name, "rows": num_rows, "expert_bytes": nbytes[name],
                            "rounds_us": [round(s * 1e6, 1) for s in rounds[name]], "median_us": round(median * 1e6, 1),
                            "gbps": round(nbytes[name] / median / 1e9, 2)})
    if args.json:
        print(json.dumps(results))
        return
    print(f"expert {args.hidden} x {args.ffn} (gate_up + down), {count} experts cycled, {args.threads} thread(s), "
          f"kernel {kernel_flavour()}")
    for num_rows in rows_list:
        base = next(r["median_us"] for r in results if r["rows"] == num_rows and r["format"] == names[0])
        print(f"rows {num_rows}:")
        print(f"{'format':>10} {'bytes':>10} {'median us':>10} {'vs ' + names[0]:>8} {'GB/s':>6}  rounds (us)")
        for r in (r for r in results if r["rows"] == num_rows):
            print(f"{r['format']:>10} {r['expert_bytes']:>10} {r['median_us']:>10.1f} {base / r['median_us']:>7.2f}x "
                  f"{r['gbps']:>6.2f}  {' '.join(f'{u:.0f}' for u in r['rounds_us'])}")


if __name__ == "__main__":
    main()
