"""The vLLM connector's translation layer, without running an engine.

The connector is built with stand-ins for vLLM's config, requests and scheduler
output, around a real :class:`dynkv.leader.Leader`: which blocks it stores
each step, what it looks up and loads, how partial local hits and preemption
are handled, and the messages that carry plans, reports, stats and metrics.
End-to-end runs in real vLLM are in ``test_connector_vllm.py``.
"""

from __future__ import annotations

import functools
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from connector_stubs import BS, LAYERS, FakeRequest, blocks, complete, fake_config, served, step, tokens
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.metrics.cache_hit_source import CacheHitSource

import dynkv.connector.connector as connector_mod
import dynkv.worker.worker
from dynkv.connector import DynKVConnector, DynKVMetadata, DynKVPromMetrics, DynKVStats, DynKVWorkerMetadata
from dynkv.connector.engine import data_parallel_rank, distinct_layers, infer_dims, model_geometry
from dynkv.protocol import StepPlan, WorkerReport


@pytest.fixture
def conn() -> Any:
    """Every hit loads asynchronously (``layerwise`` off): the protocol vLLM drives across steps."""
    vllm_config, kcc = fake_config({"host_pages": 16, "layerwise": False})
    c = DynKVConnector(vllm_config, KVConnectorRole.SCHEDULER, kcc)
    yield c
    c.shutdown()


@pytest.fixture
def sync_conn() -> Any:
    """The default: host-tier hits load in the step that computes the request."""
    vllm_config, kcc = fake_config({"host_pages": 16})
    c = DynKVConnector(vllm_config, KVConnectorRole.SCHEDULER, kcc)
    yield c
    c.shutdown()


def test_full_blocks_are_stored_after_the_step_that_fills_them(conn: Any, rng: np.random.Generator) -> None:
    a = FakeRequest("a", tokens(rng, 100))
    conn.on_new_request(a)
    assert conn.get_num_new_matched_tokens(a, 0) == (0, False)
    conn.update_state_after_alloc(a, blocks([5, 6, 7, 8]), 0)
    meta = conn.build_connector_meta(step(new={"a": [5, 6, 7, 8]}, scheduled={"a": 100}))
    assert [op.block_ids for op in meta.plan.stores] == [(5, 6, 7)]  # the fourth block holds 4 tokens
    complete(conn, meta)
    a.num_computed_tokens = 100
    for _ in range(28):  # decode until the fourth block is full
        a.all_token_ids.append(int(rng.integers(16, 1000)))
        meta = conn.build_connector_meta(step(cached={"a": None}, scheduled={"a": 1}))
        a.num_computed_tokens += 1
        if a.num_computed_tokens < 128:
            assert not meta.plan.stores
    assert [op.block_ids for op in meta.plan.stores] == [(8,)]
    assert conn.request_finished(a, [5, 6, 7, 8]) == (True, None)  # its last store is in flight
    complete(conn, meta)
    assert conn.leader.stats()["host"]["stored"] == 4


def test_lookup_loads_the_shared_prefix_into_the_new_blocks(conn: Any, rng: np.random.Generator) -> None:
    shared = tokens(rng, 2 * BS)
    served(conn, "a", shared + tokens(rng, 40), [1, 2, 3])

    b = FakeRequest("b", shared + tokens(rng, 50))
    conn.on_new_request(b)
    assert conn.get_num_new_matched_tokens(b, 0) == (2 * BS, True)
    assert conn.get_num_new_matched_tokens(b, BS) == (BS, True)  # a local hit of one block: load the next
    assert conn.get_num_new_matched_tokens(b, 40) == (0, False)  # beyond what dynkv holds
    assert conn.get_num_new_matched_tokens(b, 20) == (2 * BS - 20, True)  # a partial local block is kept
    conn.update_state_after_alloc(b, blocks([9, 10, 11, 12]), 2 * BS - 20)
    assert conn.get_external_cache_hit_sources(b, 2 * BS - 20) == {CacheHitSource.HOST: 2 * BS - 20}
    conn.update_state_after_alloc(b, blocks([9, 10, 11, 12]), 0)  # vLLM's second call, after the load
    meta = conn.build_connector_meta(step())
    (load,) = meta.plan.loads
    assert load.req_id == "b" and load.block_ids == (10,)  # block 0 was computed locally (20 tokens)


@pytest.mark.parametrize("last_block", [False, True])
def test_whole_prompt_async_hit_stops_where_vllms_prefix_cache_would(rng: np.random.Generator,
                                                                    last_block: bool) -> None:
    """By default an asynchronous whole-prompt hit leaves the last block to compute, as vLLM's own hit does.

    With ``load_last_block`` it loads every full block and vLLM recomputes only the last token (it rewinds
    one after the load).
    """
    vllm_config, kcc = fake_config({"host_pages": 16, "layerwise": False, "load_last_block": last_block})
    conn = DynKVConnector(vllm_config, KVConnectorRole.SCHEDULER, kcc)
    try:
        prompt = tokens(rng, 2 * BS)
        a = FakeRequest("a", prompt)
        conn.on_new_request(a)
        complete(conn, conn.build_connector_meta(step(new={"a": [1, 2]}, scheduled={"a": 2 * BS})))
        b = FakeRequest("b", prompt)
        conn.on_new_request(b)
        loaded = 2 * BS if last_block else BS
        assert conn.get_num_new_matched_tokens(b, 0) == (loaded, True)
        assert conn.get_num_new_matched_tokens(b, BS) == ((BS, True) if last_block else (0, False))
        c = FakeRequest("c", prompt + [7])  # one token more: the second block is no longer the last
        conn.on_new_request(c)
        assert conn.get_num_new_matched_tokens(c, 0) == (2 * BS, True)
        conn.update_state_after_alloc(c, blocks([5, 6, 7]), 0)
        assert conn.get_num_new_matched_tokens(b, 0) == (loaded, True)
        conn.update_state_after_alloc(b, blocks([3, 4]), 0)  # vLLM chose not to load (e.g. no room)
        assert conn.build_connector_meta(step()).plan.loads == []
        assert conn.leader.stats()["host"]["pinned"] == 0
    finally:
        conn.shutdown()


def test_host_hit_loads_in_the_step_that_computes_it(sync_conn: Any, rng: np.random.Generator) -> None:
    conn = sync_conn
    shared = tokens(rng, 2 * BS)
    served(conn, "a", shared + tokens(rng, 40), [1, 2, 3])
    b = FakeRequest("b", shared + tokens(rng, 5))
    conn.on_new_request(b)
    assert conn.get_num_new_matched_tokens(b, 0) == (2 * BS, False)  # not async: computed this step
    conn.update_state_after_alloc(b, blocks([9, 10, 11]), 2 * BS)
    assert conn.get_external_cache_hit_sources(b, 2 * BS) == {CacheHitSource.HOST: 2 * BS}
    meta = conn.build_connector_meta(step(new={"b": [9, 10, 11]}, scheduled={"b": 5}))
    (load,) = meta.plan.loads
    assert load.sync and load.block_ids == (9, 10) and load.req_id == "b"
    complete(conn, meta)
    assert conn.leader.stats()["host"]["pinned"] == 0


@pytest.mark.parametrize("first", [None, "zero", "copy", "off"])
def test_host_hit_loads_start_before_input_preparation(rng: np.random.Generator, first: str | None) -> None:
    """A step's sync loads start in handle_preemptions, unless vLLM writes blocks in that step's preparation."""
    vllm_config, kcc = fake_config({"host_pages": 16, "early_loads": first != "off"})
    conn = DynKVConnector(vllm_config, KVConnectorRole.SCHEDULER, kcc)
    try:
        shared = tokens(rng, 2 * BS)
        served(conn, "a", shared + tokens(rng, 40), [1, 2, 3])
        out = step(new={"x": [20]}, scheduled={"x": 8})  # a request dynkv does not know: no loads
        assert conn.build_connector_meta(out).early is False
        b = FakeRequest("b", shared + tokens(rng, 5))
        conn.on_new_request(b)
        assert conn.get_num_new_matched_tokens(b, 0) == (2 * BS, False)
        conn.update_state_after_alloc(b, blocks([9, 10, 11]), 2 * BS)
        out = step(new={"b": [9, 10, 11]}, scheduled={"b": 5})
        if first == "zero":
            out.new_block_ids_to_zero = [9, 10, 11]
        elif first == "copy":
            out.kv_cache_block_copies = [SimpleNamespace(src=4, dst=11)]
        meta = conn.build_connector_meta(out)
        assert [op.block_ids for op in meta.plan.loads] == [(9, 10)]
        assert meta.early is (first is None)
    finally:
        conn.shutdown()


@pytest.mark.parametrize("first", [None, "zero", "off"])
def test_scheduler_launches_host_hit_loads_on_a_worker_in_its_process(rng: np.random.Generator, monkeypatch,
                                                                       first: str | None) -> None:
    """TP=1 under the uni executor: the step's sync loads start as the scheduler builds the step."""
    vllm_config, kcc = fake_config({"host_pages": 16})
    conn = DynKVConnector(vllm_config, KVConnectorRole.SCHEDULER, kcc)
    calls: list[Any] = []

    class Worker:  # the engine's worker, in this process
        def start_scheduled(self, plan: StepPlan, preempted: Any, *, layer_hooks: bool) -> bool:
            calls.append((plan, tuple(preempted), layer_hooks))
            return True

    worker = Worker()
    monkeypatch.setitem(dynkv.worker.worker._IN_PROCESS, conn.pool_name, worker)
    conn.scheduler_loads = first != "off"
    try:
        shared = tokens(rng, 2 * BS)
        served(conn, "a", shared + tokens(rng, 40), [1, 2, 3])
        assert calls == [], "steps without sync loads launch nothing"
        b = FakeRequest("b", shared + tokens(rng, 5))
        conn.on_new_request(b)
        assert conn.get_num_new_matched_tokens(b, 0) == (2 * BS, False)
        conn.update_state_after_alloc(b, blocks([9, 10, 11]), 2 * BS)
        out = step(new={"b": [9, 10, 11]}, scheduled={"b": 5})
        out.preempted_req_ids = {"p"}
        if first == "zero":
            out.new_block_ids_to_zero = [9, 10, 11]
        meta = conn.build_connector_meta(out)
        assert [op.block_ids for op in meta.plan.loads] == [(9, 10)]
        assert meta.early is (first != "zero")
        # vLLM zeroes blocks in that step's input preparation: the loads wait for it (start_load_kv).
        assert calls == ([(meta.plan, ("p",), True)] if first is None else [])
    finally:
        conn.shutdown()


@pytest.mark.parametrize("others,whole", [({}, True), ({"d": 1}, True), ({"p": 5}, False)])
def test_sync_loads_of_a_uniform_decode_step_are_waited_for_whole(rng: np.random.Generator, others: dict,
                                                                   whole: bool) -> None:
    """A step of one-token requests may run as one CUDA graph (no layer hooks): its sync loads go whole."""
    vllm_config, kcc = fake_config({"host_pages": 16})
    conn = DynKVConnector(vllm_config, KVConnectorRole.SCHEDULER, kcc)
    try:
        prompt = tokens(rng, 2 * BS)
        served(conn, "a", prompt, [1, 2])
        b = FakeRequest("b", prompt + [20])  # both blocks load; the step computes the one token after them
        conn.on_new_request(b)
        assert conn.get_num_new_matched_tokens(b, 0) == (2 * BS, False)
        conn.update_state_after_alloc(b, blocks([9, 10, 11]), 2 * BS)
        meta = conn.build_connector_meta(step(new={"b": [9, 10, 11]}, scheduled={"b": 1, **others}))
        assert [op.block_ids for op in meta.plan.loads] == [(9, 10)]
        assert meta.whole is whole and meta.early is True
    finally:
        conn.shutdown()


def test_worker_side_starts_early_loads_after_waiting_for_preempted_stores() -> None:
    calls: list[Any] = []
    conn = DynKVConnector.__new__(DynKVConnector)  # the worker side's hook alone, on a recording worker
    conn.worker = SimpleNamespace(
        wait=lambda ids: calls.append(("wait", tuple(ids))),
        start_early=lambda plan, layer_hooks: calls.append(("start_early", plan, layer_hooks)),
        start=lambda plan, layer_hooks: calls.append(("start", plan, layer_hooks)))
    plan = StepPlan()
    conn.handle_preemptions(DynKVMetadata(plan, ("p",), True))
    assert calls == [("wait", ("p",)), ("start_early", plan, True)]
    calls.clear()
    conn.handle_preemptions(DynKVMetadata(plan, (), False))
    assert calls == []
    # A uniform decode step: whole loads, whether the forward context shows the graph mode or not.
    meta = DynKVMetadata(plan, (), True, whole=True)
    conn.handle_preemptions(meta)
    conn._connector_metadata = meta
    conn.start_load_kv(SimpleNamespace())
    assert calls == [("start_early", plan, False), ("start", plan, False)]
    calls.clear()
    conn._connector_metadata = DynKVMetadata(plan)
    conn.start_load_kv(SimpleNamespace(cudagraph_runtime_mode=SimpleNamespace(name="FULL")))
    conn.start_load_kv(SimpleNamespace(cudagraph_runtime_mode=SimpleNamespace(name="PIECEWISE")))
    assert calls == [("start", plan, False), ("start", plan, True)]


def test_whole_prompt_host_hit_leaves_the_last_block_to_compute(sync_conn: Any, rng: np.random.Generator) -> None:
    """The step that computes a sync hit computes at least one token: the last block of a whole-prompt hit."""
    conn = sync_conn
    prompt = tokens(rng, 3 * BS)
    served(conn, "a", prompt, [1, 2, 3], finish=False)
    b = FakeRequest("b", prompt)
    conn.on_new_request(b)
    assert conn.get_num_new_matched_tokens(b, 0) == (2 * BS, False)
    assert conn.get_num_new_matched_tokens(b, BS) == (BS, False)
    assert conn.get_num_new_matched_tokens(b, 2 * BS) == (0, False)  # nothing left but the block to compute
    conn.update_state_after_alloc(b, blocks([4, 5, 6]), 0)
    assert conn.build_connector_meta(step()).plan.loads == []
    assert conn.leader.stats()["host"]["pinned"] == 0
    c = FakeRequest("c", prompt + [20])  # one more token: every stored block loads
    conn.on_new_request(c)
    assert conn.get_num_new_matched_tokens(c, 0) == (3 * BS, False)


@pytest.mark.parametrize("disk_wait_ms", [0.0, 10_000.0])
def test_disk_hit_stays_asynchronous(tmp_path, rng: np.random.Generator, disk_wait_ms: float) -> None:
    vllm_config, kcc = fake_config({"host_pages": 4, "disk_paths": [str(tmp_path)], "disk_gb": 0.01,
                                    "disk_admit_min_hits": 0, "disk_wait_ms": disk_wait_ms})
    conn = DynKVConnector(vllm_config, KVConnectorRole.SCHEDULER, kcc)

    def serve(rid: str, toks: list[int], block_ids: list[int]) -> None:
        served(conn, rid, toks, block_ids)
        deadline = time.monotonic() + 10
        while not conn.leader.idle():  # write-through to disk
            assert time.monotonic() < deadline, conn.leader.stats()
            complete(conn, conn.build_connector_meta(step()))
            time.sleep(0.01)

    try:
        prompt = tokens(rng, 3 * BS)
        serve("a", prompt, [1, 2, 3])
        for i in range(2):  # fillers push a's pages from the 4-page host tier (they stay on disk)
            serve(f"f{i}", tokens(rng, 3 * BS), [4, 5, 6])
        b = FakeRequest("b", prompt + [20])
        conn.on_new_request(b)
        assert conn.get_num_new_matched_tokens(b, 0) == (3 * BS, True), "pages on disk load asynchronously"
        if disk_wait_ms:
            # Steps that schedule nothing wait for the disk reads instead of returning at once: each such step
            # takes in at least one landed read, so within three steps the load of the 3 pages is in a plan.
            conn.update_state_after_alloc(b, blocks([7, 8, 9, 10]), 3 * BS)
            loads = []
            for _ in range(3):
                meta = conn.build_connector_meta(step())
                loads += meta.plan.loads
                if loads:
                    break
            assert [op.block_ids for op in loads] == [(7, 8, 9)], conn.leader.stats()
            assert not conn.leader.wait_disk(10.0), "nothing reading: returns at once"
    finally:
        conn.shutdown()


def test_preemption_and_resumption(conn: Any, rng: np.random.Generator) -> None:
    a = FakeRequest("a", tokens(rng, 3 * BS))
    conn.on_new_request(a)
    meta = conn.build_connector_meta(step(new={"a": [1, 2, 3]}, scheduled={"a": BS}))
    assert [op.block_ids for op in meta.plan.stores] == [(1,)]
    a.num_computed_tokens = BS
    meta = conn.build_connector_meta(step(preempted={"a"}))
    assert meta.preempted == ("a",)
    a.num_computed_tokens = 0  # resumed with new blocks
    meta = conn.build_connector_meta(step(cached={"a": [7, 8, 9]}, resumed={"a"}, scheduled={"a": 3 * BS - 1}))
    assert [op.block_ids for op in meta.plan.stores] == [(8,)]  # block 0 is stored (or in flight) already


def test_reset_cache_empties_the_tiers(conn: Any, rng: np.random.Generator) -> None:
    a = FakeRequest("a", tokens(rng, 2 * BS + 1))
    conn.on_new_request(a)
    complete(conn, conn.build_connector_meta(step(new={"a": [1, 2, 3]}, scheduled={"a": a.num_tokens})))
    assert conn.leader.stats()["host"]["stored"] == 2
    assert conn.reset_cache() is True
    assert conn.leader.stats()["host"]["stored"] == 0
    a.num_computed_tokens = a.num_tokens
    a.all_token_ids.append(17)
    meta = conn.build_connector_meta(step(cached={"a": None}, scheduled={"a": 1}))
    assert [op.block_ids for op in meta.plan.stores] == [(1, 2)]  # a running request offloads again


def test_stats_carry_counter_deltas_and_gauges(conn: Any, rng: np.random.Generator) -> None:
    a = FakeRequest("a", tokens(rng, 2 * BS + 1))
    conn.on_new_request(a)
    conn.get_num_new_matched_tokens(a, 0)
    complete(conn, conn.build_connector_meta(step(new={"a": [1, 2, 3]}, scheduled={"a": a.num_tokens})))
    stats = conn.get_kv_connector_stats()
    assert stats.data["counters"]["dynkv_pages_moved_total{direction=d2h}"] == 2
    assert stats.data["gauges"]["dynkv_tier_capacity_pages{tier=host}"] == 16
    assert conn.get_kv_connector_stats() is None  # nothing new since
    merged = DynKVStats(data={"counters": {"x_total{}": 1}}).aggregate(DynKVStats(data={"counters": {"x_total{}": 2}}))
    assert merged.data["counters"] == {"x_total{}": 3} and merged.reduce() == {"x": 3}


def test_stats_read_the_histogram_at_most_once_per_interval_and_lose_nothing(rng: np.random.Generator) -> None:
    vllm_config, kcc = fake_config({"host_pages": 16, "stats_interval_s": 3600})
    conn = DynKVConnector(vllm_config, KVConnectorRole.SCHEDULER, kcc)
    try:
        conn.get_kv_connector_stats()  # reads everything: the interval starts
        served(conn, "a", tokens(rng, 2 * BS + 1), [1, 2, 3])
        conn.leader.metrics.latency.labels("d2h").observe(0.01)
        stats = conn.get_kv_connector_stats()
        assert stats.data["counters"]["dynkv_pages_moved_total{direction=d2h}"] == 2, "counters at every step"
        assert not any(k.startswith("dynkv_transfer_seconds") for k in stats.data["counters"])
        conn._stats_at -= 3600
        served(conn, "b", tokens(rng, BS + 1), [4, 5])
        conn.leader.metrics.latency.labels("d2h").observe(0.02)
        stats = conn.get_kv_connector_stats()
        assert stats.data["counters"]["dynkv_pages_moved_total{direction=d2h}"] == 1
        assert stats.data["counters"]["dynkv_transfer_seconds_count{direction=d2h}"] == 2, "both observations"
    finally:
        conn.shutdown()


def test_worker_reports_without_a_worker_metadata_channel(conn: Any, rng: np.random.Generator,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM without worker metadata: the report rides in the stats, merged over ranks."""
    monkeypatch.setattr(connector_mod, "KVConnectorWorkerMetadata", None)
    a = FakeRequest("a", tokens(rng, BS + 1))
    conn.on_new_request(a)
    meta = conn.build_connector_meta(step(new={"a": [4, 5]}, scheduled={"a": a.num_tokens}))
    (store,) = meta.plan.stores
    halves = [DynKVStats.with_report(WorkerReport(done={store.job: 1})) for _ in range(2)]
    carried = DynKVStats(data={}).aggregate(halves[0]).aggregate(halves[1])
    assert carried.take_report().done == {store.job: 2}
    conn.update_connector_output(SimpleNamespace(kv_connector_worker_meta=None, kv_connector_stats=halves[0]))
    assert conn.leader.stats()["host"]["stored"] == 1


def test_worker_metadata_merges_ranks() -> None:
    a = DynKVWorkerMetadata(WorkerReport(done={1: 1}, failed_blocks={3}, moved={"h2d": (10, 0.5)}))
    b = DynKVWorkerMetadata(WorkerReport(done={1: 1, 2: 1}, moved={"h2d": (5, 0.25)}))
    m = a.aggregate(b)
    assert m.report.done == {1: 2, 2: 1} and m.report.failed_blocks == {3} and m.report.moved["h2d"] == (15, 0.75)


def test_prometheus_metrics_per_engine() -> None:
    reg = CollectorRegistry()
    types = {cls: functools.partial(cls, registry=reg) for cls in (Counter, Gauge, Histogram)}
    prom = DynKVPromMetrics(SimpleNamespace(kv_transfer_config=None), types, ["engine"], {0: ["0"], 1: ["1"]})
    prom.observe({"counters": {"dynkv_hits_total{tier=host}": 3},
                  "gauges": {"dynkv_tier_pages{state=stored,tier=disk}": 7}}, 1)
    prom.observe({"counters": {"dynkv_hits_total{tier=host}": 2}}, 1)
    assert reg.get_sample_value("vllm:dynkv_hits_total", {"engine": "1", "tier": "host"}) == 5
    assert reg.get_sample_value("vllm:dynkv_tier_pages", {"engine": "1", "state": "stored", "tier": "disk"}) == 7


def test_config_errors_name_the_key_and_load_failures_recompute() -> None:
    with pytest.raises(ValueError, match=r"bad kv_connector_extra_config: .*unknown key 'host_gbb'"):
        DynKVConnector(*fake_config({"host_gbb": 1})[:1], KVConnectorRole.SCHEDULER, fake_config()[1])
    with pytest.raises(ValueError, match="pipeline_parallel_size=2"):
        model_geometry(*fake_config(pp=2))
    vllm_config, kcc = fake_config()
    c = DynKVConnector(vllm_config, KVConnectorRole.SCHEDULER, kcc)
    c.shutdown()
    assert vllm_config.kv_transfer_config.kv_load_failure_policy == "recompute"


def test_geometry_and_fingerprint_from_the_config() -> None:
    geometry, fp = model_geometry(*fake_config())
    assert (geometry.num_layers, geometry.num_heads, geometry.block_size, geometry.token_bytes) == (2, 2, BS, 16)
    assert (fp.model_id, fp.dtype, fp.head_size) == ("/models/unit", "float16", 4)


def test_geometry_from_vllm_0_26_kv_cache_tensors() -> None:
    """vLLM 0.26 names a tensor's layers ``shared_by``: layers sharing one cache count once."""
    vllm_config, kcc = fake_config()
    kcc.kv_cache_tensors = [SimpleNamespace(shared_by=[n]) for n in LAYERS]
    assert model_geometry(vllm_config, kcc)[0].num_layers == 2
    kcc.kv_cache_tensors = [SimpleNamespace(shared_by=list(LAYERS))]
    assert model_geometry(vllm_config, kcc)[0].num_layers == 1


def test_kv_tensor_axes() -> None:
    assert infer_dims(torch.empty(10, 2, BS, 8), 10, 2, BS) == "BHNC"
    assert infer_dims(torch.empty(2, 10, BS, 4, 8), 10, 4, BS) == "KBNHD"  # flash-attn style
    assert infer_dims(torch.empty(10, 2, 4, BS, 8), 10, 4, BS) == "BKHND"
    with pytest.raises(ValueError, match="kernel block splitting"):
        infer_dims(torch.empty(20, 2, 16, 8), 10, 2, 16)
    with pytest.raises(ValueError, match="cannot tell the axes"):
        infer_dims(torch.empty(2, 10, 4, 4, 8), 10, 4, 4)


def test_layers_in_model_order_each_storage_once() -> None:
    t = {f"model.layers.{i}.self_attn.attn": torch.full((1,), float(i)) for i in (10, 2, 1)}
    t["model.layers.11.self_attn.attn"] = t["model.layers.10.self_attn.attn"]  # shares layer 10's cache
    assert [float(x) for x in distinct_layers(t)] == [1.0, 2.0, 10.0]


def test_plugin_registers_the_name_once() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from dynkv.plugin import register

    register()
    register()
    assert KVConnectorFactory.get_connector_class_by_name("DynKVConnector") is DynKVConnector
    pyproject = tomllib.loads(Path(__file__).parents[2].joinpath("pyproject.toml").read_text())
    assert pyproject["project"]["entry-points"]["vllm.general_plugins"]["dynkv"] == "dynkv.plugin:register"


def test_plugin_checks_the_settings_when_vllm_looks_the_connector_up() -> None:
    """vLLM looks the class up while it builds its config: a bad setting fails there, naming its key."""
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from dynkv.plugin import register

    register()
    register()
    assert KVConnectorFactory.get_connector_class.__func__._dynkv_checks  # wrapped, once
    good = KVTransferConfig(kv_connector="DynKVConnector", kv_role="kv_both",
                            kv_connector_extra_config={"host_pages": 8})
    assert KVConnectorFactory.get_connector_class(good) is DynKVConnector
    bad = KVTransferConfig(kv_connector="DynKVConnector", kv_role="kv_both",
                           kv_connector_extra_config={"host_pages": -3})
    with pytest.raises(ValueError, match="DynKVConnector: bad kv_connector_extra_config: .*host_pages"):
        KVConnectorFactory.get_connector_class(bad)
    other = KVTransferConfig(kv_connector="ExampleConnector", kv_role="kv_both",
                             kv_connector_extra_config={"host_pages": -3})
    assert KVConnectorFactory.get_connector_class(other).__name__ == "ExampleConnector"  # not dynkv's to check



def test_kv_events_carry_vllm_hashes_tokens_and_medium_one_event_per_chained_run(tmp_path) -> None:
    from vllm.distributed.kv_events import BlockRemoved, BlockStored
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash as ext

    from dynkv.connector.events import KVEvents
    from dynkv.index import IndexEvent

    on = SimpleNamespace(kv_events_config=SimpleNamespace(enable_kv_cache_events=True))
    ev = KVEvents(on, block_size=2, log_dir=str(tmp_path), fingerprint=b"f" * 16)
    keys, toks = [b"k0", b"k1", b"k2", b"k3"], [10, 11, 12, 13, 14, 15, 16, 17]
    hashes = [bytes([i]) * 32 for i in range(4)]
    h0, h1, h2, h3 = (ext(h) for h in hashes)  # as vLLM publishes its own (ints by default)
    lora = SimpleNamespace(lora_int_id=7, lora_name="l")
    ev.remember(keys, hashes, toks, lora, 0, 4)
    out = ev.convert([IndexEvent("stored", "host", b"k0"), IndexEvent("stored", "host", b"k1"),
                      IndexEvent("stored", "host", b"k3"), IndexEvent("stored", "disk", b"k0"),
                      IndexEvent("stored", "disk", b"k1"), IndexEvent("removed", "host", b"k0"),
                      IndexEvent("removed", "host", b"k1"), IndexEvent("stored", "host", b"zz")])
    assert [type(e) for e in out] == [BlockStored, BlockStored, BlockStored, BlockRemoved]
    a, b, c, d = out
    # k0, k1 chain: one event; k3 does not follow k1 (k2 is missing): its own, with its parent's hash.
    assert (a.block_hashes, a.parent_block_hash, a.token_ids, a.medium, a.lora_name) == (
        [h0, h1], None, [10, 11, 12, 13], "CPU", "l")
    assert (b.block_hashes, b.parent_block_hash, b.token_ids, b.medium) == ([h3], h2, [16, 17], "CPU")
    assert (c.block_hashes, c.medium) == ([h0, h1], "STORAGE")
    assert (d.block_hashes, d.medium) == ([h0, h1], "CPU")
    assert ev.unknown == 1  # "zz" was never remembered: no vLLM hash, no event
    # The disk still holds k0, k1: their removal from it still finds their hashes after a cache reset.
    ev.clear()
    out = ev.convert([IndexEvent("removed", "disk", b"k0"), IndexEvent("removed", "disk", b"k1"),
                      IndexEvent("removed", "disk", b"k0")])
    assert [(type(e), e.block_hashes, e.medium) for e in out] == [(BlockRemoved, [h0, h1], "STORAGE")]
    assert KVEvents(SimpleNamespace(), block_size=2).convert([IndexEvent("stored", "host", b"k1")]) == []


def test_kv_events_announce_disk_pages_found_at_start(tmp_path) -> None:
    """The disk tier's pages' hashes survive a restart in the events file; pages adopted from disk at start are
    announced with them, and a file written under another hash seed is ignored."""
    from vllm.v1.core import kv_cache_utils

    from dynkv.connector.events import KVEvents
    from dynkv.index import IndexEvent

    on = SimpleNamespace(kv_events_config=SimpleNamespace(enable_kv_cache_events=True))
    first = KVEvents(on, block_size=2, log_dir=str(tmp_path), fingerprint=b"f" * 16)
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash as ext

    hashes = [bytes([i]) * 32 for i in range(3)]
    first.remember([b"k0", b"k1", b"k2"], hashes, [1, 2, 3, 4, 5, 6], None, 0, 3)
    first.convert([IndexEvent("stored", "host", k) for k in (b"k0", b"k1", b"k2")]
                  + [IndexEvent("stored", "disk", k) for k in (b"k0", b"k1", b"k2")])
    first.convert([IndexEvent("removed", "disk", b"k2")])
    first.close()
    again = KVEvents(on, block_size=2, log_dir=str(tmp_path), fingerprint=b"f" * 16)
    out = again.convert([IndexEvent("stored", "disk", b"k0"), IndexEvent("stored", "disk", b"k1")])
    assert [(e.block_hashes, e.parent_block_hash, e.token_ids, e.medium) for e in out] == [
        ([ext(hashes[0]), ext(hashes[1])], None, [1, 2, 3, 4], "STORAGE")]
    again.close()
    other_model = KVEvents(on, block_size=2, log_dir=str(tmp_path), fingerprint=b"g" * 16)
    assert other_model.convert([IndexEvent("stored", "disk", b"k0")]) == [] and other_model.unknown == 1
    other_model.close()
    saved = getattr(kv_cache_utils, "NONE_HASH", None)
    kv_cache_utils.NONE_HASH = b"another seed"
    try:
        reseeded = KVEvents(on, block_size=2, log_dir=str(tmp_path), fingerprint=b"f" * 16)
        assert reseeded.convert([IndexEvent("stored", "disk", b"k0")]) == []
        reseeded.close()
    finally:
        if saved is None:
            del kv_cache_utils.NONE_HASH
        else:
            kv_cache_utils.NONE_HASH = saved


def test_dynkv_logs_where_vllm_logs_and_says_what_it_set_up(monkeypatch) -> None:
    import logging

    got: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            got.append(record.getMessage())

    vllm_logger, ours = logging.getLogger("vllm"), logging.getLogger("dynkv")
    monkeypatch.setattr(vllm_logger, "handlers", [Collect()])
    monkeypatch.setattr(vllm_logger, "level", logging.INFO)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as under vLLM: nothing on the root logger
    monkeypatch.setattr(ours, "handlers", [])
    monkeypatch.setattr(ours, "level", logging.NOTSET)
    monkeypatch.setattr(ours, "propagate", True)
    vllm_config, kcc = fake_config({"host_pages": 16})
    c = DynKVConnector(vllm_config, KVConnectorRole.SCHEDULER, kcc)
    try:
        line = next((m for m in got if m.startswith("dynkv unit-engine: host tier")), None)
        assert line is not None, got
        assert "16 pages" in line and "no disk tier" in line and "eviction lru" in line and "TP 1" in line
        assert ours.handlers == vllm_logger.handlers and not ours.propagate
    finally:
        c.shutdown()


def test_each_data_parallel_rank_keeps_its_own_disk_directory(tmp_path: Path) -> None:
    """vLLM runs a dense model's DP ranks as independent engines (DP size 1); the rank survives in its index."""
    vllm_config, kcc = fake_config({"host_pages": 8, "disk_gb": 0.01, "disk_paths": [str(tmp_path)]})
    assert data_parallel_rank(vllm_config) is None
    par = vllm_config.parallel_config
    par.data_parallel_size, par.data_parallel_rank, par.data_parallel_index, par.data_parallel_rank_local = 1, 0, 1, 1
    vllm_config.kv_transfer_config.engine_id = "unit-engine_dp1"
    assert data_parallel_rank(vllm_config) == (1, 1)
    c = DynKVConnector(vllm_config, KVConnectorRole.SCHEDULER, kcc)
    try:
        assert c.config.disk_paths == (str(tmp_path / "dp1"),)
        assert [p.name for p in tmp_path.iterdir()] == ["dp1"]
    finally:
        c.shutdown()
    par.data_parallel_size, par.data_parallel_rank = 2, 1  # a MoE model's ranks keep vLLM's DP fields
    assert data_parallel_rank(vllm_config) == (1, 1)


def test_vllm_version_guard() -> None:
    from dynkv.connector.engine import NEWEST_VLLM, check_vllm_version

    assert check_vllm_version("0.32.0") is None and check_vllm_version("0.26.1+cpu") is None
    with pytest.raises(ValueError, match=r"vLLM 0.25.2 is older than dynkv supports \(0.26 to 0.33\); upgrade"):
        check_vllm_version("0.25.2")
    with pytest.raises(ValueError, match="cannot read vLLM's version 'dev'"):
        check_vllm_version("dev")
    newer = f"{NEWEST_VLLM[0]}.{NEWEST_VLLM[1] + 1}.0"
    assert f"vLLM {newer} is newer than dynkv was tested with" in check_vllm_version(newer)
    assert "newer" in check_vllm_version("1.0.0")
