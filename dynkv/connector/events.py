"""vLLM KV-cache events for dynkv's tiers, in vLLM's format and with vLLM's block hashes.

The leader reports which pages entered or left a tier, by dynkv key
(:class:`dynkv.index.IndexEvent`). A router that consumes vLLM's events
(vLLM's own, Dynamo's, llm-d's, ``dynkv proxy``) knows blocks by vLLM's
block hash, so :class:`KVEvents` keeps, for every page some tier holds, its
vLLM hash, its parent's, its token ids and LoRA — taken from the request
when the connector stores the page — and turns each step's events into
vLLM's ``BlockStored`` / ``BlockRemoved`` with medium ``CPU`` (host tier) or
``STORAGE`` (disk tier). A run of pages stored in one tier, each the next
block of the one before, is one ``BlockStored`` (as vLLM publishes its own
device blocks); vLLM publishes the step's events as one batch.

Pages found on disk at start are announced too: the disk tier's pages'
hashes and tokens are kept in ``dynkv-<fingerprint>.events`` next to the
first disk file (appended as pages reach the disk, rewritten when it holds
mostly stale records), and apply after a restart as long as the engine
hashes blocks the same way (same ``--prefix-caching-hash-algo`` and seed:
the file records vLLM's ``NONE_HASH``). A page whose hash is not known is
left out of the events (and counted in :attr:`KVEvents.unknown`).
Used by :mod:`dynkv.connector`.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from dynkv.tiers.base import DISK, HOST

__all__ = ["KVEvents"]

log = logging.getLogger("dynkv.connector")

# Pages remembered at store time and not stored in any tier yet (a store that fails is never reported).
_PENDING = 1 << 16
_MEDIUM = {HOST: "CPU", DISK: "STORAGE"}
_LOG_VERSION = 1


class _Meta(msgspec.Struct, array_like=True, gc=False):
    """What vLLM's event needs of one page: its hash, its parent's, its tokens, its LoRA."""

    block_hash: bytes | int  # as vLLM publishes it (an int under VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES)
    parent: bytes | int | None
    tokens: list[int]
    lora_id: int | None = None
    lora_name: str | None = None


class _Record(msgspec.Struct, array_like=True, gc=False):
    key: bytes
    meta: _Meta


class KVEvents:
    """vLLM's events for the pages of dynkv's tiers; off unless the engine publishes events.

    Parameters
    ----------
    vllm_config
        The engine's config (``kv_events_config`` says whether events are on).
    block_size
        Tokens per page.
    log_dir, fingerprint
        Where the disk tier's pages' hashes are kept across restarts (the
        first disk path) and the model fingerprint naming the file; None
        without a disk tier.
    """

    def __init__(self, vllm_config: Any, block_size: int, *, log_dir: str | None = None,
                 fingerprint: bytes | None = None) -> None:
        events = getattr(vllm_config, "kv_events_config", None)
        self.on = bool(getattr(events, "enable_kv_cache_events", False))
        self.block_size = block_size
        self.unknown = 0
        self._pending: OrderedDict[bytes, _Meta] = OrderedDict()
        self._held: dict[bytes, _Meta] = {}
        self._where: dict[bytes, set[str]] = {}
        self._tiers: dict[str, dict[bytes, _Meta]] = {t: {} for t in _MEDIUM}  # for snapshots: copied whole
        self._path = (os.path.join(log_dir, f"dynkv-{fingerprint.hex()[:16]}.events")
                      if self.on and log_dir and fingerprint else None)
        self._log: Any = None
        self._log_records = 0
        self._recovered: dict[bytes, _Meta] = {}
        self._ident = b""
        self._convert: Any = None

    # -- what the connector tells -----------------------------------------------

    def remember(self, keys: Sequence[bytes], block_hashes: Sequence[bytes], tokens: Sequence[int], lora: Any,
                 start: int, end: int) -> None:
        """Pages ``start..end`` of a request are being stored: its page ``keys``, vLLM's ``block_hashes``,
        its ``tokens`` and LoRA."""
        bs, convert = self.block_size, self._converter()
        lora_id, lora_name = getattr(lora, "lora_int_id", None), getattr(lora, "lora_name", None)
        for i in range(start, min(end, len(block_hashes))):
            if keys[i] in self._held:
                continue
            self._pending[keys[i]] = _Meta(convert(block_hashes[i]), convert(block_hashes[i - 1]) if i else None,
                                           list(tokens[i * bs : (i + 1) * bs]), lora_id, lora_name)
        while len(self._pending) > _PENDING:
            self._pending.popitem(last=False)

    def convert(self, events: Iterable[Any]) -> list[Any]:
        """The leader's tier events as vLLM's, a run of chained blocks per ``BlockStored``; nothing when off."""
        if not self.on:
            return []
        from vllm.distributed.kv_events import BlockRemoved, BlockStored

        self._open_log()
        out: list[Any] = []
        run: list[_Meta] = []
        run_tier: str | None = None
        gone: list[bytes] = []
        gone_tier: str | None = None

        def flush() -> None:
            nonlocal run, gone
            if run:
                out.append(BlockStored(**_stored_fields(run, self.block_size, _MEDIUM.get(run_tier),
                                                        BlockStored.__struct_fields__)))
                run = []
            if gone:
                out.append(BlockRemoved(block_hashes=gone, medium=_MEDIUM.get(gone_tier)))
                gone = []

        for ev in events:
            if ev.kind == "removed":
                meta = self._left(ev.key, ev.tier)
                if meta is None:
                    continue
                if run or gone_tier != ev.tier:
                    flush()
                gone_tier = ev.tier
                gone.append(meta.block_hash)
                continue
            meta = self._entered(ev.key, ev.tier)
            if meta is None:
                self.unknown += 1
                continue
            if gone or run_tier != ev.tier or not run or meta.parent != run[-1].block_hash or \
                    meta.lora_name != run[-1].lora_name:
                flush()
            run_tier = ev.tier
            run.append(meta)
        flush()
        self._recovered = {}  # the pages found on disk were all adopted at start, in the first events
        if self._log is not None:
            disk = sum(1 for where in self._where.values() if DISK in where)
            if self._log_records > 2 * disk + 4096:
                self._rewrite()
            self._log.flush()
        return out

    def tier_copies(self) -> dict[str, list[_Meta]]:
        """The pages each tier's events announced, by KV-events medium; each tier's list is copied in one step of
        the interpreter (see :mod:`dynkv.connector.snapshot`), so any thread may call it."""
        return {_MEDIUM[t]: list(pages.values()) for t, pages in self._tiers.items()}

    def clear(self) -> None:
        """vLLM's cache reset: forget pages not stored yet (those stored leave with their removal events)."""
        self._pending.clear()

    # -- bookkeeping ------------------------------------------------------------

    def _converter(self) -> Any:
        if self._convert is None:
            try:
                from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash
            except ImportError:
                maybe_convert_block_hash = bytes  # type: ignore[assignment]
            self._convert = maybe_convert_block_hash
        return self._convert

    def _entered(self, key: bytes, tier: str) -> _Meta | None:
        meta = self._held.get(key) or self._pending.pop(key, None) or self._recovered.pop(key, None)
        if meta is None:
            return None
        self._held[key] = meta
        self._where.setdefault(key, set()).add(tier)
        if tier in self._tiers:
            self._tiers[tier][key] = meta
        if tier == DISK and self._log is not None:
            self._log.write(_frame(_Record(key, meta)))
            self._log_records += 1
        return meta

    def _left(self, key: bytes, tier: str) -> _Meta | None:
        meta = self._held.get(key)
        where = self._where.get(key)
        if meta is None or where is None:
            return None
        where.discard(tier)
        if tier in self._tiers:
            self._tiers[tier].pop(key, None)
        if not where:
            del self._held[key], self._where[key]
        return meta

    # -- the disk tier's record of hashes ---------------------------------------

    def _identity(self) -> bytes:
        try:
            from vllm.v1.core import kv_cache_utils
        except ImportError:
            return b""
        return bytes(getattr(kv_cache_utils, "NONE_HASH", b"") or b"")

    def _open_log(self) -> None:
        """At the first events (vLLM's NONE_HASH is set by then): read the last run's records, start a new file."""
        if self._path is None or self._log is not None:
            return
        ident = _LOG_VERSION.to_bytes(4, "little") + self._identity()
        try:
            with open(self._path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        except OSError as e:
            log.warning("dynkv: cannot read %s (%s): pages found on disk are not announced in KV events",
                        self._path, e)
            data = b""
        if data:
            self._recovered = _read_log(data, ident, self._path)
        self._ident = ident
        self._rewrite()

    def _rewrite(self) -> None:
        """A fresh file: the identity, then the pages the disk tier holds (those found at start follow as they
        are adopted)."""
        assert self._path is not None
        if self._log is not None:
            self._log.close()
        try:
            self._log = open(self._path + ".new", "wb")
            self._log.write(_frame(self._ident))
            n = 0
            for key, where in self._where.items():
                if DISK in where:
                    self._log.write(_frame(_Record(key, self._held[key])))
                    n += 1
            self._log.flush()
            os.replace(self._path + ".new", self._path)
            self._log_records = n
        except OSError as e:
            log.warning("dynkv: cannot write %s (%s): disk pages will not be announced after a restart",
                        self._path, e)
            self._path, self._log = None, None

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


_ENC = msgspec.msgpack.Encoder()
_DEC = msgspec.msgpack.Decoder(_Record)


def _frame(obj: Any) -> bytes:
    data = obj if isinstance(obj, bytes) else _ENC.encode(obj)
    return len(data).to_bytes(4, "little") + data


def _read_log(data: bytes, ident: bytes, path: str) -> dict[bytes, _Meta]:
    """Records of a hashes file whose identity is ``ident``; a torn last record is dropped."""
    out: dict[bytes, _Meta] = {}
    pos, n = 0, len(data)
    first = True
    while pos + 4 <= n:
        size = int.from_bytes(data[pos : pos + 4], "little")
        if pos + 4 + size > n:
            break
        chunk = data[pos + 4 : pos + 4 + size]
        pos += 4 + size
        if first:
            if chunk != ident:
                log.warning("dynkv: %s was written by an engine hashing blocks differently (another "
                            "--prefix-caching-hash-algo or PYTHONHASHSEED): pages found on disk are not announced "
                            "in KV events", path)
                return {}
            first = False
            continue
        try:
            rec = _DEC.decode(chunk)
        except (msgspec.DecodeError, msgspec.ValidationError):
            break
        out[rec.key] = rec.meta
    return out


def _stored_fields(run: list[_Meta], block_size: int, medium: str | None, known: Iterable[str]) -> dict[str, Any]:
    tokens: list[int] = []
    for m in run:
        tokens += m.tokens
    fields = {"block_hashes": [m.block_hash for m in run], "parent_block_hash": run[0].parent, "token_ids": tokens,
              "block_size": block_size, "lora_id": run[0].lora_id, "medium": medium, "lora_name": run[0].lora_name}
    return {k: v for k, v in fields.items() if k in set(known)}
