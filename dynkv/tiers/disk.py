"""The disk tier (G3): whole pages in preallocated files, checksummed, ``O_DIRECT``.

Each configured directory holds one file per model, ``dynkv-<fingerprint
hex[:16]>.pages`` (format: :mod:`dynkv.tiers.diskfile`), so two models never share a
file. Slots are striped over the directories: slot ``s`` is record ``s // P``
of the file in directory ``s % P`` (``P`` directories), so consecutive slots
spread over the devices.

Reads verify the header (magic, version, fingerprint, epoch, position, length,
key) and the payload's checksum, and fail the future with
:class:`DiskPageError` on any mismatch: a page is served with exactly the bytes
written for its key, or not at all. Checksums are ``zlib.crc32`` (3-5 GB/s on
one core; each I/O thread runs it serially with its own I/O, so it bounds one
thread near 2.4 GB/s and stops mattering from about four threads: see the
"Disk tier" section of docs/perf.md). A CRC-32 misses a random corruption with
probability 2**-32 per page. ``clear()`` writes a new random epoch to the
superblocks, which invalidates every record at once instead of one header
write per slot (``reset_prefix_cache`` must be quick on a terabyte tier).

I/O runs on a pool of threads (:class:`dynkv.tiers.iopool.IOPool`) that
takes reads ahead of queued writes: a request waits for its reads, nobody for
a write-through. ``os.preadv``/``os.pwritev`` and ``zlib.crc32`` (on
buffers over 5 KiB) release the GIL. Caller buffers whose address and length
are multiples of 4096 are read and written in place; others go through one
page-aligned ``mmap`` buffer per I/O thread.

:class:`DiskTier` is kept whole (about 580 lines): its write, read, batched read,
recover and invalidate paths share the files' epochs, the per-thread buffers
and the counters; the record format is apart, in :mod:`dynkv.tiers.diskfile`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import logging
import mmap
import os
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import numpy as np

import dynkv._C as _C
from dynkv.tiers.diskfile import (
    ALIGN,
    HEADER_BYTES,
    PageFile,
    address,
    check_header,
    check_space,
    digest,
    file_name,
    new_epoch,
    pack_header,
    prepare_dir,
    preadv_all,
    pwritev_all,
    record_size,
)
from dynkv.tiers.iopool import IOPool

__all__ = ["DiskPageError", "DiskTier", "file_name", "record_size"]

log = logging.getLogger("dynkv.disk")
_SCAN_CHUNK = 256  # headers per recover() task
READ_CHUNK = 0  # DiskTier.read_chunk's default (runs of 8 pages measured no faster inside vLLM: docs/notes/2026-11-21-e2e-traces.md)


class DiskPageError(OSError):
    """A disk page failed its key, fingerprint, length or checksum check on read (or was cut short).

    The destination's bytes are undefined after this error; the caller must not
    use them (the leader reports the blocks as load errors and vLLM recomputes).
    """


class DiskTier:
    """Pages of one model in files under ``paths``, addressed by slot.

    The leader's page index owns slot allocation; this class only moves and
    checks bytes. It never holds a slot lock: the caller must not start a read
    and a write of one slot at once, nor change a buffer until its future is done.

    Parameters
    ----------
    paths
        Directories (one per device, ideally); missing ones are created.
    num_pages
        Slots of the tier, striped over ``paths``.
    page_bytes
        Bytes of a page (``PageGeometry.page_bytes``).
    fingerprint
        The model's fingerprint digest (``ModelFingerprint.digest()``; other
        lengths are hashed to 16 bytes). Names the files and is checked on every page.
    direct_io
        Open the files with ``O_DIRECT``. Where a file system refuses it
        (``EINVAL``), the tier logs one warning and uses the page cache;
        :attr:`direct_io_active` tells which happened.
    io_threads
        Threads of the I/O pool.
    read_chunk
        :meth:`read_many` deals its pages to the I/O threads in runs of this
        many (in file order, run ``r`` to thread ``r % io_threads``), so the
        requests in flight stay close together on the device; 0 gives each
        thread one contiguous share instead.

    Raises
    ------
    ValueError
        Bad arguments, or not enough free space for the files (the message
        names the path, the bytes needed and the bytes free).
    OSError
        A path that cannot be created or written, or whose file another
        process holds (``EBUSY``); the message names the path.
    """

    def __init__(self, paths: Sequence[str], num_pages: int, page_bytes: int, *, fingerprint: bytes,
                 direct_io: bool = True, io_threads: int = 4, read_chunk: int = READ_CHUNK) -> None:
        if isinstance(paths, (str, bytes)) or not paths:
            raise ValueError(f"paths={paths!r}: expected a non-empty sequence of directories")
        for name, v, low in (("num_pages", num_pages, 1), ("page_bytes", page_bytes, 1),
                             ("io_threads", io_threads, 1), ("read_chunk", read_chunk, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name}={v!r}: expected an integer >= {low}")
        if not isinstance(fingerprint, (bytes, bytearray)) or not fingerprint:
            raise ValueError(f"fingerprint={fingerprint!r}: expected non-empty bytes (ModelFingerprint.digest())")
        self.num_pages = num_pages
        self.page_bytes = page_bytes
        self.record_bytes = record_size(page_bytes)
        self._fp = digest(fingerprint)
        self._tls = _Buffer()
        self._lock = threading.Lock()
        self._stats: Counter[str] = Counter()
        self._closed = False
        self._files: list[PageFile] = []
        self.last_recover: dict[str, int] = {}
        dirs = [os.path.abspath(os.fspath(p)) for p in paths]
        if len(set(dirs)) != len(dirs):
            raise ValueError(f"paths={list(paths)!r} names a directory twice: expected distinct directories")
        names = [os.path.join(d, file_name(self._fp)) for d in dirs]
        self._names = names
        counts = [(num_pages - i + len(dirs) - 1) // len(dirs) for i in range(len(dirs))]
        for d in dirs:
            prepare_dir(d)
        check_space([(n, HEADER_BYTES + c * self.record_bytes) for n, c in zip(names, counts)])
        try:
            for n, c in zip(names, counts):
                self._files.append(PageFile.open(n, c, fp=self._fp, page_bytes=page_bytes, direct=direct_io))
        except BaseException:
            self._close_files()
            raise
        refused = [f.path for f in self._files if direct_io and not f.direct]
        if refused:
            log.warning("the file system refuses O_DIRECT (EINVAL) for %s: the disk tier uses buffered I/O there "
                        "(through the page cache)", ", ".join(refused))
        self.direct_io_active = direct_io and not refused
        self._pool = IOPool(io_threads, name="dynkv-disk")
        self.read_chunk = read_chunk
        # Per batch of read_many: submitted, started, read, done (perf_counter seconds), pages, runs of adjacent
        # records, and what the read call cost its thread (_C.read_records: read_ms, crc_ms, user_ms, sys_ms, ...).
        self.read_log: collections.deque[tuple[float, float, float, float, int, int, dict[str, float]]] = (
            collections.deque(maxlen=4096))

    # -------------------------------------------------------------- public API

    @property
    def files(self) -> list[str]:
        """The tier's files, one per path, in slot-stripe order."""
        return list(self._names)

    @property
    def io_threads(self) -> int:
        return self._pool.size

    def set_io_threads(self, n: int) -> None:
        """Use ``n`` I/O threads from now on; surplus threads exit after the work they are running."""
        self._check_open()
        self._pool.resize(n)

    @property
    def write_bytes_queued(self) -> int:
        """Payload bytes of writes submitted and not started (reads go ahead of them)."""
        return self._pool.write_bytes_queued

    @property
    def write_bytes_running(self) -> int:
        """Payload bytes of writes running on the I/O threads: what a read submitted now may wait behind."""
        return self._pool.write_bytes_running

    def location(self, slot: int) -> tuple[str, int]:
        """The file holding ``slot`` and the byte offset of its record there."""
        f, index = self._locate(slot)
        return f.path, f.offset(index)

    def write(self, slot: int, key: bytes, src: memoryview) -> concurrent.futures.Future[None]:
        """Write a page to ``slot`` in the background, once no read is queued ahead of it.

        Parameters
        ----------
        slot
            In ``[0, num_pages)``.
        key
            The page's 16-byte key.
        src
            ``page_bytes`` contiguous bytes; must stay unchanged until the future is done.

        Returns
        -------
        Future[None]
            Fails with the ``OSError`` of the write (``ENOSPC``, ``EIO``, a deleted file).
        """
        f, index = self._locate(slot)
        args = (f, slot, index, _check_key(key), self._check_buffer(src, "src"), f.epoch)
        return self._pool.submit_write(self.page_bytes, self._write, *args)

    def read(self, slot: int, key: bytes, dst: memoryview, *, invalidate_bad: bool = False
             ) -> concurrent.futures.Future[None]:
        """Read the page of ``key`` from ``slot`` into ``dst`` in the background.

        Parameters
        ----------
        slot
            In ``[0, num_pages)``.
        key
            The 16-byte key the slot must hold.
        dst
            ``page_bytes`` writable contiguous bytes.
        invalidate_bad
            When the record fails its checks, zero its header before the
            future fails, so a restart does not find the page again.

        Returns
        -------
        Future[None]
            Fails with :class:`DiskPageError` when the record does not hold
            exactly the page written for ``key`` (then ``dst`` is undefined), or
            with the ``OSError`` of the read.
        """
        f, index = self._locate(slot)
        return self._submit(self._read, f, slot, index, _check_key(key), self._check_buffer(dst, "dst", True), f.epoch,
                            invalidate_bad)

    def read_many(self, reads: Sequence[tuple[int, bytes, memoryview]], *, invalidate_bad: bool = False
                  ) -> list[concurrent.futures.Future[None]]:
        """:meth:`read` of many pages ``(slot, key, dst)``, one future each, in batches.

        The pages, in file order, are dealt to the I/O threads in runs of
        :attr:`read_chunk`; a thread's reads and payload checksums run in one
        call that holds no Python lock, so they keep their pace next to a busy
        scheduler thread. Pages whose ``dst`` an ``O_DIRECT`` read cannot fill
        in place go through :meth:`read`. :attr:`read_log` keeps the timing of
        each thread's batch.

        A future cancelled (``Future.cancel()``) while its batch waits for a
        thread is not read, and ``dst`` is left alone; once its batch has
        started, ``cancel()`` returns False and the page is read.
        """
        checked = []
        for slot, key, dst in reads:  # every argument checked before any read starts
            f, index = self._locate(slot)
            checked.append((f, int(slot), index, _check_key(key), self._check_buffer(dst, "dst", True), f.epoch))
        futures: list[concurrent.futures.Future[None]] = []
        batch = []
        for item in checked:
            if self._in_place(item[0], address(item[4])):
                futures.append(concurrent.futures.Future())
                batch.append((*item, futures[-1]))
            else:
                futures.append(self._submit(self._read, *item, invalidate_bad))
        for share in self._deal(batch):
            self._submit(self._read_batch, share, invalidate_bad, time.perf_counter())
        return futures

    def _deal(self, batch: list[Any]) -> list[list[Any]]:
        """``batch`` in file order, in runs of :attr:`read_chunk` pages dealt round-robin to the I/O threads."""
        if not batch:
            return []
        batch = sorted(batch, key=lambda b: (b[0].path, b[2]))
        threads = self._pool.size
        chunk = self.read_chunk or -(-len(batch) // threads)
        runs = [batch[i : i + chunk] for i in range(0, len(batch), chunk)]
        shares: list[list[Any]] = [[] for _ in range(min(threads, len(runs)))]
        for r, run in enumerate(runs):
            shares[r % len(shares)].extend(run)
        return shares

    def recover(self) -> list[tuple[int, bytes]]:
        """``(slot, key)`` of every record valid for this fingerprint, by slot.

        Reads only the headers, in parallel on the I/O pool; payload checksums
        are checked when a page is read. A key found in two slots (a page
        written again before the old slot was reused) is reported once.
        Skipped records are counted in :attr:`last_recover` and logged.
        """
        self._check_open()
        P = len(self._files)
        tasks = [(i, self._pool.submit(self._scan, f, start, min(_SCAN_CHUNK, f.records - start)))
                 for i, f in enumerate(self._files) for start in range(0, f.records, _SCAN_CHUNK)]
        counts: Counter[str] = Counter()
        found: list[tuple[int, bytes]] = []
        for i, task in tasks:
            c, pairs = task.result()
            counts.update(c)
            found += [(index * P + i, key) for index, key in pairs]
        found.sort()
        seen: set[bytes] = set()
        out = []
        for slot, key in found:
            if key in seen:
                counts["duplicate"] += 1
            else:
                seen.add(key)
                out.append((slot, key))
        counts["valid"] = len(out)
        self.last_recover = dict(counts)
        skipped = {k: v for k, v in counts.items() if k not in ("valid", "empty")}
        # Stale records (cleared) and duplicates are normal; anything else means damage or a foreign file.
        level = logging.WARNING if set(skipped) - {"stale", "duplicate"} else logging.INFO
        log.log(level, "disk tier recovered %d pages of %d slots in %s; %d empty, skipped %s", len(out),
                self.num_pages, ", ".join(self.files), counts["empty"], skipped or "none")
        return out

    def clear(self) -> None:
        """Invalidate every record (vLLM's ``reset_prefix_cache``): a new epoch in each superblock.

        Writes already submitted carry the old epoch, so they are invalid too.
        Blocks for one 4 KiB write and ``fdatasync`` per file.
        """
        self._check_open()
        for f in self._files:
            f.epoch = new_epoch()
            f.write_superblock()

    def flush(self) -> None:
        """``fdatasync`` every file (written pages survive a power loss; a process kill needs none)."""
        self._check_open()
        for f in self._files:
            os.fdatasync(f.fd)

    def stats(self) -> dict[str, int]:
        """Counters: pages and bytes read and written, failed reads and writes, page errors, bounce copies."""
        with self._lock:
            return dict(self._stats)

    def close(self) -> None:
        """Finish queued I/O, stop the pool and close the files; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        self._close_files()

    def __enter__(self) -> DiskTier:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------- I/O

    def _close_files(self) -> None:
        for f in self._files:
            f.close()
        self._files = []

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the disk tier is closed: create a new DiskTier")

    def _submit(self, fn: Callable[..., None], *args: object) -> concurrent.futures.Future[None]:
        self._check_open()
        return self._pool.submit(fn, *args)

    def _locate(self, slot: int) -> tuple[PageFile, int]:
        if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)) or not 0 <= slot < self.num_pages:
            raise ValueError(f"slot={slot!r}: expected an integer in [0, {self.num_pages})")
        self._check_open()
        P = len(self._files)
        return self._files[int(slot) % P], int(slot) // P

    def _check_buffer(self, buf: memoryview, name: str, writable: bool = False) -> memoryview:
        mv = memoryview(buf)
        if not mv.c_contiguous:
            raise ValueError(f"{name} is not contiguous: expected {self.page_bytes} contiguous bytes")
        if writable and mv.readonly:
            raise ValueError(f"{name} is read-only: expected a writable buffer")
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        if len(mv) != self.page_bytes:
            raise ValueError(f"{name} has {len(mv)} bytes: expected page_bytes={self.page_bytes}")
        return mv

    def _buffer(self) -> tuple[memoryview, int]:
        b = self._tls
        if b.view is None:
            b.view = memoryview(mmap.mmap(-1, self.record_bytes))
            b.addr = address(b.view)
        return b.view, b.addr

    def _in_place(self, f: PageFile, addr: int) -> bool:
        return not f.direct or (addr % ALIGN == 0 and self.page_bytes % ALIGN == 0)

    def _count(self, **kv: int) -> None:
        with self._lock:
            self._stats.update(kv)

    def _write(self, f: PageFile, slot: int, index: int, key: bytes, src: memoryview, epoch: int) -> None:
        n, offset = self.page_bytes, f.offset(index)
        try:
            f.check_linked()
            buf, buf_addr = self._buffer()
            src_addr = address(src)
            buf[:HEADER_BYTES] = pack_header(key, self._fp, n, index, epoch, zlib.crc32(src))
            # Header and payload go down in one write. A torn write (kill -9, power loss) can leave any
            # mix of old and new sectors, in any order; every mix fails a checksum on read: a new header
            # over old payload bytes fails the new CRC, an old header over new bytes fails the old one, a
            # torn header fails its own. Writing the payload first and the header after would need an
            # fdatasync between the two to order them (two syscalls and a flush per page), and would
            # still rest on the same checksums against media errors, so it buys nothing here.
            if self._in_place(f, src_addr):
                iov = [buf[:HEADER_BYTES], src]
            else:
                ctypes.memmove(buf_addr + HEADER_BYTES, src_addr, n)  # a ctypes call: releases the GIL
                iov = [buf]
                self._count(bounce_copies=1)
            pwritev_all(f.fd, iov, offset)
        except OSError as e:
            self._count(write_errors=1)
            raise OSError(e.errno, f"writing disk page slot {slot} at offset {offset}: {e.strerror}", f.path) from e
        self._count(pages_written=1, bytes_written=n)

    def _read(self, f: PageFile, slot: int, index: int, key: bytes, dst: memoryview, epoch: int,
              invalidate_bad: bool = False) -> None:
        n, offset = self.page_bytes, f.offset(index)
        try:
            f.check_linked()
            buf, buf_addr = self._buffer()
            dst_addr = address(dst)
            in_place = self._in_place(f, dst_addr)
            got = preadv_all(f.fd, [buf[:HEADER_BYTES], dst] if in_place else [buf], offset)
            payload = dst if in_place else buf[HEADER_BYTES : HEADER_BYTES + n]
            self._verify(f, slot, index, key, epoch, got, buf[:HEADER_BYTES], lambda: zlib.crc32(payload),
                         invalidate_bad)
            if not in_place:
                ctypes.memmove(dst_addr, buf_addr + HEADER_BYTES, n)
                self._count(bounce_copies=1)
        except DiskPageError:
            raise
        except OSError as e:
            self._count(read_errors=1)
            raise OSError(e.errno, f"reading disk page slot {slot} ({f.path}, offset {offset}): {e.strerror}",
                          f.path) from e
        self._count(pages_read=1, bytes_read=n)

    def _verify(self, f: PageFile, slot: int, index: int, key: bytes, epoch: int, got: int, header: memoryview,
                crc: Callable[[], int], invalidate_bad: bool) -> None:
        """Raise :class:`DiskPageError` unless the record read holds exactly the page of ``key``."""
        n = self.page_bytes
        where = f"disk page slot {slot} ({f.path}, offset {f.offset(index)})"
        try:
            if got < HEADER_BYTES + n:
                raise DiskPageError(f"{where}: short read, {got} of {HEADER_BYTES + n} bytes (file truncated?)")
            problem, hdr = check_header(header, self._fp, n, index, epoch)
            if problem is not None:
                raise DiskPageError(f"{where}: {problem}")
            if hdr.key != key:
                raise DiskPageError(f"{where}: holds key {hdr.key.hex()}, not the requested {key.hex()}")
            got_crc = crc()
            if got_crc != hdr.crc:
                raise DiskPageError(f"{where}: payload checksum mismatch (crc32 {got_crc:#010x}, header says "
                                    f"{hdr.crc:#010x}): a torn write or corrupted media")
        except DiskPageError:
            self._count(page_errors=1)
            if invalidate_bad:
                self._invalidate(f, index)
            raise

    def _read_batch(self, batch: list[tuple[PageFile, int, int, bytes, memoryview, int, Any]],
                    invalidate_bad: bool, submitted: float) -> None:
        """I/O thread: a batch of in-place reads in one lock-free call, then each page's checks and future."""
        batch = [b for b in batch if b[6].set_running_or_notify_cancel()]  # pages cancelled while queued: not read
        if not batch:
            return
        started = time.perf_counter()
        n = self.page_bytes
        headers = memoryview(mmap.mmap(-1, HEADER_BYTES * len(batch)))  # page-aligned, as O_DIRECT wants
        try:
            for f in {id(b[0]): b[0] for b in batch}.values():
                f.check_linked()
            with_crc = _C.record_crc_available()
            results, cost = _C.read_records([b[0].fd for b in batch], [b[0].offset(b[2]) for b in batch],
                                            address(headers), HEADER_BYTES, [address(b[4]) for b in batch], n,
                                            with_crc)
        except Exception as e:  # a file gone or replaced: every page of the batch fails
            self._count(read_errors=len(batch))
            for b in batch:
                b[6].set_exception(e)
            return
        read = time.perf_counter()
        good = []
        for i, ((f, slot, index, key, dst, epoch, fut), (got, err, crc)) in enumerate(zip(batch, results)):
            try:
                if err:
                    self._count(read_errors=1)
                    raise OSError(err, f"reading disk page slot {slot} ({f.path}, offset {f.offset(index)}): "
                                       f"{os.strerror(err)}", f.path)
                self._verify(f, slot, index, key, epoch, got, headers[i * HEADER_BYTES : (i + 1) * HEADER_BYTES],
                             (lambda crc=crc: crc) if with_crc else (lambda dst=dst: zlib.crc32(dst)), invalidate_bad)
            except OSError as e:  # DiskPageError included
                fut.set_exception(e)
                continue
            good.append(fut)
        self._count(pages_read=len(good), bytes_read=n * len(good))  # before the futures: callers see the counts
        for fut in good:
            fut.set_result(None)
        runs = 1 + sum(1 for a, b in zip(batch, batch[1:]) if a[0] is not b[0] or b[0].offset(b[2]) !=
                           a[0].offset(a[2]) + self.record_bytes)
        self.read_log.append((submitted, started, read, time.perf_counter(), len(batch), runs, cost))

    def _invalidate(self, f: PageFile, index: int) -> None:
        """Zero a bad record's header, so a restart does not find the page again (best effort).

        Runs before the failed read's future completes, so the leader cannot
        have handed the slot to a new write yet.
        """
        buf, _ = self._buffer()
        buf[:HEADER_BYTES] = bytes(HEADER_BYTES)
        try:
            pwritev_all(f.fd, [buf[:HEADER_BYTES]], f.offset(index))
        except OSError as e:
            log.warning("could not invalidate bad disk record %d of %s: %s", index, f.path, e)
            return
        self._count(records_invalidated=1)

    def _scan(self, f: PageFile, start: int, count: int) -> tuple[Counter[str], list[tuple[int, bytes]]]:
        """Check the headers of records ``[start, start + count)`` of ``f``: (counts by category, (index, key))."""
        hdr = self._buffer()[0][:HEADER_BYTES]
        counts: Counter[str] = Counter()
        pairs = []
        epoch = f.epoch
        for index in range(start, start + count):
            try:
                got = preadv_all(f.fd, [hdr], f.offset(index))
            except OSError as e:
                log.warning("cannot read the header of record %d of %s: %s", index, f.path, e)
                got = 0
            if got < HEADER_BYTES:
                counts["unreadable"] += 1
                continue
            problem, h = check_header(hdr, self._fp, self.page_bytes, index, epoch)
            if problem is None:
                pairs.append((index, h.key))
            else:
                counts[problem.split(":", 1)[0]] += 1
        return counts, pairs


class _Buffer(threading.local):
    """One page-aligned record-sized buffer per I/O thread, made on first use and reused."""

    view: memoryview | None = None
    addr: int = 0


def _check_key(key: bytes) -> bytes:
    if not isinstance(key, (bytes, bytearray)) or len(key) != 16:
        raise ValueError(f"key={key!r}: expected 16 bytes (a page key from dynkv.keys)")
    return bytes(key)
