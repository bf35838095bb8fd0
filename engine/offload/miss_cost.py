"""The per-miss cost model of hybrid miss handling: copy a missed expert to the device, or compute it
where it lives (the host tier).

Pure functions of sizes, row counts and rates (no engine objects, no torch), so the live provider
(`OffloadedExperts`) and the trace simulator decide alike. `MissRates` holds the link, host and
device rates; `choose_handling` assigns one MoE layer's misses by list scheduling over three
resources that run at once (the link, the device's compute, the host's compute), crediting a copy
with the expected later uses of the expert (`Miss.reuse`), which then run on the device instead
of the host, and weighing how far the device's and the host's compute overlap; `layer_seconds` is the layer's modelled time under given choices (copy, host or
auto's). `RateEstimate` refines a compute rate online from measured jobs. The rules and their
figures: docs/offload.md, "Hybrid miss handling".
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

# a compute job's seconds ~ bytes * (per_byte + per_row_byte * rows): memory-bound at one row,
# each further row adds its arithmetic; before any measurement a row costs this share of a pass
PRIOR_ROW_SHARE = 0.05


class MissChoice(str, enum.Enum):
    """Where a missed expert is computed: on the device after a copy, or on the host from the host tier."""

    COPY = "copy"
    HOST = "host"


@dataclass(frozen=True)
class ComputeRate:
    """Seconds an expert's FFN takes for `rows` rows: nbytes * (per_byte + per_row_byte * rows)."""

    per_byte: float
    per_row_byte: float

    @classmethod
    def from_bandwidth(cls, bytes_per_s: float) -> ComputeRate:
        """A streaming rate with the prior per-row share (before any job was measured)."""
        per_byte = 1.0 / bytes_per_s
        return cls(per_byte * (1 - PRIOR_ROW_SHARE), per_byte * PRIOR_ROW_SHARE)

    def seconds(self, nbytes: int, rows: int) -> float:
        return nbytes * (self.per_byte + self.per_row_byte * rows)


@dataclass(frozen=True)
class MissRates:
    """What a miss costs on this machine: the link's bytes per second (host -> device copies), the
    compute rates of the host's and the device's expert kernels, and how far the two computes run
    at once (`overlap` 1: side by side, as a GPU beside the CPU; 0: one after the other, as two
    threads that share the cores and the memory bandwidth)."""

    link_bytes_per_s: float
    host: ComputeRate
    device: ComputeRate
    overlap: float = 1.0

    def copy_seconds(self, nbytes: int) -> float:
        return nbytes / self.link_bytes_per_s

    def finish_seconds(self, device_s: float, host_s: float) -> float:
        """When a layer whose device and host work take these seconds ends."""
        return max(device_s, host_s) + (1.0 - self.overlap) * min(device_s, host_s)


@dataclass(frozen=True)
class Miss:
    """One missed expert of a layer: the rows (token, slot pairs) routed to it, and its expected
    later uses while it would stay resident if copied now."""

    rows: int
    reuse: float = 0.0


class LayerTimeline:
    """When the link, the device and the host each finish one layer's work placed so far."""

    def __init__(self, nbytes: int, rates: MissRates, queued_bytes: int, device_busy_s: float,
                 host_busy_s: float) -> None:
        self.nbytes, self.rates = nbytes, rates
        self.link_s = queued_bytes / rates.link_bytes_per_s
        self.device_s, self.host_s = device_busy_s, host_busy_s

    @property
    def finish_s(self) -> float:
        return self.rates.finish_seconds(self.device_s, self.host_s)

    def if_copied(self, rows: int) -> tuple[float, float]:
        """(link, device) finish times were this miss copied and computed on the device."""
        copied = self.link_s + self.rates.copy_seconds(self.nbytes)
        return copied, max(self.device_s, copied) + self.rates.device.seconds(self.nbytes, rows)

    def place(self, rows: int, choice: MissChoice) -> None:
        if choice is MissChoice.COPY:
            self.link_s, self.device_s = self.if_copied(rows)
        else:
            self.host_s += self.rates.host.seconds(self.nbytes, rows)


def choose_handling(misses: Sequence[Miss], nbytes: int, rates: MissRates, *, queued_bytes: int = 0,
                    device_busy_s: float = 0.0, host_busy_s: float = 0.0,
                    max_copies: int | None = None) -> list[MissChoice]:
    """Where to compute each of one layer's misses (same order as `misses`), every expert `nbytes`.

    Misses with the most rows are placed first. Copying finishes when the link has carried the
    bytes queued ahead (`queued_bytes`) and this expert, and then the device computes it after
    its resident work (`device_busy_s`); the host computes its misses one after the other after
    `host_busy_s`. A miss goes where the layer's finish time (`MissRates.finish_seconds` of the
    device's and the host's) grows least, a copy first being credited with its reuse: each later
    use computed on the device instead of the host. At most `max_copies` copies (free or evictable
    slots)."""
    timeline = LayerTimeline(nbytes, rates, queued_bytes, device_busy_s, host_busy_s)
    copies_left = len(misses) if max_copies is None else max_copies
    saved_per_use = max(rates.host.seconds(nbytes, 1) - rates.device.seconds(nbytes, 1), 0.0)
    choices = [MissChoice.HOST] * len(misses)
    for index in sorted(range(len(misses)), key=lambda i: -misses[i].rows):
        miss = misses[index]
        _, device_after = timeline.if_copied(miss.rows)
        host_after = timeline.host_s + rates.host.seconds(nbytes, miss.rows)
        finish_if_copied = rates.finish_seconds(device_after, timeline.host_s) - miss.reuse * saved_per_use
        if copies_left > 0 and finish_if_copied < rates.finish_seconds(timeline.device_s, host_after):
            choices[index] = MissChoice.COPY
            copies_left -= 1
        timeline.place(miss.rows, choices[index])
    return choices


def layer_seconds(misses: Sequence[Miss], choices: Sequence[MissChoice], nbytes: int, rates: MissRates, *,
                  queued_bytes: int = 0, device_busy_s: float = 0.0, host_busy_s: float = 0.0) -> float:
    """The layer's modelled finish time with its misses handled as `choices` (as `choose_handling`
    weighs it; reuse is not credited here): all COPY is `copy` handling, all HOST is `host`,
    `choose_handling`'s choices are `auto`."""
    timeline = LayerTimeline(nbytes, rates, queued_bytes, device_busy_s, host_busy_s)
    for index in sorted(range(len(misses)), key=lambda i: -misses[i].rows):
        timeline.place(misses[index].rows, choices[index])
    return timeline.finish_s


class RateEstimate:
    """A `ComputeRate` refined from measured jobs (seconds, weight bytes read, sum of bytes x rows):
    a two-parameter least-squares fit that forgets old jobs (`decay` per job) and is pulled towards
    the prior, the per-row cost by `row_prior_weight` jobs' worth of evidence (one-row jobs alone
    leave it near its prior), the per-byte cost by `byte_prior_weight` (soon the measured one)."""

    def __init__(self, prior: ComputeRate, decay: float = 0.98, byte_prior_weight: float = 0.25,
                 row_prior_weight: float = 4.0) -> None:
        self.rate = prior
        self._prior, self._decay = prior, decay
        self._weights = (byte_prior_weight, row_prior_weight)
        self._xx = [[0.0, 0.0], [0.0, 0.0]]
        self._xy = [0.0, 0.0]

    def observe(self, seconds: float, nbytes: int, row_bytes: int) -> None:
        """One job read `nbytes` of weights and computed `row_bytes` (sum over its experts of rows x bytes)."""
        if nbytes <= 0 or seconds <= 0:
            return
        scale = 1.0 / nbytes  # fit per weight byte: jobs of any size weigh alike
        x = (1.0, row_bytes * scale)
        y = seconds * scale
        for i in range(2):
            self._xy[i] = self._decay * self._xy[i] + x[i] * y
            for j in range(2):
                self._xx[i][j] = self._decay * self._xx[i][j] + x[i] * x[j]
        self.rate = self._solve()

    def _solve(self) -> ComputeRate:
        w, prior = self._weights, (self._prior.per_byte, self._prior.per_row_byte)
        a = [[self._xx[0][0] + w[0], self._xx[0][1]], [self._xx[1][0], self._xx[1][1] + w[1]]]
        b = [self._xy[0] + w[0] * prior[0], self._xy[1] + w[1] * prior[1]]
        det = a[0][0] * a[1][1] - a[0][1] * a[1][0]
        per_byte = (b[0] * a[1][1] - a[0][1] * b[1]) / det
        per_row = (a[0][0] * b[1] - a[1][0] * b[0]) / det
        if per_byte <= 0 or per_row < 0:  # noise pushed the fit out of bounds: fit the pass alone, rows free
            return ComputeRate((self._xy[0] + w[0] * prior[0]) / (self._xx[0][0] + w[0]), 0.0)
        return ComputeRate(per_byte, per_row)
