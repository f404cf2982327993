"""Pages the host tier keeps out reach the disk tier through staging slots (write-around).

The harness's forward writes a function of each block's key, so a page that
went around the host tier is checked byte for byte when a later request
loads it from disk.
"""

from __future__ import annotations

import numpy as np
import pytest
from harness import Engine, Model

from dynkv.config import DynKVConfig
from dynkv.leader import Leader

MODEL = Model(num_layers=2, num_heads=4, head_size=8, block_size=4, dims="LBNHC")
PAGES = 4  # per prompt


def leader_for(tmp_path, *, tp: int = 1, **cfg) -> Leader:
    d = {"host_pages": 12, "host_admission": "frequency", "disk_gb": 0.01, "disk_paths": [str(tmp_path / "d0")],
         "disk_direct_io": False, "disk_admit_min_hits": 0, "cost_model": False, **cfg}
    return Leader(DynKVConfig.from_dict(d, env={}), MODEL.geometry(), MODEL.fingerprint(), world_size=tp,
                  engine_id=f"around-{tmp_path.name}")


def prompts(rng: np.random.Generator, n: int) -> list[list[int]]:
    return [rng.integers(0, 1000, PAGES * MODEL.block_size).tolist() for _ in range(n)]


def turn(engine: Engine, name: str, batch: list[list[int]]) -> int:
    """Serve every prompt once; the pages loaded from dynkv, each checked against what was stored."""
    loaded = 0
    for i, p in enumerate(batch):
        out = engine.serve(f"{name}-{i}", p)
        assert out.mismatched == [] and out.load_errors == set()
        loaded += out.loaded
    engine.drain()
    return loaded


def assert_released(leader: Leader) -> None:
    s = leader.stats()
    assert s["staging"]["in_use"] == 0 and s["disk"]["pending"] == 0 and s["disk"]["pinned"] == 0
    assert s["disk_writes_in_flight"] == 0 and leader._around_held == 0 and leader._around_copying == 0


@pytest.mark.parametrize("around,tp", [(True, 1), (False, 1), (True, 2)])
def test_pages_the_gated_host_tier_refuses_are_written_to_disk(tmp_path, rng: np.random.Generator,
                                                               around: bool, tp: int) -> None:
    """24 pages a turn, 12 host slots gated: with write-around the disk holds all 24 and the next turn loads
    them all; without it the disk holds only what the host tier held, and the rest is recomputed. TP=2: each
    rank (a process of its own) writes its half of every staging page before the page goes to disk."""
    leader = leader_for(tmp_path, tp=tp, disk_write_around=around)
    engine = Engine(leader, MODEL, tp=tp, num_blocks=96, processes=tp > 1)
    m = leader.metrics
    try:
        batch = prompts(rng, 6)
        assert turn(engine, "first", batch) == 0
        assert m.value("dynkv_admissions_refused_total", tier="host", reason="filter") > 0
        assert_released(leader)
        on_disk = sum(leader.index.holds(k, "disk") for p in batch for k in engine.keys(p))
        staged = m.value("dynkv_pages_moved_total", direction="staging_to_disk")
        if around:
            assert on_disk == 6 * PAGES and staged == 6 * PAGES - leader.stats()["host"]["stored"]
            assert m.value("dynkv_bytes_moved_total", direction="staging_to_disk") == staged * MODEL.geometry().page_bytes
        else:
            assert on_disk == leader.stats()["host"]["stored"] < 6 * PAGES and staged == 0
        # Pages that went around were never host pages: no host event, not in the host tier.
        host_keys = {e.key for e in leader.take_events() if e.kind == "stored" and e.tier == "host"}
        assert len(host_keys) == leader.stats()["host"]["stored"]
        in_host = sum(leader.index.holds(k, "host") for p in batch for k in engine.keys(p))
        loaded = turn(engine, "second", batch)
        assert loaded == (6 * PAGES if around else on_disk)
        from_disk = sum(m.value("dynkv_pages_moved_total", direction=d) for d in ("disk_to_host", "disk_to_staging"))
        assert from_disk == (6 * PAGES - in_host if around else 0)
        assert_released(leader)
    finally:
        engine.close()
        leader.close()


def test_write_around_holds_at_most_half_the_staging_slots(tmp_path, rng: np.random.Generator) -> None:
    """4 staging slots: 2 pages of a store go around, the third is refused (around_staging) and ends the run;
    the slots come back once written, and the next store goes around again."""
    leader = leader_for(tmp_path, host_pages=4, staging_pages=4)
    engine = Engine(leader, MODEL, tp=1, num_blocks=96, processes=False)
    m = leader.metrics
    try:
        batch = prompts(rng, 3)
        engine.serve("fill", batch[0])  # the host tier's 4 pages
        engine.drain()
        keys = engine.keys(batch[1])
        assert leader.store("r1", keys, list(range(PAGES))) == 2
        assert leader._around_held == 2 and leader.staging.in_use == 2
        assert m.value("dynkv_admissions_refused_total", tier="disk", reason="around_staging") == 1
        assert not any(leader.index.holds(k, "host") for k in keys)
        assert [leader.index.holds(k, "disk") for k in keys] == [True, True, False, False]
        engine.step(writes=list(zip(range(PAGES), keys)))
        leader.request_finished("r1")
        engine.drain()
        assert_released(leader)
        assert m.value("dynkv_pages_moved_total", direction="staging_to_disk") == 2
        assert sum(leader.index.location(k, "disk") is not None for k in keys) == 2
        out = engine.serve("again", batch[1])  # its first two pages from disk, checked byte for byte
        assert out.loaded == 2 and out.mismatched == [] and out.load_errors == set()
        engine.drain()
        assert_released(leader)
    finally:
        engine.close()
        leader.close()


def test_write_around_keeps_the_disk_admission_filter(tmp_path, rng: np.random.Generator) -> None:
    """disk_admit_min_hits=2: a page seen once does not go around (around_filter); seen twice, it does."""
    leader = leader_for(tmp_path, host_pages=4, disk_admit_min_hits=2)
    engine = Engine(leader, MODEL, tp=1, num_blocks=96, processes=False)
    m = leader.metrics
    try:
        batch = prompts(rng, 2)
        turn(engine, "fill", batch[:1])
        turn(engine, "once", batch[1:])
        assert m.value("dynkv_admissions_refused_total", tier="disk", reason="around_filter") >= 1
        assert m.value("dynkv_pages_moved_total", direction="staging_to_disk") == 0
        turn(engine, "twice", batch[1:])
        assert m.value("dynkv_pages_moved_total", direction="staging_to_disk") == PAGES
        assert turn(engine, "thrice", batch[1:]) == PAGES
        assert_released(leader)
    finally:
        engine.close()
        leader.close()


def test_a_failed_store_gives_back_its_write_around_slots(tmp_path, rng: np.random.Generator) -> None:
    """The workers fail the store: the staging slots are free again and the pending disk pages are gone."""
    leader = leader_for(tmp_path, host_pages=4)
    engine = Engine(leader, MODEL, tp=1, num_blocks=96, processes=False)
    try:
        batch = prompts(rng, 2)
        turn(engine, "fill", batch[:1])
        keys = engine.keys(batch[1])
        assert leader.store("r1", keys, list(range(PAGES))) == PAGES
        assert all(leader.index.holds(k, "disk") for k in keys)
        leader.build_plan()
        assert leader.fail_inflight() == set()  # a store: no block to recompute
        assert not any(leader.index.holds(k, "disk") for k in keys)
        assert_released(leader)
        assert leader.metrics.value("dynkv_pages_moved_total", direction="staging_to_disk") == 0
        assert leader.metrics.value("dynkv_store_errors_total", tier="disk") == PAGES
    finally:
        engine.close()
        leader.close()
