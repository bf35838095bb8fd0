"""The benchmark scripts still run end to end (tiny sizes: their speed figures are not checked here,
the soak's verdict on lost requests is)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.soak_traffic import BAD_INPUTS, Scenario, build_deck
from moe_serve.engine.traces.trace_file import RoutingTrace, save_trace
from tests.helpers import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def run_json(module: str, *args: str) -> Any:
    done = subprocess.run([sys.executable, "-m", module, *args, "--json"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def small_trace(path: Path, prompts: int = 12, tokens: int = 6) -> Path:
    """A routing trace of `prompts` prompts of `tokens` tokens: 3 layers, top-2 of 8 experts."""
    gen = np.random.default_rng(0)
    ids = np.stack([np.stack([gen.choice(8, 2, replace=False) for _ in range(3)]) for _ in range(prompts * tokens)])
    save_trace(path, RoutingTrace(expert_ids=ids.astype(np.uint8), offsets=np.arange(0, prompts * tokens + 1, tokens),
                                  prompt_ids=np.arange(prompts, dtype=np.int32), num_experts=8))
    return path


def test_engine_vs_hf_reports_both_rates_and_the_roofline() -> None:
    rows = run_json("benchmarks.engine_vs_hf", "--hidden", "64", "--intermediate", "32", "--layers", "2",
                    "--experts", "4", "--top-k", "2", "--tokens", "4", "--concurrency", "2")
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["engine_tok_s"] > 0 and r["hf_tok_s"] > 0 and r["roofline_tok_s"] > 0
        assert r["mb_per_step"] > 0


def test_prefetch_decode_replays_a_trace_with_every_prefetch_mode(tmp_path: Path) -> None:
    trace = small_trace(tmp_path / "trace.npz", prompts=2, tokens=30)
    rows = run_json("benchmarks.prefetch_decode", "--trace", str(trace), "--hidden", "32", "--moe-intermediate",
                    "16", "--shared-intermediate", "16", "--heads", "2", "--fraction", "0.5", "--tokens", "4",
                    "--prompt-len", "8", "--warmup-requests", "1", "--cache-policy", "lru", "--device", "cpu",
                    "--train-prompts", "1")
    assert [r["prefetch"] for r in rows] == ["all-resident", "none", "next_layer", "affinity", "logistic"]
    assert rows[0]["hit_rate"] == 1.0 and rows[1]["misses_per_token"] > 0


def test_quant_benchmarks_report_each_format(tmp_path: Path) -> None:
    kernels = run_json("benchmarks.quant_kernels", "--hidden", "64", "--ffn", "48", "--rows", "1,3", "--formats",
                       "bf16,int8,int4-g32,mxfp4", "--rounds", "1", "--working-set-mb", "1")
    assert {(r["format"], r["rows"]) for r in kernels} == {(f, n) for f in ("bf16", "int8", "int4-g32", "mxfp4")
                                                           for n in (1, 3)}
    assert all(r["median_us"] > 0 for r in kernels)
    decode = run_json("benchmarks.quant_decode", "--trace", str(small_trace(tmp_path / "trace.npz")), "--layers", "2",
                      "--hidden", "64", "--moe-intermediate", "32", "--shared-intermediate", "32", "--heads", "2",
                      "--fractions", "0.5", "--formats", "bf16,int4", "--prompt-len", "4", "--tokens", "4",
                      "--warmup", "1", "--rounds", "1")
    by_format = {r["format"]: r for r in decode}
    assert by_format["int4"]["expert_bytes"] < by_format["bf16"]["expert_bytes"] / 3 and by_format["int4"]["tok_s"] > 0
    quality = run_json("benchmarks.quant_quality", "--prompts", "1", "--length", "20", "--ds-layers", "0",
                       "--formats", "int8,mxfp4", "--offload-positions", "12")
    resident = [r for r in quality if "expert_bytes" in r]
    assert [r["format"] for r in resident] == ["int8", "mxfp4"] and all(0 <= r["top1"] <= 1 for r in resident)
    full, low, adaptive = (r for r in quality if "bytes_per_token" in r)
    assert (full["format"], low["format"], adaptive["format"]) == ("full", "low int4-g32", "adaptive int4-g32 gate 1.1")
    assert full["kl"] == 0 and full["top1"] == 1 and full["positions"] == 12  # offloading alone changes nothing
    assert set(low["loads"]) == {"low"} and 0.2 < low["bytes_vs_full"] < 0.35  # int4-g32 copies: ~0.3 of bf16's bytes
    assert 0 < adaptive["bytes_per_token"] <= full["bytes_per_token"] and low["kl"] > 0
    replayed = run_json("benchmarks.quant_quality", "--prompts", "1", "--length", "20", "--ds-layers", "2",
                        "--ds-hidden", "64", "--ds-moe-intermediate", "32", "--formats", "int8",
                        "--offload-positions", "12", "--miss-precisions", "full,low", "--cache-fraction", "0.5",
                        "--trace", str(small_trace(tmp_path / "trace.npz")))
    deepseek = [r for r in replayed if r["model"].endswith("(trace routing)")]
    full, low = (r for r in deepseek if "bytes_per_token" in r)
    # every engine replays the same routing: offloading alone changes nothing, low-bit misses do
    assert full["kl"] == 0 and full["top1"] == 1 and full["loads"]["full"] > 0 and low["kl"] > 0


def test_policy_cost_measures_the_policies_in_one_run(tmp_path: Path) -> None:
    report = run_json("benchmarks.policy_cost", "--trace", str(small_trace(tmp_path / "trace.npz")), "--fraction",
                      "0.5", "--hidden", "32", "--moe-intermediate", "16", "--shared-intermediate", "16", "--heads",
                      "2", "--prompt-len", "4", "--tokens", "4", "--warmup-requests", "1", "--rounds", "1",
                      "--threads", "1", "--policies", "lru,context,context-numpy")
    median = report["median"]
    assert set(median) == {"lru", "context", "context-numpy"}
    assert all(row["tok_s"] > 0 and row["policy_us_median"] > 0 for row in median.values())
    # the native context policy decides as its numpy oracle does, live: the same hits and misses
    assert median["context"]["hit_rate"] == median["context-numpy"]["hit_rate"]
    assert median["context"]["misses_per_token"] == median["context-numpy"]["misses_per_token"]


@pytest.mark.e2e
def test_soak_sends_every_scenario_to_a_live_server_and_loses_nothing(tmp_path: Path) -> None:
    checkpoint = make_tiny_checkpoint("mixtral", tmp_path / "tiny-mixtral")
    # one client per card of the deck: each scenario is sent at the start, however slow the machine
    report = run_json("benchmarks.soak", "--model", str(checkpoint), "--minutes", "0.1", "--window-s", "2",
                      "--clients", str(len(build_deck(seed=0))))
    windows, summary = report["windows"], report["summary"]
    assert summary["passed"] and summary["lost"] == 0 and summary["hung"] == 0
    assert summary["requests_left"] == 0 and summary["kv_cache_usage_left"] == 0
    assert [w["window"] for w in windows] == [1, 2, 3]
    assert sum(w["requests"] for w in windows) == summary["requests"]
    assert set(summary["by_scenario"]) == {s.value for s in Scenario}
    assert {"invalid_json", "unknown_parameter", "context_length_exceeded"} <= summary["errors"].keys()
    assert sum(summary["errors"].values()) == summary["rejected"] == sum(
        summary["by_scenario"][s.value] for s in BAD_INPUTS)
    assert summary["ok"] > 0 and summary["cancelled"] > 0 and summary["latency_p99_ms"] > 0
    for w in windows:
        assert w["rss_mib"] > 0 and w["threads"] > 0 and w["open_fds"] > 0
    first, last = windows[0]["rss_mib"], windows[-1]["rss_mib"]
    assert summary["rss_growth_pct"] == pytest.approx((last - first) / first * 100)


@pytest.mark.e2e
def test_soak_counts_answers_of_the_wrong_status_as_lost_and_fails(tmp_path: Path) -> None:
    # a 16-token context: every chat prompt plus its max_tokens is refused with a 400
    checkpoint = make_tiny_checkpoint("mixtral", tmp_path / "tiny-mixtral")
    done = subprocess.run([sys.executable, "-m", "benchmarks.soak", "--model", str(checkpoint), "--minutes", "0.03",
                           "--window-s", "1", "--clients", "2", "--server-args", "--max-model-len 16", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 1, done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])["summary"]
    assert not summary["passed"] and summary["lost"] > 0 and summary["lost_kinds"].get("status") == summary["lost"]
    assert "lost: chat: status: got 400, expected 200" in done.stderr


def test_mla_decode_compares_the_latent_cache_with_expanded_kv_in_alternating_rounds() -> None:
    geometry = {"hidden_size": 64, "num_heads": 4, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
                "v_head_dim": 12, "num_experts": 8, "num_shared_experts": 2, "top_k": 2, "moe_intermediate_size": 16,
                "intermediate_size": 48, "vocab_size": 128}
    done = subprocess.run([sys.executable, "-m", "benchmarks.mla_decode", "--layers", "3", "--contexts", "16,40",
                           "--batch", "2", "--steps", "2", "--rounds", "2", "--device", "cpu", "--geometry",
                           json.dumps(geometry), "--json"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    rounds = [line.split(": ")[0] for line in lines if " round " in line]
    assert rounds == [f"context {c} round {r} {v}" for c in (16, 40) for r in (0, 1) for v in ("latent", "expanded")]
    result = json.loads(lines[-1])
    for row in result["rows"]:
        # per token and layer: latent 16 + rope key 8 values; expanded 4 heads x (8 + 8 key + 12 value), fp32
        assert row["latent_kv_bytes_per_token"] == 3 * (16 + 8) * 4
        assert row["expanded_kv_bytes_per_token"] == 3 * 4 * (8 + 8 + 12) * 4
        assert row["max_logit_difference"] < 1e-4 * row["max_logit"]  # the same function, computed two ways
        assert len(row["latent_rounds"]) == len(row["expanded_rounds"]) == 2 and row["latent_tok_s"] > 0


def test_structured_decode_reports_the_overhead_of_constrained_rows() -> None:
    rows = run_json("benchmarks.structured_decode", "engine", "--vocab", "600", "--batches", "2", "--threads", "1",
                    "--rounds", "1", "--tokens", "4", "--layers", "1", "--hidden", "64", "--intermediate", "64")
    assert [(r["threads"], r["batch"]) for r in rows] == [(1, 2)]
    assert rows[0]["plain_ms"][0] > 0 and rows[0]["guided_ms"][0] > 0 and "median_overhead_pct" in rows[0]


def test_hybrid_decode_compares_copy_host_and_auto_in_one_run() -> None:
    rows = run_json("benchmarks.hybrid_decode", "--smoke")
    by_setting = {(r["geometry"], r["mode"]): r for r in rows}
    assert set(by_setting) == {(g, m) for g in ("deepseek", "mixtral") for m in ("copy", "host", "auto")}
    for geometry in ("deepseek", "mixtral"):
        host, copy = by_setting[geometry, "host"], by_setting[geometry, "copy"]
        assert host["copied_mib_per_tok"] == 0 and host["host_share"] == 1.0
        assert copy["host_read_mib_per_tok"] == 0 and copy["host_share"] == 0.0
    assert all(r["tok_s"] > 0 for r in rows)


def test_quant_cpu_decode_compares_int8_weights_with_bf16_per_batch() -> None:
    rows = run_json("benchmarks.quant_cpu_decode", "--hidden", "64", "--intermediate", "64", "--layers", "1",
                    "--rounds", "1", "--tokens", "2", "--batches", "1,2")
    assert {(r["engine"], r["batch"]) for r in rows} == {(e, b) for e in ("bf16", "int8") for b in (1, 2)}
    by_engine = {(r["engine"], r["batch"]): r for r in rows}
    assert all(r["tok_s"] > 0 for r in rows)
    assert by_engine["int8", 1]["weights_mib"] < by_engine["bf16", 1]["weights_mib"]
