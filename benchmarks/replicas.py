"""Replicas behind HAProxy: round-robin vs task-affine routing, same workload, same run.

Starts `--replicas` real `moe-serve serve` processes (CPU, experts offloaded, each keeping
`--fraction` of the experts in its cache) and HAProxy with the shipped `docker/haproxy.cfg`
(task-affine: consistent hashing on X-Task with bounded load) or the same file with the task
backend switched to `balance roundrobin`. Each task draws its prompts from its own small
vocabulary (`--task-vocab` tokens, disjoint id ranges), so, as with real tasks, each routes to
its own experts on the benchmark's random-weight model (see benchmarks/emoe_preload.py).
Requests of the tasks arrive interleaved from `--concurrency` closed-loop clients.

Every run starts fresh replicas (cold caches); the first `--warmup` x `--tasks` requests are
served but not measured (in the same shuffled order). The modes alternate (A B A B ...).
Reported per run, summed over the replicas: the expert-cache hit rate per token lookup (the
replicas' per-task counters: one lookup per token, MoE layer and routed expert) and per step
acquisition (the per-layer counters: each distinct expert a step acquires counts once), the
per-task hit rate, generated tokens per second through the proxy, and where each task's
requests went (with bounded load, a task's requests spill when its replica is busy).

    python -m benchmarks.replicas [--fraction 0.25] [--tasks 4] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import csv
import enum
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.engine_vs_hf import make_checkpoint
from benchmarks.live_server import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
HAPROXY_CONFIG = REPO_ROOT / "docker" / "haproxy.cfg"
REPLICA_HEADER = "X-Moe-Serve-Replica"
TASK_BACKEND_BALANCE = "    balance hdr(X-Task)\n    hash-type consistent sdbm avalanche\n"
BALANCE_FACTOR_LINE = "    hash-balance-factor 150\n"
STARTUP_TIMEOUT_S = 180.0
MODEL_NAME = "model"  # the checkpoint directory's name, which a replica serves it as


class Routing(str, enum.Enum):
    """How the proxy spreads requests that name a task."""

    ROUND_ROBIN = "round_robin"  # in turn, whatever the task
    TASK_AFFINE = "task_affine"  # the shipped config: consistent hashing on X-Task with bounded load


def proxy_config(mode: Routing, balance_factor: int = 150) -> str:
    """The shipped HAProxy config, with the task backend's balancing as `mode` asks."""
    text = HAPROXY_CONFIG.read_text()
    if TASK_BACKEND_BALANCE not in text or BALANCE_FACTOR_LINE not in text:
        raise ValueError(f"{HAPROXY_CONFIG} no longer has the task backend this benchmark rewrites")
    if mode is Routing.ROUND_ROBIN:
        return text.replace(TASK_BACKEND_BALANCE + BALANCE_FACTOR_LINE, "    balance roundrobin\n")
    return text.replace(BALANCE_FACTOR_LINE, f"    hash-balance-factor {balance_factor}\n")


def server_states(stats_url: str) -> dict[str, str]:
    """server name -> status (UP, DOWN, ...) of the task backend, from the proxy's stats CSV."""
    text = httpx.get(f"{stats_url}/stats;csv", timeout=5).text.lstrip("# ")
    return {row["svname"]: row["status"] for row in csv.DictReader(io.StringIO(text))
            if row["pxname"] == "by_task" and row["svname"] not in ("FRONTEND", "BACKEND")}


@dataclass(frozen=True)
class Proxy:
    """A running HAProxy: the API's base URL and the stats/metrics base URL."""

    base_url: str
    stats_url: str


@contextmanager
def haproxy(config_text: str, replica_addresses: Sequence[str], workdir: Path,
            timeout_s: float = 30.0) -> Iterator[Proxy]:
    """Run `haproxy` in the foreground with `config_text` in front of `replica_addresses`
    (host:port each) on loopback until every replica is UP in its health checks; yields the
    proxy's URLs; stops it on exit."""
    config = workdir / "haproxy.cfg"
    config.write_text(config_text)
    port, stats_port = free_port(), free_port()
    env = {**os.environ, "MOE_PROXY_BIND": f"127.0.0.1:{port}", "MOE_PROXY_STATS_BIND": f"127.0.0.1:{stats_port}"}
    env.update({f"MOE_SERVE_REPLICA_{i}": address for i, address in enumerate(replica_addresses, 1)})
    log_path = workdir / "haproxy.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT, env=env)
    proxy = Proxy(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{stats_port}")
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"haproxy exited with code {process.returncode}: {log_path.read_text()[-2000:]}")
            try:
                states = server_states(proxy.stats_url)
                if len(states) == len(replica_addresses) and all(s == "UP" for s in states.values()):
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the proxy's replicas were not all UP within {timeout_s} s")
            time.sleep(0.2)
        yield proxy
    finally:
        process.terminate()
        process.wait(timeout=10)


def wait_until_healthy(address: str, process: subprocess.Popen[bytes], log_path: Path, timeout_s: float) -> None:
    """Poll a replica's /health until 200; raises with the end of its log if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"a replica exited with code {process.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://{address}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"a replica was not healthy within {timeout_s} s: {log_path.read_text()[-2000:]}")
        time.sleep(0.2)


@contextmanager
def replicas(checkpoint: Path, flags: Sequence[str], log_dir: Path, count: int,
             timeout_s: float = STARTUP_TIMEOUT_S) -> Iterator[list[str]]:
    """`count` `moe-serve serve` replicas of `checkpoint` (CPU, fp32, plus `flags`) on free loopback
    ports, started together; yields their host:port addresses once all are healthy; SIGTERM (then
    SIGKILL after 40 s) on exit."""
    processes: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    try:
        for index in range(count):
            port = free_port()
            command = [sys.executable, "-m", "moe_serve.server.cli", "serve", "--model", str(checkpoint),
                       "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32",
                       "--log-level", "warning", *flags]
            log_path = log_dir / f"replica-{index + 1}.log"
            with log_path.open("wb") as log:
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
            processes.append((f"127.0.0.1:{port}", process, log_path))
        for address, process, log_path in processes:
            wait_until_healthy(address, process, log_path, timeout_s)
        yield [address for address, _, _ in processes]
    finally:
        for _, process, _ in processes:
            process.terminate()
        for _, process, _ in processes:
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def replica_flags(tasks_file: Path, fraction: float, num_threads: int) -> list[str]:
    """Experts offloaded with `fraction` of them cached, no prefetch, the benchmark's task table."""
    return ["--offload", "on", "--expert-cache-fraction", str(fraction), "--prefetch", "none",
            "--tasks-file", str(tasks_file), "--num-threads", str(num_threads)]


def task_names(num_tasks: int) -> list[str]:
    return [f"task{i}" for i in range(num_tasks)]


def write_tasks_file(path: Path, tasks: Sequence[str]) -> Path:
    """A task table naming `tasks` (default SLOs), so the replicas label their series with them."""
    path.write_text(yaml.safe_dump({"tasks": {task: {} for task in tasks}}))
    return path


def workload(tasks: Sequence[str], per_task: int, prompt_len: int, task_vocab: int) -> list[tuple[str, list[int]]]:
    """`per_task` prompts per task in a seeded random order (a fixed interleaving would let round
    robin send each task to one replica); task i's tokens come from its own id range."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(per_task):
        for index, task in enumerate(tasks):
            low = 10 + index * task_vocab
            out.append((task, torch.randint(low, low + task_vocab, (prompt_len,), generator=gen).tolist()))
    return [out[i] for i in torch.randperm(len(out), generator=gen).tolist()]


ALL = "all"  # the per-layer counters: distinct experts acquired per step
TOKEN_LOOKUPS = "token_lookups"  # the per-task counters summed: one per (token, layer, routed expert)


def cache_counters(address: str) -> dict[str, dict[str, float]]:
    """A replica's expert-cache counters as {key: {"lookups", "misses"}}: key ALL for the per-layer
    acquisitions, each task (and TOKEN_LOOKUPS, their sum) for the per-task token lookups."""
    text = httpx.get(f"http://{address}/metrics", timeout=10).text
    out: dict[str, dict[str, float]] = defaultdict(lambda: {"lookups": 0.0, "misses": 0.0})
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "moe_serve_expert_cache_hits_total":
                out[ALL]["lookups"] += sample.value
            elif sample.name == "moe_serve_expert_cache_misses_total":
                out[ALL]["lookups"] += sample.value
                out[ALL]["misses"] += sample.value
            elif sample.name == "moe_serve_expert_cache_task_lookups_total":
                out[sample.labels["task"]]["lookups"] += sample.value
                out[TOKEN_LOOKUPS]["lookups"] += sample.value
            elif sample.name == "moe_serve_expert_cache_task_misses_total":
                out[sample.labels["task"]]["misses"] += sample.value
                out[TOKEN_LOOKUPS]["misses"] += sample.value
    return out


def hit_rate(before: Sequence[dict[str, dict[str, float]]], after: Sequence[dict[str, dict[str, float]]],
             key: str) -> float | None:
    """Hit rate of counter set `key` summed over replicas between two scrapes (None: no lookups)."""
    lookups = sum(a.get(key, {}).get("lookups", 0.0) - b.get(key, {}).get("lookups", 0.0)
                  for b, a in zip(before, after, strict=True))
    misses = sum(a.get(key, {}).get("misses", 0.0) - b.get(key, {}).get("misses", 0.0)
                 for b, a in zip(before, after, strict=True))
    return 1 - misses / lookups if lookups else None


@dataclass
class Served:
    """What the clients saw: per request its task, the replica that served it, tokens generated."""

    records: list[tuple[str, str, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def send_all(base_url: str, requests: Sequence[tuple[str, list[int]]], max_tokens: int, concurrency: int,
             served: Served) -> None:
    """Closed loop: `concurrency` clients each send the next request when their last one finished."""
    queue = list(reversed(requests))
    queue_lock = threading.Lock()
    errors: list[BaseException] = []

    def client() -> None:
        with httpx.Client(base_url=base_url, timeout=300) as http:
            while True:
                with queue_lock:
                    if not queue or errors:
                        return
                    task, prompt = queue.pop()
                body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                        "ignore_eos": True}
                try:
                    response = http.post("/v1/completions", json=body, headers={"X-Task": task})
                    response.raise_for_status()
                except httpx.HTTPError as exc:
                    errors.append(exc)
                    return
                with served.lock:
                    served.records.append((task, response.headers[REPLICA_HEADER],
                                           response.json()["usage"]["completion_tokens"]))

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"a request failed: {errors[0]}")


def run_mode(mode: Routing, checkpoint: Path, args: argparse.Namespace, workdir: Path) -> dict:
    """Serve the workload through fresh replicas behind the proxy in `mode`; the run's figures."""
    tasks = task_names(args.tasks)
    tasks_file = write_tasks_file(workdir / "tasks.yaml", tasks)
    requests = workload(tasks, args.warmup + args.per_task, args.prompt_len, args.task_vocab)
    warmup, measured = requests[: args.warmup * len(tasks)], requests[args.warmup * len(tasks):]
    with ExitStack() as stack:
        addresses = stack.enter_context(replicas(checkpoint, replica_flags(tasks_file, args.fraction, args.num_threads),
                                                 workdir, args.replicas))
        proxy = stack.enter_context(haproxy(proxy_config(mode, args.balance_factor), addresses, workdir))
        send_all(proxy.base_url, warmup, args.tokens, args.concurrency, Served())
        before = [cache_counters(address) for address in addresses]
        served = Served()
        start = time.perf_counter()
        send_all(proxy.base_url, measured, args.tokens, args.concurrency, served)
        elapsed = time.perf_counter() - start
        after = [cache_counters(address) for address in addresses]
    by_task: dict[str, Counter[str]] = defaultdict(Counter)
    for task, replica_name, _ in served.records:
        by_task[task][replica_name] += 1
    return {
        "mode": mode.value,
        "hit_rate": hit_rate(before, after, ALL),
        "token_hit_rate": hit_rate(before, after, TOKEN_LOOKUPS),
        "task_hit_rate": {task: hit_rate(before, after, task) for task in tasks},
        "tok_s": sum(tokens for _, _, tokens in served.records) / elapsed,
        "seconds": elapsed,
        "replicas_used": sorted({name for counts in by_task.values() for name in counts}),
        "task_on_main_replica": {task: max(counts.values()) / sum(counts.values()) for task, counts in by_task.items()},
        "task_replicas": {task: dict(sorted(counts.items())) for task, counts in sorted(by_task.items())},
    }


def build_native_code() -> None:
    """Compile (or find cached) the copy engine and CPU kernels the replicas load, once, before
    their start-up clock runs (a replica that cannot build them falls back to torch)."""
    from moe_serve.cuda_ext.native import load_extension
    from moe_serve.engine.model.cpu_kernels import kernel_flavour

    try:
        load_extension(with_cuda=False)
    except Exception:  # noqa: BLE001 - each replica logs the failure and uses the torch copy engine
        pass
    kernel_flavour()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=2, choices=(2,), help="the shipped config names two")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--fraction", type=float, default=0.25, help="expert cache fraction of each replica")
    parser.add_argument("--warmup", type=int, default=2, help="requests per task served before measuring")
    parser.add_argument("--per-task", type=int, default=6, help="measured requests per task")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=4, help="generated tokens per request")
    parser.add_argument("--task-vocab", type=int, default=4, help="distinct prompt tokens per task")
    parser.add_argument("--concurrency", type=int, default=2, help="closed-loop clients")
    parser.add_argument("--balance-factor", type=int, default=150, help="hash-balance-factor of the affine mode")
    parser.add_argument("--num-threads", type=int, default=1, help="torch threads per replica")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (round_robin, task_affine)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if shutil.which("haproxy") is None:
        parser.error("haproxy is not installed (Debian package haproxy)")
    build_native_code()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        checkpoint = make_checkpoint(workdir / MODEL_NAME, args.hidden, args.intermediate, args.layers, args.experts,
                                     args.top_k)
        for repeat in range(args.repeats):
            for mode in Routing:
                run = {"round": repeat, **run_mode(mode, checkpoint, args, workdir)}
                runs.append(run)
                if not args.json:
                    print(f"round {repeat} {mode.value:12s} hit rate: per token lookup {run['token_hit_rate']:.3f}, "
                          f"per step acquisition {run['hit_rate']:.3f}  {run['tok_s']:6.1f} tok/s  "
                          f"on main replica {statistics.mean(run['task_on_main_replica'].values()):.2f}  "
                          f"{run['task_replicas']}", flush=True)
    summary = {mode.value: {f"{figure}_median": statistics.median(r[figure] for r in runs if r["mode"] == mode.value)
                            for figure in ("token_hit_rate", "hit_rate", "tok_s")}
               for mode in Routing}
    if args.json:
        print(json.dumps({"args": vars(args), "runs": runs, "summary": summary}))
        return
    for mode, figures in summary.items():
        print(f"median {mode:12s} hit rate: per token lookup {figures['token_hit_rate_median']:.3f}, per step "
              f"acquisition {figures['hit_rate_median']:.3f}  {figures['tok_s_median']:6.1f} tok/s")
    for figure in ("token_hit_rate", "hit_rate"):
        gain = summary["task_affine"][f"{figure}_median"] - summary["round_robin"][f"{figure}_median"]
        print(f"task-affine - round-robin, {figure}: {100 * gain:+.1f} points")

if __name__ == "__main__":
    main()
