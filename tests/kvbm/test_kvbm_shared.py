"""The shared tier end to end without vLLM: leaders of several engines on one real redis-server.

Blocks loaded from the store are compared byte for byte with what was stored
under their key (the harness's forward writes a function of the key); every
fault ends in a recomputed block or a miss, never in a wrong one.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import pytest

redis = pytest.importorskip("redis", reason="the shared tier's Redis client: pip install 'dynkv[shared]'")
from harness import Engine, Model
from stores import RedisServer

from dynkv.config import DynKVConfig
from dynkv.leader import Leader
from dynkv.tiers.shared.tier import store_key

MODEL = Model(num_layers=2, num_heads=4, head_size=8, block_size=4, dims="LBNHC")
BLOCKS = 5


def leader_for(url: str, name: str, *, tp: int = 1, model: Model = MODEL, **cfg: object) -> Leader:
    d = {"host_pages": 32, "remote_url": url, "shared_lookup_ms": 5000, "shared_timeout_s": 2.0, **cfg}
    return Leader(DynKVConfig.from_dict(d, env={}), model.geometry(), model.fingerprint(), world_size=tp,
                  engine_id=f"shared-{name}-{os.getpid()}")


@pytest.fixture
def engines(redis_server: RedisServer) -> Iterator[list[tuple[Leader, Engine]]]:
    """Two engines (TP=1, in this process) on one store."""
    made = []
    for name in ("a", "b"):
        leader = leader_for(redis_server.url, name)
        made.append((leader, Engine(leader, MODEL, tp=1, processes=False)))
    yield made
    for leader, engine in made:
        engine.close()
        leader.close()


def prompts_for(rng: np.random.Generator, n: int) -> list[list[int]]:
    return [rng.integers(0, 1000, BLOCKS * MODEL.block_size).tolist() for _ in range(n)]


def serve_all(engine: Engine, prompts: list[list[int]], tag: str) -> list:
    outs = [engine.serve(f"{tag}{i}", p) for i, p in enumerate(prompts)]
    engine.drain()  # the write-behind lands
    assert all(o.mismatched == [] for o in outs), [o.mismatched for o in outs]
    return outs


def value(leader: Leader, name: str, **labels: str) -> float:
    return leader.metrics.value(name, **labels)


def test_an_engine_loads_the_prefixes_another_engine_stored(engines, rng: np.random.Generator) -> None:
    (a, ea), (b, eb) = engines
    prompts = prompts_for(rng, 3)
    first = serve_all(ea, prompts, "a")
    assert all(o.loaded == 0 for o in first)
    assert value(a, "dynkv_pages_moved_total", direction="host_to_shared") == 3 * BLOCKS
    outs = serve_all(eb, prompts, "b")
    assert [o.loaded for o in outs] == [BLOCKS] * 3 and all(not o.load_errors for o in outs)
    assert value(b, "dynkv_hits_total", tier="shared") == 3 * BLOCKS
    assert value(b, "dynkv_pages_moved_total", direction="shared_to_host") == 3 * BLOCKS
    assert value(b, "dynkv_bytes_moved_total", direction="shared_to_host") == 3 * BLOCKS * MODEL.geometry().page_bytes
    assert value(b, "dynkv_tier_up", tier="shared") == 1
    # B does not write back what it read; a conversation's next turn on B finds its prefix in B's host tier.
    assert value(b, "dynkv_pages_moved_total", direction="host_to_shared") == 0
    longer = prompts[0] + rng.integers(0, 1000, 2 * MODEL.block_size).tolist()
    out = eb.serve("b-turn2", longer)
    assert out.loaded == BLOCKS and out.mismatched == []
    assert value(b, "dynkv_hits_total", tier="host") == BLOCKS
    eb.drain()  # the turn's two new pages are written behind
    assert value(b, "dynkv_pages_moved_total", direction="host_to_shared") == 2
    s = b.stats()
    assert s["host"]["pinned"] == 0 and s["shared_writes_in_flight"] == 0


def test_shared_hits_past_a_small_host_tier_load_through_staging(redis_server: RedisServer,
                                                                rng: np.random.Generator) -> None:
    """A 2-page host tier: of a 5-page shared-tier hit, 3 pages go through staging slots (2 with one slot fewer
    than needed: the last page recomputes), exact, and every staging slot is free again afterwards."""
    prompt = prompts_for(rng, 1)[0]
    a = leader_for(redis_server.url, "a")
    ea = Engine(a, MODEL, tp=1, processes=False)
    try:
        serve_all(ea, [prompt], "a")
    finally:
        ea.close()
        a.close()
    for name, staging_pages, staged in (("b", None, 3), ("c", 2, 2)):
        b = leader_for(redis_server.url, name, host_pages=2, staging_pages=staging_pages)
        eb = Engine(b, MODEL, tp=1, processes=False)
        try:
            out = eb.serve("b", prompt)
            assert out.loaded == BLOCKS and out.mismatched == [] and len(out.load_errors) == 3 - staged
            assert value(b, "dynkv_pages_moved_total", direction="shared_to_host") == 2
            assert value(b, "dynkv_pages_moved_total", direction="shared_to_staging") == staged
            assert value(b, "dynkv_load_errors_total", reason="host_full") == 3 - staged
            eb.drain()
            s = b.stats()
            assert s["staging"]["in_use"] == 0 and s["host"]["pinned"] == 0 and s["host"]["pending"] == 0
            assert s["host"]["stored"] == 2 and s["shared_writes_in_flight"] == 0
        finally:
            eb.close()
            b.close()


def test_engines_share_pages_through_mooncake(mooncake_master, rng: np.random.Generator) -> None:
    pytest.importorskip("mooncake.store", reason="no Mooncake client (pip install mooncake-transfer-engine-non-cuda)")
    url = mooncake_master.url + "?segment_mb=16&buffer_mb=16"
    made = []
    try:
        for name in ("ma", "mb"):  # both alive: the pages live in the segments their clients mount
            leader = leader_for(url, name)
            made.append((leader, Engine(leader, MODEL, tp=1, processes=False)))
        (a, ea), (b, eb) = made
        prompts = prompts_for(rng, 3)
        serve_all(ea, prompts, "a")
        assert value(a, "dynkv_pages_moved_total", direction="host_to_shared") == 3 * BLOCKS
        outs = serve_all(eb, prompts, "b")
        assert [o.loaded for o in outs] == [BLOCKS] * 3 and all(not o.load_errors for o in outs)
        assert value(b, "dynkv_hits_total", tier="shared") == 3 * BLOCKS
    finally:
        for leader, engine in made:
            engine.close()
            leader.close()


def test_pages_the_store_lost_are_written_again_when_recomputed(engines, redis_server: RedisServer,
                                                                rng: np.random.Generator) -> None:
    (a, ea), _ = engines
    prompts = prompts_for(rng, 2)
    serve_all(ea, prompts, "a")
    raw = redis.Redis(port=redis_server.ports[0])
    assert raw.dbsize() == 2 * BLOCKS
    raw.flushall()  # the store evicted everything (or restarted empty)
    a.reset()  # and the engine's own tiers no longer hold the pages: it recomputes them
    outs = serve_all(ea, prompts, "again")
    assert all(o.loaded == 0 for o in outs)
    assert raw.dbsize() == 2 * BLOCKS


def test_pages_stored_at_tp2_load_at_tp1(redis_server: RedisServer, rng: np.random.Generator) -> None:
    prompts = prompts_for(rng, 2)
    leader = leader_for(redis_server.url, "tp2", tp=2)
    engine = Engine(leader, MODEL, tp=2, processes=True)
    try:
        serve_all(engine, prompts, "w")
    finally:
        engine.close()
        leader.close()
    leader = leader_for(redis_server.url, "tp1")
    engine = Engine(leader, MODEL, tp=1, processes=False)
    try:
        outs = serve_all(engine, prompts, "r")
        assert [o.loaded for o in outs] == [BLOCKS] * 2
        assert value(leader, "dynkv_hits_total", tier="shared") == 2 * BLOCKS
    finally:
        engine.close()
        leader.close()


def test_another_model_or_namespace_gets_no_hit(engines, redis_server: RedisServer, rng: np.random.Generator) -> None:
    (a, ea), _ = engines
    prompts = prompts_for(rng, 2)
    serve_all(ea, prompts, "a")
    for other, cfg in ((replace(MODEL, head_size=16), {}), (MODEL, {"shared_namespace": "elsewhere"})):
        leader = leader_for(redis_server.url, "other", model=other, **cfg)
        engine = Engine(leader, other, tp=1, processes=False)
        try:
            outs = serve_all(engine, prompts, "o")
            assert all(o.loaded == 0 for o in outs)
            assert value(leader, "dynkv_hits_total", tier="shared") == 0
            assert value(leader, "dynkv_tier_misses_total", tier="shared") == 2 * BLOCKS
        finally:
            engine.close()
            leader.close()


def test_corrupt_and_evicted_pages_are_recomputed(engines, redis_server: RedisServer, rng: np.random.Generator,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    (a, ea), (b, eb) = engines
    prompts = prompts_for(rng, 2)
    serve_all(ea, prompts, "a")
    raw = redis.Redis(port=redis_server.ports[0])
    assert len(raw.keys("dynkv:*")) == 2 * BLOCKS
    fp = MODEL.fingerprint().digest()
    corrupt = [store_key("dynkv", fp, k) for k in eb.keys(prompts[0])[1:4]]
    for k in corrupt:
        v = bytearray(raw.get(k))
        v[-7] ^= 0x40
        raw.set(k, bytes(v))
    gone = eb.keys(prompts[1])[2:4]
    read_many = b.shared.read_many

    def evicting_first(reads):  # the store evicts two pages between the lookup and the read
        if any(k in gone for k, _ in reads):
            raw.delete(*(store_key("dynkv", fp, k) for k in gone))
        return read_many(reads)

    monkeypatch.setattr(b.shared, "read_many", evicting_first)
    with caplog.at_level(logging.WARNING, logger="dynkv.leader"):
        outs = [eb.serve(f"b{i}", p) for i, p in enumerate(prompts)]
    eb.drain()
    assert [o.loaded for o in outs] == [BLOCKS, BLOCKS]
    assert all(o.mismatched == [] for o in outs)
    # Exactly the bad and the missing pages' blocks are recomputed.
    assert outs[0].load_errors == set(outs[0].blocks[1:4]) and outs[1].load_errors == set(outs[1].blocks[2:4])
    assert value(b, "dynkv_load_errors_total", reason="shared") == 3
    assert value(b, "dynkv_tier_misses_total", tier="shared") == 2
    assert caplog.text.count("payload checksum mismatch") == 3
    assert value(b, "dynkv_pages_moved_total", direction="shared_to_host") == 2 * BLOCKS - 5


def test_a_dead_store_means_recompute_and_it_comes_back(engines, redis_server: RedisServer,
                                                        rng: np.random.Generator) -> None:
    (a, ea), (b, eb) = engines
    prompts = prompts_for(rng, 3)
    serve_all(ea, prompts[:2], "a")
    redis_server.kill()
    outs = serve_all(eb, prompts[:2], "b")  # lookups fail or find nothing; reads fail: recomputed
    assert all(o.loaded == 0 and not o.load_errors for o in outs)
    assert value(b, "dynkv_lookup_timeouts_total", tier="shared") == 2  # a dead store answers no lookup
    outs = serve_all(ea, prompts[2:], "a2")  # writes behind are refused while it is down
    assert value(a, "dynkv_tier_up", tier="shared") == 0
    assert value(a, "dynkv_admissions_refused_total", tier="shared", reason="down") >= 1
    redis_server.start()  # an empty store on the same port
    eb.step_until(lambda: a.shared.up and b.shared.up, "the shared tier did not reconnect")
    serve_all(ea, prompts[2:], "a3")  # a host hit on A: written behind now
    eb_out = serve_all(eb, prompts[2:], "b2")
    assert eb_out[0].loaded == BLOCKS and not eb_out[0].load_errors


def test_a_store_down_at_start_leaves_the_engine_running(tmp_path, rng: np.random.Generator,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    from stores import free_port

    with caplog.at_level(logging.WARNING, logger="dynkv.shared"):
        leader = leader_for(f"redis://:pw@127.0.0.1:{free_port()}/0", "down")
    engine = Engine(leader, MODEL, tp=1, processes=False)
    try:
        outs = serve_all(engine, prompts_for(rng, 2), "d")
        assert all(o.loaded == 0 and not o.load_errors for o in outs)
        assert "running without it" in caplog.text and ":pw@" not in caplog.text
        assert "shared tier redis://***@127.0.0.1" in leader.describe()
    finally:
        engine.close()
        leader.close()


def test_a_stalled_store_costs_a_lookup_its_budget_only(redis_server: RedisServer, rng: np.random.Generator) -> None:
    leader = leader_for(redis_server.url, "stall", shared_lookup_ms=50, shared_timeout_s=30)
    engine = Engine(leader, MODEL, tp=1, processes=False)
    proc = redis_server.procs[0]
    try:
        prompts = prompts_for(rng, 2)
        serve_all(engine, prompts[:1], "w")
        os.kill(proc.pid, signal.SIGSTOP)  # the store answers nothing, and its connections stay open
        try:
            n = leader.lookup("stalled", engine.keys(prompts[1]))
            assert n == 0 and value(leader, "dynkv_lookup_timeouts_total", tier="shared") == 1
            # While that call still waits on the store, the next lookup does not queue behind it.
            assert leader.lookup("stalled2", engine.keys(prompts[1])) == 0
            assert value(leader, "dynkv_lookup_timeouts_total", tier="shared") == 2
            leader.request_finished("stalled")
            leader.request_finished("stalled2")
        finally:
            os.kill(proc.pid, signal.SIGCONT)
    finally:
        engine.close()
        leader.close()


def test_the_cost_model_recomputes_where_the_store_is_slower(engines, rng: np.random.Generator) -> None:
    (a, ea), (b, eb) = engines
    prompts = prompts_for(rng, 2)
    serve_all(ea, prompts, "a")
    cost = b.shared_cost
    assert cost is not None
    # As if measured: the engine prefills 10k tokens/s, the store serves 1 MB/s: reading the 5 pages (1 KiB
    # each) would take 5 ms, recomputing their 20 tokens 2 ms.
    cost.prefill_tokens_per_s, cost.disk_bytes_per_s = 1e4, 1e6
    assert b.lookup("slow", eb.keys(prompts[0])) == 0
    b.request_finished("slow")
    tokens = BLOCKS * MODEL.block_size
    assert value(b, "dynkv_cost_tokens_total", choice="recompute") == tokens
    cost.disk_bytes_per_s = 1e9  # a fast store: the same pages pay
    out = eb.serve("fast", prompts[0])
    assert out.loaded == BLOCKS and out.mismatched == [] and not out.load_errors
    assert value(b, "dynkv_cost_tokens_total", choice="load") == tokens
    eb.drain()
    assert cost.queue_bytes == 0 and cost.disk_bytes_per_s != 1e9  # the read was measured


def test_the_cost_model_probes_a_store_it_refused_and_loads_full_matches_after_a_fast_probe(
        engines, rng: np.random.Generator, monkeypatch) -> None:
    """One slow sample no longer keeps an engine off the store: once the estimate is 5 s old, the first 2 pages
    of a match are read as a probe, and its measurement brings whole matches back."""
    import time
    from types import SimpleNamespace

    import dynkv.leader.shared_flow as shared_flow
    from dynkv.policy.cost import CostModel

    (a, ea), (b, eb) = engines
    prompts = prompts_for(rng, 2)
    serve_all(ea, prompts, "a")
    offset = [0.0]

    def clock() -> float:  # the store's threads time their reads on it too (patched below), 5 s pass at once
        return time.perf_counter() + offset[0]

    monkeypatch.setattr(shared_flow, "time", SimpleNamespace(perf_counter=clock))
    b.shared_cost = cost = CostModel(clock=clock, probe_every_s=5.0, probe_pages=2)
    # As if one slow read had just been measured: 5 pages at 1 B/s against 2 s to recompute their 20 tokens.
    cost.prefill_tokens_per_s, cost.disk_bytes_per_s = 10.0, 1.0
    tokens = BLOCKS * MODEL.block_size
    assert b.lookup("slow", eb.keys(prompts[0])) == 0
    b.request_finished("slow")
    assert value(b, "dynkv_cost_tokens_total", choice="recompute") == tokens
    offset[0] += 5.0
    out = eb.serve("probe", prompts[0])
    eb.drain()
    assert out.loaded == 2 and out.mismatched == [] and not out.load_errors
    assert value(b, "dynkv_hits_total", tier="shared") == 2
    assert value(b, "dynkv_cost_tokens_total", choice="probe") == 2 * MODEL.block_size
    assert value(b, "dynkv_cost_tokens_total", choice="recompute") == tokens + 3 * MODEL.block_size
    assert cost.queue_bytes == 0 and cost.disk_bytes_per_s > BLOCKS * MODEL.geometry().page_bytes / 2.0
    out = eb.serve("full", prompts[1])
    assert out.loaded == BLOCKS and out.mismatched == [] and not out.load_errors
    assert value(b, "dynkv_cost_tokens_total", choice="load") == tokens
    assert value(b, "dynkv_cost_tokens_total", choice="probe") == 2 * MODEL.block_size


def test_config_names_the_bad_key() -> None:
    with pytest.raises(ValueError, match=r"key 'remote_url'.*'ftp'") as e:
        DynKVConfig.from_dict({"remote_url": "ftp://user:hunter2@h:1"}, env={})
    assert "hunter2" not in str(e.value)
    with pytest.raises(ValueError, match=r"DYNKV_SHARED_BATCH_PAGES"):
        DynKVConfig.from_dict({}, env={"DYNKV_SHARED_BATCH_PAGES": "0"})
    c = DynKVConfig.from_dict({}, env={"DYNKV_REMOTE_URL": "redis://u:hunter2@h:6379/1"})
    assert c.remote_url == "redis://u:hunter2@h:6379/1"
    assert "hunter2" not in repr(c) and c.shared_store() == "redis://***@h:6379/1"
