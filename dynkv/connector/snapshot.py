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
connectors (``bind_gpu_block_pool``). vLLM has no public call that lists the
pool's cached blocks (0.32 has none; its ``blocks`` and their hashes are
public but could only be read one by one, not at one moment), so one
accessor, :func:`device_block_hashes`, reads the pool's private prefix-cache
map and checks its shape. Where vLLM bound no pool or the map is not the
shape it knows, the snapshot says ``device=None`` (a WARNING once), still
lists the host and disk tiers, and the router keeps the device blocks it
learned from events.
"""

from __future__ import annotations

import logging
from typing import Any

from dynkv.connector.events import KVEvents
from dynkv.kvsnapshot import KVSnapshot, SnapshotPage, encode_snapshot

__all__ = ["SnapshotDesk", "device_block_hashes"]

log = logging.getLogger("dynkv.connector")


def device_block_hashes(pool: Any) -> list[bytes] | None:
    """The hashes of the blocks in vLLM's prefix cache, each once, or None where they cannot be listed.

    The one reader of vLLM's private prefix-cache map (``BlockPool.
    cached_block_hash_to_block._cache`` in vLLM 0.32: a dict keyed by a
    block's hash followed by its 4-byte KV-cache group id). Its keys are
    copied with one ``list()`` (one moment of the scheduler's work, see the
    module's docstring); anything not of that shape — no pool, another
    layout of the map in another vLLM, keys that are not hashes — gives
    None, never a wrong list.
    """
    cache = getattr(getattr(pool, "cached_block_hash_to_block", None), "_cache", None)
    if not isinstance(cache, dict):
        return None
    keys = list(cache)
    from vllm.v1.core.kv_cache_utils import get_block_hash

    seen: dict[bytes, None] = {}
    for key in keys:  # one key per KV-cache group and hash: a hash once
        if not isinstance(key, bytes) or len(key) <= 4:
            return None
        seen.setdefault(get_block_hash(key))
    return list(seen)


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
        self._warned = False

    def bind_pool(self, pool: Any) -> None:
        """vLLM's device block pool (the connector's ``bind_gpu_block_pool``)."""
        self._pool = pool

    def serve(self) -> tuple[int, bytes]:
        """``(200, snapshot)``; called on the metrics server's threads."""
        hashes = device_block_hashes(self._pool)
        if hashes is None and not self._warned:
            self._warned = True
            why = ("vLLM did not hand the connector its block pool" if self._pool is None else
                   f"vLLM's block pool ({type(self._pool).__name__}) has no prefix-cache map of the shape dynkv "
                   "reads")
            log.warning("dynkv: KV snapshots carry no device view: %s; they still list the host and disk tiers, "
                        "and routers keep the device blocks they learn from KV events", why)
        media = self._events.tier_copies()
        return 200, encode_snapshot(self._build(hashes, media))

    def _build(self, hashes: list[bytes] | None, media: dict[str, list[Any]]) -> KVSnapshot:
        device = None
        if hashes is not None:
            from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

            device = [maybe_convert_block_hash(h) for h in hashes]
        pages = {m: [SnapshotPage(p.block_hash, p.parent, p.tokens, p.lora_id, p.lora_name) for p in metas]
                 for m, metas in media.items()}
        return KVSnapshot(block_size=self._events.block_size, device=device, media=pages)
