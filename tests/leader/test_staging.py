"""Disk hits that get no host slot load through staging slots, which are all free again afterwards.

The harness's forward writes a function of each block's key, so a block
loaded through a staging slot is checked byte for byte against what was
stored; with staging exhausted (or off) the rest recompute as before.
"""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest
from harness import Engine, Model

from dynkv.config import DynKVConfig
from dynkv.keys import block_keys
from dynkv.leader import Leader
from dynkv.leader.staging import MAX_STAGING_PAGES, MIN_STAGING_PAGES, StagingSlots, staging_pages_for
from dynkv.layout import PAGE_ALIGN, page_stride

MODEL = Model(num_layers=2, num_heads=4, head_size=8, block_size=4, dims="LBNHC")
BLOCKS = 5


def leader_for(tmp_path, *, host_pages: int, **cfg) -> Leader:
    d = {"host_pages": host_pages, "disk_gb": 0.01, "disk_paths": [str(tmp_path / "d0")], "disk_direct_io": False,
         "disk_admit_min_hits": 0, **cfg}
    return Leader(DynKVConfig.from_dict(d, env={}), MODEL.geometry(), MODEL.fingerprint(),
                  engine_id=f"staging-{tmp_path.name}")


def on_disk(tmp_path, rng: np.random.Generator, n: int) -> list[list[int]]:
    """``n`` prompts of BLOCKS blocks, stored by an engine that then stops: a new leader finds them on disk only."""
    prompts = [rng.integers(0, 1000, BLOCKS * MODEL.block_size).tolist() for _ in range(n)]
    leader = leader_for(tmp_path, host_pages=32)
    engine = Engine(leader, MODEL, tp=1, processes=False)
    try:
        for i, p in enumerate(prompts):
            assert engine.serve(f"fill{i}", p).mismatched == []
            engine.drain()
        assert leader.stats()["disk"]["stored"] == n * BLOCKS
    finally:
        engine.close()
        leader.close()
    return prompts


def assert_all_released(leader: Leader) -> None:
    s = leader.stats()
    assert s["staging"]["in_use"] == 0
    assert s["host"]["pinned"] == 0 and s["host"]["pending"] == 0 and s["disk"]["pinned"] == 0
    assert s["requests"] == 0
    leader.build_plan()  # the gauge follows at each step's plan
    assert leader.metrics.value("dynkv_staging_pages", state="in_use") == 0


@pytest.mark.parametrize("staging_pages,staged,recomputed", [(None, 3, 0), (1, 1, 2), (0, 0, 3)])
def test_a_prompt_longer_than_the_host_tier_loads_through_staging(tmp_path, rng: np.random.Generator,
                                                                  staging_pages: int | None, staged: int,
                                                                  recomputed: int) -> None:
    """Host tier of 2 pages, a 5-page disk hit: 2 pages through the host tier, the rest through staging while it
    lasts, then recomputed (host_full) as without staging."""
    prompt = on_disk(tmp_path, rng, 1)[0]
    leader = leader_for(tmp_path, host_pages=2, staging_pages=staging_pages)
    engine = Engine(leader, MODEL, tp=1, processes=False)
    m = leader.metrics
    try:
        out = engine.serve("long", prompt)
        assert out.loaded == BLOCKS and out.mismatched == []
        assert len(out.load_errors) == recomputed
        assert m.value("dynkv_load_errors_total", reason="host_full") == recomputed
        assert m.value("dynkv_pages_moved_total", direction="disk_to_host") == 2
        assert m.value("dynkv_pages_moved_total", direction="disk_to_staging") == staged
        assert m.value("dynkv_pages_moved_total", direction="h2d") == BLOCKS - recomputed
        engine.drain()
        assert_all_released(leader)
        # Staged pages were never host pages: the index holds the two host pages only, and they alone were events.
        keys = engine.keys(prompt)
        assert sum(leader.index.holds(k, "host") for k in keys) == 2
        stored = {e.key for e in leader.take_events() if e.kind == "stored" and e.tier == "host"}
        assert len(stored) == 2 and stored <= set(keys)
        again = engine.serve("again", prompt)  # nothing of the first load is left behind to confuse a second
        assert again.mismatched == [] and len(again.load_errors) == recomputed
        engine.drain()
        assert_all_released(leader)
    finally:
        engine.close()
        leader.close()


def test_a_fully_pinned_host_tier_loads_disk_hits_through_staging(tmp_path, rng: np.random.Generator) -> None:
    """Every host page pinned by another request's match: the whole disk hit goes through staging."""
    prompts = on_disk(tmp_path, rng, 2)
    leader = leader_for(tmp_path, host_pages=BLOCKS)
    engine = Engine(leader, MODEL, tp=1, processes=False)
    try:
        assert engine.serve("first", prompts[0]).mismatched == []
        engine.drain()
        assert leader.stats()["host"]["stored"] == BLOCKS
        assert leader.lookup("holder", engine.keys(prompts[0])) == BLOCKS  # pins every host page
        out = engine.serve("second", prompts[1])
        assert out.loaded == BLOCKS and out.mismatched == [] and not out.load_errors
        assert leader.metrics.value("dynkv_pages_moved_total", direction="disk_to_staging") == BLOCKS
        assert leader.metrics.value("dynkv_load_errors_total", reason="host_full") == 0
        leader.request_finished("holder")
        engine.drain()
        assert_all_released(leader)
    finally:
        engine.close()
        leader.close()


def test_a_corrupt_page_read_into_staging_is_recomputed(tmp_path, rng: np.random.Generator) -> None:
    prompt = on_disk(tmp_path, rng, 1)[0]
    leader = leader_for(tmp_path, host_pages=2)
    keys = block_keys(MODEL.fingerprint(), np.asarray(prompt, dtype=np.int64))
    path, off = leader.disk.location(leader.index.location(keys[3], "disk"))  # the fourth page: staged
    leader.close()
    with open(path, "r+b") as f:
        f.seek(off + PAGE_ALIGN + 100)  # into the payload: found at recovery, fails its checksum when read
        f.write(b"\x5a\xa5\x5a")
    leader = leader_for(tmp_path, host_pages=2)
    engine = Engine(leader, MODEL, tp=1, processes=False)
    try:
        out = engine.serve("after", prompt)
        assert out.loaded == BLOCKS and out.load_errors == {out.blocks[3]} and out.mismatched == []
        assert leader.metrics.value("dynkv_load_errors_total", reason="disk") == 1
        assert leader.metrics.value("dynkv_pages_moved_total", direction="disk_to_staging") == 2
        engine.drain()
        assert_all_released(leader)
        assert not leader.index.holds(keys[3], "disk")
    finally:
        engine.close()
        leader.close()


def test_staging_slots_come_back_after_an_aborted_load(tmp_path, rng: np.random.Generator) -> None:
    """A request aborted while its pages come off disk: reads not started are cancelled, reads running land and
    are dropped; either way every staging slot is free afterwards, and the aborted load is still reported."""
    prompt = on_disk(tmp_path, rng, 1)[0]
    leader = leader_for(tmp_path, host_pages=2)
    engine = Engine(leader, MODEL, tp=1, processes=False)
    real = leader.disk.read_many
    held: list[tuple[concurrent.futures.Future[None], concurrent.futures.Future[None]]] = []

    def read_many(reads, **kw):  # even reads have started (cannot be cancelled), odd ones wait for a thread
        inner = real(reads, **kw)
        for j, f in enumerate(inner):
            outer: concurrent.futures.Future[None] = concurrent.futures.Future()
            if j % 2 == 0:
                assert outer.set_running_or_notify_cancel()
            held.append((f, outer))
        return [o for _, o in held]

    leader.disk.read_many = read_many
    m = leader.metrics
    try:
        keys = engine.keys(prompt)
        blocks = [engine.free_blocks.pop() for _ in keys]
        assert leader.lookup("gone", keys) == BLOCKS
        leader.begin_load("gone", blocks)
        assert leader.stats()["staging"]["in_use"] == 3
        for inner, _ in held:
            inner.result(30)  # every read is done before a staging slot can be freed
        assert leader.request_finished("gone") is False
        for _, outer in held:
            if not outer.cancelled():
                outer.set_result(None)
        engine.step_until(lambda: engine.recving.get("gone", 0) == 1, "the aborted load is not reported")
        engine.drain()
        engine.free_blocks.extend(blocks)
        assert m.value("dynkv_disk_reads_given_up_total", state="cancelled") == 2  # reads 1 and 3
        assert m.value("dynkv_disk_reads_given_up_total", state="landed") == 3  # reads 0, 2 and 4
        assert m.value("dynkv_pages_moved_total", direction="disk_to_staging") == 2  # 2 and 4
        assert_all_released(leader)
        leader.disk.read_many = real
        out = engine.serve("after", prompt)
        assert out.loaded == BLOCKS and out.mismatched == [] and not out.load_errors
        engine.drain()
        assert_all_released(leader)
    finally:
        leader.disk.read_many = real
        engine.close()
        leader.close()


def test_staging_slots_come_back_when_the_workers_fail_the_load(tmp_path, rng: np.random.Generator) -> None:
    prompt = on_disk(tmp_path, rng, 1)[0]
    leader = leader_for(tmp_path, host_pages=2)
    try:
        keys = block_keys(MODEL.fingerprint(), np.asarray(prompt, dtype=np.int64))
        assert leader.lookup("r", keys) == BLOCKS
        leader.begin_load("r", list(range(BLOCKS)))
        loads = []
        while not loads:
            leader.wait_disk(1.0)
            loads = leader.build_plan().loads
        assert loads[0].failed == () and len(loads[0].slots) == BLOCKS
        assert sorted(loads[0].slots)[2:] == [2, 3, 4]  # staging slots follow the host tier's
        assert leader.stats()["staging"]["in_use"] == 3
        assert leader.fail_inflight() == set(range(BLOCKS))
        leader.request_finished("r")
        assert_all_released(leader)
    finally:
        leader.close()


def test_the_pool_grows_by_the_staging_pages(tmp_path) -> None:
    stride = page_stride(MODEL.geometry())
    for staging_pages, want in ((None, MIN_STAGING_PAGES), (3, 3), (0, 0)):
        leader = leader_for(tmp_path, host_pages=16, staging_pages=staging_pages)
        try:
            assert leader.pool.nbytes == (16 + want) * stride
            assert leader.num_host_pages == 16 and leader.stats()["host"]["capacity"] == 16
            assert leader.metrics.value("dynkv_staging_pages", state="capacity") == want
            assert f"and {want} staging pages" in leader.describe()
        finally:
            leader.close()
    cfg = DynKVConfig.from_dict({"host_pages": 16 * 100}, env={})
    assert staging_pages_for(cfg, 1600) == 100
    assert staging_pages_for(cfg, 1 << 20) == MAX_STAGING_PAGES


def test_staging_pages_config() -> None:
    assert DynKVConfig.from_dict(None, env={}).staging_pages is None
    assert DynKVConfig.from_dict(None, env={"DYNKV_STAGING_PAGES": "12"}).staging_pages == 12
    assert DynKVConfig.from_dict({"staging_pages": 0}, env={}).staging_pages == 0
    for bad in (-1, "many", 1.5):
        with pytest.raises(ValueError, match="staging_pages"):
            DynKVConfig.from_dict({"staging_pages": bad}, env={})
    with pytest.raises(ValueError, match="DYNKV_STAGING_PAGES"):
        DynKVConfig.from_dict(None, env={"DYNKV_STAGING_PAGES": "-3"})


def test_the_allocator_hands_out_each_slot_once() -> None:
    s = StagingSlots(10, 3)
    got = [s.take() for _ in range(4)]
    assert got == [10, 11, 12, None] and s.in_use == 3
    assert s.owns(10) and s.owns(12) and not s.owns(9) and not s.owns(13)
    s.free([11])
    assert s.take() == 11
    s.free([10, 11, 12])
    assert s.in_use == 0
    with pytest.raises(ValueError, match="staging slot 10 freed but not taken"):
        s.free([10])
    with pytest.raises(ValueError, match="freed but not taken"):
        s.free([9])
    assert StagingSlots(5, 0).take() is None
