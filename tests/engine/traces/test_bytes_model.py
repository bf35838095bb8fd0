"""The bytes model of `trace simulate --formats / --miss-handling`: real stored bytes per format, the
misses of the plain replay, and the copy / host / auto handlings of the engine's cost model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_serve.engine.model.quant import MODEL_DTYPE
from moe_serve.engine.trace_cli import main
from moe_serve.engine.traces.bytes_model import (
    HandlingRates,
    expert_nbytes,
    parse_formats,
    per_format,
    simulate_handling,
)
from moe_serve.engine.traces.replay import simulate
from moe_serve.engine.traces.trace_file import ModelGeometry, RoutingTrace, save_trace

SMALL = ModelGeometry("small", hidden_size=96, moe_intermediate_size=40, num_matrices=3, bytes_per_param=1.0,
                      num_experts=8)


def _trace(tokens: int = 120, layers: int = 3, experts: int = 8, top_k: int = 2, model: str = "") -> RoutingTrace:
    generator = np.random.default_rng(0)
    skewed = 1.0 / np.arange(1, experts + 1)  # a few hot experts, as real routing
    ids = np.stack([np.stack([generator.choice(experts, top_k, replace=False, p=skewed / skewed.sum())
                              for _ in range(layers)]) for _ in range(tokens)]).astype(np.uint8)
    return RoutingTrace(expert_ids=ids, offsets=np.array([0, tokens // 2, tokens]), prompt_ids=np.arange(2, dtype=np.int32),
                        num_experts=experts, model=model)


@pytest.mark.parametrize("name", ["bf16", "int8", "int4-g32", "int4", "int4-g128-sym", "mxfp4"])
def test_expert_bytes_are_the_stored_layouts_bytes(name: str) -> None:
    fmt = parse_formats(name)[0]
    gate_up, down = torch.randn(80, 96).to(torch.bfloat16), torch.randn(96, 40).to(torch.bfloat16)
    stored = fmt.encode((gate_up, down))
    assert expert_nbytes(SMALL, fmt) == sum(t.numel() * t.element_size() for t in stored)
    if fmt is MODEL_DTYPE:
        assert expert_nbytes(SMALL, fmt) == 3 * 96 * 40 * 2


def test_unknown_formats_are_refused() -> None:
    for bad in ("model", "auto", "fp8", ""):
        with pytest.raises(ValueError):
            parse_formats(bad)


def test_per_format_scales_the_replays_misses_by_each_formats_bytes() -> None:
    trace = _trace()
    replayed = simulate(trace, ["lru"], [4])
    rows = per_format(replayed, SMALL, parse_formats("bf16,int4"), link_gbps=2.0)
    misses = replayed[0].misses / trace.num_tokens
    for row in rows:
        assert row.misses_per_token == pytest.approx(misses)
        assert row.bytes_per_token == pytest.approx(misses * row.expert_bytes)
        assert row.ms_per_token == pytest.approx(row.bytes_per_token / 2e9 * 1e3)
    assert rows[1].bytes_per_token < 0.3 * rows[0].bytes_per_token


def test_copy_handling_misses_as_the_plain_replay_and_host_copies_nothing() -> None:
    trace = _trace()
    rates = HandlingRates(link_gbps=1.0, host_gbps=0.5, device_gbps=100.0)
    formats = parse_formats("bf16,int8")
    results = {(r.format, r.handling): r for r in
               simulate_handling(trace, ["lru"], [4], SMALL, formats, ["copy", "host", "auto"], rates)}
    plain = simulate(trace, ["lru"], [4])[0].misses / trace.num_tokens
    accesses = trace.num_layers * trace.top_k
    for fmt in ("bf16", "int8"):
        copy, host, auto = (results[fmt, h] for h in ("copy", "host", "auto"))
        assert copy.misses_per_token == copy.copies_per_token == pytest.approx(plain)
        assert host.copies_per_token == host.bytes_per_token == 0 and host.misses_per_token == accesses
        assert 0 < auto.copies_per_token <= auto.misses_per_token
        assert auto.ms_per_token <= max(copy.ms_per_token, host.ms_per_token)
    assert results["int8", "copy"].ms_per_token < results["bf16", "copy"].ms_per_token


def test_cli_prints_the_bytes_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.npz"
    save_trace(path, _trace(layers=2, experts=64, top_k=6, model="deepseek-v2-lite"))
    assert main(["trace", "simulate", "--trace", str(path), "--cache-experts", "16", "--policy", "lru",
                 "--formats", "bf16,int4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["format"] for r in rows] == ["bf16", "int4-g64"] and rows[1]["expert_bytes"] == 4730880
    assert main(["trace", "simulate", "--trace", str(path), "--cache-experts", "16", "--miss-handling", "copy,auto"]) == 0
    table = capsys.readouterr().out
    assert "moe_ms_per_token" in table and table.count(" auto ") == 2  # lru and the default policy
    assert main(["trace", "simulate", "--trace", str(path), "--cache-experts", "16", "--policy", "belady",
                 "--miss-handling", "host"]) == 2
    assert "offline" in capsys.readouterr().err
