"""The KVBM end to end without vLLM: leader, workers (in-process and as TP processes), host tier.

Every loaded block is compared byte for byte against the bytes stored under
its key; hits are counted per tier.
"""

from __future__ import annotations

import os

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


def test_host_tier_larger_than_memory_is_a_clear_error() -> None:
    model = Model()
    with pytest.raises(ValueError, match=r"dynkv config host_gb=1\.04858e\+06: .*bytes available "
                                         r"\(MemAvailable in /proc/meminfo\); lower the host tier"):
        make_leader(model, host_pages=None, host_gb=1 << 20)
    with pytest.raises(ValueError, match=r"dynkv config host_pages=1000000000000: "):
        make_leader(model, host_pages=10**12)


def test_bad_disk_paths_and_a_busy_metrics_port_name_their_key(tmp_path) -> None:
    import socket

    model = Model()
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match="dynkv config disk_paths: disk path is not a directory") as e:
        make_leader(model, disk_gb=0.01, disk_paths=[str(a_file)], disk_direct_io=False)
    assert e.value.filename == str(a_file)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=rf"dynkv config metrics_port={port}: cannot listen there"):
            make_leader(model, metrics_port=port, disk_gb=0.01, disk_paths=[str(tmp_path / "d")],
                        disk_direct_io=False)
    # the failed leader let go of its disk file: the next one takes it
    make_leader(model, disk_gb=0.01, disk_paths=[str(tmp_path / "d")], disk_direct_io=False).close()


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


def test_pools_of_dead_leaders_are_removed(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A killed engine never ran its shutdown: the next leader removes its link (and the /dev/shm pool an
    older dynkv left), and leaves live ones, whatever their kind."""
    from dynkv.memory import HostPool
    from dynkv.tiers.host import live_pools, pid_alive, publish_pool

    run = tmp_path / "run"
    monkeypatch.setenv("DYNKV_RUN_DIR", str(run))
    run.mkdir(mode=0o700)
    me = os.getpid()
    dead = next(p for p in range(4_000_000, 4_100_000) if not pid_alive(p))
    dead_link = run / f"dynkv-00000000000000aa-{dead}"
    dead_link.symlink_to(f"/proc/{dead}/fd/3")
    half_made = run / f".dynkv-00000000000000ab-{dead}.tmp"  # killed between its link's two steps
    half_made.symlink_to(f"/proc/{dead}/fd/3")
    stale = HostPool.create(4096, name=f"dynkv-00000000000000ac-{dead}", pin=False)  # an older dynkv's pool
    live = HostPool.create(4096, name=f"dynkv-00000000000000bb-{me}", memfd=True, pin=False)
    live_link = publish_pool(live)
    live_shm = HostPool.create(4096, name=f"dynkv-00000000000000bc-{me}", pin=False)
    live_shm_link = publish_pool(live_shm)
    # The pid in the name is alive, but the fd it leads to is not that pool (a reused pid, or a closed pool).
    with open(tmp_path / "unrelated", "w") as unrelated:
        reused = run / f"dynkv-00000000000000cc-{me}"
        reused.symlink_to(f"/proc/{me}/fd/{unrelated.fileno()}")
        assert live_pools("dynkv-00000000000000cc") == [], "a link that leads to another file is never attached"
        assert live_pools("dynkv-00000000000000bb") == [live_link]
        assert live_pools("dynkv-00000000000000bc") == [live_shm_link]
        try:
            leader = make_leader(Model())
            leader.close()
            assert sorted(p.name for p in run.iterdir()) == sorted([os.path.basename(live_link),
                                                                   os.path.basename(live_shm_link)])
            assert not os.path.exists(f"/dev/shm/{stale.name}")
            assert os.path.exists(f"/dev/shm/{live_shm.name}")
        finally:
            stale.close()
            live.close()
            live_shm.close()
            HostPool.unlink(stale.name)


def test_leader_publishes_its_pool_in_the_run_directory(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A memfd, found through a link in $DYNKV_RUN_DIR; a worker given the prefix attaches the live leader's."""
    from harness import RankState

    from dynkv.tiers.host import pool_name_for

    run = tmp_path / "run"
    monkeypatch.setenv("DYNKV_RUN_DIR", str(run))
    model = Model()
    leader = make_leader(model)
    try:
        assert oct(run.stat().st_mode & 0o777) == "0o700"
        assert leader.pool.memfd and leader.pool_link == str(run / leader.pool_name)
        assert os.readlink(leader.pool_link) == leader.pool.path
        assert leader.pool.path.startswith(f"/proc/{os.getpid()}/fd/")
        assert not os.path.exists(f"/dev/shm/{leader.pool_name}")
        prefix = pool_name_for(leader.engine_id, model.fingerprint())
        rank = RankState(model, leader.config, 0, 1, prefix, 8)
        try:
            pages = rank.worker.host_pages()
            assert pages.owner.path == leader.pool_link
            leader.pool.as_tensor()[:8] = 42
            assert bool((pages.owner.as_tensor()[:8] == 42).all())
        finally:
            rank.worker.close()
    finally:
        leader.close()
    assert not os.path.exists(leader.pool_link), "close removes the link"


def test_run_directory_must_be_this_users_alone(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from dynkv.tiers.host import run_dir, run_dirs

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("DYNKV_RUN_DIR", str(shared))
    with pytest.raises(ValueError, match=rf"{shared} is writable by other users \(mode 777\).*set DYNKV_RUN_DIR"):
        make_leader(Model())
    monkeypatch.setenv("DYNKV_RUN_DIR", str(tmp_path / "file"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"file cannot be created"):
        run_dir()
    # Without DYNKV_RUN_DIR, an unusable $XDG_RUNTIME_DIR/dynkv gives way to /tmp/dynkv-<uid>.
    monkeypatch.delenv("DYNKV_RUN_DIR")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(shared))
    (shared / "dynkv").mkdir(mode=0o777)
    (shared / "dynkv").chmod(0o777)
    assert run_dirs()[0] == str(shared / "dynkv")
    assert run_dir() == run_dirs()[-1] == f"/tmp/dynkv-{os.getuid()}"
