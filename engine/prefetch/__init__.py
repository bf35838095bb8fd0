"""Expert prediction: next-layer speculators, the predictors behind them, the routing recorder,
eMoE task preloading and the expert-loading cost model, per-task expert-cache hits, and prefetch
replay on traces."""

from moe_serve.engine.exports import lazy_exports

_NAMES = {
    "RouterSpeculator": "speculators", "AffinitySpeculator": "speculators", "LogisticSpeculator": "speculators",
    "AffinityPredictor": "predictors", "TaskProfilePredictor": "predictors", "LogisticPredictor": "logistic_predictor",
    "RoutingRecorder": "routing", "TaskPreloader": "routing", "TraceWriter": "routing", "TaskExpertCost": "routing",
    "TaskHitCounter": "task_hits",
}
__all__ = sorted(_NAMES)
__getattr__ = lazy_exports(__name__, _NAMES)
