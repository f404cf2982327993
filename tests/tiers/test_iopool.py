"""The disk tier's I/O pool (dynkv.tiers.iopool): reads ahead of queued writes, write bytes counted, cancel,
resize, shutdown. Orders are made deterministic by holding the threads at a gate; nothing is timed."""

from __future__ import annotations

import threading

import pytest

from dynkv.tiers.iopool import IOPool

TIMEOUT = 30


def held(pool: IOPool, n: int) -> threading.Event:
    """Occupy ``n`` threads of ``pool`` until the returned gate is set."""
    gate, entered = threading.Event(), threading.Semaphore(0)

    def hold() -> None:
        entered.release()
        assert gate.wait(TIMEOUT)

    for _ in range(n):
        pool.submit(hold)
    for _ in range(n):
        assert entered.acquire(timeout=TIMEOUT)
    return gate


def test_reads_overtake_queued_writes_and_keep_their_order() -> None:
    pool = IOPool(1)
    order: list[str] = []
    try:
        gate = held(pool, 1)
        writes = [pool.submit_write(100, order.append, f"w{i}") for i in range(3)]
        reads = [pool.submit(order.append, f"r{i}") for i in range(3)]
        assert pool.write_bytes_queued == 300 and pool.write_bytes_running == 0
        gate.set()
        for f in writes + reads:
            f.result(TIMEOUT)
        assert order == ["r0", "r1", "r2", "w0", "w1", "w2"]
        assert pool.write_bytes_queued == 0 and pool.write_bytes_running == 0
    finally:
        pool.shutdown()


def test_a_running_write_is_counted_and_a_read_waits_only_behind_it() -> None:
    pool = IOPool(1)
    order: list[str] = []
    gate, entered = threading.Event(), threading.Event()

    def write() -> None:
        entered.set()
        assert gate.wait(TIMEOUT)
        order.append("w0")

    try:
        running = pool.submit_write(4096, write)
        assert entered.wait(TIMEOUT)
        queued = pool.submit_write(512, order.append, "w1")
        read = pool.submit(order.append, "r0")
        assert (pool.write_bytes_running, pool.write_bytes_queued) == (4096, 512)
        gate.set()
        for f in (running, queued, read):
            f.result(TIMEOUT)
        assert order == ["w0", "r0", "w1"]
        assert (pool.write_bytes_running, pool.write_bytes_queued) == (0, 0)
    finally:
        gate.set()
        pool.shutdown()


def test_results_errors_and_cancel_while_queued() -> None:
    pool = IOPool(2)
    ran: list[int] = []
    try:
        assert pool.submit(lambda a, b: a + b, 2, 3).result(TIMEOUT) == 5
        with pytest.raises(ZeroDivisionError):
            pool.submit_write(8, lambda: 1 // 0).result(TIMEOUT)
        assert pool.write_bytes_running == 0, "a failed write is no longer running"
        gate = held(pool, 2)
        w = pool.submit_write(64, ran.append, 1)
        r = pool.submit(ran.append, 2)
        assert w.cancel() and r.cancel()
        gate.set()
        pool.submit(lambda: None).result(TIMEOUT)
        pool.submit_write(1, lambda: None).result(TIMEOUT)
        assert ran == [] and pool.write_bytes_queued == 0, "cancelled work never runs, its bytes leave the queue"
    finally:
        pool.shutdown()


def test_resize_and_shutdown_finish_queued_work() -> None:
    pool = IOPool(1)
    assert pool.size == 1
    gate = held(pool, 1)
    pool.resize(3)
    assert pool.size == 3
    second = held(pool, 2)  # two more threads run beside the held one
    pool.resize(1)
    done: list[int] = []
    futs = [pool.submit_write(1, done.append, i) for i in range(5)]
    gate.set()
    second.set()
    pool.shutdown(wait=True)
    assert all(f.done() for f in futs) and done == list(range(5)), "shutdown runs what was queued"
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(lambda: None)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="expected an integer >= 1"):
            IOPool(bad)  # type: ignore[arg-type]
