"""vLLM KV-cache events for dynkv's tiers (``BlockStored`` / ``BlockRemoved`` with medium ``CPU`` or ``STORAGE``).

The leader reports which pages entered or left a tier by key; a stored
page's event also carries its parent, tokens and LoRA, which only the
scheduler-side connector knows when it stores the page. :class:`KVEvents`
keeps that for recently stored pages and turns the leader's events into
vLLM's. Used by :mod:`dynkv.connector`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

from dynkv.tiers.base import DISK, HOST

__all__ = ["KVEvents"]

# Token ids of recently stored pages, for KV events (older pages' events carry none).
_META_ENTRIES = 1 << 16
_MEDIUM = {HOST: "CPU", DISK: "STORAGE"}


class KVEvents:
    """What vLLM's KV events need of pages the connector stored; off unless the engine publishes events."""

    def __init__(self, vllm_config: Any, block_size: int) -> None:
        events = getattr(vllm_config, "kv_events_config", None)
        self.on = bool(getattr(events, "enable_kv_cache_events", False))
        self.block_size = block_size
        self._meta: OrderedDict[bytes, tuple[bytes | None, list[int], Any]] = OrderedDict()

    def remember(self, keys: Sequence[bytes], tokens: Sequence[int], lora: Any, start: int, end: int) -> None:
        """Pages ``start..end`` of a request (its page ``keys``, ``tokens`` and LoRA) are being stored."""
        bs = self.block_size
        for i in range(start, end):
            self._meta[keys[i]] = (keys[i - 1] if i else None, list(tokens[i * bs : (i + 1) * bs]), lora)
        while len(self._meta) > _META_ENTRIES:
            self._meta.popitem(last=False)

    def convert(self, events: Iterable[Any]) -> list[Any]:
        """The leader's tier events as vLLM's; nothing when events are off."""
        if not self.on:
            return []
        from vllm.distributed.kv_events import BlockRemoved, BlockStored

        out: list[Any] = []
        for ev in events:
            if ev.kind == "removed":
                out.append(BlockRemoved(block_hashes=[ev.key], medium=_MEDIUM.get(ev.tier)))
                continue
            parent, tokens, lora = self._meta.get(ev.key, (None, [], None))
            fields = {
                "block_hashes": [ev.key], "parent_block_hash": parent, "token_ids": tokens,
                "block_size": self.block_size, "lora_id": getattr(lora, "lora_int_id", None),
                "medium": _MEDIUM.get(ev.tier), "lora_name": getattr(lora, "lora_name", None),
            }
            out.append(BlockStored(**{k: v for k, v in fields.items() if k in BlockStored.__struct_fields__}))
        return out

    def clear(self) -> None:
        self._meta.clear()
