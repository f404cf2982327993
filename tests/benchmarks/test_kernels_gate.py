"""``bench kernels`` times ops that run together (``both``): its gate must hold the streams until every op
is queued, however long queueing takes, or the later op starts late and the pair looks serial."""

from __future__ import annotations

import statistics
import time

import pytest

from dynkv.benchmarks.kernels_setup import _sleep_rate, time_fns

pytestmark = pytest.mark.gpu


def test_ops_that_take_long_to_queue_are_still_timed_together() -> None:
    import torch

    dev = torch.device("cuda")
    gpu_ms = 20.0
    cycles = int(_sleep_rate(dev) * gpu_ms / 1e3)  # torch.cuda._sleep for ~gpu_ms on this GPU

    def op() -> None:  # the host takes as long to queue it as it runs, far past a fixed 1 ms gate
        time.sleep(gpu_ms / 1e3)
        torch.cuda._sleep(cycles)

    enqueue: list[float] = []
    bound: list[bool] = []
    alone = statistics.median(time_fns([op], dev, iters=3, warmup=1, queue_bound=bound))
    both = statistics.median(time_fns([op, op], dev, iters=3, warmup=1, enqueue=enqueue, queue_bound=bound))
    # Held until queued, one op takes its GPU time and two on two streams about as long; a gate that opens
    # early times the queueing too (one: ~2x, two: ~3x the GPU time).
    assert alone < 1.4 * gpu_ms / 1e3, alone
    assert both < 1.4 * gpu_ms / 1e3, both
    assert len(enqueue) == 3 and min(enqueue) >= 2 * gpu_ms / 1e3  # both ops' queueing is reported
    assert not bound  # slow to queue is not waiting for the GPU


def test_ops_whose_queueing_waits_for_the_gpu_are_timed_without_the_gate() -> None:
    import torch

    dev = torch.device("cuda")
    gpu_ms = 20.0
    cycles = int(_sleep_rate(dev) * gpu_ms / 1e3)

    def op() -> None:  # like a copy whose pieces overflow the driver's queue: the host waits for its own GPU work
        torch.cuda._sleep(cycles)
        done = torch.cuda.Event()
        done.record()
        done.synchronize()

    enqueue: list[float] = []
    bound: list[bool] = []
    t0 = time.perf_counter()
    times = time_fns([op], dev, iters=3, warmup=1, enqueue=enqueue, queue_bound=bound)
    took = time.perf_counter() - t0
    assert bound == [True]
    # Ungated, each repetition is the op's own GPU time; a gate doubled at each try would have taken seconds.
    assert len(times) == 3 and max(times) < 1.5 * gpu_ms / 1e3, times
    assert min(enqueue) >= 0.9 * gpu_ms / 1e3  # the host was held for the op's time
    assert took < 2.0, took
