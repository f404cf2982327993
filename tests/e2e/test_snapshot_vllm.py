"""End to end: a router that starts after a real vLLM engine with dynkv's tiers served its first turns, with a
replay buffer of two batches, rebuilds its view of the engine from the engine's KV snapshot — vLLM's device blocks
and the host tier's pages — and follows the engine's live events from there; ``dynkv proxy`` started as late
predicts the later turns' cached prefixes from it."""

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
from dynkv.proxy.events import EngineFeed, Subscriber
from dynkv.proxy.router import PrefixIndex
from dynkv.testing.model import PRESETS, write_model
from dynkv.testing.server import ServerError, VLLMServer, free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]

CONVS, PREFIX, USER, MAX_TOKENS = 3, 128, 32, 8


def wait_for(cond: Any, what: str, timeout_s: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.5)


def hashes_of(tokens: list[int]) -> set[int]:
    return {normalize(h) for h in block_hashes(tokens, BLOCK_SIZE)}


def test_late_router_rebuilds_its_view_from_a_real_engines_snapshot(tmp_path: Path) -> None:
    spec = PRESETS["tiny"]
    model = write_model(tmp_path / "tiny", preset="tiny")
    rng = random.Random(11)
    convs = [Conversation.make(rng, PREFIX, USER, 1, spec.vocab_size) for _ in range(CONVS)]
    conv_blocks = -(-(PREFIX + 2 * (USER + MAX_TOKENS)) // BLOCK_SIZE)
    page_bytes = spec.kv_bytes_per_token() * BLOCK_SIZE
    sizes = {"page_bytes": page_bytes, "host_pages": 4 * CONVS * conv_blocks, "disk_pages": 0}
    metrics_port, pub, rep = free_port(), free_port(), free_port()
    config = dynkv_transfer_config(sizes, tmp_path / "disk", metrics_port)
    config["kv_connector_extra_config"].pop("disk_gb")
    config["kv_connector_extra_config"].pop("disk_paths")
    args = engine_args(device_blocks=4 * CONVS * conv_blocks, max_model_len=(conv_blocks + 1) * BLOCK_SIZE,
                       page_bytes=page_bytes, pub_port=pub, replay_port=rep, transfer_config=config)
    at = args.index("--kv-events-config") + 1
    args[at] = json.dumps({**json.loads(args[at]), "buffer_steps": 2})  # the first turns' events are gone
    engine = VLLMServer(str(model), args, log_path=tmp_path / "engine.log", name="dynkv engine",
                        env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    with engine:
        try:
            engine.wait_ready(900)
        except ServerError as e:
            pytest.fail(str(e))
        first = drive(engine.url, convs, max_tokens=MAX_TOKENS)
        assert [t.error for t in first] == [None] * CONVS, first
        prompts = [c.prefix + c.users[0] for c in convs]
        stored = set().union(*(hashes_of(p + t.token_ids) for p, t in zip(prompts, first)))

        def host_pages() -> float | None:
            samples = scrape_metrics([f"http://127.0.0.1:{metrics_port}/metrics"])
            return next((v for (name, labels), v in samples.items() if name == "dynkv_tier_pages"
                         and dict(labels) == {"tier": "host", "state": "stored"}), None)

        wait_for(lambda: host_pages() == len(stored), "the host tier to hold every full block served")

        idx = PrefixIndex()
        feed = EngineFeed(engine.url, idx)
        sub = Subscriber({engine.url: feed}, {engine.url: (f"tcp://127.0.0.1:{pub}", f"tcp://127.0.0.1:{rep}")},
                         snapshots={engine.url: f"http://127.0.0.1:{metrics_port}/kv/snapshot"})
        try:
            sub.start(wait_s=120)
            wait_for(lambda: feed.counts["snapshots"] == 1, "the view rebuilt from the snapshot")
            assert feed.counts["lost"] == 1 and feed.block_size == BLOCK_SIZE
            view = idx.held(engine.url)
            assert view.get("CPU") == stored, view  # exactly the host tier's pages
            for p in prompts:  # vLLM's device cache, listed: every prompt's full blocks
                assert hashes_of(p) <= view.get("GPU", set()), view

            # Later turns, through a proxy started as late: it predicts their prefixes from its own snapshot.
            later = [Conversation(p + t.token_ids, [c.users[0][::-1]]) for p, t, c in zip(prompts, first, convs)]
            snapshot_url = f"http://127.0.0.1:{metrics_port}/kv/snapshot"
            with ProxyProcess([(engine.url, pub, rep)], "kv", tmp_path / "proxy.log",
                              extra=["--kv-snapshot", snapshot_url]) as proxy:
                second = drive(proxy.url, later, max_tokens=MAX_TOKENS)
                stats = proxy.get("/proxy/stats")
            assert stats["events"][engine.url]["snapshots"] == 1, stats
            assert [t.error for t in second] == [None] * CONVS, second
            for t, c in zip(second, later):
                held = len(c.prefix) // BLOCK_SIZE * BLOCK_SIZE  # the first turn's full blocks
                assert t.predicted >= held and t.cached is not None and t.cached >= held, (t, stats)
            # Their events reach the subscriber live.
            new = set().union(*(hashes_of(c.prefix + c.users[0]) for c in later))
            wait_for(lambda: new <= idx.held(engine.url).get("GPU", set()), "the later turns' device blocks")
            assert feed.counts["lost"] == 1 and feed.counts["snapshots"] == 1 and feed.counts["bad"] == 0
            assert not feed.hash_mismatch
        finally:
            sub.close()
