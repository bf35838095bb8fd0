"""The serving core: the engine loop and its async wrapper, the scheduler and its SLO policies,
sequences and KV blocks, the model runner and its step observers, sampling (grammar-constrained
when a request asks) and detokenization."""

from moe_serve.engine.exports import lazy_exports

_NAMES = {
    "AsyncLLMEngine": "async_engine", "LLMEngine": "llm_engine", "EngineStats": "stats",
    "ExpertCacheSnapshot": "stats", "EngineRequest": "request", "RequestOutput": "request",
    "check_context_length": "request", "SamplingParams": "sampling_params", "FinishReason": "sampling_params",
    "Scheduler": "scheduler", "SchedulerConfig": "scheduler", "StepLayout": "step", "StepObserver": "step",
    "TaskTable": "tasks", "ModelRunner": "model_runner", "BlockManager": "block_manager",
    "GuidedDecoding": "guided.spec", "GuidedKind": "guided.spec", "GuidedCompileError": "guided.spec",
}
__all__ = sorted(_NAMES)
__getattr__ = lazy_exports(__name__, _NAMES)
