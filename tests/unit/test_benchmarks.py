"""The benchmark scripts still run end to end (tiny sizes; their figures are not checked here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from engine.traces import RoutingTrace, save_trace

ROOT = Path(__file__).resolve().parents[2]


def run_json(module: str, *args: str) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", module, *args, "--json"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_engine_vs_hf_reports_both_rates_and_the_roofline() -> None:
    rows = run_json("benchmarks.engine_vs_hf", "--hidden", "64", "--intermediate", "32", "--layers", "2",
                    "--experts", "4", "--top-k", "2", "--tokens", "4", "--concurrency", "2")
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["engine_tok_s"] > 0 and r["hf_tok_s"] > 0 and r["roofline_tok_s"] > 0
        assert r["mb_per_step"] > 0


def test_prefetch_decode_replays_a_trace_with_every_prefetch_mode(tmp_path: Path) -> None:
    gen = np.random.default_rng(0)
    ids = np.stack([np.stack([gen.choice(8, 2, replace=False) for _ in range(3)]) for _ in range(60)])
    trace = tmp_path / "trace.npz"
    save_trace(trace, RoutingTrace(expert_ids=ids.astype(np.uint8), offsets=np.array([0, 30, 60]),
                                   prompt_ids=np.array([0, 1], dtype=np.int32), num_experts=8))
    rows = run_json("benchmarks.prefetch_decode", "--trace", str(trace), "--hidden", "32", "--moe-intermediate",
                    "16", "--shared-intermediate", "16", "--heads", "2", "--fraction", "0.5", "--tokens", "4",
                    "--prompt-len", "8", "--warmup-requests", "1", "--cache-policy", "lru", "--device", "cpu",
                    "--train-prompts", "1")
    assert [r["prefetch"] for r in rows] == ["all-resident", "none", "next_layer", "affinity", "logistic"]
    assert rows[0]["hit_rate"] == 1.0 and rows[1]["misses_per_token"] > 0
