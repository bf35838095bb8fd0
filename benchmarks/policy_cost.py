"""Eviction-policy bookkeeping in the live engine, and decode tok/s, per policy, in one run.

Builds the trace-replayed DeepSeek-V2-Lite geometry of `benchmarks/prefetch_decode.py` (26 MoE
layers x 64 experts, top-6, routing replayed from the trace; small hidden sizes by default so
the CPU run is about the cache), one engine per policy with `--fraction` of the experts cached
and no prefetch. Each engine's expert-cache policy is wrapped in `TimedPolicy`, which adds up the
time spent inside the policy's calls per engine step. After `--warmup-requests` requests per
engine, the policies take turns (A B A B ...) for `--rounds` rounds, each round one batch of
requests per policy; per round it reports tok/s and the policy time per MoE layer per step
(median over the round's steps, and the mean), then the medians over rounds.

Thread CPU time: the wrapper also records the stream of calls the engine made; a last request per
policy records its candidate sets too, and that stream is replayed into a fresh policy (fed the
whole stream before it, so in the live policy's state; same decisions, as policies are
deterministic) under one pair of thread-CPU-clock reads: CPU us per MoE layer per step.

    python -m benchmarks.policy_cost [--policies lru,context,context-numpy] [--rounds 5] [--threads 1] [--json]
    python -m benchmarks.policy_cost --call-pattern 300 --rounds 3   # no engine: the calls alone, seconds

A policy is built as the engine builds it (`make_layered_policy`: `context` in native code);
`NAME-numpy` is the numpy implementation under `PartitionedPolicy` (the native policy's oracle).

Policy time is wall time (perf_counter_ns around each call; reading the thread CPU clock costs a
system call of ~2 us here, more than a call it would time), so a step's sum can include time the
engine thread was preempted; the per-step median is robust to that, the mean is not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from array import array
from collections.abc import Hashable, Iterable, Iterator, Sequence, Set
from pathlib import Path

import numpy as np
import torch

from benchmarks.engine_runs import counters_since, offload_counters, run_to_completion
from benchmarks.prefetch_decode import DEFAULT_TRACE, make_checkpoint, replaying_engine
from moe_serve.cache_policies import CachePolicy, make_layered_policy, make_policy
from moe_serve.cache_policies.partitioned import PartitionedPolicy
from moe_serve.engine.core.llm_engine import LLMEngine
from moe_serve.engine.core.sampling_params import SamplingParams
from moe_serve.engine.offload.provider import OffloadedExperts
from moe_serve.engine.offload.slot_pool import EvictableKeys
from moe_serve.engine.traces.trace_file import load_trace
from moe_serve.engine.types import ExpertKey

METHODS = ("on_insert", "on_access", "on_evict", "on_step", "victim", "victims")
NUMPY_SUFFIX = "-numpy"


def layered_policy(name: str, capacity: int, num_layers: int, num_experts: int) -> CachePolicy:
    """The engine's policy called `name`; `NAME-numpy`: the numpy `NAME` per layer under `PartitionedPolicy`."""
    if name.endswith(NUMPY_SUFFIX):
        base = name.removesuffix(NUMPY_SUFFIX)
        return PartitionedPolicy(lambda: make_policy(base), capacity, num_layers)
    return make_layered_policy(name, capacity, num_layers, num_experts)


class RecordedKeys(Set[Hashable]):
    """A candidate set as the engine passed it: its keys in their order, O(1) membership, and the
    view's `protected` set (the same object) where it had one."""

    def __init__(self, keys: Iterable[Hashable]) -> None:
        self._order = list(keys)
        self._keys = set(self._order)
        self.protected = getattr(keys, "protected", None)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)


class TimedPolicy(CachePolicy):
    """Forwards every call to `inner`, adds up the nanoseconds spent inside per engine step, and
    records the calls (victim calls, with their candidates, only while `record_victims` is set).
    Calls are recorded as integers (method, layer, expert): millions of recorded tuples would make
    the garbage collector's full passes, and so the timed steps, slower and slower."""

    name = "timed"

    def __init__(self, inner: CachePolicy) -> None:
        self.inner = inner
        self.step_ns: list[int] = []  # one entry per finished step
        self.calls = array("q")
        self.candidates: list[RecordedKeys] = []
        self.record_victims = False
        self._ns = 0

    def _record(self, method: int, key: Hashable = None) -> None:
        code = method if key is None else (key[0] << 24 | key[1] << 4) | method
        self.calls.append(code)

    def decoded(self, start: int) -> list[tuple[str, object]]:
        """The calls from `start` on as (method name, argument), candidates in order."""
        candidates = iter(self.candidates)
        out: list[tuple[str, object]] = []
        for code in self.calls[start:]:
            method = METHODS[code & 15]
            if method in ("victim", "victims"):
                out.append((method, next(candidates)))
            elif method == "on_step":
                out.append((method, None))
            else:
                out.append((method, ExpertKey(code >> 24, (code >> 4) & 0xFFFFF)))
        return out

    def on_insert(self, key: Hashable) -> None:
        start = time.perf_counter_ns()
        self.inner.on_insert(key)
        self._ns += time.perf_counter_ns() - start
        self._record(0, key)

    def on_access(self, key: Hashable) -> None:
        start = time.perf_counter_ns()
        self.inner.on_access(key)
        self._ns += time.perf_counter_ns() - start
        self._record(1, key)

    def on_evict(self, key: Hashable) -> None:
        start = time.perf_counter_ns()
        self.inner.on_evict(key)
        self._ns += time.perf_counter_ns() - start
        self._record(2, key)

    def on_step(self) -> None:
        start = time.perf_counter_ns()
        self.inner.on_step()
        self.step_ns.append(self._ns + time.perf_counter_ns() - start)
        self._ns = 0
        self._record(3)

    def victim(self, candidates: Iterable[Hashable]) -> Hashable:
        start = time.perf_counter_ns()
        key = self.inner.victim(candidates)
        self._ns += time.perf_counter_ns() - start
        if self.record_victims:
            self._record(4)
            self.candidates.append(RecordedKeys(candidates))
        return key

    def victims(self, candidates: Set[Hashable], incoming: Sequence[Hashable]) -> list[Hashable] | None:
        start = time.perf_counter_ns()
        keys = self.inner.victims(candidates, incoming)
        self._ns += time.perf_counter_ns() - start
        if self.record_victims:
            self._record(5)
            self.candidates.append((RecordedKeys(candidates), list(incoming)))
        return keys


def replayed_cpu_us(calls: list[tuple[str, object]], start: int, policy: CachePolicy, num_layers: int) -> float:
    """Thread CPU us per layer per step of `calls[start:]` replayed into `policy`, after the calls
    before `start` (untimed; they hold no victim calls, which change no state)."""
    def run(segment: list[tuple[str, object]]) -> int:
        steps = 0
        for method, argument in segment:
            if method == "on_step":
                policy.on_step()
                steps += 1
            elif method == "victims":
                policy.victims(*argument)
            else:
                getattr(policy, method)(argument)
        return steps

    run(calls[:start])
    begin = time.thread_time()
    steps = run(calls[start:])
    return (time.thread_time() - begin) * 1e6 / (steps * num_layers)


class NullPolicy(CachePolicy):
    """Evicts the first candidate and keeps no state: the cost of `drive_call_pattern` itself."""

    name = "null"

    def on_access(self, key: Hashable) -> None:
        """Nothing to note."""

    def victim(self, candidates: Iterable[Hashable]) -> Hashable:
        return next(iter(candidates))


def drive_call_pattern(policy: CachePolicy, expert_ids: np.ndarray, capacity: int,
                       resident: dict[ExpertKey, None]) -> None:
    """The engine's calls at batch 1 without an engine: per step and MoE layer, the routed keys that are
    resident are accessed first, then each miss evicts (a victim among the resident keys not routed
    this step, passed as the cache's `EvictableKeys` set view; the victims of two or more misses in one
    `victims` call where the policy offers it, as `ExpertCache.acquire` asks) while the cache is full,
    is inserted, and is accessed; then the step
    ends. expert_ids: [tokens, layers, top_k] (a trace's routing); `resident`: the cache's keys, updated
    (pass the same dict to a later call that continues the run)."""
    for token in expert_ids.tolist():
        for layer, experts in enumerate(token):
            keys = list(dict.fromkeys(ExpertKey(layer, expert) for expert in experts))
            misses = [key for key in keys if key not in resident]
            for key in keys:
                if key in resident:
                    policy.on_access(key)
            protected = set(keys)
            incoming = misses[max(0, capacity - len(resident)):]
            ahead = policy.victims(EvictableKeys(resident, protected), incoming) if len(incoming) > 1 else None
            for key in misses:
                if len(resident) >= capacity:
                    victim = ahead.pop(0) if ahead else policy.victim(EvictableKeys(resident, protected))
                    del resident[victim]
                    policy.on_evict(victim)
                resident[key] = None
                policy.on_insert(key)
            for key in misses:
                policy.on_access(key)
        policy.on_step()


def call_pattern_cpu_us(names: list[str], trace_ids: np.ndarray, fraction: float, warmup: int, rounds: int) -> dict:
    """Thread CPU us per MoE layer per step of `drive_call_pattern` over the trace's tokens after `warmup`,
    each policy fresh (as the engine builds it), and the null policy alone (the driver's own cost, to
    subtract), alternating."""
    layers, experts = trace_ids.shape[1], int(trace_ids.max()) + 1
    capacity = max(1, int(fraction * layers * experts))
    steps = trace_ids.shape[0] - warmup
    out: dict[str, list[float]] = {name: [] for name in ["null", *names]}
    for _ in range(rounds):
        for name in out:
            policy = NullPolicy() if name == "null" else layered_policy(name, capacity, layers, experts)
            resident: dict[ExpertKey, None] = {}
            drive_call_pattern(policy, trace_ids[:warmup], capacity, resident)
            begin = time.thread_time()
            drive_call_pattern(policy, trace_ids[warmup:], capacity, resident)
            out[name].append((time.thread_time() - begin) * 1e6 / (steps * layers))
    return out


def timed_policy(engine: LLMEngine, name: str, num_layers: int, num_experts: int) -> TimedPolicy:
    """Wraps the engine's expert-cache policy (in place; a `NAME-numpy` one replaces it first, before
    any request) and returns the wrapper."""
    experts = engine.runner.model.experts
    if not isinstance(experts, OffloadedExperts):
        raise ValueError("the engine keeps every expert resident: there is no cache policy to time")
    if name.endswith(NUMPY_SUFFIX):
        experts.cache.policy = layered_policy(name, experts.cache.num_slots, num_layers, num_experts)
    wrapper = TimedPolicy(experts.cache.policy)
    experts.cache.policy = wrapper
    return wrapper


def one_round(engine: LLMEngine, policy: TimedPolicy, prompts: list[list[int]], params: SamplingParams,
              num_layers: int, prefix: str) -> dict:
    before = offload_counters(engine)
    first = len(policy.step_ns)
    generated, elapsed = run_to_completion(engine, prompts, params, prefix=prefix)
    steps = policy.step_ns[first:]
    counters = counters_since(before, offload_counters(engine))
    per_layer_us = [ns / 1000 / num_layers for ns in steps]
    return {"tok_s": generated / elapsed, "policy_us_median": statistics.median(per_layer_us),
            "policy_us_mean": statistics.fmean(per_layer_us), "hit_rate": counters["hit_rate"],
            "misses_per_token": counters["misses"] / generated, "steps": len(steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", default=DEFAULT_TRACE)
    parser.add_argument("--policies", default="lru,context")
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--moe-intermediate", type=int, default=128)
    parser.add_argument("--shared-intermediate", type=int, default=256)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--warmup-requests", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--call-pattern", type=int, default=0, metavar="TOKENS",
                        help="no engine: drive each policy with the engine's calls for this many trace tokens "
                             "(the first --call-pattern-warmup untimed) and print thread CPU per layer per step")
    parser.add_argument("--call-pattern-warmup", type=int, default=100)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    trace = load_trace(args.trace)
    if args.call_pattern:
        names = args.policies.split(",")
        ids = trace.expert_ids[:args.call_pattern + args.call_pattern_warmup]
        rounds = call_pattern_cpu_us(names, ids, args.fraction, args.call_pattern_warmup, args.rounds)
        print(f"engine call pattern, {trace.num_layers} layers, cache {args.fraction:.0%}, {args.call_pattern} tokens "
              f"timed, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}; thread CPU us per layer per step")
        for name, values in rounds.items():
            print(f"{name:>8} rounds {' '.join(f'{v:.1f}' for v in values)}  median {statistics.median(values):.1f}")
        return
    args.layers, args.first_layer, args.dtype, args.device = trace.num_layers, 0, "float32", "cpu"
    policies = args.policies.split(",")
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    prompts = [list(range(3, 3 + args.prompt_len))] * args.batch
    rows: dict[str, list[dict]] = {name: [] for name in policies}
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp), trace, args)
        engines = {name: replaying_engine(path, trace, args, offload="on", expert_cache_fraction=args.fraction,
                                          cache_policy=name.removesuffix(NUMPY_SUFFIX), prefetch="none")
                   for name in policies}
        timers = {name: timed_policy(engine, name, trace.num_layers, trace.num_experts)
                  for name, engine in engines.items()}
        for name, engine in engines.items():
            for i in range(args.warmup_requests):
                run_to_completion(engine, prompts, params, prefix=f"w{i}-")
        for index in range(args.rounds):
            for name in policies:
                rows[name].append(one_round(engines[name], timers[name], prompts, params, trace.num_layers,
                                            f"r{index}-"))
        cpu_us = {}
        for name, engine in engines.items():
            timer = timers[name]
            start, timer.record_victims = len(timer.calls), True
            run_to_completion(engine, prompts, params, prefix="cpu-")
            timer.record_victims = False
            cache = engine.runner.model.experts.cache
            fresh = layered_policy(name, cache.num_slots, trace.num_layers, trace.num_experts)
            calls = timer.decoded(0)
            cpu_us[name] = replayed_cpu_us(calls, start, fresh, trace.num_layers)
    summary = {name: {key: statistics.median(row[key] for row in rows[name]) for key in rows[name][0]}
               for name in policies}
    for name in policies:
        summary[name]["policy_cpu_us_replayed"] = cpu_us[name]
    result = {"threads": torch.get_num_threads(), "load_average": os.getloadavg(), "rounds": rows, "median": summary}
    if args.json:
        print(json.dumps(result))
        return
    print(f"{trace.num_layers} layers x {trace.num_experts} experts (top-{trace.top_k}), hidden {args.hidden}, "
          f"cache {args.fraction:.0%}, batch {args.batch}, {torch.get_num_threads()} torch threads, "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{'round':>5} {'policy':>8} {'tok/s':>7} {'policy us/layer/step median':>27} {'mean':>7} "
          f"{'hit rate':>8} {'misses/tok':>10}")
    for index in range(args.rounds):
        for name in policies:
            r = rows[name][index]
            print(f"{index:>5} {name:>8} {r['tok_s']:>7.1f} {r['policy_us_median']:>27.1f} {r['policy_us_mean']:>7.1f} "
                  f"{r['hit_rate']:>8.3f} {r['misses_per_token']:>10.1f}")
    for name in policies:
        r = summary[name]
        print(f"{'med':>5} {name:>8} {r['tok_s']:>7.1f} {r['policy_us_median']:>27.1f} {r['policy_us_mean']:>7.1f} "
              f"{r['hit_rate']:>8.3f} {r['misses_per_token']:>10.1f}")
    for name in policies:
        print(f"{name}: thread CPU us per MoE layer per step, its last request's calls replayed: "
              f"{summary[name]['policy_cpu_us_replayed']:.1f}")


if __name__ == "__main__":
    main()
