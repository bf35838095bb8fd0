"""Assembles an LLMEngine from an EngineConfig: checkpoint, tokenizer, device, KV budget, expert
offload, prefetch and routing consumers. Every component is built before the ones that use it and
passed to their constructors; nothing is attached afterwards."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moe_serve.engine.config import (
    DeviceKind,
    EngineConfig,
    PrefetchMode,
    PreloadMode,
    SchedulingPolicyName,
    WeightDType,
)
from moe_serve.engine.core.async_engine import AsyncLLMEngine
from moe_serve.engine.core.block_manager import BlockManager
from moe_serve.engine.core.kv_cache import KV_BLOCK_SIZE, allocate_kv_cache, kv_bytes_per_block
from moe_serve.engine.core.llm_engine import LLMEngine
from moe_serve.engine.core.model_runner import ModelRunner
from moe_serve.engine.core.scheduler import Scheduler, SchedulerConfig
from moe_serve.engine.core.scheduling_policy import ExpertCostModel, NoExpertCost, ServiceTimeModel, SloContext
from moe_serve.engine.core.step import StepObserver
from moe_serve.engine.core.tasks import TaskTable, per_task_capacity
from moe_serve.engine.errors import ModelLoadError
from moe_serve.engine.model.cpu_kernels import packs_weights
from moe_serve.engine.model.loader import LoadedModel, load_model
from moe_serve.engine.model.moe_model import MoEModel, RoutingObserver, Speculator, moe_routers
from moe_serve.engine.model.packed import Matrix
from moe_serve.engine.model.spec import ModelSpec
from moe_serve.engine.model.weights import pack_dense
from moe_serve.engine.offload.expert_cache import ExpertCache, SlotState
from moe_serve.engine.offload.provider import OffloadedExperts, build_expert_provider
from moe_serve.engine.prefetch.logistic_predictor import LOGISTIC_MIN_PROBABILITY, LogisticPredictor
from moe_serve.engine.prefetch.predictors import AFFINITY_MIN_SCORE, AffinityPredictor, TaskProfilePredictor
from moe_serve.engine.prefetch.routing import (
    RoutingConsumer,
    RoutingRecorder,
    TaskExpertCost,
    TaskPreloader,
    TraceWriter,
)
from moe_serve.engine.prefetch.speculators import AffinitySpeculator, LogisticSpeculator, RouterSpeculator
from moe_serve.engine.prefetch.task_hits import TaskHitCounter
from moe_serve.engine.traces.trace_file import RoutingTrace, load_trace
from moe_serve.engine.traces.trace_router import TraceRouter

logger = logging.getLogger(__name__)


def resolve_device(kind: DeviceKind) -> torch.device:
    """`auto` is CUDA when available, else CPU; asking for CUDA without one is an error."""
    if kind is DeviceKind.CUDA and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was requested but no CUDA device is available")
    if kind is DeviceKind.CPU or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def model_path(config: EngineConfig) -> Path:
    """The checkpoint directory, building the bundled demo model when none is given."""
    if config.model:
        return Path(config.model).expanduser()
    from moe_serve.engine.model.demo_model import ensure_demo_model

    return ensure_demo_model()


def load_task_table(tasks_file: str | None) -> TaskTable:
    """The task/SLO table from YAML, or just the `default` task."""
    if tasks_file is None:
        return TaskTable.from_mapping({})
    path = Path(tasks_file).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"tasks file not found: {path}")
    try:
        return TaskTable.from_yaml(path)
    except ValueError as exc:
        raise ModelLoadError(f"invalid tasks file {path}: {exc}") from exc


def served_model_name(config: EngineConfig) -> str:
    """The model id clients use: the configured name, else the checkpoint directory's name."""
    if config.served_model_name:
        return config.served_model_name
    if config.model:
        return Path(config.model).expanduser().name
    from moe_serve.engine.model.demo_model import DEMO_MODEL_NAME

    return DEMO_MODEL_NAME


def load_tokenizer(path: Path) -> Any:
    """The checkpoint's tokenizer (transformers AutoTokenizer)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer from {path}: {str(exc).splitlines()[0]}") from exc


def eos_ids(loaded: LoadedModel, tokenizer: Any) -> frozenset[int]:
    """Ids that end generation: the config's and the tokenizer's eos tokens."""
    ids = set(loaded.spec.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


def kv_cache_blocks(spec: ModelSpec, config: EngineConfig, dtype: torch.dtype,
                    block_size: int = KV_BLOCK_SIZE) -> tuple[int, int]:
    """The context length served and the KV-cache blocks for it: the kv_cache_gb budget, at most what
    max_num_seqs sequences of max_model_len can use; a budget below one sequence is refused."""
    max_model_len = min(config.max_model_len or spec.max_position_embeddings, spec.max_position_embeddings)
    block_bytes = kv_bytes_per_block(spec, block_size, dtype)
    budget_blocks = int(config.kv_cache_gb * 2**30) // block_bytes
    useful_blocks = config.max_num_seqs * -(-max_model_len // block_size)
    num_blocks = min(budget_blocks, useful_blocks)
    if num_blocks * block_size < max_model_len:
        raise ModelLoadError(
            f"kv_cache_gb={config.kv_cache_gb} holds {num_blocks * block_size} tokens, less than one "
            f"max_model_len={max_model_len} sequence; raise kv_cache_gb or lower max_model_len"
        )
    return max_model_len, num_blocks


@dataclass(frozen=True)
class RoutingReplay:
    """Benchmarks: route every token as `trace` recorded (the model's MoE layer l takes the trace's
    layer `first_layer + l`) instead of by the model's routers (`TraceRouter`)."""

    trace: RoutingTrace
    first_layer: int = 0


@dataclass(frozen=True)
class RoutingConsumers:
    """What consumes live routing, built before the model: the recorder (None when nothing
    consumes routing), the eMoE preloader and the scheduler's expert-cost model (offloaded experts
    with task preloading), and the `--record-trace` writer."""

    recorder: RoutingRecorder | None = None
    preloader: TaskPreloader | None = None
    expert_cost: ExpertCostModel = field(default_factory=NoExpertCost)
    trace_writer: TraceWriter | None = None


def build_engine(config: EngineConfig, show_progress: bool = True, replay: RoutingReplay | None = None,
                 block_size: int = KV_BLOCK_SIZE) -> LLMEngine:
    """Load everything named by `config` and return a ready engine; each component is built
    before the components that use it and handed to their constructors. `block_size`: tokens per
    KV block (tests use small blocks to reach block boundaries in short sequences)."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    path = model_path(config)
    device = resolve_device(config.device)
    loaded = load_model(path, dtype=config.dtype.value, show_progress=show_progress, expert_dtype=config.expert_dtype)
    tokenizer = load_tokenizer(path)
    spec = loaded.spec
    dtype = loaded.weights.dense.embed_tokens.dtype
    max_model_len, num_blocks = kv_cache_blocks(spec, config, dtype, block_size)
    block_bytes = kv_bytes_per_block(spec, block_size, dtype)
    packed = packs_weights(device, dtype)  # the CPU kernels' layout, packed once here
    if config.weight_dtype is not WeightDType.MODEL and not packed:
        logger.warning("--weight-dtype %s applies to the CPU kernels' path (fp32/bf16 on the CPU): dense weights stay %s",
                       config.weight_dtype.value, dtype)
    if device.type == "cuda":
        logger.info("kernels: torch on %s (cuBLAS matmuls, SDPA attention, experts %s)",
                    torch.cuda.get_device_name(device), loaded.expert_format.name)
    dense = _dense_to(pack_dense(loaded.weights.dense, config.weight_dtype.value) if packed
                      else loaded.weights.dense, device)
    experts = build_expert_provider(config, loaded.weights.experts, spec, device, config.max_num_batched_tokens,
                                    pack=packed and spec.expert_mlp.is_plain and not loaded.expert_format.quantized,
                                    kv_nbytes=num_blocks * block_bytes, expert_format=loaded.expert_format)
    cache = experts.cache if isinstance(experts, OffloadedExperts) else None
    tasks = load_task_table(config.tasks_file)
    routing = routing_consumers(config, spec, tasks, cache, device)
    speculator = None if cache is None else make_speculator(config, spec, moe_routers(spec, dense), device)
    router = None if replay is None else TraceRouter(replay.trace, spec.num_moe_layers, spec.num_experts, spec.top_k,
                                                     first_layer=replay.first_layer)
    task_hits = None if cache is None else TaskHitCounter(cache, spec.num_experts)
    model = MoEModel(spec, dense, experts, device, packed=packed, speculator=speculator,
                     routing_observer=fan_out([routing.recorder, task_hits]), routing_override=router,
                     expert_format=loaded.expert_format)
    observers = [o for o in (routing.recorder, task_hits, speculator, router) if isinstance(o, StepObserver)]
    kv = allocate_kv_cache(spec, num_blocks, block_size, dtype, device)
    logger.info(
        "KV cache: %d blocks of %d tokens (%.1f MiB) on %s", num_blocks, block_size,
        num_blocks * block_bytes / 2**20, device,
    )
    scheduler = Scheduler(
        SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, config.max_waiting,
                        config.scheduling_policy, max_tasks=config.max_tasks),
        BlockManager(num_blocks, block_size),
        SloContext(tasks, ServiceTimeModel(route_share=spec.top_k / spec.num_experts), routing.expert_cost),
    )
    runner = ModelRunner(model, kv, block_size, eos_ids(loaded, tokenizer), observers)
    return LLMEngine(scheduler, runner, tokenizer, max_model_len, served_model_name(config),
                     preloader=routing.preloader, trace_writer=routing.trace_writer, expert_cache=cache)


def fan_out(observers: Sequence[RoutingObserver | None]) -> RoutingObserver | None:
    """One routing observer calling each of `observers` (None when there is none)."""
    present = [observer for observer in observers if observer is not None]
    if len(present) <= 1:
        return present[0] if present else None

    def observe(layer: int, topk_ids: torch.Tensor) -> None:
        for observer in present:
            observer(layer, topk_ids)

    return observe


def build_async_engine(config: EngineConfig) -> AsyncLLMEngine:
    """The server's engine: `build_engine(config)` run on the engine thread once it starts."""
    return AsyncLLMEngine(config, build_engine)


def prefetch_mode(config: EngineConfig, device: torch.device) -> PrefetchMode:
    """The configured prefetch mode, `auto` resolved for `device` (see `PrefetchMode`)."""
    if config.prefetch is not PrefetchMode.AUTO:
        return config.prefetch
    return PrefetchMode.AFFINITY if device.type == "cuda" else PrefetchMode.NONE


def task_preload(config: EngineConfig, device: torch.device) -> bool:
    """Whether eMoE task preloading runs, `auto` resolved for `device` (see `PreloadMode`)."""
    if config.task_preload is PreloadMode.AUTO:
        return device.type == "cuda"
    return config.task_preload is PreloadMode.ON


def make_speculator(config: EngineConfig, spec: ModelSpec, routers: list[Matrix],
                    device: torch.device) -> Speculator | None:
    """The next-layer prefetcher `config.prefetch` names for `device` (None: demand loads only);
    `routers`: the MoE layers' routers on the device."""
    mode = prefetch_mode(config, device)
    if mode is PrefetchMode.NEXT_LAYER:
        return RouterSpeculator(routers, spec.top_k, config.prefetch_margin)
    width = spec.top_k + config.prefetch_margin
    if mode is PrefetchMode.AFFINITY and spec.num_moe_layers > 1:
        min_score = AFFINITY_MIN_SCORE if config.prefetch_min_score is None else config.prefetch_min_score
        return AffinitySpeculator(AffinityPredictor(spec.num_moe_layers, spec.num_experts), width, min_score)
    if mode is PrefetchMode.LOGISTIC and spec.num_moe_layers > 1:
        predictor = LogisticPredictor(spec.num_moe_layers, spec.num_experts, top_k=spec.top_k)
        if config.prefetch_trace is not None:
            predictor.fit(model_trace(config.prefetch_trace, spec, "prefetch_trace"))
        min_score = LOGISTIC_MIN_PROBABILITY if config.prefetch_min_score is None else config.prefetch_min_score
        return LogisticSpeculator(predictor, width, min_score)
    return None


def model_trace(path: str, spec: ModelSpec, what: str) -> RoutingTrace:
    """A routing trace of this model (its MoE layers and experts); errors name the setting `what`."""
    try:
        trace = load_trace(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot read {what} {path}: {exc}") from exc
    if (trace.num_layers, trace.num_experts) != (spec.num_moe_layers, spec.num_experts):
        raise ModelLoadError(f"{what} {path} has {trace.num_layers} layers x {trace.num_experts} experts, "
                             f"the model {spec.num_moe_layers} x {spec.num_experts}")
    return trace


def routing_consumers(config: EngineConfig, spec: ModelSpec, tasks: TaskTable, cache: ExpertCache | None,
                      device: torch.device) -> RoutingConsumers:
    """Record routing when something consumes it: eMoE task preloading and the `slo` scheduler's
    expert-loading cost model (both with offloaded experts only; they share the per-task routing
    profiles), and `--record-trace` files."""
    preload = cache is not None and task_preload(config, device)
    profiles = preload or (cache is not None and config.scheduling_policy is SchedulingPolicyName.SLO)
    if not profiles and config.record_trace is None:
        return RoutingConsumers()
    preloader, expert_cost, writer, predictor = None, NoExpertCost(), None, None
    if profiles:
        assert cache is not None
        insensitive = frozenset(name for name, t in tasks.tasks.items() if not t.prediction_sensitive)
        max_tasks = per_task_capacity(tasks, config.max_tasks)
        predictor = TaskProfilePredictor(spec.num_moe_layers, spec.num_experts, insensitive_tasks=insensitive,
                                         max_tasks=max_tasks)
        per_layer = max(spec.top_k, min(spec.num_experts, cache.num_slots // spec.num_moe_layers))
        if preload:
            # a preload may fill the cache except one layer's worst-case demand, so the prefill's
            # first layers cannot evict the preloads of its later layers before they are reached
            one_layer = min(spec.num_experts, config.max_num_batched_tokens * spec.top_k)
            preloader = TaskPreloader(predictor, tasks, spec.num_experts, cache.prefetch,
                                      max_experts=max(spec.top_k, cache.num_slots - one_layer))
        gbps = config.expert_link_gbps or (25.0 if device.type == "cuda" else 8.0)
        expert_cost = TaskExpertCost(
            predictor, per_layer, lambda key: cache.state_of(key) is SlotState.RESIDENT,
            cache.store.expert_nbytes / (gbps * 1e9), max_tasks=max_tasks,
        )
    if config.record_trace is not None:
        writer = TraceWriter(Path(config.record_trace).expanduser(), spec.num_experts, spec.architecture)
    consumers: list[RoutingConsumer] = [] if predictor is None else [predictor.observe_routing]
    consumers += [writer.add] if writer else []
    return RoutingConsumers(RoutingRecorder(spec.num_moe_layers, consumers), preloader, expert_cost, writer)


def _dense_to(dense: Any, device: torch.device) -> Any:
    """The dense weights on `device` (every tensor field of the nested dataclasses moved)."""
    if device.type == "cpu":
        return dense

    def move(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            return obj.to(device)
        if isinstance(obj, list):
            return [move(o) for o in obj]
        if dataclasses.is_dataclass(obj):
            return dataclasses.replace(obj, **{f.name: move(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
        return obj

    return move(dense)
