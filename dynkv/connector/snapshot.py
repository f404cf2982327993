"""The engine's side of KV snapshots (:mod:`dynkv.kvsnapshot`): asked for over HTTP, taken at the end of a step.

``GET /kv/snapshot`` on dynkv's ``metrics_port`` files a ticket and waits.
The scheduler's thread, in the connector's ``take_events`` (after vLLM took
its device events for the step, before it publishes the step's batch),
copies what a snapshot needs — the keys of vLLM's prefix-cache map and the
lists of dynkv's tier pages, C-level copies of references — and adds one
marker event per ticket to the batch; the HTTP thread builds and encodes
the snapshot from that copy, so the scheduler never waits on a client or an
encoder. A waiting ticket keeps an idle engine stepping
(``has_pending_push_work``) until its marker is out.

vLLM's device blocks are listed from its block pool, which vLLM hands to
connectors (``bind_gpu_block_pool``); the map is private to vLLM, so where
it is not found the snapshot says ``device=None`` and the router keeps the
device blocks it learned from events.
"""

from __future__ import annotations

import logging
import secrets
import threading
from typing import Any

from dynkv.connector.events import KVEvents
from dynkv.kvsnapshot import MARKER_PREFIX, KVSnapshot, SnapshotPage, encode_snapshot

__all__ = ["SnapshotDesk"]

log = logging.getLogger("dynkv.connector")


class _Ticket:
    def __init__(self, ident: str) -> None:
        self.ident = ident
        self.done = threading.Event()
        self.device: list[bytes] | None = None
        self.media: dict[str, list[Any]] = {}


class SnapshotDesk:
    """Snapshot requests between the HTTP thread (:meth:`serve`) and the scheduler's thread (:meth:`take`).

    Parameters
    ----------
    events
        The connector's :class:`~dynkv.connector.events.KVEvents` (the tiers' pages and vLLM's hashes).
    timeout_s
        How long a request waits for the engine's next step.
    """

    def __init__(self, events: KVEvents, *, timeout_s: float = 30.0) -> None:
        self._events = events
        self._timeout_s = timeout_s
        self._pool: Any = None
        self._lock = threading.Lock()
        self._waiting: list[_Ticket] = []
        self._prefix = f"{MARKER_PREFIX}{secrets.token_hex(6)}-"  # one per engine process: a restart's differ
        self._n = 0

    def bind_pool(self, pool: Any) -> None:
        """vLLM's device block pool (the connector's ``bind_gpu_block_pool``)."""
        self._pool = pool

    def wanted(self) -> bool:
        """Whether a snapshot waits for the next step."""
        return bool(self._waiting)

    def take(self) -> list[Any]:
        """In the scheduler's thread, at the end of ``take_events``: copy the state for each waiting ticket and
        return their marker events (to publish in this step's batch)."""
        with self._lock:
            tickets, self._waiting = self._waiting, []
        if not tickets:
            return []
        from vllm.distributed.kv_events import BlockRemoved

        device = self._device_keys()
        media = self._events.tier_copies()
        for t in tickets:
            t.device, t.media = device, media
            t.done.set()
        return [BlockRemoved(block_hashes=[], medium=t.ident) for t in tickets]

    def _device_keys(self) -> list[bytes] | None:
        cache = getattr(getattr(self._pool, "cached_block_hash_to_block", None), "_cache", None)
        return list(cache) if isinstance(cache, dict) else None

    def serve(self) -> tuple[int, bytes]:
        """In the HTTP thread: ``(200, snapshot)`` once the engine stepped, or ``(503, why)``."""
        with self._lock:
            self._n += 1
            ticket = _Ticket(f"{self._prefix}{self._n}")
            self._waiting.append(ticket)
        if not ticket.done.wait(self._timeout_s):
            with self._lock:
                if ticket in self._waiting:
                    self._waiting.remove(ticket)
            if not ticket.done.is_set():
                return 503, f"the engine did not step within {self._timeout_s:.0f} s; ask again".encode()
        return 200, encode_snapshot(self._build(ticket))

    def _build(self, t: _Ticket) -> KVSnapshot:
        device = None
        if t.device is not None:
            from vllm.v1.core.kv_cache_utils import get_block_hash, maybe_convert_block_hash

            seen: set[bytes] = set()
            device = []
            for key in t.device:  # one key per KV-cache group and hash: a hash once
                h = get_block_hash(key)
                if h not in seen:
                    seen.add(h)
                    device.append(maybe_convert_block_hash(h))
        media = {m: [SnapshotPage(p.block_hash, p.parent, p.tokens, p.lora_id, p.lora_name) for p in pages]
                 for m, pages in t.media.items()}
        return KVSnapshot(marker=t.ident, block_size=self._events.block_size, device=device, media=media)
