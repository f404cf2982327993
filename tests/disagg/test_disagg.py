"""Disaggregated prefill/decode at the KVBM level, without vLLM: NIXL between real processes.

A prefill engine runs in a child process (``disagg_harness.PrefillProcess``),
a decode engine here with its TP ranks as processes; every pulled block is
compared byte for byte with the KV its key stands for. Faults — a prefill
engine killed or frozen, one of another model or dynkv version, forged page
slots — must end in recomputed blocks within ``transfer_timeout_s``: no hang,
no crash, no wrong bytes, and no page or pin left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import signal
import threading
import time

import numpy as np
import pytest
from disagg_harness import SECRET, PrefillProcess, decode
from harness import Engine, Model

from dynkv.config import DynKVConfig
from dynkv.disagg.params import MAX_PAGES, ParamsError, RemotePrefill, asks_remote_decode
from dynkv.disagg.puller import PullError, Puller
from dynkv.disagg.wire import Handshake, IncompatibleError, SideChannelClient, SideChannelServer
from dynkv.leader import Leader
from dynkv.memory import HostPool
from dynkv.protocol import PullSpec, WorkerReport

pytest.importorskip("nixl", reason="disaggregated serving needs NIXL")


def decode_engine(model: Model, *, tp: int, processes: bool = True, **cfg: object) -> Engine:
    cfg.setdefault("host_pages", 64)
    cfg.setdefault("transfer_timeout_s", 20)
    cfg.setdefault("transfer_secret", SECRET)
    leader = Leader(DynKVConfig.from_dict(cfg, env={}), model.geometry(), model.fingerprint(), world_size=tp,
                    engine_id=f"decode-{id(cfg)}")
    return Engine(leader, model, tp=tp, processes=processes)


def close(engine: Engine) -> None:
    engine.close()
    engine.leader.close()


def assert_clean(engine: Engine) -> None:
    """Nothing left pending, pinned or reserved on the decode side."""
    engine.drain()
    host = engine.leader.stats()["host"]
    assert host["pinned"] == 0 and host["pending"] == 0, host
    assert not engine.leader._importing


def resign(params: dict, **fields: object) -> dict:
    """``params`` with ``fields`` changed and signed again under the deployment's secret: a buggy prefill engine."""
    from dataclasses import replace

    r = RemotePrefill.from_params(params)
    return replace(r, **fields).signed(SECRET.encode()).to_params()


def prompt(rng: np.random.Generator, model: Model, blocks: int, tail: int = 1) -> list[int]:
    return rng.integers(0, 1000, blocks * model.block_size + tail).tolist()


def wait_for(cond, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(what)
        time.sleep(0.05)


# -- kv_transfer_params, handshake, side channel --------------------------------------------


def params_for(**over: object) -> dict:
    base = RemotePrefill("p0", "127.0.0.1", 5555, "abc123", "t1", "aa" * 16, "bb" * 16, (3, 4, 5)).to_params()
    base["dynkv"].update({k: v for k, v in over.items() if k in base["dynkv"]})
    base.update({k: v for k, v in over.items() if k not in base["dynkv"]})
    return base


def test_params_round_trip_through_json() -> None:
    p = params_for()
    r = RemotePrefill.from_params(json.loads(json.dumps(p)))
    assert r == RemotePrefill("p0", "127.0.0.1", 5555, "abc123", "t1", "aa" * 16, "bb" * 16, (3, 4, 5))
    assert RemotePrefill.from_params(None) is None
    assert RemotePrefill.from_params({"do_remote_decode": True}) is None
    assert asks_remote_decode({"do_remote_decode": True}) and not asks_remote_decode(p)


@pytest.mark.parametrize(("over", "expected"), [
    ({"dynkv": None}, "no 'dynkv' entry"),
    ({"remote_port": 0}, "remote_port"),
    ({"remote_port": "80"}, "remote_port"),
    ({"remote_host": ""}, "remote_host"),
    ({"slots": []}, "slots"),
    ({"slots": [1, -2]}, "-2"),
    ({"slots": [1, "2"]}, "'2'"),
    ({"slots": [True]}, "True"),
    ({"slots": list(range(MAX_PAGES + 1))}, "slots"),
    ({"transfer": "a b"}, "transfer"),
    ({"fingerprint": "zz" * 16}, "fingerprint"),
    ({"last_key": "ab"}, "last_key"),
])
def test_bad_params_are_rejected(over: dict, expected: str) -> None:
    with pytest.raises(ParamsError, match=expected):
        RemotePrefill.from_params(params_for(**over))


def test_params_of_another_model_or_prompt_are_refused(rng: np.random.Generator) -> None:
    model = Model()
    fp = model.fingerprint()
    from dynkv.keys import block_keys

    keys = block_keys(fp, np.asarray(prompt(rng, model, 4)))
    good = RemotePrefill("p", "h", 1, "i", "t", fp.digest().hex(), keys[2].hex(), (7, 8, 9))
    assert good.verify(fp, keys, None).trusted is False
    with pytest.raises(ParamsError, match="serves another model"):
        RemotePrefill("p", "h", 1, "i", "t", "00" * 16, keys[2].hex(), (7, 8, 9)).verify(fp, keys, None)
    with pytest.raises(ParamsError, match="hold other tokens"):
        RemotePrefill("p", "h", 1, "i", "t", fp.digest().hex(), keys[1].hex(), (7, 8, 9)).verify(fp, keys, None)
    with pytest.raises(ParamsError, match="hold other tokens"):
        RemotePrefill("p", "h", 1, "i", "t", fp.digest().hex(), keys[3].hex(), (1, 2, 3, 4, 5)).verify(fp, keys,
                                                                                                      None)


def handshake(model: Model, **over: object) -> Handshake:
    hs = Handshake.describe(engine_id="e", fingerprint=model.fingerprint(), geometry=model.geometry(),
                            page_stride=4096, num_pages=8, pool_addr=1 << 20)
    return Handshake(**{**hs.to_json(), **over})


def test_handshake_parse_and_compatibility() -> None:
    model = Model()
    hs = handshake(model)
    assert Handshake.from_json(json.loads(json.dumps(hs.to_json()))) == hs
    for bad in ({"num_pages": -1}, {"num_pages": "8"}, {"model_id": 3}, {"page_stride": 1}, {"pool_addr": True}):
        with pytest.raises(ValueError, match="handshake"):
            Handshake.from_json({**hs.to_json(), **bad})
    hs.check_compatible(handshake(model, num_pages=99, pool_addr=5, engine_id="other"))
    with pytest.raises(IncompatibleError, match=r"num_layers 2 \(here 3\).*same model"):
        handshake(Model(num_layers=2)).check_compatible(hs)
    with pytest.raises(IncompatibleError, match=r"dynkv_version '9.9' \(here"):
        handshake(model, dynkv_version="9.9").check_compatible(hs)


def test_side_channel_round_trip_errors_and_timeouts() -> None:
    seen: list[dict] = []
    gate = threading.Event()

    def handler(msg: dict) -> tuple[dict, list[bytes]]:
        seen.append(msg)
        if msg["op"] == "slow":
            gate.wait(10)
        if msg["op"] == "boom":
            raise KeyError("x")
        return {"ok": msg["op"] != "no", "error": "refused here", "echo": msg.get("n")}, [b"\x00blob"]

    server = SideChannelServer("127.0.0.1", 0, handler)
    client = SideChannelClient("127.0.0.1", server.port)
    try:
        reply, blobs = client.call({"op": "hi", "n": 3}, time.monotonic() + 10)
        assert reply["echo"] == 3 and blobs == [b"\x00blob"]
        with pytest.raises(ConnectionError, match="refused here"):
            client.call({"op": "no"}, time.monotonic() + 10)
        with pytest.raises(ConnectionError, match="KeyError"):
            client.call({"op": "boom"}, time.monotonic() + 10)
        with pytest.raises(TimeoutError, match="no answer to 'slow'"):
            client.call({"op": "slow"}, time.monotonic() + 0.3)
        gate.set()  # the late answer to "slow" must not be taken for the next one
        assert client.call({"op": "hi", "n": 4}, time.monotonic() + 10)[0]["echo"] == 4
        client.notify({"op": "fire", "n": 5})
        wait_for(lambda: seen[-1].get("n") == 5, "notify did not arrive")
        with pytest.raises(ValueError, match="cannot bind"):
            SideChannelServer("127.0.0.1", server.port, handler)
    finally:
        client.close()
        server.close()
    dead = SideChannelClient("127.0.0.1", server.port)
    try:
        with pytest.raises(TimeoutError):
            dead.call({"op": "hi"}, time.monotonic() + 0.3)
    finally:
        dead.close()


def test_side_channel_client_closed_while_threads_call_it() -> None:
    """Twelve threads calling a dead peer while another closes the client: each gets a timeout or a clear
    "closed" error, never a socket closed under it."""
    server = SideChannelServer("127.0.0.1", 0, lambda msg: ({"ok": True}, []))
    port = server.port
    server.close()  # the peer is gone
    client = SideChannelClient("127.0.0.1", port)
    errors: list[BaseException] = []

    def pull() -> None:
        try:
            client.call({"op": "hi"}, time.monotonic() + 0.2)
        except (TimeoutError, ConnectionError) as e:
            errors.append(e)
        except BaseException as e:  # noqa: BLE001 - what the test looks for
            errors.append(e)

    threads = [threading.Thread(target=pull) for _ in range(12)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    client.close()
    client.close()  # idempotent
    for t in threads:
        t.join(10)
    assert len(errors) == 12
    unexpected = [e for e in errors if not isinstance(e, (TimeoutError, ConnectionError))]
    assert not unexpected, unexpected
    client.notify({"op": "late"})  # after close: dropped, no error
    with pytest.raises(ConnectionError, match="is closed"):
        client.call({"op": "hi"}, time.monotonic() + 1)


def test_pulls_queued_behind_a_dead_peer_fail_at_once() -> None:
    """Twelve pulls on four threads from a prefill engine that never answers: the first ones wait out the
    timeout, those queued meanwhile fail at once instead of one timeout each; a pull queued after that
    failure tries the engine again."""
    from concurrent.futures import ThreadPoolExecutor

    model = Model()
    server = SideChannelServer("127.0.0.1", 0, lambda msg: ({"ok": True}, []))
    port = server.port
    server.close()  # nobody answers there any more
    pool = HostPool.create(1 << 20, pin=False)
    puller = Puller(Handshake.describe(engine_id="d", fingerprint=model.fingerprint(), geometry=model.geometry(),
                                       page_stride=4096, num_pages=4, pool_addr=pool.ptr),
                    pool.nbytes, (0, model.num_heads), rank=0, world_size=1, timeout_s=0.5)
    try:
        t0 = time.monotonic()

        def pull(i: int) -> str:  # requests admitted 40 ms apart, as a burst of them would be
            spec = PullSpec("p", "127.0.0.1", port, "run1", i, (0,), (0,))
            try:
                puller.pull(spec, admitted=t0 + 0.04 * i)
            except PullError as e:
                return str(e)
            return "pulled"

        with ThreadPoolExecutor(4) as ex:
            outcomes = list(ex.map(pull, range(12)))
        waited = [o for o in outcomes if "no answer" in o]
        at_once = [o for o in outcomes if "not tried: another pull from that engine failed" in o]
        print(outcomes)
        assert len(waited) + len(at_once) == 12, outcomes
        assert len(waited) <= 4 and len(at_once) >= 8, outcomes
        # queued now, after the failure: it tries the engine again (and fails on its own)
        with pytest.raises(PullError, match="no answer"):
            puller.pull(PullSpec("p", "127.0.0.1", port, "run1", 99, (0,), (0,)), admitted=time.monotonic())
        stale = PullSpec("p", "127.0.0.1", port, "run1", 100, (0,), (0,))
        with pytest.raises(PullError, match="waited its whole transfer_timeout_s=0.5 s"):
            puller.pull(stale, admitted=time.monotonic() - 1.0)
    finally:
        puller.close()
        pool.close()


# -- pulls between processes ------------------------------------------------------------------


@pytest.mark.parametrize(("prefill_tp", "decode_tp", "heads"), [(2, 1, 4), (1, 2, 4), (4, 2, 4), (1, 2, 1)])
def test_pull_across_tp_sizes(rng: np.random.Generator, prefill_tp: int, decode_tp: int, heads: int) -> None:
    """Pages written at one TP size are pulled, slice by slice, at another; the decode engine keeps them."""
    model = Model(num_heads=heads, head_size=16 if heads == 1 else 8, dims="LBNHC")
    prefill = PrefillProcess(model, tp=prefill_tp)
    engine = decode_engine(model, tp=decode_tp)
    try:
        shared = prompt(rng, model, 3, tail=0)
        first = shared + prompt(rng, model, 2, tail=3)
        out = decode(engine, "a", first, prefill.prefill("a", first))
        assert out.refused is None and out.load_errors == set() and out.mismatched == []
        assert (out.local, out.pulled) == (0, 5)
        # A second prompt with the same opening: those pages are this engine's own now, only the rest is pulled.
        second = shared + prompt(rng, model, 3, tail=2)
        out = decode(engine, "b", second, prefill.prefill("b", second))
        assert out.load_errors == set() and out.mismatched == []
        assert (out.local, out.pulled) == (3, 3)
        m = engine.leader.metrics
        assert m.value("dynkv_pages_moved_total", direction="remote_to_host") == 8
        assert m.value("dynkv_hits_total", tier="remote") == 8
        # Each rank reads its own heads; ranks that replicate a head (MLA here) each read it.
        replicas = max(1, decode_tp // heads)
        assert m.value("dynkv_bytes_moved_total", direction="remote_to_host") == 8 * model.geometry().page_bytes * replicas
        assert_clean(engine)
        # Every decode rank released both exports: the prefill engine unpins their pages.
        wait_for(lambda: prefill.call("stats")["outcomes"]["released"] == 2, "exports not released")
        assert prefill.call("stats")["host"]["pinned"] == 0
    finally:
        close(engine)
        prefill.close()


def test_a_decode_engine_without_a_secret_keeps_pulls_private(rng: np.random.Generator) -> None:
    """No secret here: the pulled bytes serve the request, then go; the same prompt is pulled again, not hit."""
    model = Model()
    prefill = PrefillProcess(model, transfer_secret=None)
    engine = decode_engine(model, tp=2, transfer_secret=None)
    try:
        tokens = prompt(rng, model, 3)
        for req in ("a", "b"):
            out = decode(engine, req, tokens, prefill.prefill(req, tokens))
            assert (out.local, out.pulled) == (0, 3) and out.load_errors == set() and out.mismatched == []
        m = engine.leader.metrics
        assert m.value("dynkv_pages_moved_total", direction="remote_to_host") == 6
        assert engine.leader.stats()["host"]["stored"] == 0  # nothing pulled joined the host tier...
        assert_clean(engine)
        again = decode(engine, "c", tokens, None)  # ...so without params the prompt is computed
        assert again.local == 0 and again.mismatched == []
    finally:
        close(engine)
        prefill.close()


def test_prefill_killed_after_answering(rng: np.random.Generator) -> None:
    """The prefill engine dies between its answer and the pull: the decode engine recomputes, and serves on."""
    model = Model()
    prefill = PrefillProcess(model)
    engine = decode_engine(model, tp=2, transfer_timeout_s=3)
    try:
        tokens = prompt(rng, model, 4)
        params = prefill.prefill("a", tokens)
        prefill.kill()
        out = decode(engine, "a", tokens, params)
        assert out.pulled == 4 and out.load_errors == set(out.blocks[:4])
        assert out.mismatched == []
        assert engine.leader.metrics.value("dynkv_load_errors_total", reason="remote") == 4
        assert_clean(engine)
        # The recomputed pages were stored: the same prompt now loads from this engine's host tier.
        again = decode(engine, "b", tokens, None)
        assert again.local == 4 and again.load_errors == set() and again.mismatched == []
    finally:
        close(engine)
        prefill.close()


def test_frozen_or_slow_prefill_times_out(rng: np.random.Generator) -> None:
    """Pages that never land (stores stuck) or a peer that never answers: timeouts, recompute, no hang."""
    model = Model()
    prefill = PrefillProcess(model)
    engine = decode_engine(model, tp=1, transfer_timeout_s=1.5)
    try:
        tokens = prompt(rng, model, 3)
        stuck = prefill.prefill("slow", tokens, hold=True)  # exported, but its stores never run
        out = decode(engine, "slow", tokens, stuck)
        assert out.pulled == 3 and out.load_errors == set(out.blocks[:3]) and out.mismatched == []
        other = prompt(rng, model, 2)
        params = prefill.prefill("frozen", other)
        prefill.signal(signal.SIGSTOP)
        try:
            out = decode(engine, "frozen", other, params)
        finally:
            prefill.signal(signal.SIGCONT)
        assert out.pulled == 2 and out.load_errors == set(out.blocks[:2]) and out.mismatched == []
        assert_clean(engine)
        # The engine answers again: a new export is pulled as usual.
        fresh = prompt(rng, model, 2)
        out = decode(engine, "fresh", fresh, prefill.prefill("fresh", fresh))
        assert out.pulled == 2 and out.load_errors == set() and out.mismatched == []
    finally:
        close(engine)
        prefill.close()


def test_out_of_range_remote_slots_are_rejected(rng: np.random.Generator) -> None:
    model = Model()
    prefill = PrefillProcess(model, host_pages=16)
    engine = decode_engine(model, tp=2, transfer_timeout_s=5)
    try:
        tokens = prompt(rng, model, 3)
        params = prefill.prefill("a", tokens)
        slots = params["dynkv"]["slots"]
        params = resign(params, slots=(slots[0], 16, slots[2]))  # one past the prefill pool's last page
        out = decode(engine, "a", tokens, params)
        assert out.pulled == 3 and out.load_errors == set(out.blocks[:3]) and out.mismatched == []
        # In range, but not a page of this export: the prefill engine refuses it.
        tokens = prompt(rng, model, 2)
        params = prefill.prefill("b", tokens)
        params = resign(params, slots=(15, params["dynkv"]["slots"][1]))
        out = decode(engine, "b", tokens, params)
        assert out.pulled == 2 and out.load_errors == set(out.blocks[:2]) and out.mismatched == []
        assert_clean(engine)
    finally:
        close(engine)
        prefill.close()


@pytest.mark.parametrize("mismatch", ["version", "model"])
def test_incompatible_prefill_is_refused(rng: np.random.Generator, mismatch: str) -> None:
    """A handshake naming another dynkv version or geometry is refused with a clear error; nothing is read."""
    model = Model()
    other = Model(num_layers=2) if mismatch == "model" else model
    prefill = PrefillProcess(other, version="9.9.9" if mismatch == "version" else None)
    engine = decode_engine(model, tp=1, transfer_timeout_s=5)
    try:
        tokens = prompt(rng, model, 3)
        params = prefill.prefill("a", tokens)
        if mismatch == "model":
            # The connector refuses such params outright (another model's fingerprint)...
            x = prompt(rng, model, 3)
            assert "serves another model" in decode(engine, "x", x, prefill.prefill("x", x)).refused
            # ...so claim this model's, as a misrouted or buggy peer might: the handshake still refuses.
            keys = engine.keys(tokens)
            params = resign(params, fingerprint=model.fingerprint().digest().hex(), last_key=keys[2].hex())
        out = decode(engine, "a", tokens, params)
        assert out.pulled == 3 and out.load_errors == set(out.blocks[:3]) and out.mismatched == []
        # The same refusal, seen from a puller in this process.
        puller = Puller(Handshake.describe(engine_id="d", fingerprint=model.fingerprint(),
                                           geometry=model.geometry(), page_stride=4096, num_pages=4,
                                           pool_addr=engine.leader.pool.ptr),
                        engine.leader.pool.nbytes, (0, model.num_heads), rank=0, world_size=1, timeout_s=5,
                        secret=SECRET.encode())
        try:
            r = RemotePrefill.from_params(params)
            with pytest.raises(PullError, match="incompatible") as e:
                puller.pull(PullSpec(r.engine_id, r.host, r.port, r.instance, r.transfer, (0, 1, 2), r.slots))
            assert ("dynkv_version '9.9.9'" if mismatch == "version" else "num_layers 2 (here 3)") in str(e.value)
        finally:
            puller.close()
        assert_clean(engine)
    finally:
        close(engine)
        prefill.close()


@pytest.mark.parametrize("secret", [None, b"another secret, of 32 characters"])
def test_a_hello_not_signed_under_the_secret_gets_no_metadata(rng: np.random.Generator, secret: bytes | None) -> None:
    """The NIXL metadata (what it takes to read the prefill engine's host pool) goes to holders of the secret only."""
    from dynkv.disagg.wire import hello_auth

    model = Model()
    prefill = PrefillProcess(model)
    pool = HostPool.create(1 << 20, pin=False)
    local = Handshake.describe(engine_id="d", fingerprint=model.fingerprint(), geometry=model.geometry(),
                               page_stride=4096, num_pages=4, pool_addr=pool.ptr)
    try:
        tokens = prompt(rng, model, 2)
        r = RemotePrefill.from_params(prefill.prefill("a", tokens))
        spec = PullSpec(r.engine_id, r.host, r.port, r.instance, r.transfer, (0, 1), r.slots)
        for key in (secret, SECRET.encode()):
            puller = Puller(local, pool.nbytes, (0, model.num_heads), rank=0, world_size=1, timeout_s=10,
                            secret=key)
            try:
                if key is secret:
                    with pytest.raises(PullError, match="hello refused"):
                        puller.pull(spec)
                else:  # the same export, pulled under the deployment's secret
                    assert puller.pull(spec) == 2 * model.geometry().page_bytes
            finally:
                puller.close()
        client = SideChannelClient(r.host, r.port)
        try:
            t = int(time.time()) - 3600  # a signed hello from an hour ago (replayed)
            with pytest.raises(ConnectionError, match="hello refused"):
                client.call({"op": "hello", "t": t, "auth": hello_auth(SECRET.encode(), t)}, time.monotonic() + 10)
        finally:
            client.close()
    finally:
        pool.close()
        prefill.close()


def test_exports_expire_when_never_pulled(rng: np.random.Generator) -> None:
    model = Model()
    prefill = PrefillProcess(model, export_timeout_s=0.5)
    try:
        prefill.prefill("a", prompt(rng, model, 3))
        assert prefill.call("stats")["host"]["pinned"] == 3
        time.sleep(0.6)
        stats = prefill.call("stats")
        assert stats["exports"] == 0 and stats["outcomes"]["expired"] == 1 and stats["host"]["pinned"] == 0
    finally:
        prefill.close()


def test_a_failed_pull_is_not_retried_for_the_same_request(rng: np.random.Generator) -> None:
    """vLLM reschedules a request whose load failed and looks it up again: it must be recomputed, not re-pulled."""
    model = Model()
    engine = decode_engine(model, tp=1, processes=False)
    leader = engine.leader
    try:
        keys = engine.keys(prompt(rng, model, 3))
        remote = RemotePrefill("p", "127.0.0.1", 1, "i", "t", model.fingerprint().digest().hex(), keys[2].hex(),
                               (10, 11, 12))
        assert leader.lookup("a", keys, 0) == 0
        assert leader.match_remote("a", keys, 0, remote) == 3
        leader.begin_load("a", [5, 6, 7])
        (load,) = leader.build_plan().loads
        leader.update(WorkerReport(failed={load.job: 1}, failed_blocks={5, 6, 7}))
        assert leader.lookup("a", keys, 0) == 0
        assert leader.match_remote("a", keys, 0, remote) == 0
        assert leader.match_remote("a", keys, 0, remote) == 0
        assert leader.lookup("b", keys, 0) == 0 and leader.match_remote("b", keys, 0, remote) == 3  # others may
        leader.request_finished("a")
        leader.request_finished("b")
        assert leader.stats()["host"]["pending"] == 0 and not leader._importing
    finally:
        close(engine)


def test_a_page_being_pulled_is_waited_for_not_pulled_twice(rng: np.random.Generator) -> None:
    model = Model()
    engine = decode_engine(model, tp=1, processes=False)
    leader = engine.leader
    try:
        keys = engine.keys(prompt(rng, model, 4))
        remote = RemotePrefill("p", "127.0.0.1", 1, "i", "t", model.fingerprint().digest().hex(), keys[3].hex(),
                               (10, 11, 12, 13))
        assert leader.lookup("a", keys, 0) == 0
        assert leader.match_remote("a", keys, 0, remote) == 4
        assert leader.lookup("b", keys[:2], 0) == 0
        assert leader.match_remote("b", keys[:2], 0, remote) is None  # "a" is pulling them: ask again later
        assert leader.stats()["host"]["pending"] == 4
        assert leader.request_finished("a") is False  # aborted before its load started
        assert leader.stats()["host"]["pending"] == 0 and not leader._importing
        assert leader.lookup("b", keys[:2], 0) == 0
        assert leader.match_remote("b", keys[:2], 0, remote) == 2
        leader.request_finished("b")
        assert leader.stats()["host"]["pending"] == 0
    finally:
        close(engine)


def test_decode_ranks_prepare_pulls_before_the_first_one(rng: np.random.Generator) -> None:
    """A kv_consumer rank attaches the pool and starts its NIXL agent in the background once registered."""
    from harness import DTYPE
    from kvtensors import make_rank_kv

    from dynkv.worker import Worker

    model = Model()
    leader = Leader(DynKVConfig.from_dict({"host_pages": 8}, env={}), model.geometry(), model.fingerprint(),
                    engine_id="prep")
    kv = make_rank_kv(rng, model.shape, dims=model.dims, form="separate", dtype=DTYPE, heads=(0, model.num_heads),
                      num_layers=model.num_layers, num_blocks=8)
    worker = Worker(leader.config, rank=0, world_size=1, pool_name=leader.pool_name, fingerprint=model.fingerprint(),
                    prepare_pulls=True)
    try:
        worker.register(kv.view(num_heads_total=model.num_heads, head_start=0))
        wait_for(lambda: worker._puller is not None, "the NIXL agent was not prepared")
        assert worker._pages is not None and worker._pages.owner.path == leader.pool_link
    finally:
        worker.close()
        leader.close()
    # A rank whose leader never comes: closing it stops the preparation's wait for the pool.
    lonely = Worker(DynKVConfig.from_dict({"host_pages": 8, "init_timeout_s": 600}, env={}), rank=0, world_size=1,
                    pool_name="dynkv-0000000000000000", fingerprint=model.fingerprint(), prepare_pulls=True)
    lonely.register(kv.view(num_heads_total=model.num_heads, head_start=0))
    closer = threading.Thread(target=lonely.close)
    closer.start()
    closer.join(60)
    assert not closer.is_alive(), "close() waited for a host pool that never came"


_LISTENING = textwrap.dedent("""
    import json, os, sys
    from dynkv.config import DynKVConfig
    from dynkv.memory import HostPool
    from dynkv.disagg.nixl import Agent, ucx_devices
    pool = HostPool.create(1 << 20, pin=False)
    if sys.argv[1] == "decode":  # a decode rank's agent, as dynkv.worker.pull starts it with the default config
        from dynkv.disagg.puller import Puller
        from dynkv.disagg.wire import Handshake
        from harness import Model
        cfg = DynKVConfig.from_dict({}, env={})
        devices, force = ucx_devices(cfg.side_channel_host, cfg.ucx_net_devices)
        m = Model()
        local = Handshake.describe(engine_id="d", fingerprint=m.fingerprint(), geometry=m.geometry(),
                                   page_stride=4096, num_pages=4, pool_addr=pool.ptr)
        agent = Puller(local, pool.nbytes, (0, m.num_heads), rank=0, world_size=1, timeout_s=1,
                       net_devices=devices, force_devices=force)
    else:
        agent = Agent("t-listen", pool.ptr, pool.nbytes, net_devices="lo" if sys.argv[1] == "1" else None)
    mine = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            mine.add(target[8:-1])
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in mine:  # LISTEN
                out.append(f[1].split(":")[0])
    print(json.dumps(out), flush=True)
    os._exit(0)  # a process with a NIXL agent may crash in the interpreter's teardown; the answer is out
""")


def _listening(mode: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "UCX_NET_DEVICES"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "support"),
                                         env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", _LISTENING, mode], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


_LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1 as /proc/net writes them


def test_a_prefill_agent_on_a_loopback_side_channel_listens_on_loopback_only() -> None:
    """/proc/net/tcp of a process with one NIXL agent: on device ``lo`` every listening socket is 127.0.0.1."""
    from dynkv.disagg.nixl import is_loopback

    kept = _listening("1")
    assert kept and set(kept) <= _LOOPBACK, kept
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.7") and not is_loopback("host.example")


def test_a_decode_agent_with_the_default_config_listens_on_loopback_only() -> None:
    """The same for a decode rank's puller: its UCX worker listens too, on loopback unless configured."""
    unrestricted = _listening("0")
    print("listening without UCX_NET_DEVICES:", unrestricted)
    if not set(unrestricted) - _LOOPBACK:
        pytest.skip("UCX finds no interface but loopback on this host: nothing to restrict")
    kept = _listening("decode")
    assert kept and set(kept) <= _LOOPBACK, kept
