"""The KVBM end to end without vLLM: leader, workers (in-process and as TP processes), host tier.

Every loaded block is compared byte for byte against the bytes stored under
its key; hits are counted per tier.
"""

from __future__ import annotations

import numpy as np
import pytest
from harness import Engine, Model, conversation_stream, make_leader, serve_stream
from kvbm_checks import check_one_steps_stores

from dynkv.leader import Leader


def test_second_request_loads_the_shared_prefix(rng: np.random.Generator) -> None:
    model = Model()
    leader = make_leader(model)
    engine = Engine(leader, model, tp=1, processes=False)
    try:
        prefix = rng.integers(0, 1000, 4 * model.block_size).tolist()
        first = engine.serve("a", prefix + [1] * model.block_size)
        assert first.loaded == 0 and not first.mismatched
        second = engine.serve("b", prefix + [2] * model.block_size)
        assert second.loaded == 4, "the four prefix blocks come from the host tier"
        assert second.mismatched == []
        assert leader.metrics.value("dynkv_hits_total", tier="host") == 4
        assert leader.metrics.value("dynkv_pages_moved_total", direction="d2h") == 4 + 1 + 1
        engine.drain()
        assert leader.stats()["host"]["pinned"] == 0
    finally:
        engine.close()
        leader.close()


@pytest.mark.parametrize("dims", ["LBHNC", "LBNHC", "LHBNC"])
def test_random_stream_in_process(rng: np.random.Generator, dims: str) -> None:
    model = Model(dims=dims)
    leader = make_leader(model, tp=2, host_pages=24)  # smaller than the working set: evictions happen
    engine = Engine(leader, model, tp=2, processes=False)
    try:
        prompts = conversation_stream(rng, num_prefixes=5, requests=30, block_size=model.block_size)
        totals = serve_stream(engine, prompts)
        assert totals["loaded"] > 0
        s = leader.stats()["host"]
        assert s["stored"] <= 24 and s["pinned"] == 0 and s["pending"] == 0
        assert s["evictions"] > 0
    finally:
        engine.close()
        leader.close()


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_worker_processes(rng: np.random.Generator, tp: int) -> None:
    model = Model(num_heads=4, dims="LBNHC")
    leader = make_leader(model, tp=tp, host_pages=32)
    engine = Engine(leader, model, tp=tp, processes=True)
    try:
        prompts = conversation_stream(rng, num_prefixes=3, requests=8, block_size=model.block_size)
        totals = serve_stream(engine, prompts)
        assert totals["loaded"] > 0
    finally:
        engine.close()
        leader.close()


def test_mla_replicated_head_loads_on_every_rank(rng: np.random.Generator) -> None:
    model = Model(num_heads=1, head_size=16)
    leader = make_leader(model, tp=2)
    engine = Engine(leader, model, tp=2, processes=False)
    try:
        totals = serve_stream(engine, conversation_stream(rng, num_prefixes=2, requests=6, block_size=model.block_size))
        assert totals["loaded"] > 0
    finally:
        engine.close()
        leader.close()


def test_pages_in_flight_are_never_evicted(rng: np.random.Generator) -> None:
    """A host tier of 4 pages under requests of 6 blocks: stores are refused, loads stay exact."""
    model = Model()
    leader = make_leader(model, host_pages=4)
    engine = Engine(leader, model, tp=1, processes=False)
    try:
        prompts = conversation_stream(rng, num_prefixes=2, requests=10, block_size=model.block_size,
                                      prefix_blocks=5, tail_blocks=1)
        serve_stream(engine, prompts)
        assert leader.metrics.value("dynkv_admissions_refused_total", tier="host", reason="full") > 0
        assert leader.stats()["host"]["stored"] <= 4
    finally:
        engine.close()
        leader.close()


def test_request_finished_while_storing_delays_the_free(rng: np.random.Generator) -> None:
    model = Model()
    leader = make_leader(model)
    engine = Engine(leader, model, tp=1, processes=False)
    try:
        tokens = rng.integers(0, 1000, 3 * model.block_size).tolist()
        keys = engine.keys(tokens)
        blocks = [engine.free_blocks.pop() for _ in keys]
        assert leader.lookup("x", keys) == 0
        leader.begin_load("x", [])
        assert leader.store("x", keys, blocks) == 3
        # vLLM finishes the request before the stores were even planned: the free must wait.
        assert leader.request_finished("x") is True
        engine.step(writes=list(zip(blocks, keys)))
        engine.finish("x", blocks)
        engine.drain()
        assert leader.lookup("y", keys) == 3
    finally:
        engine.close()
        leader.close()


def test_one_steps_stores_of_several_requests(rng: np.random.Generator) -> None:
    check_one_steps_stores(rng)


def test_lookup_again_releases_earlier_pins(rng: np.random.Generator) -> None:
    model = Model()
    leader = make_leader(model)
    engine = Engine(leader, model, tp=1, processes=False)
    try:
        tokens = rng.integers(0, 1000, 2 * model.block_size).tolist()
        engine.serve("a", tokens)
        engine.drain()
        keys = engine.keys(tokens)
        for _ in range(3):  # vLLM asks again each step while it cannot schedule the request
            assert leader.lookup("b", keys) == 2
        assert leader.stats()["host"]["pinned"] == 2
        assert leader.request_finished("b") is False
        assert leader.stats()["host"]["pinned"] == 0
    finally:
        engine.close()
        leader.close()


def test_bad_calls_name_the_problem() -> None:
    model = Model()
    leader = make_leader(model)
    try:
        with pytest.raises(ValueError, match="were matched"):
            leader.begin_load("nobody", [1, 2])
        with pytest.raises(ValueError, match="keys but"):
            leader.store("r", [b"x" * 16], [1, 2])
        with pytest.raises(ValueError, match="world_size"):
            Leader(leader.config, model.geometry(), model.fingerprint(), world_size=0)
    finally:
        leader.close()


def test_shared_memory_too_small_is_a_clear_error() -> None:
    model = Model()
    with pytest.raises(ValueError, match="/dev/shm"):
        make_leader(model, host_pages=None, host_gb=1 << 20)


def test_worker_killed_mid_transfer(rng: np.random.Generator) -> None:
    """A dead rank: the leader fails the jobs in flight, keeps its index consistent, and serves on."""
    model = Model(dims="LBHNC")
    leader = make_leader(model, tp=2)
    engine = Engine(leader, model, tp=2, processes=True)
    try:
        tokens = rng.integers(0, 1000, 4 * model.block_size).tolist()
        engine.serve("a", tokens)
        engine.drain()
        keys = engine.keys(tokens)
        blocks = [engine.free_blocks.pop() for _ in keys]
        assert leader.lookup("b", keys) == 4
        leader.begin_load("b", blocks)
        plan = leader.build_plan()
        assert len(plan.loads) == 1
        engine.kill(1)
        failed = leader.fail_inflight()
        assert failed == set(blocks), "every block of the lost load is reported for recompute"
        s = leader.stats()["host"]
        assert s["pinned"] == 0 and s["pending"] == 0 and s["stored"] == 4
        assert leader.idle()
    finally:
        engine.close()
    engine = Engine(leader, model, tp=2, processes=True)  # the engine restarts its workers
    try:
        out = engine.serve("c", tokens)
        assert out.loaded == 4 and out.mismatched == []
    finally:
        engine.close()
        leader.close()


def test_pools_of_dead_leaders_are_removed() -> None:
    """A killed engine never ran its shutdown: the next leader unlinks its pool, and leaves live ones."""
    import os

    from dynkv.memory import HostPool
    from dynkv.tiers.host import pid_alive

    dead = next(p for p in range(4_000_000, 4_100_000) if not pid_alive(p))
    stale = HostPool.create(4096, name=f"dynkv-00000000000000aa-{dead}", pin=False)
    live = HostPool.create(4096, name=f"dynkv-00000000000000bb-{os.getpid()}", pin=False)
    try:
        leader = make_leader(Model())
        leader.close()
        assert not os.path.exists(f"/dev/shm/{stale.name}")
        assert os.path.exists(f"/dev/shm/{live.name}")
    finally:
        stale.close()
        live.close()
        HostPool.unlink(live.name)
