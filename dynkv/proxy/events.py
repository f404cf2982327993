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
(``buffer_steps``), the view stays partial and ``lost`` counts it: routing
still works, its predictions are just shorter. This is the one home of ZMQ
in the proxy (the house rule's second home, next to ``disagg/wire.py``).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import zmq

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
        self.counts = {"batches": 0, "events": 0, "gaps": 0, "lost": 0, "restarts": 0, "bad": 0}
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

    def replayed(self, batches: Sequence[tuple[int, bytes]]) -> None:
        """Batches from the replay socket, oldest first; those past :meth:`want_from` are applied."""
        want = self.want_from()
        todo = [(s, p) for s, p in batches if s >= want]
        if todo and todo[0][0] > want or not todo and self.last_seq is None and batches:
            self.counts["lost"] += 1
            log.warning("KV events of %s: batches %d..%d are gone from its replay buffer (raise buffer_steps); "
                        "its blocks from then are not known", self.engine, want,
                        (todo[0][0] if todo else batches[-1][0] + 1) - 1)
        for seq, payload in todo:
            if self.last_seq is not None and seq != self.last_seq + 1 and seq <= self.last_seq:
                continue
            self._apply(seq, payload)
        if self.last_seq is not None:
            self._dup_to = self.last_seq

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
    """A thread reading every engine's KV events (SUB) and asking for replays (DEALER to vLLM's ROUTER).

    Parameters
    ----------
    feeds
        Engine -> its :class:`EngineFeed`.
    endpoints
        Engine -> ``(publisher endpoint, replay endpoint or None)``, e.g.
        ``("tcp://10.0.0.5:5557", "tcp://10.0.0.5:5558")``.
    topic
        The publishers' topic (vLLM's ``topic``, default empty).
    replay_timeout_s
        How long a replay socket may stay silent before the replay is given up.
    """

    def __init__(self, feeds: dict[str, EngineFeed], endpoints: dict[str, tuple[str, str | None]], *,
                 topic: str = "", replay_timeout_s: float = 2.0) -> None:
        for engine, (pub, replay) in endpoints.items():
            for ep in (pub, replay):
                if ep is not None and not ep.startswith(("tcp://", "ipc://", "inproc://")):
                    raise ValueError(f"KV events endpoint {ep!r} of {engine}: expected tcp://host:port or ipc://path")
        self.feeds, self.endpoints = feeds, endpoints
        self._topic = topic.encode()
        self._timeout_ms = int(replay_timeout_s * 1000)
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
                self._replay(engine)
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
            self._replay(engine)

    def _live(self, engine: str, frames: list[bytes]) -> None:
        if len(frames) != 3:
            log.warning("KV events of %s: a message of %d frames (expected topic, seq, payload)", engine, len(frames))
            return
        feed = self.feeds[engine]
        seq = int.from_bytes(frames[1], "big")
        action = feed.offer(seq, frames[2])
        if action in ("gap", "restart"):
            if not self._replay(engine) or feed.offer(seq, frames[2]) not in ("applied", "duplicate"):
                feed.skip_to(seq, frames[2])

    def _replay(self, engine: str) -> bool:
        """Ask ``engine``'s replay socket for what the feed misses; False when it has none or did not answer."""
        endpoint = self.endpoints[engine][1]
        feed = self.feeds[engine]
        if endpoint is None:
            return False
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(endpoint)
            sock.send_multipart((b"", feed.want_from().to_bytes(8, "big")))
            got: list[tuple[int, bytes]] = []
            while sock.poll(self._timeout_ms):
                frames = sock.recv_multipart()
                if len(frames) != 4:
                    continue
                if frames[2] == _END_SEQ:
                    feed.replayed(got)
                    return True
                got.append((int.from_bytes(frames[2], "big"), frames[3]))
            log.warning("KV events of %s: replay socket %s did not answer within %.1f s", engine, endpoint,
                        self._timeout_ms / 1000)
            return False
        finally:
            sock.close()
