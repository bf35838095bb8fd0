"""Hybrid miss handling's live state: which of a layer's misses are copied and which are computed on
the host, from the cost model (`miss_cost`) fed with rates probed at start-up and refined online.

`MissPlanner` owns the rates (the link's from the copy engine's busy time and the bytes it moved,
the host's from each host job's measured seconds; on a CPU the device computes with the same
kernels from the same RAM, so it shares the host's; how far the device's and the host's compute
overlap, from each layer's measured time against its modelled parts), each layer's per-expert use
frequency (the predictor of a copy's reuse) and the copies per step that bound how long a copy
stays resident.
`probe_rates` measures the link and the compute rates once at start-up.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping, Sequence

import torch

from moe_serve.cuda_ext.api import CopyEngine, CopyPriority
from moe_serve.engine.offload.miss_cost import (
    ComputeRate,
    LayerTimeline,
    Miss,
    MissChoice,
    MissRates,
    RateEstimate,
    choose_handling,
)

USE_DECAY = 0.9  # per step of a layer: an expert's use frequency forgets older steps
COPIES_DECAY = 0.8  # per step of a layer: copies per step (how fast the layer's slots turn over)
LINK_DECAY = 0.8  # per engine step: the link rate's moving average
OVERLAP_DECAY = 0.9  # per layer with work on both sides: the overlap's moving average
# a GPU computes beside the CPU; on a CPU the "device" is a second thread on the same cores and memory
# bus, and measured no faster beside the host worker than the host worker alone (docs/offload.md)
CUDA_OVERLAP, CPU_OVERLAP = 1.0, 0.0
MAX_RESIDENT_STEPS = 32.0  # a copy's expected residency, in steps, is capped here
PROBE_BYTES = 32 << 20  # a probe moves about this much (whole experts, 1 to PROBE_MAX_COPIES of them)
PROBE_MAX_COPIES = 16


def probe_rates(source: torch.Tensor, copy_engine: CopyEngine, device: torch.device) -> MissRates:
    """The link's rate (copies of `source`, one expert's host bytes, through `copy_engine` into a
    scratch slot on `device`), the host's streaming read rate over the same bytes and, on CUDA, the
    device's; a second or less, once at start-up. The overlap starts at CUDA_OVERLAP or CPU_OVERLAP."""
    repeats = min(PROBE_MAX_COPIES, max(1, -(-PROBE_BYTES // source.numel())))
    scratch = torch.empty_like(source, device=device)
    start = time.perf_counter()
    for ticket in copy_engine.submit([(source, scratch)] * repeats, CopyPriority.DEMAND):
        ticket.synchronize()
    link = repeats * source.numel() / (time.perf_counter() - start)
    host = ComputeRate.from_bandwidth(_read_bytes_per_s(source, repeats))
    if device.type == "cpu":
        return MissRates(link, host, host, CPU_OVERLAP)
    return MissRates(link, host, ComputeRate.from_bandwidth(_read_bytes_per_s(scratch, repeats)), CUDA_OVERLAP)


def _read_bytes_per_s(buffer: torch.Tensor, repeats: int) -> float:
    """Streaming read rate over `buffer` (its bytes summed as fp32 words; best of `repeats`)."""
    words = buffer[: buffer.numel() // 4 * 4].view(torch.float32)
    best = float("inf")
    for _ in range(max(repeats, 2)):
        start = time.perf_counter()
        words.sum()
        if buffer.is_cuda:
            torch.cuda.synchronize(buffer.device)
        best = min(best, time.perf_counter() - start)
    return words.numel() * 4 / max(best, 1e-9)


class MissPlanner:
    """`auto` miss handling: chooses copy or host per miss, and learns the rates and uses it needs."""

    def __init__(self, rates: MissRates, expert_nbytes: int, experts_per_layer: Mapping[int, int],
                 slots_per_layer: float, device_is_host: bool) -> None:
        self.expert_nbytes = expert_nbytes
        self._link_bytes_per_s = rates.link_bytes_per_s
        self._host = RateEstimate(rates.host)
        self._device = rates.device
        self._device_is_host = device_is_host  # a CPU: the device's kernels are the host's, on the same RAM
        self._overlap = rates.overlap
        self._predicted: dict[int, tuple[float, float]] = {}  # layer -> its modelled device, host seconds
        self._slots_per_layer = slots_per_layer
        self._uses = {layer: torch.zeros(count, dtype=torch.float64) for layer, count in experts_per_layer.items()}
        self._copies: dict[int, float] = defaultdict(float)
        self._link_seen = (0.0, 0)  # link busy seconds, bytes copied at the last refresh

    @property
    def rates(self) -> MissRates:
        """The rates the next decision uses."""
        host = self._host.rate
        return MissRates(self._link_bytes_per_s, host, host if self._device_is_host else self._device, self._overlap)

    def plan(self, layer: int, expert_ids: Sequence[int], rows: Sequence[int], resident: Sequence[bool],
             queued_bytes: int, max_copies: int) -> list[bool]:
        """Whether each expert is computed on the host (True) or on the device (False: a hit, or a
        miss to copy). `resident[i]`: the expert holds a slot (a hit)."""
        uses = self._uses[layer]
        uses *= USE_DECAY
        uses[list(expert_ids)] += 1.0 - USE_DECAY
        misses = [i for i, hit in enumerate(resident) if not hit]
        on_host = [False] * len(expert_ids)
        if not misses:
            self._copies[layer] *= COPIES_DECAY
            return on_host
        rates = self.rates
        nbytes = self.expert_nbytes
        device_busy = sum(rates.device.seconds(nbytes, rows[i]) for i, hit in enumerate(resident) if hit)
        resident_steps = min(MAX_RESIDENT_STEPS, self._slots_per_layer / max(self._copies[layer], 1e-3))
        choices = choose_handling(
            [Miss(rows[i], float(uses[expert_ids[i]]) * resident_steps) for i in misses], nbytes, rates,
            queued_bytes=queued_bytes, device_busy_s=device_busy, max_copies=max_copies)
        timeline = LayerTimeline(nbytes, rates, queued_bytes, device_busy, 0.0)
        copied = 0
        for i, choice in zip(misses, choices):
            on_host[i] = choice is MissChoice.HOST
            copied += choice is MissChoice.COPY
            timeline.place(rows[i], choice)
        self._copies[layer] = COPIES_DECAY * self._copies[layer] + (1 - COPIES_DECAY) * copied
        self._predicted[layer] = (timeline.device_s, timeline.host_s)
        return on_host

    def observe_layer(self, layer: int, seconds: float) -> None:
        """The layer's experts took `seconds` from fetch to done: where both sides had work, the
        overlap that explains it, max(device, host) + (1 - overlap) x min(device, host), refines
        the estimate (the model's other errors land in it too)."""
        predicted = self._predicted.pop(layer, None)
        if predicted is None or min(predicted) <= 0:
            return
        shorter, longer = min(predicted), max(predicted)
        observed = min(max(1.0 - (seconds - longer) / shorter, 0.0), 1.0)
        self._overlap = OVERLAP_DECAY * self._overlap + (1 - OVERLAP_DECAY) * observed

    def observe_host_job(self, seconds: float, nbytes: int, row_bytes: int) -> None:
        """A host job read `nbytes` of expert weights for `row_bytes` (sum of rows x bytes) in `seconds`."""
        self._host.observe(seconds, nbytes, row_bytes)

    def observe_link(self, busy_seconds: float, bytes_copied: int) -> None:
        """The copy engine's link busy seconds and the bytes copied so far (totals): refines the link
        rate from what moved since the last call, once at least an expert's bytes did."""
        seen_busy, seen_bytes = self._link_seen
        moved, busy = bytes_copied - seen_bytes, busy_seconds - seen_busy
        if moved < self.expert_nbytes or busy <= 0:
            return
        self._link_seen = (busy_seconds, bytes_copied)
        self._link_bytes_per_s = LINK_DECAY * self._link_bytes_per_s + (1 - LINK_DECAY) * moved / busy
