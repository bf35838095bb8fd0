"""Soak benchmark: minutes of mixed traffic against a live moe-serve server, reported per window.

A bounded number of concurrent clients (default 8) send the scenarios of benchmarks/soak_traffic.py
back to back: chat and completions, JSON and streamed, n up to 2, seeded; cancels; a client
process killed mid-stream and restarted; bad inputs that must get their 400. Every request has a
client-side timeout; a request is *lost* when it gets no response or an unexpected status,
shape or seeded text, *hung* when it hits the timeout.

Per window (--window-s): requests by outcome, 4xx by code, p50/p99 latency of the successful JSON
requests and time to first token of the streams, and the server's RSS, threads and open file
descriptors (from /proc of the server process, or from the process_* gauges of /metrics for a
--base-url server given without --server-pid). The summary gives the RSS growth after warm-up
(end of the first window to the end of the last) and the p99 drift between the first and the
last window. The exit code is 1 when anything was lost or hung, the server still holds requests
or KV cache once the clients stop, or the server died; 2 when the soak could not start.

The server is started here (the demo model, or --model, with `--offload on
--expert-cache-fraction 0.5` plus --server-args) unless --base-url names a running one; only
loopback addresses are accepted.

    python -m benchmarks.soak [--minutes 10] [--window-s 60] [--clients 8] [--json]
    python -m benchmarks.soak --base-url http://127.0.0.1:8000 [--server-pid PID] [--api-key KEY]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from benchmarks.live_server import free_port
from benchmarks.soak_client import API_KEY_ENV
from benchmarks.soak_traffic import ROOT, Outcome, Record, Traffic, client_loop

logger = logging.getLogger(__name__)

DEFAULT_SERVER_FLAGS = ("--offload", "on", "--expert-cache-fraction", "0.5")
SETTLE_WAIT_S = 10.0
PROCESS_GAUGES = ("process_resident_memory_bytes", "process_open_fds")


@dataclass(frozen=True)
class ServerStats:
    """A sample of the server process (None: not available)."""

    rss_bytes: int | None
    threads: int | None
    open_fds: int | None


@dataclass(frozen=True)
class Leftovers:
    """What the server still holds once the clients stopped and it had SETTLE_WAIT_S to settle."""

    requests: int | None  # running + waiting
    kv_cache_usage: float | None

    @property
    def clean(self) -> bool:
        return self.requests == 0 and self.kv_cache_usage == 0


def pct_ms(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile in milliseconds (None without values)."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)] * 1000, 2)


def change_pct(first: float | None, last: float | None) -> float | None:
    if first is None or last is None or first == 0:
        return None
    return (last - first) / first * 100


def window_row(records: Sequence[Record], number: int, end_s: float, stats: ServerStats) -> dict[str, Any]:
    """The figures of one window from the requests that finished in it and a server sample at its end."""
    outcomes = Counter(r.outcome for r in records)
    latencies = [r.latency_s for r in records if r.latency_s is not None]
    ttfts = [r.ttft_s for r in records if r.ttft_s is not None]
    return {
        "window": number, "end_s": round(end_s, 1), "requests": len(records), "ok": outcomes[Outcome.OK],
        "rejected": outcomes[Outcome.REJECTED], "cancelled": outcomes[Outcome.CANCELLED],
        "lost": outcomes[Outcome.LOST], "hung": outcomes[Outcome.HUNG],
        "errors": dict(Counter(r.kind for r in records if r.outcome == Outcome.REJECTED)),
        "lost_kinds": dict(Counter(r.kind for r in records if r.outcome in (Outcome.LOST, Outcome.HUNG))),
        "latency_p50_ms": pct_ms(latencies, 0.5), "latency_p99_ms": pct_ms(latencies, 0.99),
        "ttft_p50_ms": pct_ms(ttfts, 0.5), "ttft_p99_ms": pct_ms(ttfts, 0.99),
        "rss_mib": stats.rss_bytes / 2**20 if stats.rss_bytes is not None else None,
        "threads": stats.threads, "open_fds": stats.open_fds,
    }


def summarize(records: Sequence[Record], rows: Sequence[dict[str, Any]], leftovers: Leftovers,
              server_exit_code: int | None) -> dict[str, Any]:
    """Totals, RSS growth after the first window, p99 drift first -> last window, and the verdict."""
    outcomes = Counter(r.outcome for r in records)
    latencies = [r.latency_s for r in records if r.latency_s is not None]
    summary = {
        "requests": len(records), "ok": outcomes[Outcome.OK], "rejected": outcomes[Outcome.REJECTED],
        "cancelled": outcomes[Outcome.CANCELLED], "lost": outcomes[Outcome.LOST], "hung": outcomes[Outcome.HUNG],
        "by_scenario": dict(Counter(r.scenario.value for r in records)),
        "errors": dict(Counter(r.kind for r in records if r.outcome == Outcome.REJECTED)),
        "lost_kinds": dict(Counter(r.kind for r in records if r.outcome in (Outcome.LOST, Outcome.HUNG))),
        "latency_p50_ms": pct_ms(latencies, 0.5), "latency_p99_ms": pct_ms(latencies, 0.99),
        "rss_growth_pct": change_pct(rows[0]["rss_mib"], rows[-1]["rss_mib"]) if len(rows) > 1 else None,
        "p99_drift_pct": change_pct(rows[0]["latency_p99_ms"], rows[-1]["latency_p99_ms"]),
        "threads_change": _difference(rows[0]["threads"], rows[-1]["threads"]),
        "open_fds_change": _difference(rows[0]["open_fds"], rows[-1]["open_fds"]),
        "requests_left": leftovers.requests, "kv_cache_usage_left": leftovers.kv_cache_usage,
        "server_exit_code": server_exit_code,
    }
    summary["passed"] = (summary["lost"] == 0 and summary["hung"] == 0 and leftovers.clean
                         and server_exit_code is None)
    return summary


def _difference(first: int | None, last: int | None) -> int | None:
    return last - first if first is not None and last is not None else None


class StatsProbe:
    """Samples the server process: /proc/<pid> when the pid is known, else /metrics' process_* gauges."""

    def __init__(self, traffic: Traffic, pid: int | None) -> None:
        self.traffic = traffic
        self.pid = pid

    async def sample(self) -> ServerStats:
        if self.pid is not None:
            return proc_stats(self.pid)
        return await self.metrics_stats()

    async def metrics_stats(self) -> ServerStats:
        try:
            async with httpx.AsyncClient(base_url=self.traffic.base_url, timeout=10) as client:
                text = (await client.get("/metrics", headers=self.traffic.headers())).text
        except httpx.HTTPError:
            return ServerStats(None, None, None)
        gauges = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name in PROCESS_GAUGES:
                gauges[name] = int(float(value))
        return ServerStats(gauges.get("process_resident_memory_bytes"), None, gauges.get("process_open_fds"))


def proc_stats(pid: int) -> ServerStats:
    """RSS and threads from /proc/<pid>/status, open fds from /proc/<pid>/fd (None once it is gone)."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
        open_fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return ServerStats(None, None, None)
    return ServerStats(int(fields["VmRSS"].split()[0]) * 1024, int(fields["Threads"]), open_fds)


async def leftovers(traffic: Traffic) -> Leftovers:
    """What /health reports once the server settles (polled for up to SETTLE_WAIT_S)."""
    found = Leftovers(None, None)
    deadline = time.monotonic() + SETTLE_WAIT_S
    async with httpx.AsyncClient(base_url=traffic.base_url, timeout=5) as client:
        while time.monotonic() < deadline and not found.clean:
            try:
                health = (await client.get("/health", headers=traffic.headers())).json()
                found = Leftovers(int(health["num_running"]) + int(health["num_waiting"]),
                                  float(health["kv_cache_usage"]))
            except (httpx.HTTPError, ValueError, KeyError, TypeError):
                return found
            if not found.clean:
                await asyncio.sleep(0.5)
    return found


async def run_soak(traffic: Traffic, num_clients: int, window_s: float, probe: StatsProbe,
                   on_row: Callable[[dict[str, Any]], None]) -> tuple[list[dict[str, Any]], Leftovers]:
    """Drive the clients for the duration; one row per window, handed to `on_row` as the window ends
    (requests still in flight at the end count in the last window)."""
    num_windows = max(1, math.ceil(traffic.duration_s / window_s - 1e-9))
    traffic.started = time.monotonic()
    clients = {asyncio.create_task(client_loop(traffic)) for _ in range(num_clients)}
    rows: list[dict[str, Any]] = []
    for number in range(1, num_windows + 1):
        start_s, end_s = (number - 1) * window_s, min(number * window_s, traffic.duration_s)
        while clients and (remaining_s := end_s - traffic.elapsed()) > 0:
            done, clients = await asyncio.wait(clients, timeout=remaining_s, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # a client's crash ends the run now, not at the end
        await asyncio.sleep(max(0.0, end_s - traffic.elapsed()))
        stats = await probe.sample()
        last = number == num_windows
        if last:
            await asyncio.gather(*clients)
        records = [r for r in traffic.records if start_s <= r.finished_s and (last or r.finished_s < end_s)]
        rows.append(window_row(records, number, end_s, stats))
        on_row(rows[-1])
    return rows, await leftovers(traffic)


def check_loopback(url: str) -> str:
    """`url` without a trailing slash when its host is a loopback address; ValueError otherwise."""
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"--base-url must be a loopback address (127.0.0.1, ::1, localhost), got {host!r}")
    return url.rstrip("/")


@contextmanager
def started_server(model: Path | None, server_args: Sequence[str], startup_timeout_s: float
                   ) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """`moe-serve serve` on a free loopback port until healthy; yields (base URL, process, its log); stops it."""
    port = free_port()
    command = [sys.executable, "-m", "moe_serve.server.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "warning", *(["--model", str(model)] if model else []), *DEFAULT_SERVER_FLAGS,
               *server_args]
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        log_path = Path(tmp) / "server.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        base_url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(base_url, process, startup_timeout_s, log_path)
            yield base_url, process, log_path
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_healthy(base_url: str, process: subprocess.Popen[bytes], timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} before becoming healthy:\n"
                               + log_path.read_text(errors="replace")[-2000:])
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the server was not healthy within {timeout_s:.0f} s")


def served_model(base_url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=10)
    response.raise_for_status()
    return str(response.json()["data"][0]["id"])


def _format(value: Any, width: int) -> str:
    if value is None:
        return f"{'-':>{width}}"
    if isinstance(value, float):
        return f"{value:>{width}.1f}"
    return f"{value:>{width}}"


TABLE_COLUMNS = (("window", 6), ("end_s", 7), ("requests", 9), ("ok", 6), ("rejected", 9), ("cancelled", 10),
                 ("lost", 5), ("hung", 5), ("latency_p50_ms", 15), ("latency_p99_ms", 15), ("ttft_p50_ms", 12),
                 ("ttft_p99_ms", 12), ("rss_mib", 8), ("threads", 8), ("open_fds", 9))


def print_row(row: dict[str, Any]) -> None:
    print("".join(_format(row[name], width) for name, width in TABLE_COLUMNS), flush=True)


def _signed(value: int | None) -> str:
    return "n/a" if value is None else f"{value:+d}"


def print_summary(summary: dict[str, Any]) -> None:
    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{value:+.2f}%"

    errors = ", ".join(f"{code} {count}" for code, count in sorted(summary["errors"].items())) or "none"
    print(f"4xx answers to bad inputs: {errors}")
    if summary["lost_kinds"]:
        print("lost/hung by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["lost_kinds"].items())))
    print(f"requests {summary['requests']}: ok {summary['ok']}, rejected {summary['rejected']}, "
          f"cancelled {summary['cancelled']}, lost {summary['lost']}, hung {summary['hung']}; left on the "
          f"server afterwards: {summary['requests_left']} requests, KV cache usage {summary['kv_cache_usage_left']}")
    print(f"RSS growth after warm-up {pct(summary['rss_growth_pct'])}, p99 drift first->last window "
          f"{pct(summary['p99_drift_pct'])}, threads {_signed(summary['threads_change'])}, "
          f"open fds {_signed(summary['open_fds_change'])} (first -> last window)")
    if summary["server_exit_code"] is not None:
        print(f"the server exited with code {summary['server_exit_code']} during the soak")
    print("PASS" if summary["passed"] else "FAIL: requests were lost or hung, the server kept requests or KV "
                                           "cache, or it died")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="traffic duration (default 10)")
    parser.add_argument("--window-s", type=float, default=60.0, help="reporting window in seconds (default 60)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--timeout-s", type=float, default=60.0,
                        help="client-side timeout of each request; beyond it a request is hung (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="deck order and request parameters")
    parser.add_argument("--long-prompt-tokens", type=int, default=65536,
                        help="length of the too-long prompt; must exceed the server's context (default 65536)")
    parser.add_argument("--base-url", default=None, help="a running server on loopback instead of starting one")
    parser.add_argument("--server-pid", type=int, default=None, help="with --base-url: read RSS etc. from /proc")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"Bearer key (default ${API_KEY_ENV})")
    parser.add_argument("--model", type=Path, default=None, help="checkpoint to serve (default: the demo model)")
    parser.add_argument("--server-args", default="",
                        help=f"extra `moe-serve serve` flags after the defaults {' '.join(DEFAULT_SERVER_FLAGS)}")
    parser.add_argument("--startup-timeout-s", type=float, default=600.0, help="wait for /health (default 600)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.window_s <= 0 or args.clients < 1 or args.timeout_s <= 0:
        parser.error("--minutes, --window-s and --timeout-s must be positive and --clients at least 1")
    if args.base_url is not None:
        try:
            args.base_url = check_loopback(args.base_url)
        except ValueError as exc:
            parser.error(str(exc))
    return args


def soak_against(args: argparse.Namespace, base_url: str, pid: int | None,
                 process: subprocess.Popen[bytes] | None) -> dict[str, Any]:
    """Run the soak against `base_url`; the full report (config, windows, summary)."""
    traffic = Traffic(base_url=base_url, model=served_model(base_url, args.api_key), api_key=args.api_key,
                      duration_s=args.minutes * 60, timeout_s=args.timeout_s, seed=args.seed,
                      long_prompt_tokens=args.long_prompt_tokens)
    if not args.json:
        print(f"soak: {args.minutes:g} min of traffic from {args.clients} clients against {base_url} "
              f"({traffic.model}), windows of {args.window_s:g} s, timeout {args.timeout_s:g} s", flush=True)
        print("".join(f"{name:>{width}}" for name, width in TABLE_COLUMNS), flush=True)
    on_row = (lambda row: None) if args.json else print_row
    probe = StatsProbe(traffic, pid)
    rows, left = asyncio.run(run_soak(traffic, args.clients, args.window_s, probe, on_row))
    summary = summarize(traffic.records, rows, left, process.poll() if process is not None else None)
    config = {"base_url": base_url, "model": traffic.model, "minutes": args.minutes, "window_s": args.window_s,
              "clients": args.clients, "timeout_s": args.timeout_s, "seed": args.seed,
              "deck": [s.value for s in traffic.deck]}
    return {"config": config, "windows": rows, "summary": summary}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.base_url is not None:
            report = soak_against(args, args.base_url, args.server_pid, None)
        else:
            with started_server(args.model, shlex.split(args.server_args), args.startup_timeout_s) as (
                    base_url, process, log_path):
                report = soak_against(args, base_url, process.pid, process)
                report["config"]["server_args"] = [*DEFAULT_SERVER_FLAGS, *shlex.split(args.server_args)]
                if process.poll() is not None:
                    logger.error("the server exited with code %s; the end of its log:\n%s", process.returncode,
                                 log_path.read_text(errors="replace")[-4000:])
    except (RuntimeError, httpx.HTTPError) as exc:
        sys.stderr.write(f"soak: error: {exc}\n")
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        print_summary(report["summary"])
    return 0 if report["summary"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
