"""KV snapshots, the router's side, without vLLM: an engine that keeps only its last few batches for replay, a
router that starts late or misses more than that, and the view it rebuilds from the engine's snapshot compared
with the view of a router that saw every batch."""

from __future__ import annotations

import collections
import http.server
import os
import random
import threading
import time
from collections.abc import Callable

import pytest

msgspec = pytest.importorskip("msgspec", reason="dynkv proxy's dependencies: pip install 'dynkv[proxy]'")
zmq = pytest.importorskip("zmq", reason="dynkv proxy's dependencies: pip install 'dynkv[proxy]'")

from dynkv.kvsnapshot import KVSnapshot, SnapshotPage, encode_snapshot
from dynkv.proxy.block_hash import block_hashes, normalize
from dynkv.proxy.events import BlockRemoved, BlockStored, EngineFeed, KVEventBatch, Subscriber
from dynkv.proxy.router import PrefixIndex
from dynkv.testing.server import free_port

E = "http://e:1"
BS = 4
_ENC = msgspec.msgpack.Encoder()
_END_SEQ = (-1).to_bytes(8, "big", signed=True)
MEDIA = ("GPU", "CPU", "STORAGE")


class FakeEngine:
    """vLLM's publisher as seen from outside (PUB of ``(topic, seq, payload)``, a replay ROUTER keeping the last
    ``buffer_steps`` batches) and dynkv's snapshot endpoint, over a state of blocks per medium.

    Each request for a snapshot publishes ``before`` (batches whose changes the snapshot holds), then
    copies the state in the middle of building ``split`` (half its changes made, as when the copy falls inside
    a scheduler step), publishes it and ``after`` (changes the snapshot misses), and answers with the copy.
    ``drop`` holds back batches from the PUB socket (lost on the wire; still in the replay buffer).
    """

    def __init__(self, buffer_steps: int, *, device_listed: bool = True) -> None:
        self.ctx = zmq.Context()
        self.pub_ep, self.rep_ep = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.bind(self.pub_ep)
        self.replay = self.ctx.socket(zmq.ROUTER)
        self.replay.bind(self.rep_ep)
        self.buffer: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=buffer_steps)
        self.published: list[tuple[int, bytes]] = []  # every batch, for the router that sees everything
        self.state: dict[str, dict[int | bytes, tuple[bytes | None, list[int]]]] = {m: {} for m in MEDIA}
        self.device_listed = device_listed
        self.seq = 0
        self.lock = threading.RLock()
        self.drop = False
        self.snapshots = 0
        self.before: list[list[object]] = []
        self.split: list[object] = []
        self.after: list[list[object]] = []
        self._stop = threading.Event()
        self._replayer = threading.Thread(target=self._serve_replays, daemon=True)
        self._replayer.start()
        engine = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = engine.snapshot()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.snapshot_url = f"http://127.0.0.1:{self.http.server_address[1]}/kv/snapshot"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def apply(self, events: list[object]) -> None:
        for ev in events:
            if isinstance(ev, BlockStored):
                parent = ev.parent_block_hash
                for i, h in enumerate(ev.block_hashes):
                    self.state[ev.medium or "GPU"][h] = (parent, ev.token_ids[i * BS : (i + 1) * BS])
                    parent = h
            elif isinstance(ev, BlockRemoved):
                for h in ev.block_hashes:
                    self.state.get(ev.medium or "GPU", {}).pop(h, None)

    def publish(self, events: list[object], *, drop: bool | None = None) -> int:
        with self.lock:
            self.apply(events)
            seq, self.seq = self.seq, self.seq + 1
            payload = _ENC.encode(KVEventBatch(ts=float(seq), events=events))
            self.buffer.append((seq, payload))
            self.published.append((seq, payload))
            if not (self.drop if drop is None else drop):
                self.pub.send_multipart((b"", seq.to_bytes(8, "big"), payload))
            return seq

    def snapshot(self) -> bytes:
        for events in self.before:
            self.publish(events)
        self.snapshots += 1
        with self.lock:
            self.apply(self.split[: len(self.split) // 2])
            media = {m: [SnapshotPage(h, parent, tokens) for h, (parent, tokens) in self.state[m].items()]
                     for m in ("CPU", "STORAGE")}
            device = list(self.state["GPU"]) if self.device_listed else None
            if self.split:
                self.publish(self.split)
        for events in self.after:
            self.publish(events)
        return encode_snapshot(KVSnapshot(block_size=BS, device=device, media=media))

    def _serve_replays(self) -> None:
        while not self._stop.is_set():
            if not self.replay.poll(50):
                continue
            client, _, start = self.replay.recv_multipart()
            with self.lock:
                batches = [(s, p) for s, p in self.buffer if s >= int.from_bytes(start, "big")]
            for s, p in batches:
                self.replay.send_multipart((client, b"", b"", s.to_bytes(8, "big"), p))
            self.replay.send_multipart((client, b"", b"", _END_SEQ, b""))

    def close(self) -> None:
        self._stop.set()
        self._replayer.join()
        self.http.shutdown()
        self.http.server_close()
        self.pub.close(linger=0)
        self.replay.close(linger=0)
        self.ctx.term()


class Workload:
    """Random chains of blocks stored in and removed from each medium, seeded."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.chains: list[list[int]] = []

    def tokens(self) -> list[int]:
        return [self.rng.randrange(1000) for _ in range(BS * self.rng.randrange(1, 4))]

    def batch(self) -> list[object]:
        out: list[object] = []
        for _ in range(self.rng.randrange(1, 4)):
            if self.chains and self.rng.random() < 0.35:
                toks = self.rng.choice(self.chains)
                out.append(BlockRemoved(block_hashes=block_hashes(toks, BS)[self.rng.randrange(len(toks) // BS):],
                                        medium=self.rng.choice(MEDIA)))
            else:
                toks = self.tokens() if not self.chains or self.rng.random() < 0.5 else self.rng.choice(self.chains)
                self.chains.append(toks)
                out.append(BlockStored(block_hashes=block_hashes(toks, BS), parent_block_hash=None, token_ids=toks,
                                       block_size=BS, medium=self.rng.choice(MEDIA)))
        return out


def saw_everything(engine: FakeEngine) -> dict[str, set[int]]:
    """The view of a router that applied every batch the engine published, in order."""
    idx = PrefixIndex()
    feed = EngineFeed(E, idx)
    for seq, payload in engine.published:
        assert feed.offer(seq, payload) == "applied"
    return idx.held(E)


def wait_for(cond: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def seed() -> int:
    s = int(os.environ.get("DYNKV_TEST_SEED", random.randrange(1 << 30)))
    print(f"DYNKV_TEST_SEED={s}")
    return s


def follow(engine: FakeEngine, **kw: object) -> tuple[Subscriber, EngineFeed, PrefixIndex]:
    idx = PrefixIndex()
    feed = EngineFeed(E, idx, block_size=BS)
    sub = Subscriber({E: feed}, {E: (engine.pub_ep, engine.rep_ep)}, snapshots={E: engine.snapshot_url},
                     **kw)  # type: ignore[arg-type]
    return sub, feed, idx


def test_router_started_past_the_replay_buffer_rebuilds_the_view_of_one_that_saw_everything(seed: int) -> None:
    work = Workload(seed)
    engine = FakeEngine(buffer_steps=4)
    # Around the copy: a batch the snapshot holds, one it holds half of (a store then a removal of the same
    # blocks: the copy has them, the router must end without), and batches it misses.
    toks = work.tokens()
    hashes = block_hashes(toks, BS)
    engine.before = [work.batch()]
    engine.split = [BlockStored(block_hashes=hashes, parent_block_hash=None, token_ids=toks, block_size=BS,
                                medium="GPU"), *work.batch(), BlockRemoved(block_hashes=hashes, medium="GPU")]
    engine.after = [work.batch(), [BlockStored(block_hashes=hashes, parent_block_hash=None, token_ids=toks,
                                               block_size=BS, medium="STORAGE")]]
    sub, feed, idx = follow(engine)
    try:
        for _ in range(12):  # three times the replay buffer, before the router starts
            engine.publish(work.batch())
        sub.start(wait_s=60)
        wait_for(lambda: feed.last_seq == engine.seq - 1, "the router to reach the engine's last batch")
        assert feed.counts["lost"] == 1 and feed.counts["snapshots"] == 1 and engine.snapshots == 1
        for _ in range(5):  # and it follows the live stream on from there
            engine.publish(work.batch())
        wait_for(lambda: feed.last_seq == engine.seq - 1, "the live batches")
        want = saw_everything(engine)
        assert idx.held(E) == want
        assert want["STORAGE"] >= {normalize(h) for h in hashes} and not want.get("GPU", set()) & {
            normalize(h) for h in hashes}  # stored and removed again in the batch the copy fell into
        assert feed.counts["bad"] == 0 and not feed.hash_mismatch
    finally:
        sub.close()
        engine.close()


def test_router_that_misses_more_than_the_replay_buffer_takes_a_snapshot(seed: int) -> None:
    work = Workload(seed)
    engine = FakeEngine(buffer_steps=3)
    sub, feed, idx = follow(engine)
    try:
        sub.start(wait_s=60)
        for _ in range(4):
            engine.publish(work.batch())
        wait_for(lambda: feed.last_seq == engine.seq - 1, "the first batches")
        assert feed.counts["snapshots"] == 0  # replays reach back to 0: no snapshot needed
        for _ in range(6):  # lost on the wire, twice what the replay buffer keeps
            engine.publish(work.batch(), drop=True)
        engine.after = [work.batch()]
        engine.publish(work.batch())  # the gap shows
        wait_for(lambda: feed.last_seq == engine.seq - 1, "the router to catch up")
        assert feed.counts["gaps"] == 1 and feed.counts["lost"] == 1 and feed.counts["snapshots"] == 1
        engine.publish(work.batch())
        wait_for(lambda: feed.last_seq == engine.seq - 1, "a live batch")
        assert idx.held(E) == saw_everything(engine)
    finally:
        sub.close()
        engine.close()


def test_snapshot_without_the_device_keeps_the_device_blocks_known_from_events(seed: int) -> None:
    work = Workload(seed)
    engine = FakeEngine(buffer_steps=2, device_listed=False)
    sub, feed, idx = follow(engine)
    try:
        sub.start(wait_s=60)
        engine.publish(work.batch())
        wait_for(lambda: feed.last_seq == 0, "the first batch")
        lost = work.tokens()  # device blocks stored in a batch the router never gets
        engine.publish([BlockStored(block_hashes=block_hashes(lost, BS), parent_block_hash=None, token_ids=lost,
                                    block_size=BS, medium="GPU")], drop=True)
        for _ in range(4):
            engine.publish(work.batch(), drop=True)
        engine.publish(work.batch())  # the gap shows: the replay buffer has this batch and the one before
        wait_for(lambda: feed.last_seq == engine.seq - 1, "the router to catch up")
        assert feed.counts["snapshots"] == 1
        got, want = idx.held(E), saw_everything(engine)
        assert {m: got.get(m) for m in ("CPU", "STORAGE")} == {m: want.get(m) for m in ("CPU", "STORAGE")}
        # Device blocks: what the batches the router got (the first, then the two replayed) did to them.
        seen = PrefixIndex()
        for seq, payload in (engine.published[0], *engine.published[5:7]):
            EngineFeed(E, seen).offer(0, payload)
        assert got.get("GPU", set()) == seen.held(E).get("GPU", set())
        lost_hashes = {normalize(h) for h in block_hashes(lost, BS)}
        assert lost_hashes <= want["GPU"] and not lost_hashes & got.get("GPU", set())  # the engine holds more
    finally:
        sub.close()
        engine.close()


def test_snapshot_urls_are_checked_against_the_engines() -> None:
    import argparse

    from dynkv.proxy.server import _snapshots, add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    two = ["--engine", "http://a:1", "--engine", "http://b:1", "--kv-events", "tcp://a:2", "--kv-events", "tcp://b:2"]
    with pytest.raises(ValueError, match="one --kv-snapshot per engine"):
        _snapshots(p.parse_args([*two, "--kv-snapshot", "http://a:3/kv/snapshot"]))
    assert _snapshots(p.parse_args([*two, "--kv-snapshot", "http://a:3/kv/snapshot", "--kv-snapshot",
                                    "http://b:3/kv/snapshot"])) == {"http://a:1": "http://a:3/kv/snapshot",
                                                                    "http://b:1": "http://b:3/kv/snapshot"}
    feed = EngineFeed(E, PrefixIndex())
    with pytest.raises(ValueError, match="expected http://host:port/kv/snapshot"):
        Subscriber({E: feed}, {E: ("tcp://e:2", None)}, snapshots={E: "tcp://e:3"})
    with pytest.raises(ValueError, match="for an engine with KV events"):
        Subscriber({E: feed}, {E: ("tcp://e:2", None)}, snapshots={"http://f:1": "http://f:3/kv/snapshot"})
