"""The leader's reaction to a disk that stops taking writes (a full file system): few log lines, writes
stopped after failures in a row, and back on once a trial write succeeds."""

from __future__ import annotations

import errno
import logging
from concurrent.futures import Future

from harness import Model, make_leader

from dynkv.keys import block_keys
from dynkv.leader.tier_flow import PROBE_EVERY, WRITE_FAILURES_TO_STOP
from dynkv.protocol import WorkerReport


def store_pages(leader, model: Model, start: int, n: int) -> None:
    """Store ``n`` new pages (each its own prefix), 16 a step, and let their write-through complete."""
    for first in range(start, start + n, 16):
        for i in range(first, min(first + 16, start + n)):
            keys = block_keys(model.fingerprint(), [i] * model.block_size, model.block_size)
            assert leader.store(f"r{i}", keys, [i % 32]) == 1
        plan = leader.build_plan()
        leader.update(WorkerReport(done={op.job: 1 for op in plan.stores}))
        while not leader.idle():
            leader.build_plan()


def test_a_full_disk_stops_write_through_with_one_line_and_it_resumes(tmp_path, caplog) -> None:
    model = Model()
    leader = make_leader(model, host_pages=64, disk_gb=0.01, disk_paths=[str(tmp_path)], disk_admit_min_hits=0)
    real_write = leader.disk.write
    full = True

    def write(slot, key, data):
        if not full:
            return real_write(slot, key, data)
        f: Future[None] = Future()
        f.set_exception(OSError(errno.ENOSPC, "No space left on device"))
        return f

    leader.disk.write = write
    m = leader.metrics
    try:
        with caplog.at_level(logging.WARNING, logger="dynkv.leader"):
            store_pages(leader, model, 0, WRITE_FAILURES_TO_STOP + 2)
            assert m.value("dynkv_store_errors_total", tier="disk") == WRITE_FAILURES_TO_STOP + 2
            assert m.value("dynkv_tier_writes_on", tier="disk") == 0
            lines = [r.getMessage() for r in caplog.records]
            assert len(lines) == 2, lines
            assert "further failures in a row are not logged" in lines[0]
            assert "writes in a row failed, the last with [Errno 28] No space left on device; write-through " \
                   "stops" in lines[1]
            caplog.clear()
            store_pages(leader, model, 100, 2 * PROBE_EVERY)  # stopped: one page in PROBE_EVERY is tried
            assert m.value("dynkv_store_errors_total", tier="disk") == WRITE_FAILURES_TO_STOP + 2 + 2
            assert m.value("dynkv_admissions_refused_total", tier="disk", reason="off") == 2 * PROBE_EVERY - 2
            assert caplog.records == []
            full = False  # space again
            store_pages(leader, model, 1000, PROBE_EVERY)
            assert m.value("dynkv_tier_writes_on", tier="disk") == 1
            assert [r.getMessage() for r in caplog.records] == [
                f"disk tier: writes succeed again after {WRITE_FAILURES_TO_STOP + 4} failed in a row; "
                "write-through is back on"]
            on_disk = leader.stats()["disk"]["stored"]
            store_pages(leader, model, 2000, 5)
            assert leader.stats()["disk"]["stored"] == on_disk + 5  # every page written again
    finally:
        leader.disk.write = real_write
        leader.close()


def test_write_through_past_the_backlog_bound_is_skipped_and_counted(tmp_path) -> None:
    """The one I/O thread held busy: write-through queues up to the bound (2.5 pages: 3 writes), the rest is
    skipped and counted; the skipped pages stay in the host tier, and the queued ones land once the disk frees."""
    import threading

    model = Model()
    page = model.geometry().page_bytes
    leader = make_leader(model, host_pages=64, disk_gb=0.01, disk_paths=[str(tmp_path)], disk_admit_min_hits=0,
                         io_threads=1, disk_write_backlog_gb=2.5 * page / (1 << 30))
    gate, entered = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        gate.wait(30)

    m = leader.metrics
    try:
        leader.disk._pool.submit(hold)
        assert entered.wait(30)
        keys = [block_keys(model.fingerprint(), [i] * model.block_size, model.block_size)[0] for i in range(8)]
        for i, key in enumerate(keys):
            assert leader.store(f"r{i}", [key], [i]) == 1
        plan = leader.build_plan()
        leader.update(WorkerReport(done={op.job: 1 for op in plan.stores}))
        assert leader.stats()["disk_writes_in_flight"] == 3
        assert m.value("dynkv_disk_writes_skipped_total", what="pages") == 5
        assert m.value("dynkv_disk_writes_skipped_total", what="bytes") == 5 * page
        assert m.value("dynkv_admissions_refused_total", tier="disk", reason="backlog") == 5
        assert m.value("dynkv_admissions_refused_total", tier="disk", reason="busy") == 0
        assert leader.disk.write_bytes_queued == 3 * page, "queued behind the held thread"
        gate.set()
        while not leader.idle():
            leader.build_plan()
        assert [leader.index.holds(k, "disk") for k in keys] == [True] * 3 + [False] * 5
        assert all(leader.index.holds(k, "host") and leader.index.pins(k, "host") == 0 for k in keys)
        assert leader.lookup("again", keys) == 8, "a skipped write loses nothing: the pages are on the host"
        leader.request_finished("again")
    finally:
        gate.set()
        leader.close()
