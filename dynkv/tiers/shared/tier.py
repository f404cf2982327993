"""G4: whole TP-agnostic pages in a store that many engines share (Redis/Valkey, Mooncake Store).

The tier sits below the host tier: the leader writes host pages to it
(write-behind, once a page has been seen often enough) and reads pages from
it into fresh host pages, from where the normal host -> device load takes
them (:mod:`dynkv.leader.shared_flow`). It keeps no index of its own: the
store is the index, and other engines add and the store evicts pages at any
time.

Keys
    ``<namespace>:<fingerprint hex>:<page key hex>``. The fingerprint
    (:class:`dynkv.keys.ModelFingerprint`) covers the weights' identity, the
    dtype, the geometry of the whole model (all KV heads), the block size and
    the page-format version, so another model or format never reads these
    pages, while engines of every TP size share them (pages hold all heads).
Values
    A 64-byte header, then the page. The header follows the disk tier's
    record header (:mod:`dynkv.tiers.diskfile`) without what only a file
    needs (slot index, epoch, 4 KiB padding): magic, format version, key,
    fingerprint digest, payload length, CRC-32C of the payload, CRC-32C of
    the header (format 2; format 1 had zlib's CRC-32, 4-10x slower to compute
    than the store's own copies: its pages read back as a format mismatch and
    are rewritten). A page read back is used only when every field matches
    what was asked for and the payload's CRC-32C is right; otherwise the read fails
    (:class:`SharedPageError`), the value is deleted (the next write of the
    page replaces it) and the leader has the block recomputed. A key
    gone since the lookup (the store evicted it) fails as
    :class:`SharedPageMissing`: a miss, not an error.
Time
    Lookups (:meth:`SharedTier.count_stored`) wait at most
    ``lookup_timeout_s`` on their own thread; a store that answers later, or
    is down, is a miss. Reads and writes run on the tier's I/O threads, each
    call bounded by the backend's socket timeout.
Failure
    A store that cannot be reached (at start or later) puts the tier *down*:
    every lookup misses at once, reads and writes fail at once, and a
    reconnection is tried on the I/O threads after a backoff that doubles
    from 0.5 s to 30 s. Transitions are logged once each (WARNING down,
    INFO back), with the URL's credentials redacted.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from dynkv.tiers.shared.base import (GOT, MISSING, StoreBackend, StoreUnavailable, crc32c, redact, require_crc32c,
                                     scheme_of)

__all__ = ["HEADER_BYTES", "PageFuture", "SharedPageError", "SharedPageMissing", "SharedTier", "open_backend",
           "pack_header", "store_key"]

log = logging.getLogger("dynkv.shared")

FORMAT_VERSION = 2  # 2: CRC-32C (1: zlib's CRC-32)
HEADER_BYTES = 64
_MAGIC = b"DYNKVSH\x00"
# magic, version, key, fingerprint, payload length, payload CRC-32C; then the header's CRC-32C
_HDR = struct.Struct("<8sI16s16sQI")
_CRC = struct.Struct("<I")
_LEN = struct.Struct("<Q")
_PAD = bytes(HEADER_BYTES - _HDR.size - _CRC.size)
_HEAD = _MAGIC + struct.pack("<I", FORMAT_VERSION)  # the header's fields before the page's key
_BACKOFF = (0.5, 30.0)


class SharedPageMissing(KeyError):
    """The store no longer holds the page (evicted since the lookup): a miss."""


class SharedPageError(ValueError):
    """A value read back is not the page asked for (checksum, key, model or size): a load error."""


class _Batch(Future):
    """A batch's future; ``results`` is every page's outcome once it completed (read without the future's lock)."""

    results: list | None = None

    def complete(self, results: list) -> None:
        self.set_result(results)
        self.results = results


class PageFuture:
    """One page's outcome in a batched read or write: the part of :class:`concurrent.futures.Future` that
    callers use (``done``, ``cancelled``, ``result``, ``exception``, ``add_done_callback``).

    A batch of pages shares one future, which completes once with every
    page's outcome (its value, or the exception it fails with), so a page
    costs a small object rather than a future and its lock. A page's
    callback runs, with the page's future, when its batch completes; pages
    are never cancelled.
    """

    __slots__ = ("_batch", "_i")

    def __init__(self, batch: _Batch, i: int) -> None:
        self._batch = batch
        self._i = i

    def done(self) -> bool:
        return self._batch.results is not None or self._batch.done()

    def cancel(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return False

    def result(self, timeout: float | None = None) -> Any:
        """The page's value; raises its exception (or :class:`TimeoutError` after ``timeout`` seconds)."""
        r = (self._batch.results or self._batch.result(timeout))[self._i]
        if isinstance(r, BaseException):
            raise r
        return r

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The page's exception, None when it succeeded (waits like :meth:`result`)."""
        r = (self._batch.results or self._batch.result(timeout))[self._i]
        return r if isinstance(r, BaseException) else None

    def add_done_callback(self, fn: Callable[[PageFuture], object]) -> None:
        """Call ``fn(self)`` once the page is done (at once if it is)."""
        self._batch.add_done_callback(lambda _: fn(self))


def store_key(namespace: str, fingerprint: bytes, key: bytes) -> str:
    """The store's key of page ``key`` of the model with this fingerprint digest."""
    return f"{namespace}:{fingerprint.hex()}:{key.hex()}"


def pack_header(key: bytes, fingerprint: bytes, page: memoryview | bytes) -> bytes:
    """The 64-byte header stored before ``page``."""
    return _header(key, fingerprint + _LEN.pack(len(page)), page)


def _header(key: bytes, tail: bytes, page: memoryview | bytes) -> bytes:
    """:func:`pack_header` with the fields after the key (fingerprint, payload length) packed already."""
    body = _HEAD + key + tail + _CRC.pack(crc32c(page))
    return body + _CRC.pack(crc32c(body)) + _PAD


def check_page(hdr: bytes | bytearray, key: bytes, fingerprint: bytes, page: memoryview) -> str | None:
    """What is wrong with a page read back (None: nothing)."""
    magic, version, got_key, fp, length, crc = _HDR.unpack_from(hdr)
    if magic != _MAGIC:
        return "no page header (bad magic): not written by dynkv's shared tier"
    if version != FORMAT_VERSION:  # before the header's checksum, whose algorithm the version names
        return f"format version {version}, expected {FORMAT_VERSION}"
    if _CRC.unpack_from(hdr, _HDR.size)[0] != crc32c(memoryview(hdr)[: _HDR.size]):
        return "header checksum mismatch"
    if fp != fingerprint:
        return f"written for model fingerprint {fp.hex()}, not {fingerprint.hex()}"
    if got_key != key:
        return f"holds page {got_key.hex()}, not {key.hex()}"
    if length != len(page):
        return f"payload of {length} bytes, expected {len(page)}"
    got = crc32c(page)
    if got != crc:
        return f"payload checksum mismatch (crc32c {got:#010x}, header says {crc:#010x})"
    return None


def open_backend(url: str, *, timeout_s: float, username: str | None = None,
                 password: str | None = None) -> StoreBackend:
    """Connect the backend ``url``'s scheme names.

    Raises
    ------
    ValueError
        An unknown scheme or a malformed address.
    StoreUnavailable
        The store does not answer.
    """
    scheme = scheme_of(url)
    if scheme == "mooncake":
        from dynkv.tiers.shared.mooncake import MooncakeBackend

        return MooncakeBackend(url, timeout_s=timeout_s)
    from dynkv.tiers.shared.redis import RedisBackend

    return RedisBackend(url, timeout_s=timeout_s, username=username, password=password)


class SharedTier:
    """Pages of one model in a shared store: bounded-latency lookups, verified batched reads, batched writes.

    Parameters
    ----------
    url
        The store (see :func:`open_backend`); shown only redacted.
    fingerprint
        The model's 16-byte fingerprint digest: in every key and header.
    page_bytes
        Bytes of one page.
    namespace
        First part of every key (engines share pages only within one).
    batch_pages
        Pages per store call.
    timeout_s
        Connect and per-call timeout of the backend.
    lookup_timeout_s
        The most a lookup waits for the store's answer.
    io_threads
        Threads running reads and writes.
    connect
        Builds the backend (tests inject failures); default :func:`open_backend`.

    The constructor tries to connect once (bounded by ``timeout_s``); a
    store that is down leaves the tier down, and it reconnects later.
    """

    def __init__(self, url: str, *, fingerprint: bytes, page_bytes: int, namespace: str = "dynkv",
                 batch_pages: int = 32, timeout_s: float = 2.0, lookup_timeout_s: float = 0.02,
                 io_threads: int = 2, username: str | None = None, password: str | None = None,
                 connect: Callable[[], StoreBackend] | None = None) -> None:
        scheme_of(url)
        require_crc32c()
        if len(fingerprint) != 16:
            raise ValueError(f"fingerprint: expected a 16-byte digest, got {len(fingerprint)} bytes")
        self.url = redact(url)
        self.fingerprint = bytes(fingerprint)
        self.page_bytes = page_bytes
        self.namespace = namespace
        self._kprefix = store_key(namespace, self.fingerprint, b"")
        self._tail = self.fingerprint + _LEN.pack(page_bytes)  # the header's fields after the key, at page_bytes
        self.batch_pages = batch_pages
        self.lookup_timeout_s = lookup_timeout_s
        self._connect_fn = connect or (lambda: open_backend(url, timeout_s=timeout_s, username=username,
                                                            password=password))
        self._io = ThreadPoolExecutor(io_threads, thread_name_prefix="dynkv-shared")
        self._threads = io_threads
        self._queue: deque[tuple[Callable[[list], list], list, _Batch]] = deque()  # batches to run
        self._lookups = ThreadPoolExecutor(1, thread_name_prefix="dynkv-shared-lookup")
        self._lock = threading.Lock()
        self._backend: StoreBackend | None = None
        self._registered: list[memoryview] = []
        self._local = threading.local()  # each I/O thread's header buffer
        self._backoff = _BACKOFF[0]
        self._retry_at = 0.0
        self._connecting = False
        self._lookup: Future[int] | None = None
        self._closed = False
        self.downs = 0  # times the store was found down (at start included)
        self._connect()

    # -- state ------------------------------------------------------------------

    @property
    def up(self) -> bool:
        """Connected (as of the last call); a down tier tries to reconnect when its backoff has passed."""
        if self._backend is None:
            self._maybe_reconnect()
        return self._backend is not None

    @property
    def backend(self) -> StoreBackend | None:
        """The connected backend, None while down (the bench measures the store's own calls through it)."""
        return self._backend

    def register(self, buf: memoryview) -> None:
        """The host pool: a backend that can move pages in place registers it (now, and at each reconnection)."""
        with self._lock:
            self._registered.append(buf)
            backend = self._backend
        if backend is not None:
            backend.register(buf)

    def _connect(self) -> None:
        try:
            backend = self._connect_fn()
            for buf in self._registered:
                backend.register(buf)
        except StoreUnavailable as e:
            with self._lock:
                self._connecting = False
                self._retry_at = time.monotonic() + self._backoff
                first = self.downs == 0
                self._backoff = min(self._backoff * 2, _BACKOFF[1])
                self.downs = max(self.downs, 1)
            if first:
                log.warning("shared tier: %s; running without it, retrying with backoff", redact(str(e)))
            else:
                log.debug("shared tier: still down (%s)", redact(str(e)))
            return
        with self._lock:
            self._connecting = False
            if self._closed:
                backend.close()
                return
            was_down = self.downs > 0
            self._backend, self._backoff = backend, _BACKOFF[0]
        if was_down:
            log.info("shared tier: connected to %s", self.url)
        else:
            log.info("shared tier: %s", self.url)

    def _maybe_reconnect(self) -> None:
        with self._lock:
            if self._closed or self._connecting or self._backend is not None or time.monotonic() < self._retry_at:
                return
            self._connecting = True
        self._io.submit(self._connect)

    def _down(self, backend: StoreBackend, e: BaseException) -> None:
        with self._lock:
            if self._backend is not backend:
                return  # another thread already took it down
            self._backend = None
            self.downs += 1
            self._backoff = _BACKOFF[0]
            self._retry_at = time.monotonic() + self._backoff
        log.warning("shared tier down (%s); requests recompute until it is back", redact(str(e)))
        try:
            backend.close()
        except Exception:  # closing a dead connection may fail too; nothing to keep from it
            pass

    def _call(self, fn: Callable[[StoreBackend], list]) -> list:
        backend = self._backend
        if backend is None:
            self._maybe_reconnect()
            raise StoreUnavailable(f"shared tier {self.url} is down")
        try:
            return fn(backend)
        except StoreUnavailable as e:
            self._down(backend, e)
            raise

    # -- lookups ----------------------------------------------------------------

    def _count(self, keys: Sequence[bytes]) -> int:
        n = 0
        for start in range(0, len(keys), self.batch_pages):
            batch = keys[start : start + self.batch_pages]
            got = self._call(lambda b: b.exists([self._kprefix + k.hex() for k in batch]))
            for present in got:
                if not present:
                    return n
                n += 1
        return n

    def count_stored(self, keys: Sequence[bytes]) -> int | None:
        """How many leading ``keys`` the store holds; None when it is down or did not answer in time.

        Never waits longer than ``lookup_timeout_s``; while an earlier lookup
        is still waiting on the store, returns None at once.
        """
        if not keys:
            return 0
        if not self.up:
            return None
        if self._lookup is not None and not self._lookup.done():
            return None
        fut = self._lookups.submit(self._count, list(keys))
        self._lookup = fut
        try:
            return fut.result(timeout=self.lookup_timeout_s)
        except FutureTimeout:
            return None
        except StoreUnavailable:
            return None

    # -- reads and writes --------------------------------------------------------

    def read_many(self, reads: Sequence[tuple[bytes, memoryview]]) -> list[PageFuture]:
        """Read pages ``(key, destination)``; each page's future fails with :class:`SharedPageMissing`,
        :class:`SharedPageError` or :class:`StoreUnavailable` where the page cannot be used.

        A failed destination holds undefined bytes.
        """
        return self._submit_all(self._read_batch, reads)

    def write_many(self, writes: Sequence[tuple[bytes, memoryview]], *, check: bool = True) -> list[PageFuture]:
        """Write pages ``(key, source)``; each page's future: True when the store holds the page afterwards,
        False where it refused it (full).

        ``check``: ask the store first and send only the pages it lacks (one
        more round trip per batch; spares the bytes of pages another engine
        wrote). Without, every page is sent; one already there is replaced
        (Redis) or kept (Mooncake Store), the same bytes either way.
        """
        return self._submit_all(self._write_batch if check else self._put_batch, writes)

    def _submit_all(self, fn: Callable[[list], list], items: Sequence[tuple[bytes, memoryview]]) -> list[PageFuture]:
        # The batches go on one queue that the I/O threads drain: a call hands the pool a task per idle
        # thread, not one per batch, so the caller (holding the GIL) is done with it sooner and the threads start.
        out: list[PageFuture] = []
        closed = self._closed
        for start in range(0, len(items), self.batch_pages):
            batch = list(items[start : start + self.batch_pages])
            fut = _Batch()
            fut.set_running_or_notify_cancel()
            if closed:
                fut.complete([StoreUnavailable(f"shared tier {self.url} is closed")] * len(batch))
            else:
                self._queue.append((fn, batch, fut))
            out += [PageFuture(fut, i) for i in range(len(batch))]
        if not closed:
            try:
                for _ in range(min(self._threads, -(-len(items) // self.batch_pages))):
                    self._io.submit(self._drain)
            except RuntimeError:  # closed meanwhile: no thread will take what is queued
                while self._queue:
                    try:
                        _, batch, fut = self._queue.popleft()
                    except IndexError:  # a thread still draining took the last
                        break
                    fut.complete([StoreUnavailable(f"shared tier {self.url} is closed")] * len(batch))
        return out

    def _drain(self) -> None:
        while True:
            try:
                fn, items, fut = self._queue.popleft()
            except IndexError:
                return
            try:
                results = fn(items)
            except BaseException as e:  # every page completes, whatever went wrong
                results = [e] * len(items)
            fut.complete(results)

    def _headers(self, n: int) -> memoryview:
        """This I/O thread's header buffer, its first ``n`` 64-byte slots: registered like the host pool so
        that a backend moving pages in place moves their headers in place too; valid until the thread's next
        batch."""
        arena = getattr(self._local, "headers", None)
        if arena is None:
            arena = memoryview(bytearray(self.batch_pages * HEADER_BYTES))
            self._local.headers = arena
            self.register(arena)
        return arena[: n * HEADER_BYTES]

    def _read_batch(self, reads: list[tuple[bytes, memoryview]]) -> list[BaseException | None]:
        heads = self._headers(len(reads))
        pages = [dst for _, dst in reads]
        skeys = [self._kprefix + k.hex() for k, _ in reads]
        codes = self._call(lambda b: b.get(skeys, heads, pages))
        raw = bytes(heads)  # one copy of the batch's headers, sliced as bytes below
        # Every page came back: each header must be, byte for byte, the one written for its key and the page read.
        if codes.count(GOT) == len(reads) and raw == b"".join(_header(key, self._tail, dst) for key, dst in reads):
            return [None] * len(reads)
        # Otherwise page by page: what is missing, and what is wrong with each page that is (check_page names it).
        results: list[BaseException | None] = []
        bad_keys = []
        for i, ((key, dst), code) in enumerate(zip(reads, codes)):
            if code == MISSING:
                results.append(SharedPageMissing(key.hex()))
                continue
            o = i * HEADER_BYTES
            bad = check_page(raw[o : o + HEADER_BYTES], key, self.fingerprint, dst) if code == GOT \
                else "a value of another size"
            results.append(None if bad is None else SharedPageError(f"shared page {key.hex()}: {bad}"))
            if bad is not None:
                bad_keys.append(skeys[i])
        if bad_keys:  # under this model's key, a bad value is bad for every engine: let the next write replace it
            try:
                self._call(lambda b: b.remove(bad_keys))
            except StoreUnavailable:
                pass
        return results

    def _write_batch(self, writes: list[tuple[bytes, memoryview]]) -> list[bool | BaseException]:
        skeys = [self._kprefix + k.hex() for k, _ in writes]
        held = self._call(lambda b: b.exists(skeys))
        todo = [i for i, h in enumerate(held) if not h]
        results: list[bool | BaseException] = [True] * len(writes)
        if todo:
            for i, r in zip(todo, self._put_batch([writes[i] for i in todo])):
                results[i] = r
        return results

    def _put_batch(self, writes: list[tuple[bytes, memoryview]]) -> list[bool | BaseException]:
        heads = self._headers(len(writes))
        heads[:] = b"".join(
            _header(key, self._tail, src) if len(src) == self.page_bytes else pack_header(key, self.fingerprint, src)
            for key, src in writes)
        pages = [src for _, src in writes]
        skeys = [self._kprefix + k.hex() for k, _ in writes]
        return [bool(good) for good in self._call(lambda b: b.put(skeys, heads, pages))]

    def close(self) -> None:
        """Wait for reads and writes in flight, then disconnect."""
        with self._lock:
            self._closed = True
        self._io.shutdown(wait=True)
        self._lookups.shutdown(wait=True)
        with self._lock:
            backend, self._backend = self._backend, None
        if backend is not None:
            backend.close()
