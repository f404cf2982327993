"""End to end: two real vLLM engines behind ``dynkv proxy --policy kv``, one of them with dynkv's tiers.

One test, three engine starts (two at once, then the dynkv engine again):

- A multi-turn workload through the proxy: every later turn goes to the engine that served its
  conversation before, which the router predicted holds its prefix, and which reports at least that
  many cached tokens. The greedy outputs equal those of the plain engine asked directly.
- The dynkv engine's KV events, replayed from 0 and decoded with vLLM's own ``KVEventBatch`` (msgspec),
  give per medium a set of blocks whose tokens are exactly those the workload sent under vLLM's hash
  of them; the host and disk sets have the sizes the engine's own metrics report, after a run with
  host-tier evictions. After a restart on the same disk, the events announce the disk's pages again.
"""

from __future__ import annotations

import importlib.util
import json
import random
import time
from pathlib import Path
from typing import Any

import pytest

from dynkv.benchmarks.demo import BLOCK_SIZE, dynkv_transfer_config, scrape_metrics
from dynkv.benchmarks.router import Conversation, ProxyProcess, drive, engine_args
from dynkv.proxy.block_hash import block_hashes, normalize
from dynkv.testing.model import PRESETS, write_model
from dynkv.testing.server import ServerError, VLLMServer, free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]

CONVS, TURNS, PREFIX, USER, MAX_TOKENS = 4, 3, 256, 32, 8
_END = (-1).to_bytes(8, "big", signed=True)


def conversations() -> list[Conversation]:
    rng = random.Random(7)
    return [Conversation.make(rng, PREFIX, USER, TURNS, PRESETS["tiny"].vocab_size) for _ in range(CONVS)]


def replay(port: int) -> list[Any]:
    """Every batch an engine published, from its replay socket, decoded with vLLM's own schema."""
    import msgspec
    import zmq
    from vllm.distributed.kv_events import KVEventBatch

    dec = msgspec.msgpack.Decoder(KVEventBatch)
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.connect(f"tcp://127.0.0.1:{port}")
    s.send_multipart((b"", (0).to_bytes(8, "big")))
    out = []
    try:
        while s.poll(10_000):
            frames = s.recv_multipart()
            if frames[2] == _END:
                return out
            out.append(dec.decode(frames[3]))
        pytest.fail(f"replay socket on port {port} stopped answering")
    finally:
        s.close(linger=0)
        ctx.term()
    return out


def tiers_from(batches: list[Any]) -> tuple[dict[str, dict[int, list[int]]], dict[str, int]]:
    """Per medium, block hash -> its tokens, replaying stored/removed/cleared; and removals per medium."""
    state: dict[str, dict[int, list[int]]] = {}
    removed: dict[str, int] = {}
    for batch in batches:
        for ev in batch.events:
            kind = type(ev).__name__
            if kind == "BlockStored":
                bs = ev.block_size
                assert len(ev.token_ids) == bs * len(ev.block_hashes), ev
                for i, h in enumerate(ev.block_hashes):
                    state.setdefault(ev.medium, {})[normalize(h)] = list(ev.token_ids[i * bs : (i + 1) * bs])
            elif kind == "BlockRemoved":
                for h in ev.block_hashes:
                    state.get(ev.medium, {}).pop(normalize(h), None)
                removed[ev.medium] = removed.get(ev.medium, 0) + len(ev.block_hashes)
            else:
                state.clear()
    return state, removed


def tier_pages(metrics_port: int) -> dict[str, float]:
    samples = scrape_metrics([f"http://127.0.0.1:{metrics_port}/metrics"])
    return {dict(labels)["tier"]: v for (name, labels), v in samples.items()
            if name == "dynkv_tier_pages" and dict(labels).get("state") == "stored"}


def wait_for(cond: Any, what: str, timeout_s: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.5)


def test_kv_routing_and_dynkv_events_over_two_engines(tmp_path: Path) -> None:
    spec = PRESETS["tiny"]
    model = write_model(tmp_path / "tiny", preset="tiny")
    longest = PREFIX + TURNS * (USER + MAX_TOKENS)
    conv_blocks = -(-longest // BLOCK_SIZE)
    working_set = CONVS * conv_blocks
    max_model_len = (conv_blocks + 1) * BLOCK_SIZE
    page_bytes = spec.kv_bytes_per_token() * BLOCK_SIZE
    sizes = {"page_bytes": page_bytes, "host_pages": working_set // 3, "disk_pages": 4 * working_set}
    metrics_port = free_port()
    ports = [(free_port(), free_port()) for _ in range(2)]
    common = dict(device_blocks=2 * working_set, max_model_len=max_model_len, page_bytes=page_bytes)
    args_a = engine_args(**common, pub_port=ports[0][0], replay_port=ports[0][1],
                         transfer_config=dynkv_transfer_config(sizes, tmp_path / "disk", metrics_port))
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    a = VLLMServer(str(model), args_a, log_path=tmp_path / "a.log", name="dynkv engine", env=env)
    b = VLLMServer(str(model), engine_args(**common, pub_port=ports[1][0], replay_port=ports[1][1]),
                   log_path=tmp_path / "b.log", name="plain engine", env=env)
    with a, b:
        try:
            a.wait_ready(900)
            b.wait_ready(900)
        except ServerError as e:
            pytest.fail(str(e))
        engines = [(a.url, *ports[0]), (b.url, *ports[1])]
        with ProxyProcess(engines, "kv", tmp_path / "proxy.log") as proxy:
            routed = drive(proxy.url, conversations(), max_tokens=MAX_TOKENS)
            stats = proxy.get("/proxy/stats")
        plain = drive(b.url, conversations(), max_tokens=MAX_TOKENS)

        assert [t.error for t in routed + plain] == [None] * (2 * CONVS * TURNS), (routed, plain)
        where = {t.conversation: t.engine for t in routed if t.turn == 0}
        assert set(where.values()) == {a.url, b.url}, where  # first turns spread over both
        for t in routed:
            if t.turn:
                assert t.engine == where[t.conversation], (t, stats)
                assert t.predicted >= PREFIX // BLOCK_SIZE * BLOCK_SIZE, (t, stats)
                assert t.cached is not None and t.cached >= t.predicted, (t, stats)
        assert {(t.conversation, t.turn): t.token_ids for t in routed} == {
            (t.conversation, t.turn): t.token_ids for t in plain}
        assert not any(e["hash_mismatch"] for e in stats["events"].values()), stats

        # What the dynkv engine's events say its tiers hold, against what the engine says.
        expected: dict[int, list[int]] = {}
        for t in routed:
            if t.engine == a.url:
                conv = conversations()[t.conversation]
                full = [*conv.prefix]
                for k in range(t.turn + 1):
                    full += conv.users[k] + ([] if k == t.turn else next(
                        r.token_ids for r in routed if (r.conversation, r.turn) == (t.conversation, k)))
                full += t.token_ids
                for h, i in zip(block_hashes(full, BLOCK_SIZE), range(len(full) // BLOCK_SIZE)):
                    expected[normalize(h)] = full[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]

        def settled() -> tuple[dict, dict] | None:
            state, removed = tiers_from(replay(ports[0][1]))
            pages = tier_pages(metrics_port)
            ok = len(state.get("CPU", {})) == pages.get("host") and len(state.get("STORAGE", {})) == pages.get("disk")
            return (state, removed) if ok else None

        state, removed = wait_for(settled, "the events to match the engine's tiers")
        assert removed.get("CPU", 0) > 0, removed  # the host tier evicted
        assert state["CPU"] and state["STORAGE"] and state["GPU"]
        for medium, blocks in state.items():
            for h, tokens in blocks.items():
                assert expected.get(h) == tokens, (medium, h)
        disk_before = state["STORAGE"]

    # The same engine again, on the same disk: its first events announce what the disk holds.
    a2 = VLLMServer(str(model), args_a, log_path=tmp_path / "a2.log", name="dynkv engine again", env=env)
    with a2:
        try:
            a2.wait_ready(900)
        except ServerError as e:
            pytest.fail(str(e))
        state, _ = wait_for(lambda: (s := tiers_from(replay(ports[0][1])))[0].get("STORAGE") and s,
                            "the disk's pages in the restarted engine's events")
        assert state["STORAGE"] == disk_before
        assert tier_pages(metrics_port).get("disk") == len(disk_before)
        assert json.dumps(sorted(state)) == json.dumps(["STORAGE"])  # nothing else is held yet
