"""The leader's disk tier end to end: write-through, promotion, restart across TP sizes, and faults.

Every fault ends in a load error (the block is recomputed) or a refused
admission, with every other block byte-identical to what was stored.
"""

from __future__ import annotations

import concurrent.futures
import errno
import logging
import os

import numpy as np
import pytest
from harness import Engine, Model

from dynkv.config import DynKVConfig
from dynkv.tiers.disk import DiskTier
from dynkv.leader import Leader, tier_flow

MODEL = Model(num_layers=2, num_heads=4, head_size=8, block_size=4, dims="LBNHC")


def leader_for(tmp_path, *, tp: int = 1, host_pages: int = 8, **cfg) -> Leader:
    d = {"host_pages": host_pages, "disk_gb": 0.01, "disk_paths": [str(tmp_path / "d0"), str(tmp_path / "d1")],
         "disk_direct_io": False, "disk_admit_min_hits": 0, **cfg}
    return Leader(DynKVConfig.from_dict(d, env={}), MODEL.geometry(), MODEL.fingerprint(), world_size=tp,
                  engine_id=f"disk-{tmp_path.name}-{tp}")


def prompts_for(rng: np.random.Generator, n: int = 4) -> list[list[int]]:
    return [rng.integers(0, 1000, 5 * MODEL.block_size).tolist() for _ in range(n)]


def fill(engine: Engine, prompts: list[list[int]]) -> None:
    for i, p in enumerate(prompts):
        out = engine.serve(f"fill{i}", p)
        assert out.mismatched == []
        engine.drain()  # let the write-through finish before the next request needs host slots


def test_host_evictions_are_served_from_disk(tmp_path, rng: np.random.Generator) -> None:
    leader = leader_for(tmp_path, host_pages=6)
    engine = Engine(leader, MODEL, tp=1, processes=False)
    try:
        prompts = prompts_for(rng)
        fill(engine, prompts)  # 20 pages through a 6-page host tier, all written through to disk
        assert leader.stats()["disk"]["stored"] == 20
        out = engine.serve("again", prompts[0])
        assert out.loaded == 5 and out.mismatched == [] and not out.load_errors
        assert leader.metrics.value("dynkv_hits_total", tier="disk") >= 1
        assert leader.metrics.value("dynkv_pages_moved_total", direction="disk_to_host") >= 1
        engine.drain()
        s = leader.stats()
        assert s["host"]["pinned"] == 0 and s["disk"]["pinned"] == 0 and s["host"]["pending"] == 0
    finally:
        engine.close()
        leader.close()


def test_frequency_filter_spares_the_disk(tmp_path, rng: np.random.Generator) -> None:
    leader = leader_for(tmp_path, host_pages=32, disk_admit_min_hits=2)
    engine = Engine(leader, MODEL, tp=1, processes=False)
    try:
        p = prompts_for(rng, 1)[0]
        fill(engine, [p])
        assert leader.stats()["disk"]["stored"] == 0, "seen once: not on disk"
        engine.serve("hit", p)
        engine.drain()
        assert leader.stats()["disk"]["stored"] == 5, "seen twice: written through"
        assert leader.metrics.value("dynkv_admissions_refused_total", tier="disk", reason="filter") == 5
    finally:
        engine.close()
        leader.close()


def test_restart_serves_pages_stored_at_another_tp(tmp_path, rng: np.random.Generator) -> None:
    """Pages stored by a TP=4 engine are found by a new leader and load exactly at TP=2 and TP=1."""
    prompts = prompts_for(rng, 3)
    leader = leader_for(tmp_path, tp=4, host_pages=32)
    engine = Engine(leader, MODEL, tp=4, processes=True)
    try:
        fill(engine, prompts)
    finally:
        engine.close()
        leader.close()
    for tp, processes in ((2, True), (1, False)):
        leader = leader_for(tmp_path, tp=tp, host_pages=32)
        assert leader.stats()["disk"]["stored"] == 15
        engine = Engine(leader, MODEL, tp=tp, processes=processes)
        try:
            for i, p in enumerate(prompts):
                out = engine.serve(f"tp{tp}-{i}", p)
                assert out.loaded == 5 and out.mismatched == [] and not out.load_errors
            engine.drain()
            assert leader.metrics.value("dynkv_hits_total", tier="disk") == 15
        finally:
            engine.close()
            leader.close()


def _corrupt(leader: Leader, key: bytes, offset_in_record: int, data: bytes) -> None:
    slot = leader.index.location(key, "disk")
    path, off = leader.disk.location(slot)
    with open(path, "r+b") as f:
        f.seek(off + offset_in_record)
        f.write(data)


@pytest.mark.parametrize("where", ["payload", "header"])
def test_corrupted_page_is_a_load_error(tmp_path, rng: np.random.Generator, where: str) -> None:
    prompts = prompts_for(rng, 1)
    leader = leader_for(tmp_path, host_pages=32)
    engine = Engine(leader, MODEL, tp=1, processes=False)
    try:
        fill(engine, prompts)
        keys = engine.keys(prompts[0])
        # Flip bytes of the third page on disk, then restart so the host tier is cold.
        _corrupt(leader, keys[2], 4096 + 100 if where == "payload" else 40, b"\x5a\xa5\x5a")
    finally:
        engine.close()
        leader.close()
    leader = leader_for(tmp_path, host_pages=32)
    engine = Engine(leader, MODEL, tp=1, processes=False)
    try:
        out = engine.serve("after", prompts[0])
        if where == "header" and out.loaded == 2:
            pass  # recovery already dropped the page: a shorter hit, nothing wrong served
        else:
            assert out.loaded == 5
            assert out.load_errors == {out.blocks[2]}, "the corrupted page's block is recomputed"
            assert leader.metrics.value("dynkv_load_errors_total", reason="disk") == 1
        assert out.mismatched == [], "every block that was not reported holds exactly the stored bytes"
        engine.drain()
    finally:
        engine.close()
        leader.close()
    # After a restart the bad page is not found again. With a bad header, recovery dropped it before
    # the first load, so that request recomputed and stored it anew; with a bad payload the record
    # was invalidated when its read failed, and the hit ends before it.
    leader = leader_for(tmp_path, host_pages=32)
    engine = Engine(leader, MODEL, tp=1, processes=False)
    try:
        out = engine.serve("later", prompts[0])
        assert out.loaded == (5 if where == "header" else 2)
        assert not out.load_errors and out.mismatched == []
    finally:
        engine.close()
        leader.close()


def test_deleted_disk_file_means_recompute(tmp_path, rng: np.random.Generator) -> None:
    prompts = prompts_for(rng, 2)
    leader = leader_for(tmp_path, host_pages=5)
    engine = Engine(leader, MODEL, tp=1, processes=False)
    try:
        fill(engine, prompts)  # the second prompt pushes the first out of the host tier
        for path in leader.disk.files:
            os.truncate(path, 0)
        out = engine.serve("after", prompts[0])
        assert out.mismatched == []
        assert out.load_errors, "pages that could not be read are reported"
        engine.drain()
        assert leader.idle()
    finally:
        engine.close()
        leader.close()


def test_failed_reads_of_a_deleted_disk_file_log_one_line_a_minute(tmp_path, rng: np.random.Generator, caplog,
                                                                  monkeypatch) -> None:
    """Every page of a deleted file fails its read once (and is dropped): one line, then one a minute with a count."""
    clock = [1000.0]
    monkeypatch.setattr(tier_flow, "_now", lambda: clock[0])
    prompts = prompts_for(rng, 6)
    leader = leader_for(tmp_path, host_pages=6)
    engine = Engine(leader, MODEL, tp=1, processes=False)

    def read_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if "failed to load" in r.getMessage()
                or "reads failed" in r.getMessage()]

    def serve(tag: str, ps: list[list[int]]) -> None:
        for i, p in enumerate(ps):
            out = engine.serve(f"{tag}{i}", p)
            assert out.mismatched == []
            engine.drain()

    try:
        fill(engine, prompts)  # 30 pages through a 6-page host tier: most are on disk only
        for path in leader.disk.files:
            os.unlink(path)
        with caplog.at_level(logging.WARNING, logger="dynkv.leader"):
            serve("a", prompts[:3])
            failed = leader.metrics.value("dynkv_load_errors_total", reason="disk")
            assert failed >= 5, "the prompts' disk pages were read and failed"
            lines = read_lines()
            assert len(lines) == 1 and "failed to load" in lines[0] and "deleted while in use" in lines[0], lines
            clock[0] += tier_flow.READ_LOG_EVERY_S - 1
            serve("b", prompts[3:5])
            assert len(read_lines()) == 1
            before = leader.metrics.value("dynkv_load_errors_total", reason="disk")
            assert before > failed
            clock[0] += 1
            serve("c", prompts[5:])
            lines = read_lines()
            # The first failure a minute after the first line: it and every one since that line, counted.
            assert len(lines) == 2 and lines[1].startswith(f"{int(before)} disk page reads failed in the last "
                                                           f"{tier_flow.READ_LOG_EVERY_S:.0f} s"), lines
    finally:
        engine.close()
        leader.close()


def test_disk_full_refuses_admission(tmp_path, rng: np.random.Generator, monkeypatch) -> None:
    def enospc(self, slot, key, src):
        f: concurrent.futures.Future[None] = concurrent.futures.Future()
        f.set_exception(OSError(errno.ENOSPC, "No space left on device"))
        return f

    monkeypatch.setattr(DiskTier, "write", enospc)
    leader = leader_for(tmp_path, host_pages=32)
    engine = Engine(leader, MODEL, tp=1, processes=False)
    try:
        p = prompts_for(rng, 1)[0]
        fill(engine, [p])
        assert leader.stats()["disk"]["stored"] == 0
        assert leader.metrics.value("dynkv_store_errors_total", tier="disk") == 5
        out = engine.serve("again", p)  # the host copies are intact
        assert out.loaded == 5 and out.mismatched == []
        assert leader.stats()["host"]["pinned"] == 0 or not leader.idle()
    finally:
        engine.close()
        leader.close()


def test_unwritable_disk_path_fails_at_start(tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises((OSError, ValueError), match="file"):
        leader_for(tmp_path, disk_paths=[str(blocker / "sub")])


def test_reset_clears_every_tier(tmp_path, rng: np.random.Generator) -> None:
    leader = leader_for(tmp_path, host_pages=32)
    engine = Engine(leader, MODEL, tp=1, processes=False)
    try:
        p = prompts_for(rng, 1)[0]
        fill(engine, [p])
        assert leader.reset() == 10
        assert leader.lookup("x", engine.keys(p)) == 0
        leader.request_finished("x")
    finally:
        engine.close()
        leader.close()
    leader = leader_for(tmp_path, host_pages=32)
    try:
        assert leader.stats()["disk"]["stored"] == 0, "a reset disk tier stays empty after a restart"
    finally:
        leader.close()


def test_request_aborted_while_promoting_still_reports_its_load(tmp_path, rng: np.random.Generator) -> None:
    """vLLM waits for finished_recving before freeing an aborted request's blocks: it must come."""
    prompts = prompts_for(rng, 1)
    leader = leader_for(tmp_path, host_pages=32)
    engine = Engine(leader, MODEL, tp=1, processes=False)
    try:
        fill(engine, prompts)
    finally:
        engine.close()
        leader.close()
    leader = leader_for(tmp_path, host_pages=32)  # cold host tier: the hit is on disk
    engine = Engine(leader, MODEL, tp=1, processes=False)
    try:
        keys = engine.keys(prompts[0])
        blocks = [engine.free_blocks.pop() for _ in keys]
        held: list[tuple[concurrent.futures.Future[None], concurrent.futures.Future[None]]] = []
        real_read = leader.disk.read

        def slow_read(*args, **kw):  # the reads finish only after the abort
            outer: concurrent.futures.Future[None] = concurrent.futures.Future()
            held.append((real_read(*args, **kw), outer))
            return outer

        leader.disk.read = slow_read
        assert leader.lookup("gone", keys) == 5
        leader.begin_load("gone", blocks)
        assert leader.request_finished("gone") is False  # aborted while its pages come off disk
        for inner, outer in held:
            inner.result()
            outer.set_result(None)
        engine.step_until(lambda: engine.recving.get("gone", 0) == 1, "the aborted load is not reported")
        engine.drain()
        s = leader.stats()
        assert s["host"]["pinned"] == 0 and s["disk"]["pinned"] == 0 and s["requests"] == 0
    finally:
        engine.close()
        leader.close()


@pytest.mark.parametrize("host_pages,bound", [(64, 16), (160, 40)])
def test_disk_writes_in_flight_are_bounded(tmp_path, rng: np.random.Generator, host_pages: int, bound: int) -> None:
    """16 writes per I/O thread, or a quarter of the host tier: past that, write-through is skipped and counted."""
    leader = leader_for(tmp_path, host_pages=host_pages, io_threads=1, disk_gb=0.05)
    engine = Engine(leader, MODEL, tp=1, num_blocks=64, processes=False)
    held: list[tuple[concurrent.futures.Future[None], concurrent.futures.Future[None]]] = []
    write = leader.disk.write

    def slow_write(slot: int, key: bytes, src: memoryview) -> concurrent.futures.Future[None]:
        f: concurrent.futures.Future[None] = concurrent.futures.Future()  # reported done only once released
        held.append((write(slot, key, src), f))
        return f

    leader.disk.write = slow_write
    try:
        tokens = rng.integers(0, 1000, 48 * MODEL.block_size).tolist()
        engine.serve("big", tokens, finish=False)
        engine.step_until(lambda: leader.stats()["host"]["stored"] == 48, "stores of big not committed")
        assert leader.stats()["disk_writes_in_flight"] == bound
        assert leader.metrics.value("dynkv_admissions_refused_total", tier="disk", reason="busy") == 48 - bound
        for real, f in held:
            real.result()
            f.set_result(None)
        engine.drain()
        assert leader.stats()["disk_writes_in_flight"] == 0 and leader.stats()["disk"]["stored"] == bound
    finally:
        engine.close()
        leader.close()
