"""The connector's kv_role in disaggregated serving, with stand-ins for vLLM's objects (no engine).

A ``kv_producer`` connector answers a finished request that asked for a
remote decode with ``kv_transfer_params`` naming its pages (even while their
stores are in flight); a ``kv_consumer`` connector given those params loads
them asynchronously with a pull, counts them as peer-to-peer hits, and falls
back to recomputing when the params are unusable. The pulls themselves are
tested across processes in ``test_disagg.py``.
"""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from connector_stubs import BS, FakeRequest, blocks, complete, fake_config, step, tokens
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from dynkv.connector import DynKVConnector, DynKVWorkerMetadata
from dynkv.disagg.params import RemotePrefill
from dynkv.protocol import WorkerReport

pytest.importorskip("nixl", reason="a kv_producer connector starts a NIXL agent")


SECRET = "unit-" + "5ec2e7" * 8


def connector(role: str, engine_id: str, **extra: Any) -> DynKVConnector:
    vllm_config, kcc = fake_config({"host_pages": 16, "transfer_secret": SECRET, **extra})
    vllm_config.kv_transfer_config.kv_role = role
    vllm_config.kv_transfer_config.engine_id = engine_id
    return DynKVConnector(vllm_config, KVConnectorRole.SCHEDULER, kcc)


@pytest.fixture
def pair() -> Any:
    p, d = connector("kv_producer", "prefill"), connector("kv_consumer", "decode")
    yield p, d
    p.shutdown()
    d.shutdown()


def request(rid: str, prompt: list[int], params: dict | None) -> FakeRequest:
    r = FakeRequest(rid, prompt)
    r.prompt_token_ids = list(prompt)
    r.kv_transfer_params = params
    return r


def prefill(p: DynKVConnector, rid: str, prompt: list[int]) -> dict[str, Any] | None:
    """Run a request through the producer: one step computes the prompt; it finishes with its stores in flight."""
    a = request(rid, prompt, {"do_remote_decode": True, "do_remote_prefill": False})
    p.on_new_request(a)
    assert p.get_num_new_matched_tokens(a, 0) == (0, False)
    ids = list(range(len(prompt) // BS + 1))
    meta = p.build_connector_meta(step(new={rid: ids}, scheduled={rid: len(prompt)}))
    delay, params = p.request_finished(a, ids)
    assert delay is True, "blocks stay until their stores are done"
    complete(p, meta)
    return params


def test_producer_exports_and_consumer_pulls(pair: Any, rng: np.random.Generator) -> None:
    p, d = pair
    prompt = tokens(rng, 3 * BS + 5)
    params = prefill(p, "a", prompt)
    params = json.loads(json.dumps(params))  # through the proxy
    remote = RemotePrefill.from_params(params)
    assert remote is not None and len(remote.slots) == 3 and remote.host == "127.0.0.1"
    assert params["remote_port"] == p.leader.exporter.port and params["remote_engine_id"] == "prefill"
    assert p.leader.stats()["host"]["pinned"] == 3  # until the decode engine releases them

    b = request("a", prompt, params)
    d.on_new_request(b)
    assert d.get_num_new_matched_tokens(b, 0) == (3 * BS, True)
    d.update_state_after_alloc(b, blocks([7, 8, 9, 10]), 3 * BS)
    assert d.get_external_cache_hit_sources(b, 3 * BS) == {CacheHitSource.P2P: 3 * BS}
    (load,) = d.build_connector_meta(step()).plan.loads
    assert load.block_ids == (7, 8, 9) and load.pull is not None
    assert load.pull.remote_slots == remote.slots and load.pull.local_slots == load.slots
    assert (load.pull.host, load.pull.port, load.pull.transfer) == (remote.host, remote.port, remote.transfer)
    # Every rank pulled and loaded: the pages are the decode engine's own now.
    d.update_connector_output(_report(WorkerReport(done={load.job: 1})))
    assert d.leader.stats()["host"]["stored"] == 3 and d.leader.stats()["host"]["pinned"] == 0
    assert d.request_finished(b, [7, 8, 9, 10]) == (False, None)


def test_failed_pull_gives_its_slots_back(pair: Any, rng: np.random.Generator) -> None:
    p, d = pair
    prompt = tokens(rng, 2 * BS + 1)
    b = request("a", prompt, prefill(p, "a", prompt))
    d.on_new_request(b)
    assert d.get_num_new_matched_tokens(b, 0) == (2 * BS, True)
    d.update_state_after_alloc(b, blocks([1, 2, 3]), 2 * BS)
    (load,) = d.build_connector_meta(step()).plan.loads
    d.update_connector_output(_report(WorkerReport(failed={load.job: 1}, failed_blocks={1, 2})))
    host = d.leader.stats()["host"]
    assert host["stored"] == 0 and host["pending"] == 0 and host["pinned"] == 0
    assert d.leader.metrics.value("dynkv_load_errors_total", reason="remote") == 2


def test_unusable_params_are_recomputed(pair: Any, rng: np.random.Generator, caplog: Any) -> None:
    p, d = pair
    prompt = tokens(rng, 2 * BS + 1)
    params = prefill(p, "a", prompt)
    caplog.set_level(logging.WARNING, "dynkv.connector")
    other = request("x", tokens(rng, 2 * BS + 1), params)  # another prompt than the one prefilled
    d.on_new_request(other)
    assert d.get_num_new_matched_tokens(other, 0) == (0, False)
    assert "hold other tokens than this request's prompt" in caplog.text
    forged = json.loads(json.dumps(params))
    forged["dynkv"]["fingerprint"] = "00" * 16
    r = request("y", prompt, forged)
    d.on_new_request(r)
    assert d.get_num_new_matched_tokens(r, 0) == (0, False)
    assert "serves another model" in caplog.text
    plain = request("z", prompt, {"do_remote_prefill": True, "remote_host": "h", "remote_port": 1})
    d.on_new_request(plain)
    assert d.get_num_new_matched_tokens(plain, 0) == (0, False)
    assert "does not run DynKVConnector as kv_producer" in caplog.text


def test_forged_params_are_refused_counted_and_never_pulled(pair: Any, rng: np.random.Generator) -> None:
    """Prompt B with prompt A's params: as they are (A's last key), and with B's own key put in."""
    p, d = pair
    a_prompt, b_prompt = tokens(rng, 3 * BS + 1), tokens(rng, 3 * BS + 1)
    params = prefill(p, "a", a_prompt)
    victim = request("b0", b_prompt, None)
    d.on_new_request(victim)
    b_keys = d._keys(d._reqs["b0"], 3)
    forged = json.loads(json.dumps(params))
    forged["dynkv"]["last_key"] = b_keys[2].hex()
    for rid, fake in (("b1", params), ("b2", forged)):
        r = request(rid, b_prompt, fake)
        d.on_new_request(r)
        assert d.get_num_new_matched_tokens(r, 0) == (0, False)
        assert not d.build_connector_meta(step()).plan.loads
    m = d.leader.metrics
    assert m.value("dynkv_remote_rejected_total", reason="key") == 1
    assert m.value("dynkv_remote_rejected_total", reason="mac") == 1
    assert d.leader.stats()["host"]["pending"] == 0


@pytest.mark.parametrize("accept", [False, True])
def test_kv_both_pulls_only_with_accept_remote_prefill(rng: np.random.Generator, accept: bool) -> None:
    p, both = connector("kv_producer", "prefill"), connector("kv_both", "agg", accept_remote_prefill=accept)
    try:
        prompt = tokens(rng, 2 * BS + 1)
        r = request("a", prompt, prefill(p, "a", prompt))
        both.on_new_request(r)
        assert both.get_num_new_matched_tokens(r, 0) == ((2 * BS, True) if accept else (0, False))
        assert both.leader.metrics.value("dynkv_remote_rejected_total", reason="not_accepted") == (0 if accept else 1)
    finally:
        p.shutdown()
        both.shutdown()


def test_only_a_producer_exports(rng: np.random.Generator, caplog: Any) -> None:
    both = connector("kv_both", "agg")
    try:
        assert both.leader.exporter is None  # aggregated serving starts no side channel
        a = request("a", tokens(rng, BS + 1), {"do_remote_decode": True})
        both.on_new_request(a)
        both.build_connector_meta(step(new={"a": [0, 1]}, scheduled={"a": BS + 1}))
        caplog.set_level(logging.WARNING, "dynkv.connector")
        assert both.request_finished(a, [0, 1])[1] is None
        assert "kv_role is not kv_producer" in caplog.text
    finally:
        both.shutdown()
    p = connector("kv_producer", "p")
    try:
        a = request("a", tokens(rng, BS + 1), None)  # a plain request on a prefill engine
        p.on_new_request(a)
        p.build_connector_meta(step(new={"a": [0, 1]}, scheduled={"a": BS + 1}))
        assert p.request_finished(a, [0, 1])[1] is None
    finally:
        p.shutdown()


def _report(report: WorkerReport) -> Any:
    return SimpleNamespace(kv_connector_worker_meta=DynKVWorkerMetadata(report))
