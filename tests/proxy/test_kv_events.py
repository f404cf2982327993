"""The router's KV-events feed: sequence numbers, gaps, restarts and hash checks (no sockets), then the
subscriber against vLLM's own ZMQ publisher and its replay socket (a router that starts late, an engine
that restarts)."""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable

import pytest

msgspec = pytest.importorskip("msgspec", reason="dynkv proxy's dependencies: pip install 'dynkv[proxy]'")

from dynkv.proxy.block_hash import block_hashes, normalize
from dynkv.proxy.events import BlockRemoved, BlockStored, EngineFeed, KVEventBatch, Subscriber
from dynkv.proxy.router import PrefixIndex
from dynkv.testing.server import free_port

E = "http://e:1"
BS = 4
_ENC = msgspec.msgpack.Encoder()


def stored(tokens: list[int], medium: str = "GPU", *, seed: str | None = None) -> BlockStored:
    return BlockStored(block_hashes=block_hashes(tokens, BS, seed=seed), parent_block_hash=None, token_ids=tokens,
                       block_size=BS, medium=medium)


def payload(*events: object) -> bytes:
    return _ENC.encode(KVEventBatch(ts=0.0, events=list(events)))


def held(idx: PrefixIndex, tokens: list[int]) -> list[str]:
    return idx.match([normalize(h) for h in block_hashes(tokens, BS)], [E])[E]


def test_feed_applies_in_order_and_asks_for_replays_on_gaps_and_restarts() -> None:
    idx = PrefixIndex()
    feed = EngineFeed(E, idx)
    t1, t2 = list(range(8)), list(range(100, 108))
    assert feed.offer(3, payload(stored(t1))) == "gap" and feed.want_from() == 0  # a late start: replay from 0
    feed.replayed([(0, payload()), (1, payload(stored(t1))), (2, payload(stored(t1, "CPU"))), (3, payload())])
    assert feed.last_seq == 3 and held(idx, t1) == ["GPU", "GPU"] and feed.counts["lost"] == 0
    assert feed.offer(3, payload(stored(t2))) == "duplicate"  # the live copy of a replayed batch
    assert feed.offer(4, payload(BlockRemoved(block_hashes=block_hashes(t1, BS), medium="GPU"))) == "applied"
    assert held(idx, t1) == ["CPU", "CPU"]
    assert feed.offer(7, payload(stored(t2))) == "gap" and feed.want_from() == 5
    feed.replayed([(6, payload()), (7, payload(stored(t2)))])  # 5 is gone from the replay buffer
    assert feed.counts["lost"] == 1 and held(idx, t2) == ["GPU", "GPU"]
    assert feed.offer(8, payload()) == "applied"
    # The engine's publisher started over: its blocks are forgotten until its history is replayed.
    assert feed.offer(0, payload(stored(t2, "STORAGE"))) == "restart"
    assert held(idx, t1) == [] and held(idx, t2) == [] and feed.want_from() == 0
    assert feed.offer(0, payload(stored(t2, "STORAGE"))) == "applied" and held(idx, t2) == ["STORAGE"] * 2
    assert feed.counts["restarts"] == 1


def test_feed_flags_foreign_hashes_and_bad_payloads() -> None:
    idx = PrefixIndex()
    flagged: list[str] = []
    feed = EngineFeed(E, idx)
    feed.on_mismatch = flagged.append
    assert feed.offer(0, payload(stored(list(range(8))))) == "applied" and not feed.hash_mismatch
    assert feed.offer(1, b"\x93not a batch") == "applied" and feed.counts["bad"] == 1
    other = EngineFeed("http://f:1", idx)
    other.on_mismatch = flagged.append
    other.offer(0, payload(stored(list(range(8)), seed="42")))  # an engine with PYTHONHASHSEED=42
    assert other.hash_mismatch and flagged == ["http://f:1"]
    sized = EngineFeed("http://g:1", idx, block_size=16)
    sized.on_mismatch = flagged.append
    sized.offer(0, payload(stored(list(range(8)))))
    assert sized.hash_mismatch and flagged[-1] == "http://g:1"


def wait_for(cond: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.05)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_subscriber_follows_vllms_publisher_late_start_and_restart() -> None:
    from vllm.distributed import kv_events as ve

    pub_ep, rep_ep = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"

    def vllm_stored(tokens: list[int], medium: str) -> object:
        return ve.BlockStored(block_hashes=block_hashes(tokens, BS), parent_block_hash=None, token_ids=tokens,
                              block_size=BS, lora_id=None, medium=medium, lora_name=None)

    def publisher() -> object:
        import zmq

        # Bound like an engine's "tcp://*:port". A restarted one binds the ports its predecessor's thread may
        # still be letting go of.
        deadline = time.monotonic() + 30
        while True:
            try:
                return ve.ZmqEventPublisher(0, endpoint=pub_ep.replace("127.0.0.1", "*"), replay_endpoint=rep_ep)
            except zmq.ZMQError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    t1, t2, t3 = list(range(8)), list(range(50, 58)), list(range(90, 98))
    pub = publisher()
    idx = PrefixIndex()
    feed = EngineFeed(E, idx)
    sub = Subscriber({E: feed}, {E: (pub_ep, rep_ep)})
    try:
        pub.publish(ve.KVEventBatch(ts=1.0, events=[vllm_stored(t1, "GPU")]))
        pub.publish(ve.KVEventBatch(ts=2.0, events=[vllm_stored(t1, "CPU"), vllm_stored(t2, "STORAGE")]))
        wait_for(lambda: len(pub._buffer) == 2, "the publisher to send two batches")
        sub.start()  # starts late: both batches come from the replay socket
        wait_for(lambda: feed.last_seq == 1, "the replay")
        assert held(idx, t1) == ["GPU", "GPU"] and held(idx, t2) == ["STORAGE"] * 2
        pub.publish(ve.KVEventBatch(ts=3.0, events=[ve.BlockRemoved(block_hashes=block_hashes(t1, BS)[1:],
                                                                    medium="GPU")]))
        wait_for(lambda: feed.last_seq == 2, "a live batch")
        assert held(idx, t1) == ["GPU", "CPU"]
        pub.shutdown()
        pub = publisher()  # the engine restarted: its sequence starts at 0 again
        pub.publish(ve.KVEventBatch(ts=4.0, events=[vllm_stored(t3, "GPU")]))
        # The restarted publisher's first batch may go out before the subscriber reconnects: a gap the
        # resync (what the proxy asks for when the engine answers again) fills.
        sub.resync(E)
        wait_for(lambda: held(idx, t3) == ["GPU", "GPU"], "the restarted engine's batch")
        assert held(idx, t1) == [] and held(idx, t2) == []  # the old engine's blocks are gone
        assert feed.counts["bad"] == 0
    finally:
        sub.close()
        pub.shutdown()
