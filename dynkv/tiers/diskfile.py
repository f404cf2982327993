"""The disk tier's on-disk format and its files (used by :mod:`dynkv.tiers.disk`).

A file is a 4096-byte superblock (magic, format version, model fingerprint,
page and record size, record count, epoch, CRC-32 of those) followed by
records. A record is a 4096-byte header (magic, format version, key,
fingerprint, payload length, the record's index in its file, epoch, CRC-32 of
the payload, CRC-32 of the header) followed by the payload, rounded up to 4096
bytes. A record counts only when its epoch is its file's: a new epoch in the
superblock invalidates every record at once. All integers are little-endian.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import mmap
import os
import struct
import time
import zlib
from dataclasses import dataclass

import numpy as np

__all__ = ["ALIGN", "FORMAT_VERSION", "HEADER_BYTES", "Header", "PageFile", "address", "check_header", "check_space",
           "digest", "file_name", "new_epoch", "pack_header", "prepare_dir", "preadv_all", "pwritev_all",
           "record_size"]

log = logging.getLogger("dynkv.disk")

ALIGN = 4096  # O_DIRECT alignment of offsets, lengths and buffer addresses
HEADER_BYTES = 4096  # a record's header; also the superblock's size
FORMAT_VERSION = 1
_REC_MAGIC = b"DYNKVPG\x00"
_FILE_MAGIC = b"DYNKVFL\x00"
# magic, version, key, fingerprint, payload length, record index, epoch, payload crc; then the header's crc
_REC = struct.Struct("<8sI16s16sQQQI")
# magic, version, fingerprint, page bytes, record bytes, records, epoch; then the superblock's crc
_FILE = struct.Struct("<8sI16sQQQQ")
_CRC = struct.Struct("<I")


def record_size(page_bytes: int) -> int:
    """Bytes one page takes on disk: the header plus the payload rounded up to 4096."""
    return HEADER_BYTES + -(-page_bytes // ALIGN) * ALIGN


def digest(fingerprint: bytes) -> bytes:
    """The 16 bytes stored for a fingerprint: itself when 16 bytes long, else its blake2b-128."""
    fp = bytes(fingerprint)
    return fp if len(fp) == 16 else hashlib.blake2b(fp, digest_size=16).digest()


def file_name(fingerprint: bytes) -> str:
    """Name of a model's file in each disk path: two models never share one."""
    return f"dynkv-{digest(fingerprint).hex()[:16]}.pages"


def address(buf: memoryview) -> int:
    """Address of a contiguous buffer's first byte (read-only buffers too)."""
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)


def _advance(bufs: list[memoryview], skip: int) -> list[memoryview]:
    """``bufs`` without their first ``skip`` bytes (after a partial preadv/pwritev)."""
    out = []
    for b in bufs:
        if skip >= len(b):
            skip -= len(b)
            continue
        out.append(b[skip:])
        skip = 0
    return out


def preadv_all(fd: int, bufs: list[memoryview], offset: int) -> int:
    """Fill ``bufs`` from ``offset``; returns the bytes read, fewer only at the end of the file."""
    total, done = sum(len(b) for b in bufs), 0
    while done < total:
        n = os.preadv(fd, _advance(bufs, done), offset + done)
        if n == 0:
            break
        done += n
    return done


def pwritev_all(fd: int, bufs: list[memoryview], offset: int) -> None:
    """Write all of ``bufs`` at ``offset``, continuing after partial writes."""
    total, done = sum(len(b) for b in bufs), 0
    while done < total:
        n = os.pwritev(fd, _advance(bufs, done), offset + done)
        if n == 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        done += n


def pack_header(key: bytes, fp: bytes, length: int, index: int, epoch: int, crc: int) -> bytes:
    """A record's 4096-byte header."""
    body = _REC.pack(_REC_MAGIC, FORMAT_VERSION, key, fp, length, index, epoch, crc)
    return (body + _CRC.pack(zlib.crc32(body))).ljust(HEADER_BYTES, b"\0")


@dataclass(frozen=True)
class Header:
    key: bytes
    length: int
    crc: int


def check_header(hdr: memoryview, fp: bytes, length: int, index: int, epoch: int) -> tuple[str | None, Header]:
    """What is wrong with a record header (None: nothing), and its fields.

    The text starts with its category (``empty``, ``corrupt``, ``foreign``,
    ``stale``, ``misplaced``), which :meth:`DiskTier.recover` counts. The key
    is not checked here: a read compares it, a scan reports it.
    """
    f = _REC.unpack_from(hdr)
    out = Header(f[2], f[4], f[7])
    if f[0] != _REC_MAGIC:
        if not any(hdr[: _REC.size]):
            return "empty: no page was written to this slot", out
        return "corrupt: no record header (bad magic)", out
    if _CRC.unpack_from(hdr, _REC.size)[0] != zlib.crc32(hdr[: _REC.size]):
        return "corrupt: header checksum mismatch (a torn write or corrupted media)", out
    if f[1] != FORMAT_VERSION:
        return f"foreign: record format version {f[1]}, expected {FORMAT_VERSION}", out
    if f[3] != fp:
        return f"foreign: written for model fingerprint {f[3].hex()}, not {fp.hex()}", out
    if f[6] != epoch:
        return "stale: written before the last clear() or re-initialization of the file", out
    if f[5] != index:
        return f"misplaced: the record belongs at index {f[5]} of its file, not {index}", out
    if f[4] != length:
        return f"foreign: payload length {f[4]}, expected {length}", out
    return None, out


@dataclass(eq=False)
class PageFile:
    """One open, locked, preallocated file of ``records`` records."""

    path: str
    fd: int
    direct: bool
    records: int
    fp: bytes
    page_bytes: int
    epoch: int = 0

    @property
    def record_bytes(self) -> int:
        return record_size(self.page_bytes)

    @property
    def size(self) -> int:
        return HEADER_BYTES + self.records * self.record_bytes

    def offset(self, index: int) -> int:
        return HEADER_BYTES + index * self.record_bytes

    @classmethod
    def open(cls, path: str, records: int, *, fp: bytes, page_bytes: int, direct: bool) -> PageFile:
        """Open (creating it if needed), lock, check, resize or reinitialize, and preallocate ``path``.

        ``direct`` asks for ``O_DIRECT``; the returned file's ``direct`` says
        whether it got it (the file system may refuse with ``EINVAL``).
        """
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        f = cls(path, -1, False, records, fp, page_bytes)
        if direct:
            try:
                f.fd, f.direct = _open(path, flags | os.O_DIRECT), True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
        if f.fd < 0:
            f.fd = _open(path, flags)
        try:
            buf = memoryview(mmap.mmap(-1, HEADER_BYTES))
            try:
                got = preadv_all(f.fd, [buf], 0)
            except OSError as e:
                if e.errno != errno.EINVAL or not f.direct:
                    raise
                # Accepted at open, refused at I/O: some FUSE and network file systems do this.
                os.close(f.fd)
                f.fd, f.direct = -1, False
                f.fd = _open(path, flags)
                got = preadv_all(f.fd, [buf], 0)
            f._adopt(bytes(buf[:got]))
        except BaseException:
            if f.fd >= 0:
                os.close(f.fd)
            raise
        return f

    def _adopt(self, sb: bytes) -> None:
        """Keep, resize or reinitialize the file from its superblock ``sb``, then preallocate it."""
        size, target = os.fstat(self.fd).st_size, self.size
        fields = _FILE.unpack_from(sb) if len(sb) >= _FILE.size + _CRC.size else None
        valid = (fields is not None and fields[:2] == (_FILE_MAGIC, FORMAT_VERSION)
                 and _CRC.unpack_from(sb, _FILE.size)[0] == zlib.crc32(sb[: _FILE.size]))
        if fields is not None and valid and fields[2:5] == (self.fp, self.page_bytes, self.record_bytes):
            self.epoch = fields[6]
            if fields[5] != self.records or size != target:
                log.info("resizing %s from %d to %d records (%d to %d bytes); pages in the first %d records are kept",
                         self.path, fields[5], self.records, size, target, min(fields[5], self.records))
            write_sb = fields[5] != self.records
        else:
            if size == 0:
                log.info("creating %s: %d records of %d bytes", self.path, self.records, self.record_bytes)
            else:
                why = (f"it was made for fingerprint {fields[2].hex()}, page_bytes={fields[3]}, "
                       f"record_bytes={fields[4]}" if fields is not None and valid else "no valid superblock")
                log.warning("reinitializing %s (%s): its pages are dropped; now %d records of %d bytes",
                            self.path, why, self.records, self.record_bytes)
            self.epoch = new_epoch()
            write_sb = True
        try:
            if size > target:
                os.ftruncate(self.fd, target)
            os.posix_fallocate(self.fd, 0, target)
        except OSError as e:
            raise OSError(e.errno, f"cannot preallocate {target} bytes ({e.strerror}): free space, or lower "
                          "disk_gb", self.path) from e
        if write_sb:
            self.write_superblock()

    def write_superblock(self) -> None:
        """Write the superblock (with the current epoch) and make it durable."""
        body = _FILE.pack(_FILE_MAGIC, FORMAT_VERSION, self.fp, self.page_bytes, self.record_bytes, self.records,
                          self.epoch)
        buf = mmap.mmap(-1, HEADER_BYTES)
        buf[: len(body) + _CRC.size] = body + _CRC.pack(zlib.crc32(body))
        pwritev_all(self.fd, [memoryview(buf)], 0)
        os.fdatasync(self.fd)

    def check_linked(self) -> None:
        """Raise ``FileNotFoundError`` when the file was deleted while open.

        An unlinked file still reads and writes through the descriptor, but
        nothing written there survives a restart and its space is only freed at
        close: failing is the honest answer.
        """
        if os.fstat(self.fd).st_nlink == 0:
            raise FileNotFoundError(errno.ENOENT, "the disk tier's file was deleted while in use; restart to "
                                    "recreate it", self.path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def new_epoch() -> int:
    # Random, not a counter: a lost or rewritten superblock can never bring back an old epoch.
    return int.from_bytes(os.urandom(8), "little")


def _open(path: str, flags: int) -> int:
    """Open and lock ``path``; an ``EINVAL`` for ``O_DIRECT`` is raised as is, for the caller's fallback."""
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        if e.errno == errno.EINVAL and flags & os.O_DIRECT:
            raise
        raise OSError(e.errno, f"cannot open the disk tier's file ({e.strerror}): give a writable disk_paths "
                      "entry", path) from e
    try:
        _lock(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


ORPHAN_WAIT_S = 30.0  # how long a start waits for orphaned holders of its file to let go (leader/orphan.py)


def _lock(fd: int, path: str) -> None:
    """Take the file's lock; wait up to :data:`ORPHAN_WAIT_S` while only orphans hold it, else raise ``EBUSY``.

    An engine core whose API server was killed stops by itself within seconds
    (:mod:`dynkv.leader.orphan`), and a supervisor may restart the engine
    before it has: the restart waits for it. A holder with a parent is
    another engine configured on the same path: that fails at once.
    """
    deadline = None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            holders = lock_holders(fd)
        if not holders:  # let go since, or /proc/locks unreadable: one more try decides
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
        orphans = bool(holders) and all(_parent(pid) == 1 for pid in holders)
        now = time.monotonic()
        if orphans and deadline is None:
            deadline = now + ORPHAN_WAIT_S
            log.warning("%s is held by %s: waiting up to %g s for it to stop", path, describe_holders(holders),
                        ORPHAN_WAIT_S)
        if not orphans or now >= deadline:
            waited = f" and did not let go within {ORPHAN_WAIT_S:g} s" if orphans else ""
            raise OSError(errno.EBUSY, f"another dynkv disk tier uses this file ({describe_holders(holders)})"
                          f"{waited}: give each engine its own disk_paths, or stop that process", path)
        time.sleep(0.1)


def _parent(pid: int) -> int | None:
    """Parent pid of ``pid`` from ``/proc`` (None where it cannot tell)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def lock_holders(fd: int) -> list[int]:
    """Pids holding a ``flock`` on ``fd``'s file, from ``/proc/locks`` (empty where it cannot tell)."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; a blocked waiter's line has "->" second
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == inode:
                    pids.append(int(fields[4]))
    except (OSError, ValueError):
        return []
    return sorted(set(pids))


def describe_holders(pids: list[int]) -> str:
    """Who holds the lock: pid, command, and its parent (pid 1: an orphan whose own parent is gone)."""
    if not pids:
        return "holder unknown"
    parts = []
    for pid in pids:
        ppid = _parent(pid)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = " ".join(f.read().replace(b"\0", b" ").decode(errors="replace").split())[:80]
        except OSError:
            ppid = None
        if ppid is None:
            parts.append(f"pid {pid}")
            continue
        parts.append(f"pid {pid} ({cmd or '?'}), " + ("an orphan: its parent is gone; kill it" if ppid == 1
                                                      else f"child of pid {ppid}"))
    return "; ".join(parts)


def prepare_dir(path: str) -> None:
    """Create ``path`` if missing; raise an ``OSError`` naming it when it is not a writable directory."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(errno.ENOTDIR, "disk path is not a directory: give a directory", path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, f"disk path cannot be created ({e.strerror}): create it, or give another "
                      "disk_paths entry", path) from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "disk path is not writable by this process: fix its permissions, "
                              "or give another disk_paths entry", path)


def check_space(files: list[tuple[str, int]]) -> None:
    """Raise ``ValueError`` when growing ``(path, bytes)`` files does not fit their file systems' free space."""
    by_dev: dict[int, tuple[list[str], int, int]] = {}
    for path, target in files:
        d = os.path.dirname(path)
        try:
            st = os.stat(path)
            have = min(st.st_size, st.st_blocks * 512)
        except FileNotFoundError:
            have = 0
        vfs = os.statvfs(d)
        dirs, need, _ = by_dev.get(os.stat(d).st_dev, ([], 0, 0))
        by_dev[os.stat(d).st_dev] = ([*dirs, d], need + max(0, target - have), vfs.f_bavail * vfs.f_frsize)
    for dirs, need, free in by_dev.values():
        if need > free:
            raise ValueError(f"disk tier: {', '.join(dirs)} needs {need} more bytes ({need / 2**30:.2f} GiB) but "
                             f"its file system has {free} bytes ({free / 2**30:.2f} GiB) free: lower disk_gb, or "
                             "free space")
