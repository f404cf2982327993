"""The KVBM end to end without vLLM: leader, workers (in-process and as TP processes), host tier.

Every loaded block is compared byte for byte against the bytes stored under
its key; hits are counted per tier.
"""

from __future__ import annotations

import numpy as np
import pytest
from harness import Engine, Model, conversation_stream

from dynkv.config import DynKVConfig
from dynkv.leader import Leader


def make_leader(model: Model, tmp_path=None, *, tp: int = 1, engine_id: str = "t", **cfg) -> Leader:
    cfg.setdefault("host_pages", 64)
    return Leader(DynKVConfig.from_dict(cfg, env={}), model.geometry(), model.fingerprint(), world_size=tp,
                  engine_id=f"{engine_id}-{id(cfg)}")


def serve_stream(engine: Engine, prompts: list[list[int]]) -> dict[str, int]:
    totals = {"loaded": 0, "blocks": 0}
    for i, tokens in enumerate(prompts):
        out = engine.serve(f"r{i}", tokens)
        assert out.mismatched == [], f"request {i}: blocks {out.mismatched} differ from what was stored"
        assert out.load_errors == set()
        totals["loaded"] += out.loaded
        totals["blocks"] += len(out.keys)
    engine.drain()
    return totals


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


def check_one_steps_stores(rng: np.random.Generator, device: str = "cpu") -> None:
    """store_many (a decode step's stores): one job per request, launched as one copy; a page two requests store
    is stored once; every loaded byte exact. A step whose copy cannot start stores none of its pages."""
    model = Model(device=device)
    leader = make_leader(model)
    engine = Engine(leader, model, tp=1, processes=False)
    try:
        shared = rng.integers(0, 1000, 2 * model.block_size).tolist()
        own = [rng.integers(0, 1000, model.block_size).tolist() for _ in range(3)]
        keys = [engine.keys(shared + tail) for tail in own]
        assert keys[0][:2] == keys[1][:2] and keys[0][2] != keys[1][2]
        blocks = [[engine.free_blocks.pop() for _ in k] for k in keys]
        for rid, k in zip("abc", keys):
            assert leader.lookup(rid, k) == 0
            leader.begin_load(rid, [])
        with pytest.raises(ValueError, match="'b': 3 keys but 2 blocks"):
            leader.store_many([("a", keys[0], blocks[0]), ("b", keys[1], blocks[1][:2])])
        assert leader.stats()["host"]["pending"] == 0, "a bad call allocates nothing"
        assert leader.store_many([("a", keys[0], blocks[0]), ("b", keys[1], blocks[1])]) == [3, 1]
        assert leader.store_many([("a", keys[0], blocks[0])]) == [0], "pages already pending are skipped"
        plans, build = [], leader.build_plan
        leader.build_plan = lambda: plans.append(build()) or plans[-1]  # type: ignore[method-assign]
        engine.step(writes=[*zip(blocks[0], keys[0]), *zip(blocks[1], keys[1])])
        # c's last block id is past the KV cache: the step's one copy fails to start, for c and for a2.
        a2 = rng.integers(0, 1000, model.block_size).tolist()
        k2 = engine.keys(shared + own[0] + a2)[3]
        assert leader.store_many([("a", [k2], [engine.free_blocks[-1]]),
                                  ("c", keys[2][2:], [10**6])]) == [1, 1]
        engine.step(writes=[(engine.free_blocks[-1], k2)])
        leader.build_plan = build  # type: ignore[method-assign]
        assert [(op.req_id, len(op.slots)) for op in plans[0].stores] == [("a", 3), ("b", 1)]
        assert [op.req_id for op in plans[1].stores] == ["a", "c"]
        for rid, b in zip("abc", blocks):
            engine.finish(rid, b)
        engine.drain()
        assert leader.metrics.value("dynkv_store_errors_total", tier="host") == 2
        assert leader.lookup("probe", [*keys[0], k2]) == 3 and leader.lookup("probe2", keys[2]) == 2
        leader.request_finished("probe")
        leader.request_finished("probe2")
        for i, tail in enumerate(own[:2]):
            out = engine.serve(f"again{i}", shared + tail + [1])
            assert out.loaded == 3 and out.mismatched == []
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

    from dynkv.ops import HostPool
    from dynkv.protocol import pid_alive

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
