"""The per-miss cost model: choices follow the link, the host's load and the reuse; the online rate fit."""

from __future__ import annotations

from dataclasses import replace

import pytest

from moe_serve.engine.offload.miss_cost import (
    ComputeRate,
    Miss,
    MissChoice,
    MissRates,
    RateEstimate,
    choose_handling,
    layer_seconds,
)

MB = 10**6
NBYTES = 17 * MB  # about one DeepSeek-V2-Lite expert in bf16
COPY, HOST = MissChoice.COPY, MissChoice.HOST


def rates(link_gbps: float, host_gbps: float = 10.0, device_gbps: float = 10.0) -> MissRates:
    return MissRates(link_gbps * 1e9, ComputeRate(1 / (host_gbps * 1e9), 0.0), ComputeRate(1 / (device_gbps * 1e9), 0.0))


def test_a_slow_link_computes_every_miss_on_the_host() -> None:
    assert choose_handling([Miss(1)] * 6, NBYTES, rates(2.0)) == [HOST] * 6


def test_a_fast_link_copies_what_the_busy_host_would_finish_later() -> None:
    """Host and device compute alike: the first misses go to the idle host, later ones to the device
    once the host's queue outgrows a copy plus its compute (copy 0.17 ms + 1.7 ms vs host 1.7 ms each)."""
    choices = choose_handling([Miss(1)] * 6, NBYTES, rates(100.0))
    assert choices.count(HOST) == 3 and choices.count(COPY) == 3
    auto = layer_seconds([Miss(1)] * 6, choices, NBYTES, rates(100.0))
    assert auto < layer_seconds([Miss(1)] * 6, [HOST] * 6, NBYTES, rates(100.0))
    assert auto < layer_seconds([Miss(1)] * 6, [COPY] * 6, NBYTES, rates(100.0))


def test_where_device_and_host_compute_one_after_the_other_a_copy_only_adds_its_link_time() -> None:
    serial = replace(rates(100.0), overlap=0.0)
    assert choose_handling([Miss(1)] * 6, NBYTES, serial) == [HOST] * 6
    assert serial.finish_seconds(2.0, 1.0) == 3.0 and rates(100.0).finish_seconds(2.0, 1.0) == 2.0


def test_queued_copies_and_the_devices_resident_work_push_misses_to_the_host() -> None:
    fast = rates(100.0)
    assert choose_handling([Miss(1)] * 6, NBYTES, fast, queued_bytes=100 * NBYTES) == [HOST] * 6
    assert choose_handling([Miss(1)] * 6, NBYTES, fast, device_busy_s=1.0) == [HOST] * 6


def test_reuse_pays_for_a_copy_where_the_device_computes_faster_than_the_host() -> None:
    gpu = rates(25.0, host_gbps=50.0, device_gbps=3000.0)  # copy 0.68 ms vs host 0.34 ms
    assert choose_handling([Miss(1, reuse=0.0)], NBYTES, gpu) == [HOST]
    assert choose_handling([Miss(1, reuse=3.0)], NBYTES, gpu) == [COPY]
    assert choose_handling([Miss(1, reuse=3.0)] * 4, NBYTES, gpu, max_copies=1).count(COPY) == 1


def test_the_busiest_miss_is_placed_first() -> None:
    """Three misses and room for one copy: the 16-row miss gets it."""
    row_heavy = MissRates(100e9, ComputeRate(1e-10, 1e-10), ComputeRate(1e-10, 1e-12))
    choices = choose_handling([Miss(1), Miss(16), Miss(1)], NBYTES, row_heavy, max_copies=1)
    assert choices == [HOST, COPY, HOST]


def test_the_rate_fit_recovers_per_byte_and_per_row_costs_and_keeps_the_row_prior_at_one_row() -> None:
    truth = ComputeRate(1e-10, 2e-11)
    prior = ComputeRate(3e-10, 1e-11)
    single_rows = RateEstimate(prior)
    for _ in range(200):
        single_rows.observe(truth.seconds(NBYTES, 1), NBYTES, NBYTES)
    assert single_rows.rate.seconds(NBYTES, 1) == pytest.approx(truth.seconds(NBYTES, 1), rel=0.05)
    varied = RateEstimate(prior)
    for step in range(200):
        rows = 1 + step % 16
        varied.observe(truth.seconds(NBYTES, rows), NBYTES, rows * NBYTES)
    assert varied.rate.per_byte == pytest.approx(truth.per_byte, rel=0.05)
    assert varied.rate.per_row_byte == pytest.approx(truth.per_row_byte, rel=0.05)
