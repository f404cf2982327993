"""Leader-side bookkeeping speed: prefix lookup in a 100k-page index, key hashing."""

from __future__ import annotations

import numpy as np
import pytest

from dynkv.index import PageIndex
from dynkv.keys import ModelFingerprint, block_keys

PAGES = 100_000


@pytest.fixture(scope="module")
def big_index() -> tuple[PageIndex, list[bytes]]:
    idx = PageIndex({"host": PAGES})
    keys = [int(x).to_bytes(16, "little") for x in np.random.default_rng(0).integers(0, 2**63, size=PAGES)]
    for i in range(0, PAGES, 4096):
        chunk = keys[i : i + 4096]
        idx.allocate("host", chunk)
        idx.commit("host", chunk)
    return idx, keys


@pytest.mark.parametrize("touch", [False, True])
def test_lookup_256_in_100k(benchmark, big_index, touch: bool) -> None:
    idx, keys = big_index
    query = keys[5000:5256]
    m = benchmark(idx.lookup, query, touch=touch)
    assert m.num_keys == 256


def test_block_keys_throughput(benchmark) -> None:
    fp = ModelFingerprint("bench", "bfloat16", 32, 8, 128, 16)
    tokens = np.random.default_rng(0).integers(0, 128_000, size=128 * 1024, dtype=np.uint32)
    keys = benchmark(block_keys, fp, tokens, 16)
    assert len(keys) == len(tokens) // 16
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["GB/s of token ids"] = tokens.nbytes / benchmark.stats["median"] / 1e9


def test_scheduler_side_of_an_8k_host_hit(benchmark) -> None:
    """The connector's scheduler calls for a revisit of an 8k prompt (512 pages of 16 tokens) in the host tier:
    lookup, load bookkeeping, the plan, the worker's report and the finish, on vLLM stand-ins."""
    import connector_stubs as tc
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from dynkv.connector import DynKVConnector

    vllm_config, kcc = tc.fake_config({"host_pages": 1200}, block_size=16)
    kcc.num_blocks = 2048
    conn = DynKVConnector(vllm_config, KVConnectorRole.SCHEDULER, kcc)
    toks = np.random.default_rng(0).integers(0, 30_000, size=8192).tolist()
    tc.served(conn, "first", toks, list(range(512)))
    count = iter(range(10**9))

    def revisit() -> int:
        req = tc.FakeRequest(f"r{next(count)}", toks)
        conn.on_new_request(req)
        n, _ = conn.get_num_new_matched_tokens(req, 0)
        blocks = list(range(600, 1112))
        conn.update_state_after_alloc(req, tc.blocks(blocks), n)
        tc.complete(conn, conn.build_connector_meta(tc.step(new={req.request_id: blocks},
                                                             scheduled={req.request_id: 8192 - n})))
        conn.request_finished(req, blocks)
        conn.build_connector_meta(tc.step())
        return n

    try:
        assert benchmark(revisit) == 8176  # every page but the last block's, loaded layer by layer
    finally:
        conn.shutdown()


def test_scheduler_side_of_an_8k_disk_hit(benchmark, tmp_path) -> None:
    """The leader's part of a revisit whose 512 pages are all on the disk tier: lookup, then begin_load
    (a host slot per page, each read submitted). The reads themselves run on the I/O threads, untimed."""
    from harness import Engine, Model

    from dynkv.config import DynKVConfig
    from dynkv.leader import Leader

    model = Model(num_layers=2, num_heads=2, head_size=8, block_size=4, dims="LBNHC")
    cfg = {"host_pages": 2048, "disk_gb": 0.05, "disk_paths": [str(tmp_path / "d")], "disk_direct_io": False,
           "disk_admit_min_hits": 0}
    leader = Leader(DynKVConfig.from_dict(cfg, env={}), model.geometry(), model.fingerprint(),
                    engine_id=f"bench-disk-{tmp_path.name}")
    engine = Engine(leader, model, tp=1, num_blocks=1100, processes=False)
    prompt = np.random.default_rng(0).integers(0, 1000, 512 * model.block_size).tolist()
    keys = engine.keys(prompt)
    rounds = iter(range(10**9))
    live: list[tuple[str, list[int]]] = []

    def finish_previous() -> None:
        while live:
            req, blocks = live.pop()
            engine.step_until(lambda: engine.recving.get(req, 0) == 1, f"load of {req} not finished")
            engine.recving.pop(req, None)
            engine.finish(req, blocks)
        engine.drain()
        leader.index.remove("host", keys)  # the next revisit finds every page on disk only

    def revisit() -> int:
        req = f"r{next(rounds)}"
        n = leader.lookup(req, keys)
        blocks = [engine.free_blocks.pop() for _ in range(n)]
        live.append((req, blocks))
        leader.begin_load(req, blocks)
        return n

    try:
        engine.serve("first", prompt)
        engine.drain()
        assert leader.stats()["disk"]["stored"] == 512
        finish_previous()
        assert benchmark.pedantic(revisit, setup=finish_previous, rounds=30) == 512
        finish_previous()
        assert leader.metrics.value("dynkv_load_errors_total", reason="disk") == 0
    finally:
        engine.close()
        leader.close()


def test_scheduler_side_of_decode_steps(benchmark) -> None:
    """The connector's scheduler calls of 16 decode steps of 32 running requests (1024-token prompts), on vLLM
    stand-ins: each step's plan and the workers' report, the step's stats and events; one step in 16 fills a
    block of every request and stores it. vLLM makes these calls at every step, so they add to each step."""
    import connector_stubs as tc
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from dynkv.connector import DynKVConnector

    running, prompt, bs, steps = 32, 1024, 16, 16
    vllm_config, kcc = tc.fake_config({"host_pages": 4096}, block_size=bs)
    kcc.num_blocks = 8192
    conn = DynKVConnector(vllm_config, KVConnectorRole.SCHEDULER, kcc)
    rng = np.random.default_rng(0)
    reqs, next_block = [], 0
    for i in range(running):
        req = tc.FakeRequest(f"d{i}", rng.integers(0, 30_000, size=prompt).tolist())
        conn.on_new_request(req)
        conn.get_num_new_matched_tokens(req, 0)
        conn.update_state_after_alloc(req, tc.blocks([]), 0)
        blocks = list(range(next_block, next_block + prompt // bs))
        next_block += len(blocks)
        reqs.append((req, blocks))
    tc.complete(conn, conn.build_connector_meta(tc.step(new={r.request_id: b for r, b in reqs},
                                                         scheduled={r.request_id: prompt for r, _ in reqs})))
    for req, _ in reqs:
        req.num_computed_tokens = prompt
    stored: list[int] = []  # stores planned by each call
    drawn = iter(rng.integers(0, 30_000, size=1 << 22).tolist())

    def decode_steps() -> None:
        nonlocal next_block
        stored.append(0)
        for _ in range(steps):
            new = {}
            for req, blocks in reqs:  # the token this step computes, and a block for it when one fills
                req.all_token_ids.append(next(drawn))
                new[req.request_id] = None
                if req.num_computed_tokens // bs >= len(blocks):
                    new[req.request_id] = [next_block]
                    blocks.append(next_block)
                    next_block += 1
            meta = conn.build_connector_meta(tc.step(cached=new, scheduled={r.request_id: 1 for r, _ in reqs}))
            stored[-1] += len(meta.plan.stores)
            tc.complete(conn, meta)
            conn.get_kv_connector_stats()
            conn.take_events()
            conn.has_pending_push_work()
            for req, _ in reqs:
                req.num_computed_tokens += 1

    try:
        benchmark(decode_steps)
        assert stored and set(stored) == {running}, "every call stores one block of every request"
        if benchmark.stats:
            benchmark.extra_info["us per step"] = benchmark.stats["median"] / steps * 1e6
    finally:
        conn.shutdown()
