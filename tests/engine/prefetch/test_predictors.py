"""Affinity and task-profile predictors on synthetic routing with known structure."""

from __future__ import annotations

import numpy as np
import pytest

from moe_serve.engine.prefetch.predictors import (
    AffinityPredictor,
    PredictorStats,
    TaskProfilePredictor,
    affinity_recall,
    online_affinity_predictions,
    score,
)
from moe_serve.engine.traces.trace_file import RoutingTrace

NUM_EXPERTS, NUM_LAYERS, TOP_K = 16, 4, 2


def mapped_routing(num_tokens: int, seed: int, shift: int = 3) -> np.ndarray:
    """[T, L, K] routing where layer l+1's experts are (layer l's + shift * (l+1)) mod E."""
    rng = np.random.default_rng(seed)
    first = np.stack([rng.choice(NUM_EXPERTS, TOP_K, replace=False) for _ in range(num_tokens)])
    layers = [(first + shift * layer) % NUM_EXPERTS for layer in range(NUM_LAYERS)]
    return np.stack(layers, axis=1).astype(np.uint8)


def as_trace(routing: np.ndarray, prompt_length: int = 10) -> RoutingTrace:
    offsets = np.arange(0, len(routing) + 1, prompt_length, dtype=np.int64)
    return RoutingTrace(routing, offsets, np.arange(len(offsets) - 1, dtype=np.int32), NUM_EXPERTS)


def test_affinity_learns_a_deterministic_mapping() -> None:
    predictor = AffinityPredictor(NUM_LAYERS, NUM_EXPERTS).fit(as_trace(mapped_routing(200, seed=0)))
    for row in mapped_routing(50, seed=1):
        for layer in range(NUM_LAYERS - 1):
            assert set(predictor.predict(layer, row[layer].tolist(), TOP_K)) == set(row[layer + 1].tolist())


def test_affinity_recall_is_one_on_a_deterministic_mapping() -> None:
    recall = affinity_recall(as_trace(mapped_routing(100, seed=2)), as_trace(mapped_routing(200, seed=3)), [2, 4])
    assert recall.shape == (NUM_LAYERS - 1, 2)
    np.testing.assert_allclose(recall, 1.0)


def test_observe_token_observe_and_observe_tokens_agree() -> None:
    routing = mapped_routing(30, seed=4, shift=5)
    by_rows, by_token, by_pair = (AffinityPredictor(NUM_LAYERS, NUM_EXPERTS) for _ in range(3))
    by_rows.observe_tokens(routing)
    for row in routing:
        by_token.observe_token(row)
        for layer in range(NUM_LAYERS - 1):
            by_pair.observe(layer, row[layer].tolist(), row[layer + 1].tolist())
    np.testing.assert_allclose(by_rows.affinity(), by_token.affinity())
    np.testing.assert_allclose(by_rows.affinity(), by_pair.affinity())


def test_predict_tokens_matches_predict_and_min_score_filters() -> None:
    predictor = AffinityPredictor(NUM_LAYERS, NUM_EXPERTS).fit(as_trace(mapped_routing(100, seed=5)))
    routing = mapped_routing(8, seed=6)
    batch = predictor.predict_tokens(routing, 3)
    for token, row in enumerate(routing):
        for layer in range(NUM_LAYERS - 1):
            assert batch[token, layer].tolist() == predictor.predict(layer, row[layer].tolist(), 3)
    strict = predictor.predict_tokens(routing, 3, min_score=0.5)
    assert (strict[:, :, :TOP_K] >= 0).all() and (strict[:, :, TOP_K:] == -1).all()


def test_decay_follows_a_changed_mapping() -> None:
    predictor = AffinityPredictor(NUM_LAYERS, NUM_EXPERTS, decay=0.9)
    for row in mapped_routing(200, seed=7, shift=3):
        predictor.observe_token(row)
    for row in mapped_routing(100, seed=8, shift=7):
        predictor.observe_token(row)
    row = mapped_routing(1, seed=9, shift=7)[0]
    assert set(predictor.predict(0, row[0].tolist(), TOP_K)) == set(row[1].tolist())


def test_online_predictions_use_only_earlier_prompts() -> None:
    trace = as_trace(np.concatenate([mapped_routing(10, seed=10, shift=3), mapped_routing(10, seed=11, shift=5)]))
    predicted = online_affinity_predictions(trace, None, TOP_K)
    assert predicted.shape == (20, NUM_LAYERS - 1, TOP_K)
    second = trace.expert_ids[10:].astype(np.int64)
    found = (predicted[10:, :, :, None] == second[:, 1:, None, :]).any(axis=2)
    assert found.mean() < 0.5  # the second prompt's new mapping was not known yet


def test_affinity_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        AffinityPredictor(1, NUM_EXPERTS)
    with pytest.raises(ValueError):
        AffinityPredictor(NUM_LAYERS, NUM_EXPERTS, decay=1.5)
    with pytest.raises(ValueError):
        AffinityPredictor(NUM_LAYERS, NUM_EXPERTS).predict(NUM_LAYERS - 1, [0], 2)


def request(experts: list[int], tokens: int = 4) -> np.ndarray:
    """[T, L, K] routing using the same experts at every token and layer."""
    return np.tile(np.asarray(experts, dtype=np.int64), (tokens, NUM_LAYERS, 1))


def test_task_profile_refreshes_every_n_prompts() -> None:
    predictor = TaskProfilePredictor(NUM_LAYERS, NUM_EXPERTS, refresh_every=3)
    assert predictor.predict("code", 2) == {}
    predictor.observe_request("code", request([0, 1]))
    first = predictor.predict("code", 2)
    assert first == {layer: [0, 1] for layer in range(NUM_LAYERS)}
    for _ in range(2):
        predictor.observe_request("code", request([5, 6], tokens=10))
        assert predictor.predict("code", 2) == first  # cached: 1 and 2 prompts since the refresh
    predictor.observe_request("code", request([5, 6], tokens=10))
    assert predictor.predict("code", 2) == {layer: [5, 6] for layer in range(NUM_LAYERS)}
    assert predictor.predict("code", 4)[0] == [5, 6, 0, 1]


def test_task_profiles_are_per_task_and_insensitive_tasks_get_nothing() -> None:
    predictor = TaskProfilePredictor(NUM_LAYERS, NUM_EXPERTS, refresh_every=1, insensitive_tasks=frozenset({"chat"}))
    predictor.observe_request("chat", request([2, 3]))
    predictor.observe_request("math", request([4, 9]))
    assert predictor.predict("chat", 2) == {}
    assert predictor.predict("math", 1) == {layer: [4] for layer in range(NUM_LAYERS)}
    assert predictor.predict("summarize", 2) == {}
    with pytest.raises(ValueError):
        predictor.observe_request("math", np.zeros((3, NUM_LAYERS + 1, 2), dtype=np.int64))


def test_score_and_running_stats() -> None:
    assert score({1, 2, 3, 4}, {3, 4, 5}) == (0.5, 2 / 3)
    assert score(set(), {1}) == (0.0, 0.0)
    stats = PredictorStats()
    stats.update([1, 2], [2, 3])
    stats.update([4], [4])
    assert (stats.issued, stats.hits, stats.actual) == (3, 2, 3)
    assert stats.precision == pytest.approx(2 / 3) and stats.recall == pytest.approx(2 / 3)


def test_task_profile_scores_are_request_usage_shares_and_skip_unlikely_experts() -> None:
    from moe_serve.engine.prefetch.predictors import TaskProfilePredictor

    predictor = TaskProfilePredictor(num_layers=1, num_experts=4, refresh_every=1)
    predictor.observe_request("t", np.array([[[0, 1]], [[0, 1]]]))
    predictor.observe_request("t", np.array([[[0, 2]]]))
    scores = predictor.predict_scores("t", per_layer=4)
    assert scores == {0: [(0, 1.0), (1, 0.5), (2, 0.5)]}
    assert predictor.predict_scores("t", per_layer=4, min_probability=0.6) == {0: [(0, 1.0)]}
    assert predictor.predict_scores("t", per_layer=4, min_probability=1.1) == {}  # flat/unlikely: nothing
    assert predictor.predict_scores("unseen", per_layer=4) == {}
