"""EngineConfig: every engine setting, validated by pydantic with messages that name the field."""

from __future__ import annotations

import enum

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_MAX_TASKS = 64  # distinct task names with their own state


class SchedulingPolicyName(str, enum.Enum):
    """`--scheduling-policy` values."""

    FCFS = "fcfs"
    PRIORITY = "priority"
    SLO = "slo"


class DType(str, enum.Enum):
    """Compute dtype; `auto` keeps the checkpoint's."""

    AUTO = "auto"
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class DeviceKind(str, enum.Enum):
    """Where the model runs; `auto` picks CUDA when available."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class OffloadMode(str, enum.Enum):
    """Expert offloading: `on` keeps a bounded expert cache, `off` keeps every expert resident,
    `auto` offloads when an expert-cache budget is given or the experts do not fit the device."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


class PrefetchMode(str, enum.Enum):
    """Expert prefetching when offloading, at low priority while layer l computes: `next_layer`
    applies layer l+1's router to layer l's hidden state; `affinity` ranks layer l+1's experts by
    co-activation with layer l's choice (learned online); `logistic` by a per-layer logistic
    regression over the token's last layers' routing and the previous token's (learned online,
    optionally trained on a trace first); `none` loads on demand only; `auto` is each hardware's
    measured best: `none` on a CPU (a prefetch copy is a memcpy on the computing cores), `affinity`
    on CUDA (the fewest demand misses of the modes that learn online; configs/README.md)."""

    AUTO = "auto"
    NONE = "none"
    NEXT_LAYER = "next_layer"
    AFFINITY = "affinity"
    LOGISTIC = "logistic"


class PreloadMode(str, enum.Enum):
    """eMoE task preloading when offloading: `on` preloads a task's predicted experts before its
    prefill, `off` does not, `auto` is each hardware's measured best: `off` on a CPU (preloads cut
    misses 2.8% per token but raised TTFT 8%: the copies run on the computing cores), `on` on CUDA
    (the copies run on the DMA engine beside the compute; configs/README.md). `true`/`false` are
    read as `on`/`off`."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"

    @classmethod
    def _missing_(cls, value: object) -> PreloadMode | None:
        if isinstance(value, bool):
            return cls.ON if value else cls.OFF
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return cls.ON if value.lower() == "true" else cls.OFF
        return None


class MissHandling(str, enum.Enum):
    """What a missed expert costs: `copy` loads it into a device slot and computes it there, `host`
    computes it where it lives (the host tier, on the host's kernels) while the device computes the
    resident experts, `auto` decides per miss from a cost model of the link, the host and the
    expert's expected reuse (docs/offload.md)."""

    AUTO = "auto"
    COPY = "copy"
    HOST = "host"


class MissPrecision(str, enum.Enum):
    """Which copy of a missed expert is loaded when the host tier keeps a low-bit copy beside the full one:
    `full` always the full-precision one, `low` always the low-bit one, `adaptive` decides per miss (the
    expert's gate weight, the link's queue) and upgrades hot experts later (docs/mixed_precision.md)."""

    FULL = "full"
    LOW = "low"
    ADAPTIVE = "adaptive"


class WeightDType(str, enum.Enum):
    """Storage of the dense linear layers (attention projections, shared experts, lm_head) on the CPU
    path: `model` keeps the compute dtype, `int8` / `int4` quantize at load (docs/quantization.md)."""

    MODEL = "model"
    INT8 = "int8"
    INT4 = "int4"


class EngineConfig(BaseModel):
    """Engine settings (model, memory budgets, batching limits)."""

    model_config = ConfigDict(extra="forbid", use_enum_values=False, protected_namespaces=())

    model: str | None = Field(default=None, description="checkpoint directory; empty serves the bundled demo model")
    served_model_name: str | None = Field(default=None, description="model id clients use; defaults to the directory name")
    dtype: DType = DType.AUTO
    device: DeviceKind = DeviceKind.AUTO
    max_model_len: int | None = Field(default=None, ge=16, description="context length; defaults to the model's")
    kv_cache_gb: float = Field(default=0.5, gt=0, description="KV-cache budget in GiB")
    max_num_seqs: int = Field(default=32, ge=1, le=4096)
    max_num_batched_tokens: int = Field(default=512, ge=16, description="tokens per step (prefill chunk size)")
    max_waiting: int = Field(default=256, ge=1, description="waiting-queue bound; beyond it requests get 429")
    expert_dtype: str = Field(
        default="auto", pattern=r"^(auto|model|int8|mxfp4|int4(-g(32|64|128))?(-sym)?)$",
        description="routed experts' storage: auto (an MXFP4 checkpoint stays MXFP4, else the model dtype), model, "
                    "int8, int4 (group 64 with zero points; int4-g32/-g128, -sym without zero points) or mxfp4; "
                    "quantized at load, expert by expert (docs/quantization.md)",
    )
    weight_dtype: WeightDType = Field(
        default=WeightDType.MODEL, description="dense linear layers' storage on the CPU path: model, int8 or int4 "
        "(quantized at load; docs/quantization.md)"
    )
    offload: OffloadMode = OffloadMode.AUTO
    expert_cache_gb: float | None = Field(default=None, gt=0, description="device expert-cache budget in GiB")
    expert_cache_fraction: float | None = Field(
        default=None, gt=0, le=1, description="share of all routed experts kept resident (instead of a GiB budget)"
    )
    host_memory_gb: float | None = Field(
        default=None, gt=0,
        description="host RAM budget for the offloaded experts; a larger host tier is file-backed (mmap), "
                    "so the OS keeps only its hot part in RAM",
    )
    host_tier_dir: str | None = Field(
        default=None, description="directory for a file-backed host tier (default: <cache>/moe-serve/host-tier)"
    )
    cache_policy: str = Field(default="default", description="expert-cache eviction policy (see cache_policies)")
    prefetch: PrefetchMode = PrefetchMode.AUTO
    prefetch_margin: int = Field(default=2, ge=0, le=64, description="extra experts per token beyond top-k to prefetch")
    prefetch_min_score: float | None = Field(
        default=None, ge=0, le=1, description="lowest score worth a prefetch copy: affinity's co-activation score "
        "(default 0.25), logistic's probability (default 0.5)"
    )
    prefetch_trace: str | None = Field(
        default=None, description="logistic prefetch: routing trace (npz) of this model to train on at start-up"
    )
    task_preload: PreloadMode = Field(
        default=PreloadMode.AUTO, description="eMoE: preload a task's predicted experts before its prefill "
        "{auto, on, off}; auto: off on a CPU, on on CUDA"
    )
    expert_link_gbps: float | None = Field(
        default=None, gt=0, description="host-to-device GB/s. On a CPU it throttles the copy engine (the stand-in "
        "for PCIe; unset: unthrottled copies) and lets --miss-handling auto weigh copies against host compute; cost "
        "estimates use it, else 25 on CUDA, 8 on CPU"
    )
    miss_handling: MissHandling = Field(
        default=MissHandling.AUTO, description="a missed expert: copy it to the device, compute it on the host, "
        "or auto (per miss, from the link/host cost model; on a CPU only with --expert-link-gbps, else copy)"
    )
    miss_precision: MissPrecision = Field(
        default=MissPrecision.FULL, description="a copied miss: load the full-precision expert, its low-bit copy, or "
        "adaptive (per miss; hot experts upgraded later); low and adaptive keep both copies in the host tier"
    )
    miss_low_dtype: str = Field(
        default="int4-g32", pattern=r"^(int8|mxfp4|int4(-g(32|64|128))?(-sym)?)$",
        description="format of the low-bit copy --miss-precision low/adaptive loads (docs/mixed_precision.md)"
    )
    miss_low_gate: float = Field(
        default=1.1, ge=0, le=64, description="adaptive: a miss whose largest relative gate weight over its rows (the "
        "row's gate weight over its token's top-k mean: 1 = an average routed expert) is below this loads the low-bit copy"
    )
    miss_full_per_token: float | None = Field(
        default=1.0, gt=0, le=64, description="adaptive: full-precision copies a MoE layer-step may start per token "
        "it computes (misses at or above the gate first, highest gate first, then upgrades); the other misses load "
        "the low-bit copy. None: no cap (every miss at or above the gate loads full)"
    )
    record_trace: str | None = Field(default=None, description="directory to write routing traces (npz) into")
    copy_workers: int = Field(default=2, ge=1, le=64, description="copy-engine worker threads (CPU backend)")
    scheduling_policy: SchedulingPolicyName = Field(
        default=SchedulingPolicyName.FCFS, description="waiting-queue order"
    )
    tasks_file: str | None = Field(default=None, description="YAML table of tasks and SLOs (configs/tasks.yaml)")
    max_tasks: int = Field(
        default=DEFAULT_MAX_TASKS, ge=1, description="distinct task names with their own state (the tasks file's "
        "always count); beyond it a new name is served as 'default'"
    )
    num_threads: int | None = Field(default=None, ge=1, description="torch CPU threads; default: all cores")
