"""Head-of-line blocking: does a cheap request wait behind expensive ones?

Measures the latency of a 1-token chat completion and of `GET /health` on an idle server
(medians of --repeats probes each), then again while four large requests are in flight the
whole time: four ~4 MB chat prompts (each refused as too long in the end), then, separately,
four ~3.95 MiB bodies of token ids. A loader process keeps the four large requests going
(each worker sends its next one as soon as the previous one is answered) so that the probes,
sent from this process one at a time, always meet them (the loader runs at the lowest CPU
priority: it stands for remote clients). Each load is measured right after its own idle
baseline (a shared machine's background load drifts); prints the medians and their ratios to
that baseline; the target is 2x at most.

Starts a server on a small random Mixtral checkpoint unless --base-url names a running one.

    python -m benchmarks.head_of_line [--repeats 15] [--base-url URL] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from multiprocessing.synchronize import Event
from pathlib import Path

import httpx

MODEL_NAME = "bench"
NUM_LOADERS = 4
CHAT_PROMPT_BYTES = 4 * 10**6
TOKEN_ID_BODY_BYTES = int(3.95 * 2**20)
PROBE_PAUSE_S = 0.02
LOAD_START_TIMEOUT_S = 60.0
TIMEOUT_S = 120.0
# The loader stands for clients on other machines: at the lowest CPU priority, its own work
# takes as little as it can from the server it loads.
LOADER_NICENESS = 19


class Load(str, enum.Enum):
    """What is in flight while the probes run."""

    CHAT_4MB = "four 4 MB chat prompts"
    TOKEN_IDS = "four 3.95 MiB token-id bodies"


@dataclass(frozen=True)
class Row:
    """Median probe latencies under one load and just before it (idle), and their ratios."""

    load: str
    idle_chat_ms: float
    idle_health_ms: float
    chat_ms: float
    health_ms: float
    chat_ratio: float
    health_ratio: float
    large_answered: int
    large_statuses: str


def large_body(load: Load, model: str) -> tuple[str, bytes]:
    """The route and body of one large request."""
    if load is Load.CHAT_4MB:
        content = ("lorem ipsum " * (CHAT_PROMPT_BYTES // 12 + 1))[:CHAT_PROMPT_BYTES]
        return "/v1/chat/completions", json.dumps(
            {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 1}).encode()
    ids: list[int] = []
    size = 64
    while size < TOKEN_ID_BODY_BYTES:
        ids.append(100 + len(ids) % 300)
        size += 5
    return "/v1/completions", json.dumps({"model": model, "prompt": ids, "max_tokens": 1}).encode()


async def _load_loop(base_url: str, path: str, body: bytes, events: tuple[Event, Event],
                     statuses: dict[int, int]) -> None:
    busy, stop = events
    async with httpx.AsyncClient(base_url=base_url, timeout=TIMEOUT_S) as client:
        while not stop.is_set():
            response = await client.post(path, content=body, headers={"Content-Type": "application/json"})
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            busy.set()


def run_loader(base_url: str, load: Load, model: str, events: tuple[Event, Event],
               results: multiprocessing.Queue) -> None:
    """Loader process: NUM_LOADERS large requests in flight until the stop event is set (the busy
    event is set once the first one is answered); puts the count of each status it got."""
    os.nice(LOADER_NICENESS)
    path, body = large_body(load, model)
    statuses: dict[int, int] = {}

    async def main() -> None:
        await asyncio.gather(*(_load_loop(base_url, path, body, events, statuses) for _ in range(NUM_LOADERS)))

    asyncio.run(main())
    results.put(statuses)


async def probe(client: httpx.AsyncClient, model: str) -> tuple[float, float]:
    """Seconds for one 1-token chat completion and one /health."""
    start = time.perf_counter()
    chat = await client.post("/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0})
    chat_s = time.perf_counter() - start
    if chat.status_code != 200:
        raise RuntimeError(f"the probe chat request failed: {chat.status_code} {chat.text[:200]}")
    start = time.perf_counter()
    health = await client.get("/health")
    health_s = time.perf_counter() - start
    if health.status_code != 200:
        raise RuntimeError(f"/health failed: {health.status_code}")
    return chat_s, health_s


async def medians(base_url: str, model: str, repeats: int) -> tuple[float, float]:
    async with httpx.AsyncClient(base_url=base_url, timeout=TIMEOUT_S) as client:
        await probe(client, model)  # warm the connection
        samples = []
        for _ in range(repeats):
            samples.append(await probe(client, model))
            await asyncio.sleep(PROBE_PAUSE_S)
    return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)


def measure_under(base_url: str, model: str, load: Load, repeats: int) -> tuple[float, float, dict[int, int]]:
    """Probe medians while `load` runs in a loader process (its status counts when it ends)."""
    context = multiprocessing.get_context("spawn")
    busy, stop = context.Event(), context.Event()
    results: multiprocessing.Queue = context.Queue()
    loader = context.Process(target=run_loader, args=(base_url, load, model, (busy, stop), results), daemon=True)
    loader.start()
    if not busy.wait(LOAD_START_TIMEOUT_S):
        loader.terminate()
        raise RuntimeError(f"the loader got no answer to a large request within {LOAD_START_TIMEOUT_S} s")
    chat_s, health_s = asyncio.run(medians(base_url, model, repeats))
    stop.set()
    statuses = results.get(timeout=LOAD_START_TIMEOUT_S + TIMEOUT_S)
    loader.join(timeout=TIMEOUT_S)
    return chat_s, health_s, statuses


def run(base_url: str, model: str, repeats: int) -> list[Row]:
    rows = []
    for load in (Load.CHAT_4MB, Load.TOKEN_IDS):
        idle_chat, idle_health = asyncio.run(medians(base_url, model, repeats))
        chat_s, health_s, statuses = measure_under(base_url, model, load, repeats)
        rows.append(Row(load.value, idle_chat * 1e3, idle_health * 1e3, chat_s * 1e3, health_s * 1e3,
                        chat_s / idle_chat, health_s / idle_health, sum(statuses.values()),
                        ", ".join(f"{n}x {code}" for code, n in sorted(statuses.items()))))
    return rows


def print_table(rows: list[Row]) -> None:
    print(f"{'in flight':30} {'1-token chat p50 ms (idle -> loaded)':>37} {'/health p50 ms (idle -> loaded)':>33}"
          "  large requests answered")
    for row in rows:
        chat = f"{row.idle_chat_ms:.1f} -> {row.chat_ms:.1f} ({row.chat_ratio:.2f}x)"
        health = f"{row.idle_health_ms:.1f} -> {row.health_ms:.1f} ({row.health_ratio:.2f}x)"
        print(f"{row.load:30} {chat:>37} {health:>33}  {row.large_answered} ({row.large_statuses})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="probes per load (medians)")
    parser.add_argument("--base-url", default=None, help="a running server (default: start one)")
    parser.add_argument("--model", default=MODEL_NAME, help="the served model id (with --base-url)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    if args.base_url:
        rows = run(args.base_url, args.model, args.repeats)
    else:
        from benchmarks.engine_vs_hf import make_checkpoint
        from benchmarks.live_server import live_server

        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = make_checkpoint(Path(tmp) / MODEL_NAME, hidden=64, intermediate=128, layers=2, experts=8,
                                         top_k=2)
            with live_server(checkpoint, ["--device", "cpu", "--served-model-name", MODEL_NAME]) as base_url:
                rows = run(base_url, MODEL_NAME, args.repeats)
    if args.json:
        print(json.dumps([asdict(row) for row in rows]))
    else:
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
