"""The C kernels vs torch on this CPU, same run: linear layers and one MoE layer's experts.

Decode-sized products are bound by reading weights, so each case cycles through more weight
matrices than the last-level cache holds (every read comes from memory, as in a real decode
step) and reports microseconds per call and the weight bytes read per second. The kernel reads
the packed layout the engine loads (`engine.models.packed`); `torch` is `F.linear` on the plain
weights (and, for the experts, the per-expert loop the engine runs without the kernels);
`read GB/s` is a plain `sum` over the same bytes, the machine's streaming read rate. Large row
counts are prefill sizes, where the products are bound by arithmetic instead.

With `--dtype bfloat16` weights and activations are bf16 on both sides: the kernels widen the
weights in registers and sum in fp32; torch runs its bf16 GEMM (slow on CPUs without bf16
instructions).

    python -m benchmarks.cpu_kernels [--hidden 512] [--rows 1,2,4,8,16,32,64,128,512] [--dtype float32] [--json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from moe_serve.engine.model.cpu_kernels import ExpertRows, expert_ffn, kernel_flavour, linear
from moe_serve.engine.model.packed import PackedMatrix
from moe_serve.engine.model.weights import pack_expert

WORKING_SET_BYTES = 256 * 2**20  # weights cycled through per case: far more than a last-level cache


def best_seconds(fn: Callable[[int], object], calls: int, repeats: int = 3) -> float:
    """Best of `repeats` passes of fn(0..calls-1), per call."""
    fn(0)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(calls):
            fn(i)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def linear_rows(hidden: int, rows_list: list[int], dtype: torch.dtype) -> list[dict]:
    size = torch.finfo(dtype).bits // 8
    count = max(1, WORKING_SET_BYTES // (hidden * hidden * size))
    weights = [torch.randn(hidden, hidden).to(dtype) for _ in range(count)]
    packed = [PackedMatrix.pack(w) for w in weights]
    nbytes = hidden * hidden * size
    read = best_seconds(lambda i: weights[i].sum(), count)
    out = []
    for rows in rows_list:
        x = torch.randn(rows, hidden).to(dtype)
        ours = best_seconds(lambda i, x=x: linear(x, packed[i]), count)
        theirs = best_seconds(lambda i, x=x: F.linear(x, weights[i]), count)
        out.append({"case": "linear", "rows": rows, "kernel_us": round(ours * 1e6, 1), "torch_us": round(theirs * 1e6, 1),
                    "speedup": round(theirs / ours, 2), "kernel_gbps": round(nbytes / ours / 1e9, 1),
                    "torch_gbps": round(nbytes / theirs / 1e9, 1), "read_gbps": round(nbytes / read / 1e9, 1)})
    return out


def expert_layer(hidden: int, experts: int, top_k: int, tokens: int, dtype: torch.dtype) -> dict:
    ffn = hidden // 2
    expert_bytes = 3 * hidden * ffn * (torch.finfo(dtype).bits // 8)
    layers = max(1, WORKING_SET_BYTES // (experts * expert_bytes))
    gate_ups = [[torch.randn(2 * ffn, hidden).to(dtype) for _ in range(experts)] for _ in range(layers)]
    downs = [[torch.randn(hidden, ffn).to(dtype) for _ in range(experts)] for _ in range(layers)]
    packed = [[pack_expert((gu, d)) for gu, d in zip(gate_ups[layer], downs[layer], strict=True)]
              for layer in range(layers)]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)]).flatten()
    weights = torch.rand(tokens * top_k, generator=gen).to(dtype)
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=experts).tolist()
    starts = [sum(counts[:e]) for e in range(experts)]
    used = [e for e in range(experts) if counts[e]]

    def ours(layer: int) -> None:
        rows = ExpertRows(x, order // top_k, order, weights[order], ffn)
        out = torch.zeros(tokens * top_k, hidden)  # the kernel accumulates in fp32
        expert_ffn(rows, out, [(starts[e], starts[e] + counts[e], *packed[layer][e]) for e in used])

    def theirs(layer: int) -> None:
        out = x.new_zeros(tokens * top_k, hidden)
        for e in used:
            rows = order[starts[e] : starts[e] + counts[e]]
            gate, up = F.linear(x[rows // top_k], gate_ups[layer][e]).chunk(2, dim=-1)
            out[rows] = F.linear(F.silu(gate) * up, downs[layer][e]) * weights[rows, None]

    nbytes = len(used) * expert_bytes
    a, b = best_seconds(ours, layers), best_seconds(theirs, layers)
    return {"case": f"experts ({tokens} tokens, top-{top_k} of {experts})", "rows": max(counts),
            "kernel_us": round(a * 1e6, 1), "torch_us": round(b * 1e6, 1), "speedup": round(b / a, 2),
            "kernel_gbps": round(nbytes / a / 1e9, 1), "torch_gbps": round(nbytes / b / 1e9, 1), "read_gbps": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--rows", default="1,2,4,8,16,32,64,128,512", help="activation rows per linear call")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if kernel_flavour() == "torch":
        raise SystemExit("the C kernels are not available here (see the log)")
    rows_list = [int(r) for r in args.rows.split(",")]
    results = linear_rows(args.hidden, rows_list, dtype)
    results += [expert_layer(args.hidden, 16, 4, tokens, dtype) for tokens in (1, 16, 64, 512)]
    if args.json:
        print(json.dumps(results))
        return
    print(f"kernel: {kernel_flavour()}, {torch.get_num_threads()} threads, hidden {args.hidden}, {args.dtype}")
    print(f"{'case':<34} {'rows':>4} {'kernel us':>10} {'torch us':>9} {'speedup':>8} {'kernel GB/s':>12} "
          f"{'torch GB/s':>11} {'read GB/s':>10}")
    for r in results:
        print(f"{r['case']:<34} {r['rows']:>4} {r['kernel_us']:>10} {r['torch_us']:>9} {r['speedup']:>7}x "
              f"{r['kernel_gbps']:>12} {r['torch_gbps']:>11} {r['read_gbps'] or '':>10}")


if __name__ == "__main__":
    main()
