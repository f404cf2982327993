"""The engine's side of KV snapshots (:mod:`dynkv.kvsnapshot`): ``GET /kv/snapshot`` on dynkv's ``metrics_port``.

The HTTP thread copies what a snapshot needs — the keys of vLLM's
prefix-cache map and, per tier, the list of pages its KV events announced —
then builds and encodes the snapshot from that copy. The scheduler never
waits for it: each copy is one ``list()`` of a dict the scheduler's thread
owns, made in one step of the interpreter (under the GIL, with no Python code
run in between), so it is that dict at one moment of the scheduler's work;
copies of different media are taken at different moments, which
:mod:`dynkv.kvsnapshot` explains is enough.

vLLM's device blocks are listed from its block pool, which vLLM hands to
connectors (``bind_gpu_block_pool``); the map is private to vLLM, so where
it is not found the snapshot says ``device=None`` and the router keeps the
device blocks it learned from events.
"""

from __future__ import annotations

from typing import Any

from dynkv.connector.events import KVEvents
from dynkv.kvsnapshot import KVSnapshot, SnapshotPage, encode_snapshot

__all__ = ["SnapshotDesk"]


class SnapshotDesk:
    """Answers snapshot requests from the connector's :class:`~dynkv.connector.events.KVEvents` and vLLM's pool.

    Parameters
    ----------
    events
        The connector's KV events (the tiers' pages with vLLM's hashes).
    """

    def __init__(self, events: KVEvents) -> None:
        self._events = events
        self._pool: Any = None

    def bind_pool(self, pool: Any) -> None:
        """vLLM's device block pool (the connector's ``bind_gpu_block_pool``)."""
        self._pool = pool

    def serve(self) -> tuple[int, bytes]:
        """``(200, snapshot)``; called on the metrics server's threads."""
        cache = getattr(getattr(self._pool, "cached_block_hash_to_block", None), "_cache", None)
        keys = list(cache) if isinstance(cache, dict) else None
        media = self._events.tier_copies()
        return 200, encode_snapshot(self._build(keys, media))

    def _build(self, keys: list[bytes] | None, media: dict[str, list[Any]]) -> KVSnapshot:
        device = None
        if keys is not None:
            from vllm.v1.core.kv_cache_utils import get_block_hash, maybe_convert_block_hash

            seen: set[bytes] = set()
            device = []
            for key in keys:  # one key per KV-cache group and hash: a hash once
                h = get_block_hash(key)
                if h not in seen:
                    seen.add(h)
                    device.append(maybe_convert_block_hash(h))
        pages = {m: [SnapshotPage(p.block_hash, p.parent, p.tokens, p.lora_id, p.lora_name) for p in metas]
                 for m, metas in media.items()}
        return KVSnapshot(block_size=self._events.block_size, device=device, media=pages)
