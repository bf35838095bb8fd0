"""Trace loaders and writer, replay, Belady's optimality against exhaustive search, and the CLI."""

from __future__ import annotations

import io
import json
import sys
from functools import lru_cache
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_serve.cache_policies import available_policies, make_policy
from moe_serve.engine.trace_cli import main
from moe_serve.engine.traces.replay import next_use, replay, replay_belady, simulate
from moe_serve.engine.traces.trace_file import RoutingTrace, load_trace, save_trace

TRACES = Path(__file__).resolve().parents[3].parent / "shared" / "traces"
DEEPSEEK = TRACES / "deepseek-v2-lite-puffin-train.npz"
MIXTRAL = TRACES / "mixtral-8x7b-humaneval-decode.jsonl"


def make_trace(rows: list[list[list[int]]], offsets: list[int], num_experts: int) -> RoutingTrace:
    return RoutingTrace(
        expert_ids=np.asarray(rows, dtype=np.uint8),
        offsets=np.asarray(offsets, dtype=np.int64),
        prompt_ids=np.arange(len(offsets) - 1, dtype=np.int32),
        num_experts=num_experts,
    )


def brute_force_min_misses(rows: list[list[int]], slots: int) -> int:
    """Fewest misses over every eviction choice (one layer, demand loading)."""

    @lru_cache(maxsize=None)
    def best(t: int, cache: frozenset[int]) -> int:
        if t == len(rows):
            return 0
        row = set(rows[t])
        missing = row - cache
        overflow = len(cache) + len(missing) - slots
        evictable = sorted(cache - row)
        options = combinations(evictable, overflow) if overflow > 0 else [()]
        return len(missing) + min(best(t + 1, (cache - set(out)) | row) for out in options)

    return best(0, frozenset())


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_belady_is_optimal_on_tiny_traces(data: st.DataObject) -> None:
    num_experts = data.draw(st.integers(3, 6))
    top_k = data.draw(st.integers(1, 2))
    slots = data.draw(st.integers(top_k, num_experts))
    length = data.draw(st.integers(1, 9))
    rows = [data.draw(st.lists(st.integers(0, num_experts - 1), min_size=top_k, max_size=top_k, unique=True))
            for _ in range(length)]
    trace = make_trace([[row] for row in rows], [0, length], num_experts)
    belady = replay_belady(trace, slots)
    assert belady.misses == brute_force_min_misses(rows, slots)
    for name in available_policies():
        assert belady.hits >= replay(trace, lambda: make_policy(name), slots).hits


def test_replay_counts_lru_by_hand() -> None:
    # one layer, top-2, 3 slots: [0,1] [2,0] [3,1] [0,2]
    trace = make_trace([[[0, 1]], [[2, 0]], [[3, 1]], [[0, 2]]], [0, 2, 4], 4)
    result = replay(trace, lambda: make_policy("lru"), 3, expert_bytes=10)
    # t0: miss 0, 1. t1: hit 0, miss 2 (cache full). t2: hit 1, miss 3 evicts 0 (older than 2).
    # t3: hit 2, miss 0 evicts 1 (used before 3 at t2).
    assert (result.hits, result.misses) == (3, 5)
    assert result.hit_rate == pytest.approx(3 / 8)
    assert result.expert_bytes_per_token == pytest.approx(5 * 10 / 4)
    assert replay_belady(trace, 3).misses <= 5


def test_next_use_indices() -> None:
    trace = make_trace([[[0, 1]], [[2, 0]], [[1, 3]]], [0, 3], 4)
    assert next_use(trace, 0).tolist() == [[1, 2], [3, 3], [3, 3]]


def test_missing_rows_are_skipped() -> None:
    trace = make_trace([[[0, 1]], [[2, 3]], [[0, 1]]], [0, 3], 4)
    trace.present = np.array([[True], [False], [True]])
    result = replay(trace, lambda: make_policy("lru"), 2)
    assert (result.hits, result.misses) == (2, 2)
    assert replay_belady(trace, 2).misses == 2


def test_npz_round_trip_and_slicing(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ids = np.stack([np.stack([rng.choice(8, 2, replace=False) for _ in range(3)]) for _ in range(10)])
    trace = RoutingTrace(ids.astype(np.uint8), np.array([0, 4, 4, 10]), np.array([7, 8, 9], dtype=np.int32), 8,
                         model="toy", tasks=["code", "chat", "math"], request_ids=["r1", "r2", "r3"])
    save_trace(tmp_path / "t.npz", trace)
    loaded = load_trace(tmp_path / "t.npz")
    assert np.array_equal(loaded.expert_ids, trace.expert_ids)
    assert loaded.offsets.tolist() == [0, 4, 4, 10] and loaded.prompt_ids.tolist() == [7, 8, 9]
    assert (loaded.num_experts, loaded.model, loaded.tasks, loaded.request_ids) == (8, "toy", trace.tasks, trace.request_ids)
    tail = loaded.slice_prompts(1, 3)
    assert tail.offsets.tolist() == [0, 0, 6] and tail.tasks == ["chat", "math"]
    assert np.array_equal(tail.expert_ids, ids[4:])
    cut = loaded.slice_tokens(2, 6)
    assert cut.offsets.tolist() == [0, 2, 4] and cut.prompt_ids.tolist() == [7, 9]
    assert cut.request_ids == ["r1", "r3"] and np.array_equal(cut.expert_ids, ids[2:6])


def test_readme_schema_npz_loads(tmp_path: Path) -> None:
    ids = np.zeros((3, 2, 2), dtype=np.uint8)
    ids[:, :, 1] = 1
    np.savez(tmp_path / "deepseek-v2-lite-x.npz", expert_ids=ids, offsets=np.array([0, 3]), prompt_ids=np.array([1]))
    trace = load_trace(tmp_path / "deepseek-v2-lite-x.npz")
    assert trace.num_experts == 64 and trace.geometry is not None
    assert trace.geometry.expert_bytes == 2048 * 1408 * 3


def test_jsonl_tolerates_missing_and_duplicates(tmp_path: Path) -> None:
    records = []
    for problem, tokens in ((5, 3), (2, 2)):
        for token in range(tokens):
            for layer in range(2):
                if (problem, token, layer) == (5, 1, 1):
                    continue  # missing
                records.append({"dataset": "x", "problem_id": problem, "layer": layer, "token_idx": token,
                                "experts": [token % 4, 3 - layer], "gating_probs": [0.6, 0.4]})
    records.append(dict(records[0], experts=[1, 2]))  # duplicate: first wins
    path = tmp_path / "mixtral-8x7b-toy.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    trace = load_trace(path)
    assert trace.prompt_ids.tolist() == [2, 5] and trace.offsets.tolist() == [0, 2, 5]
    assert trace.expert_ids.shape == (5, 2, 2) and trace.num_experts == 8
    assert trace.present is not None and int((~trace.present).sum()) == 1 and not trace.present[3, 1]
    assert trace.expert_ids[2, 0].tolist() == [0, 3]
    assert replay(trace, lambda: make_policy("lru"), 2).accesses == 9 * 2


def test_cli_json_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = make_trace([[[t % 5, (t * 3 + 1) % 5]] for t in range(40)], [0, 20, 40], 5)
    save_trace(tmp_path / "t.npz", trace)
    argv = ["trace", "simulate", "--trace", str(tmp_path / "t.npz"), "--policy", "lru,markov,belady",
            "--cache-experts", "2,3", "--expert-bytes", "100"]
    assert main(argv + ["--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["policy"], r["cache_experts"]) for r in rows] == [
        (p, n) for n in (2, 3) for p in ("lru", "markov", "belady")]
    for row in rows:
        assert row["expert_bytes_per_token"] == pytest.approx(row["misses"] * 100 / 40)
    assert main(argv + ["--tokens", "10"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split() == ["policy", "cache_experts", "hit_rate", "misses", "expert_MB_per_token"]
    assert len(table) == 2 + 6 and len({len(line) for line in table[1:]}) == 1


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal, json_mode, drawn", [(True, False, True), (True, True, False), (False, False, False)],
                         ids=["terminal", "json", "pipe"])
@pytest.mark.parametrize("extra, bars", [
    (["--policy", "lru,belady"], ["lru @ 2", "belady @ 2"]),
    (["--policy", "lru", "--prefetch", "none,affinity", "--learn-prompts", "1"], ["affinity", "lru+affinity @ 2"]),
], ids=["replay", "prefetch"])
def test_cli_draws_progress_on_a_terminal_only_and_never_with_json(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], terminal: bool,
        json_mode: bool, drawn: bool, extra: list[str], bars: list[str]) -> None:
    trace = make_trace([[[t % 5, (t * 3 + 1) % 5], [t % 4, 4]] for t in range(40)], [0, 20, 40], 5)
    save_trace(tmp_path / "t.npz", trace)
    stderr = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    argv = ["trace", "simulate", "--trace", str(tmp_path / "t.npz"), "--cache-experts", "2", *extra,
            *(["--json"] if json_mode else [])]
    assert main(argv) == 0
    for bar in bars:
        assert (f"{bar}: 100%" in stderr.getvalue()) == drawn, stderr.getvalue()
    assert "100%" not in capsys.readouterr().out  # results only on stdout


@pytest.mark.parametrize("extra, needle", [
    (["--trace", "nope.npz", "--cache-experts", "2"], "not found"),
    (["--policy", "mru", "--cache-experts", "2"], "unknown policy"),
    (["--cache-experts", "1"], "top-k"),
    (["--cache-experts", "9"], "top-k"),
    (["--cache-experts", "x"], "integers"),
])
def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], needle: str) -> None:
    save_trace(tmp_path / "t.npz", make_trace([[[0, 1]], [[2, 3]]], [0, 2], 5))
    argv = ["trace", "simulate", "--trace", str(tmp_path / "t.npz"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0]


@pytest.mark.skipif(not DEEPSEEK.is_file(), reason="real traces not present")
def test_real_deepseek_smoke() -> None:
    trace = load_trace(DEEPSEEK).slice_prompts(0, 40)
    assert (trace.num_layers, trace.top_k, trace.num_experts) == (26, 6, 64)
    results = {r.policy: r for r in simulate(trace, ["lru", "markov", "belady"], [16])}
    assert results["belady"].hit_rate >= max(results["lru"].hit_rate, results["markov"].hit_rate)
    assert 0.2 < results["lru"].hit_rate < results["belady"].hit_rate < 1.0


@pytest.mark.skipif(not MIXTRAL.is_file(), reason="real traces not present")
def test_real_mixtral_smoke() -> None:
    trace = load_trace(MIXTRAL)
    assert (trace.num_prompts, trace.num_layers, trace.top_k, trace.num_experts) == (2, 32, 2, 8)
    assert trace.present is not None and (~trace.present).sum() == 83 * 32 + 255 * 32 - 10779
    result = replay_belady(trace, 4)
    assert result.accesses == 10779 * 2
