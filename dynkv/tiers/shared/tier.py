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
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from crc32c import crc32c
from dynkv.tiers.shared.base import GOT, MISSING, StoreBackend, StoreUnavailable, redact, scheme_of

__all__ = ["HEADER_BYTES", "SharedPageError", "SharedPageMissing", "SharedTier", "open_backend", "pack_header",
           "store_key"]

log = logging.getLogger("dynkv.shared")

FORMAT_VERSION = 2  # 2: CRC-32C (1: zlib's CRC-32)
HEADER_BYTES = 64
_MAGIC = b"DYNKVSH\x00"
# magic, version, key, fingerprint, payload length, payload CRC-32C; then the header's CRC-32C
_HDR = struct.Struct("<8sI16s16sQI")
_CRC = struct.Struct("<I")
_BACKOFF = (0.5, 30.0)


class SharedPageMissing(KeyError):
    """The store no longer holds the page (evicted since the lookup): a miss."""


class SharedPageError(ValueError):
    """A value read back is not the page asked for (checksum, key, model or size): a load error."""


def store_key(namespace: str, fingerprint: bytes, key: bytes) -> str:
    """The store's key of page ``key`` of the model with this fingerprint digest."""
    return f"{namespace}:{fingerprint.hex()}:{key.hex()}"


def pack_header(key: bytes, fingerprint: bytes, page: memoryview | bytes) -> bytes:
    """The 64-byte header stored before ``page``."""
    body = _HDR.pack(_MAGIC, FORMAT_VERSION, key, fingerprint, len(page), crc32c(page))
    return (body + _CRC.pack(crc32c(body))).ljust(HEADER_BYTES, b"\0")


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
        if len(fingerprint) != 16:
            raise ValueError(f"fingerprint: expected a 16-byte digest, got {len(fingerprint)} bytes")
        self.url = redact(url)
        self.fingerprint = bytes(fingerprint)
        self.page_bytes = page_bytes
        self.namespace = namespace
        self.batch_pages = batch_pages
        self.lookup_timeout_s = lookup_timeout_s
        self._connect_fn = connect or (lambda: open_backend(url, timeout_s=timeout_s, username=username,
                                                            password=password))
        self._io = ThreadPoolExecutor(io_threads, thread_name_prefix="dynkv-shared")
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

    def _skey(self, key: bytes) -> str:
        return store_key(self.namespace, self.fingerprint, key)

    def _count(self, keys: Sequence[bytes]) -> int:
        n = 0
        for start in range(0, len(keys), self.batch_pages):
            batch = keys[start : start + self.batch_pages]
            got = self._call(lambda b: b.exists([self._skey(k) for k in batch]))
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

    def read_many(self, reads: Sequence[tuple[bytes, memoryview]]) -> list[Future[None]]:
        """Read pages ``(key, destination)``; each future fails with :class:`SharedPageMissing`,
        :class:`SharedPageError` or :class:`StoreUnavailable` where the page cannot be used.

        A failed destination holds undefined bytes.
        """
        futs: list[Future[None]] = [Future() for _ in reads]
        for start in range(0, len(reads), self.batch_pages):
            self._submit(self._read_batch, list(reads[start : start + self.batch_pages]),
                         futs[start : start + self.batch_pages])
        return futs

    def write_many(self, writes: Sequence[tuple[bytes, memoryview]], *, check: bool = True) -> list[Future[bool]]:
        """Write pages ``(key, source)``; each future: True when the store holds the page afterwards,
        False where it refused it (full).

        ``check``: ask the store first and send only the pages it lacks (one
        more round trip per batch; spares the bytes of pages another engine
        wrote). Without, every page is sent; one already there is replaced
        (Redis) or kept (Mooncake Store), the same bytes either way.
        """
        futs: list[Future[bool]] = [Future() for _ in writes]
        fn = self._write_batch if check else self._put_batch
        for start in range(0, len(writes), self.batch_pages):
            self._submit(fn, list(writes[start : start + self.batch_pages]), futs[start : start + self.batch_pages])
        return futs

    def _submit(self, fn: Callable, items: list, futs: list[Future]) -> None:
        for f in futs:
            f.set_running_or_notify_cancel()
        if self._closed:
            for f in futs:
                f.set_exception(StoreUnavailable(f"shared tier {self.url} is closed"))
            return
        self._io.submit(self._guard, fn, items, futs)

    @staticmethod
    def _guard(fn: Callable, items: list, futs: list[Future]) -> None:
        try:
            fn(items, futs)
        except BaseException as e:  # every future completes, whatever went wrong
            for f in futs:
                if not f.done():
                    f.set_exception(e)

    def _headers(self, n: int) -> list[memoryview]:
        """``n`` header slots in this I/O thread's header buffer, registered like the host pool so that a
        backend moving pages in place moves their headers in place too; valid until the thread's next batch."""
        arena = getattr(self._local, "headers", None)
        if arena is None:
            arena = memoryview(bytearray(self.batch_pages * HEADER_BYTES))
            self._local.headers = arena
            self.register(arena)
        return [arena[i * HEADER_BYTES : (i + 1) * HEADER_BYTES] for i in range(n)]

    def _read_batch(self, reads: list[tuple[bytes, memoryview]], futs: list[Future[None]]) -> None:
        headers = self._headers(len(reads))
        parts = [[h, dst] for h, (_, dst) in zip(headers, reads)]
        codes = self._call(lambda b: b.get([self._skey(k) for k, _ in reads], parts))
        results: list[BaseException | None] = []
        for (key, dst), hdr, code in zip(reads, headers, codes):
            if code == MISSING:
                results.append(SharedPageMissing(key.hex()))
            elif code != GOT:
                results.append(SharedPageError(f"shared page {key.hex()}: a value of another size"))
            else:
                bad = check_page(hdr, key, self.fingerprint, dst)
                results.append(None if bad is None else SharedPageError(f"shared page {key.hex()}: {bad}"))
        bad_keys = [self._skey(k) for (k, _), r in zip(reads, results) if isinstance(r, SharedPageError)]
        if bad_keys:  # under this model's key, a bad value is bad for every engine: let the next write replace it
            try:
                self._call(lambda b: b.remove(bad_keys))
            except StoreUnavailable:
                pass
        for fut, r in zip(futs, results):
            if r is None:
                fut.set_result(None)
            else:
                fut.set_exception(r)

    def _write_batch(self, writes: list[tuple[bytes, memoryview]], futs: list[Future[bool]]) -> None:
        skeys = [self._skey(k) for k, _ in writes]
        held = self._call(lambda b: b.exists(skeys))
        todo = [i for i, h in enumerate(held) if not h]
        for i, h in enumerate(held):
            if h:
                futs[i].set_result(True)
        if todo:
            self._put_batch([writes[i] for i in todo], [futs[i] for i in todo])

    def _put_batch(self, writes: list[tuple[bytes, memoryview]], futs: list[Future[bool]]) -> None:
        skeys = [self._skey(k) for k, _ in writes]
        headers = self._headers(len(writes))
        for h, (key, src) in zip(headers, writes):
            h[:] = pack_header(key, self.fingerprint, src)
        parts = [[h, src] for h, (_, src) in zip(headers, writes)]
        ok = self._call(lambda b: b.put(skeys, parts))
        for i, good in enumerate(ok):
            futs[i].set_result(bool(good))

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
