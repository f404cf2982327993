"""KV events of N engines over ZMQ, into the router's :class:`~dynkv.proxy.router.PrefixIndex`.

Each engine publishes vLLM's ``KVEventBatch`` messages (``--kv-events-config
'{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:5557",
"replay_endpoint":"tcp://*:5558"}'``): its device cache's events, and — with
dynkv's connector — those of dynkv's host and disk tiers (media ``CPU`` and
``STORAGE``) in the same batches. A message is ``(topic, seq, payload)``,
``seq`` an 8-byte big-endian count from 0 per publisher.

The schema below is vLLM's, written out (the proxy does not import vLLM):
tagged structs, unknown fields ignored, so newer engines decode too.

Re-sync: a router that starts late asks each engine's replay socket for
every batch from 0; a gap in ``seq`` asks for the missing batches; a ``seq``
that goes back means the engine restarted, so its blocks are forgotten and
its batches replayed from 0. When the replay buffer no longer reaches back
(``buffer_steps``; ``lost`` counts it), the router asks the engine for a
snapshot (:mod:`dynkv.kvsnapshot`, dynkv's ``/kv/snapshot``), sets the
engine's part of the index to it and applies every batch after the last one
it had before asking (those the snapshot already holds do no harm; see
:mod:`dynkv.kvsnapshot`). An engine without a snapshot endpoint stays
partially known: routing still works, its predictions are just shorter.
This is the one home of ZMQ in the proxy (the house rule's second home,
next to ``disagg/wire.py``).
"""

from __future__ import annotations

import logging
import queue
import threading
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import zmq

from dynkv.kvsnapshot import KVSnapshot, decode_snapshot
from dynkv.proxy.block_hash import normalize, stored_hash_ok
from dynkv.proxy.router import PrefixIndex

__all__ = ["AllBlocksCleared", "BlockRemoved", "BlockStored", "EngineFeed", "KVEventBatch", "Subscriber",
           "decode_batch"]

log = logging.getLogger("dynkv.proxy")

_END_SEQ = (-1).to_bytes(8, "big", signed=True)
_CHECKS = 4  # stored events whose hashes are recomputed per engine (and again after a restart)


class _Event(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(_Event):
    block_hashes: list[bytes | int]
    parent_block_hash: bytes | int | None = None
    token_ids: list[int] = []
    block_size: int = 0
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None


class BlockRemoved(_Event):
    block_hashes: list[bytes | int]
    medium: str | None = None


class AllBlocksCleared(_Event):
    pass


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


_DECODER = msgspec.msgpack.Decoder(KVEventBatch)


def decode_batch(payload: bytes) -> KVEventBatch:
    """One published payload as a :class:`KVEventBatch`."""
    return _DECODER.decode(payload)


class EngineFeed:
    """One engine's event stream: sequence numbers, gaps, restarts, and the batches applied to the index.

    No sockets: :meth:`offer` says what to do with a live message, the
    :class:`Subscriber` fetches replays and hands them to :meth:`replayed`.
    """

    def __init__(self, engine: str, index: PrefixIndex, *, hash_algo: str = "sha256", hash_seed: str | None = None,
                 block_size: int | None = None) -> None:
        self.engine, self.index = engine, index
        self.hash_algo, self.hash_seed = hash_algo, hash_seed
        self.block_size = block_size
        self.last_seq: int | None = None
        self._dup_to = -1  # live messages up to here were already applied from a replay
        self.hash_mismatch = False
        self._checked = 0
        self.counts = {"batches": 0, "events": 0, "gaps": 0, "lost": 0, "restarts": 0, "bad": 0, "snapshots": 0}
        self.on_mismatch: Callable[[str], None] | None = None

    def offer(self, seq: int, payload: bytes) -> str:
        """A live message: ``"applied"``, ``"duplicate"``, or ``"gap"``/``"restart"`` (replay, then offer again)."""
        last = self.last_seq
        if last is None:
            if seq == 0:
                self._apply(seq, payload)
                return "applied"
            return "gap"
        if seq == last + 1:
            self._apply(seq, payload)
            return "applied"
        if seq <= last:
            if seq <= self._dup_to:
                return "duplicate"
            self.restart()
            return "restart"
        self.counts["gaps"] += 1
        return "gap"

    def want_from(self) -> int:
        """The first sequence number a replay should bring."""
        return 0 if self.last_seq is None else self.last_seq + 1

    def restart(self) -> None:
        """The engine's publisher started over: forget its blocks and sequence."""
        self.counts["restarts"] += 1
        self.index.cleared(self.engine)
        self.last_seq, self._dup_to, self._checked = None, -1, 0

    def replayed(self, batches: Sequence[tuple[int, bytes]]) -> bool:
        """Batches from the replay socket, oldest first; those past :meth:`want_from` are applied.

        False when the first of them is gone from the replay buffer (the view
        misses what they did: ask for a snapshot).
        """
        want = self.want_from()
        todo = [(s, p) for s, p in batches if s >= want]
        complete = True
        if todo and todo[0][0] > want or not todo and self.last_seq is None and batches:
            complete = False
            self.counts["lost"] += 1
            log.warning("KV events of %s: batches %d..%d are gone from its replay buffer (raise buffer_steps)",
                        self.engine, want, (todo[0][0] if todo else batches[-1][0] + 1) - 1)
        for seq, payload in todo:
            if self.last_seq is not None and seq != self.last_seq + 1 and seq <= self.last_seq:
                continue
            self._apply(seq, payload)
        if self.last_seq is not None:
            self._dup_to = self.last_seq
        return complete

    def load_snapshot(self, snap: KVSnapshot) -> None:
        """The engine's snapshot, asked for after batch :attr:`last_seq` arrived, replaces its view; the batches
        after that one apply on top of it (:mod:`dynkv.kvsnapshot` says why that is exact).

        Without the device's blocks (``snap.device`` None: the engine's vLLM
        does not list them) the device blocks known from events are kept.
        """
        if snap.device is None:
            self.index.cleared(self.engine, [m for m in self.index.counts().get(self.engine, {}) if m != "GPU"])
        else:
            self.index.cleared(self.engine)
            self.index.stored(self.engine, "GPU", (normalize(h) for h in snap.device))
        if snap.block_size and self.block_size is None:
            self.block_size = snap.block_size
        for medium, pages in snap.media.items():
            for page in pages[:_CHECKS]:
                self._check(BlockStored(block_hashes=[page.block_hash], parent_block_hash=page.parent,
                                        token_ids=page.tokens, block_size=snap.block_size,
                                        lora_name=page.lora_name))
            self.index.stored(self.engine, medium, (normalize(p.block_hash) for p in pages))
        self.counts["snapshots"] += 1
        log.info("KV events of %s: view rebuilt from a snapshot (device blocks: %s; %s), going on after batch %s",
                 self.engine, "not listed" if snap.device is None else len(snap.device),
                 ", ".join(f"{len(p)} {m}" for m, p in snap.media.items()) or "no tier pages", self.last_seq)

    def skip_to(self, seq: int, payload: bytes) -> None:
        """Apply a message past a gap nobody can fill (no replay socket, or it did not answer)."""
        self.counts["lost"] += 1
        self._apply(seq, payload)

    def _apply(self, seq: int, payload: bytes) -> None:
        self.last_seq = seq
        if seq > self._dup_to:
            self._dup_to = -1
        try:
            batch = decode_batch(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            self.counts["bad"] += 1
            log.warning("KV events of %s: batch %d does not decode as vLLM's KVEventBatch (%s)", self.engine, seq, e)
            return
        self.counts["batches"] += 1
        self.counts["events"] += len(batch.events)
        for ev in batch.events:
            if isinstance(ev, BlockStored):
                self._check(ev)
                self.index.stored(self.engine, ev.medium, (normalize(h) for h in ev.block_hashes))
            elif isinstance(ev, BlockRemoved):
                self.index.removed(self.engine, ev.medium, (normalize(h) for h in ev.block_hashes))
            else:
                self.index.cleared(self.engine)

    def _check(self, ev: BlockStored) -> None:
        if self.block_size is None and ev.block_size:
            self.block_size = ev.block_size
        elif ev.block_size and ev.block_size != self.block_size and not self.hash_mismatch:
            self._mismatch(f"its blocks hold {ev.block_size} tokens, the router hashes {self.block_size}: "
                           "give every engine one --block-size")
            return
        if self._checked >= _CHECKS or self.hash_mismatch or ev.extra_keys or ev.lora_name or not ev.block_size:
            return
        ok = stored_hash_ok(ev.parent_block_hash, ev.token_ids, ev.block_size, ev.block_hashes,
                            algo=self.hash_algo, seed=self.hash_seed)
        if ok is None:
            return
        self._checked += 1
        if not ok:
            self._mismatch(f"its block hashes are not {self.hash_algo} with seed "
                           f"{self.hash_seed or 'unset'}: pass the engines' --prefix-caching-hash-algo and "
                           "PYTHONHASHSEED to the proxy (--hash-algo, --hash-seed)")

    def _mismatch(self, why: str) -> None:
        self.hash_mismatch = True
        log.error("KV events of %s: %s; no cached prefix is predicted for it until then", self.engine, why)
        if self.on_mismatch is not None:
            self.on_mismatch(self.engine)


class Subscriber:
    """A thread reading every engine's KV events (SUB), asking for replays (DEALER to vLLM's ROUTER) and, where the
    replay buffer does not reach back, for snapshots (HTTP).

    Parameters
    ----------
    feeds
        Engine -> its :class:`EngineFeed`.
    endpoints
        Engine -> ``(publisher endpoint, replay endpoint or None)``, e.g.
        ``("tcp://10.0.0.5:5557", "tcp://10.0.0.5:5558")``.
    snapshots
        Engine -> the URL of its snapshot (dynkv's
        ``http://HOST:METRICS_PORT/kv/snapshot``); engines without one are
        followed by events and replays only.
    topic
        The publishers' topic (vLLM's ``topic``, default empty).
    replay_timeout_s
        How long a replay socket may stay silent before the replay is given up.
    snapshot_timeout_s
        How long a snapshot may take to come.
    """

    def __init__(self, feeds: dict[str, EngineFeed], endpoints: dict[str, tuple[str, str | None]], *,
                 snapshots: dict[str, str] | None = None, topic: str = "", replay_timeout_s: float = 2.0,
                 snapshot_timeout_s: float = 30.0) -> None:
        for engine, (pub, replay) in endpoints.items():
            for ep in (pub, replay):
                if ep is not None and not ep.startswith(("tcp://", "ipc://", "inproc://")):
                    raise ValueError(f"KV events endpoint {ep!r} of {engine}: expected tcp://host:port or ipc://path")
        for engine, url in (snapshots or {}).items():
            if engine not in endpoints or not url.startswith(("http://", "https://")):
                raise ValueError(f"KV snapshot URL {url!r} of {engine}: expected http://host:port/kv/snapshot for an "
                                 "engine with KV events")
        self.feeds, self.endpoints = feeds, endpoints
        self.snapshots = dict(snapshots or {})
        self._topic = topic.encode()
        self._timeout_ms = int(replay_timeout_s * 1000)
        self._snapshot_timeout_s = snapshot_timeout_s
        self._ctx = zmq.Context()
        self._requests: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="dynkv-kv-events", daemon=True)
        self._ready = threading.Event()

    def start(self, wait_s: float = 10.0) -> None:
        """Connect, replay each engine's history, then follow live batches (returns once replays are asked)."""
        self._thread.start()
        self._ready.wait(wait_s)

    def resync(self, engine: str) -> None:
        """Forget ``engine``'s blocks and replay its history (it came back after being down)."""
        self._requests.put(engine)

    def close(self) -> None:
        self._requests.put(None)
        self._thread.join(5)

    def _run(self) -> None:
        subs: dict[Any, str] = {}
        poller = zmq.Poller()
        try:
            for engine, (pub, _) in self.endpoints.items():
                s = self._ctx.socket(zmq.SUB)
                s.setsockopt(zmq.RCVHWM, 0)
                s.setsockopt(zmq.SUBSCRIBE, self._topic)
                s.connect(pub)
                subs[s] = engine
                poller.register(s, zmq.POLLIN)
            for engine in self.endpoints:
                self._catch_up(engine)
            self._ready.set()
            while True:
                stop = self._serve_requests()
                if stop:
                    return
                for s, _ in poller.poll(100):
                    self._live(subs[s], s.recv_multipart())
        except Exception:
            log.exception("KV events subscriber stopped; routing goes on with what it knows")
        finally:
            self._ready.set()
            for s in subs:
                s.close(linger=0)
            self._ctx.term()

    def _serve_requests(self) -> bool:
        while True:
            try:
                engine = self._requests.get_nowait()
            except queue.Empty:
                return False
            if engine is None:
                return True
            self.feeds[engine].restart()
            self._catch_up(engine)

    def _catch_up(self, engine: str) -> None:
        """Replay what ``engine``'s feed misses, and take a snapshot where the replay buffer no longer has it."""
        if self._replay(engine) == "partial":
            self._snapshot(engine)

    def _live(self, engine: str, frames: list[bytes]) -> None:
        if len(frames) != 3:
            log.warning("KV events of %s: a message of %d frames (expected topic, seq, payload)", engine, len(frames))
            return
        feed = self.feeds[engine]
        seq = int.from_bytes(frames[1], "big")
        action = feed.offer(seq, frames[2])
        if action in ("gap", "restart"):
            got = self._replay(engine)
            skipped = feed.offer(seq, frames[2]) not in ("applied", "duplicate")
            if skipped:
                feed.skip_to(seq, frames[2])  # no replay, or it did not reach this batch
            if got != "complete" or skipped:
                self._snapshot(engine)

    def _replay(self, engine: str) -> str:
        """Ask ``engine``'s replay socket for what the feed misses: ``"complete"``, ``"partial"`` or ``"failed"``."""
        got = self._fetch_replay(engine, self.feeds[engine].want_from())
        if got is None:
            return "failed"
        return "complete" if self.feeds[engine].replayed(got) else "partial"

    def _fetch_replay(self, engine: str, start: int) -> list[tuple[int, bytes]] | None:
        """The batches from ``start`` that ``engine``'s replay socket still has; None when it has none or did not
        answer."""
        endpoint = self.endpoints[engine][1]
        if endpoint is None:
            return None
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(endpoint)
            sock.send_multipart((b"", start.to_bytes(8, "big")))
            got: list[tuple[int, bytes]] = []
            while sock.poll(self._timeout_ms):
                frames = sock.recv_multipart()
                if len(frames) != 4:
                    continue
                if frames[2] == _END_SEQ:
                    return got
                got.append((int.from_bytes(frames[2], "big"), frames[3]))
            log.warning("KV events of %s: replay socket %s did not answer within %.1f s", engine, endpoint,
                        self._timeout_ms / 1000)
            return None
        finally:
            sock.close()

    def _snapshot(self, engine: str) -> bool:
        """Rebuild ``engine``'s view from its snapshot; False when it has none, it failed (the view is unchanged),
        or no batch arrived yet to go on from."""
        url = self.snapshots.get(engine)
        feed = self.feeds[engine]
        if url is None or feed.last_seq is None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=self._snapshot_timeout_s) as r:
                snap = decode_snapshot(r.read())
        except (OSError, ValueError, msgspec.DecodeError, msgspec.ValidationError) as e:
            log.warning("KV events of %s: snapshot %s failed (%s)", engine, url, e)
            return False
        feed.load_snapshot(snap)
        return True
