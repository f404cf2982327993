"""Disk tier (G3): round trips, restart, and every fault a page can meet on disk.

The invariant under test everywhere: a read returns exactly the bytes last
written for that slot and key, or fails with an error; never other bytes.
Page content is a deterministic function of the key (``content``), so a page
read back after a crash can be checked without remembering what was written.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import mmap
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynkv.tiers.disk import DiskPageError, DiskTier, file_name, record_size
from dynkv.tiers.diskfile import HEADER_BYTES

FP = hashlib.blake2b(b"test-model", digest_size=16).digest()
TIMEOUT = 30  # seconds any future may take: a hang fails the test instead of stalling the suite
ROOT = Path(__file__).resolve().parents[2]


def key_of(i: int) -> bytes:
    return hashlib.blake2b(i.to_bytes(8, "little"), digest_size=16).digest()


def content(key: bytes, n: int) -> bytes:
    return hashlib.shake_128(key).digest(n)


def aligned(n: int) -> memoryview:
    """``n`` bytes at a page-aligned address (mmap), poisoned with 0xFF."""
    m = mmap.mmap(-1, max(n, 1))
    m.write(b"\xff" * n)
    return memoryview(m)[:n]


def unaligned(n: int) -> tuple[memoryview, bytearray]:
    """``n`` bytes at an odd address inside a poisoned bytearray (returned too, to check its edges)."""
    raw = bytearray(b"\xff" * (n + 2))
    return memoryview(raw)[1 : n + 1], raw


def result(fut: Future[None]) -> None:
    fut.result(timeout=TIMEOUT)


def error(fut: Future[None]) -> BaseException:
    exc = fut.exception(timeout=TIMEOUT)
    assert exc is not None, "expected the future to fail"
    return exc


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., DiskTier]]:
    """``make(num_pages, page_bytes, paths=1 | [names], **kw)``: a DiskTier under tmp_path, closed after the test."""
    tiers: list[DiskTier] = []

    def build(num_pages: int = 8, page_bytes: int = 8192, paths: int | list[str] = 1, **kw: object) -> DiskTier:
        names = [f"d{i}" for i in range(paths)] if isinstance(paths, int) else paths
        kw.setdefault("fingerprint", FP)
        t = DiskTier([str(tmp_path / n) for n in names], num_pages, page_bytes, **kw)  # type: ignore[arg-type]
        tiers.append(t)
        return t

    yield build
    for t in tiers:
        t.close()


def write_keys(t: DiskTier, slots: dict[int, int]) -> None:
    """Write ``content(key_of(i))`` to each ``slot: i``, all in flight at once."""
    futs = [t.write(s, key_of(i), memoryview(content(key_of(i), t.page_bytes))) for s, i in slots.items()]
    for f in futs:
        result(f)


def read_back(t: DiskTier, slot: int, key: bytes) -> bytes:
    dst = aligned(t.page_bytes)
    result(t.read(slot, key, dst))
    return bytes(dst)


def poke(path: str, offset: int, data: bytes) -> None:
    """Overwrite bytes of a tier's file behind its back (buffered; O_DIRECT reads see it)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
@pytest.mark.parametrize("paths", [1, 3])
@pytest.mark.parametrize("page_bytes", [4096, 3 * 4096, 5000, 12345])
@pytest.mark.parametrize("align", [True, False], ids=["aligned", "unaligned"])
def test_round_trip(make, rng, direct: bool, paths: int, page_bytes: int, align: bool) -> None:
    t = make(num_pages=7, page_bytes=page_bytes, paths=paths, direct_io=direct, io_threads=3)
    assert t.record_bytes == record_size(page_bytes) and t.record_bytes % 4096 == 0
    slots = [int(s) for s in rng.permutation(7)[:5]]
    srcs = {}
    futs = []
    for s in slots:
        data = rng.integers(0, 256, page_bytes, dtype=np.uint8).tobytes()
        src, raw = (aligned(page_bytes), None) if align else unaligned(page_bytes)
        src[:] = data
        srcs[s] = (data, src, raw)
        futs.append(t.write(s, key_of(s), src))
    for f in futs:
        result(f)
    for s in slots:
        data, src, raw = srcs[s]
        dst, draw = (aligned(page_bytes), None) if align else unaligned(page_bytes)
        result(t.read(s, key_of(s), dst))
        assert bytes(dst) == data and bytes(src) == data
        if draw is not None:
            assert draw[0] == draw[-1] == 0xFF, "bytes outside dst were touched"
    st_ = t.stats()
    assert st_["pages_written"] == st_["pages_read"] == 5
    assert st_["bytes_written"] == 5 * page_bytes
    if direct and align and page_bytes % 4096 == 0:
        assert t.direct_io_active
        assert st_.get("bounce_copies", 0) == 0, "aligned buffers must be read and written in place"


def test_files_striped_and_named(make, tmp_path: Path) -> None:
    t = make(num_pages=7, paths=3)
    name = file_name(FP)
    assert t.files == [str(tmp_path / f"d{i}" / name) for i in range(3)]
    assert name == f"dynkv-{FP.hex()[:16]}.pages"
    assert [t.location(s)[0] for s in range(4)] == [t.files[0], t.files[1], t.files[2], t.files[0]]
    assert t.location(3)[1] == HEADER_BYTES + t.record_bytes
    sizes = [os.path.getsize(f) for f in t.files]
    assert sizes == [HEADER_BYTES + n * t.record_bytes for n in (3, 2, 2)]


def test_host_pool_pages_go_in_place(make) -> None:
    """Slots of a HostPool (what the leader hands over) are aligned: no bounce copy."""
    from dynkv.memory import HostPool

    pb = 2 * 4096
    with HostPool.create(4 * pb, pin=False) as pool:
        mem = pool.as_tensor().numpy()
        t = make(num_pages=4, page_bytes=pb)
        for s in range(2):
            mem[s * pb : (s + 1) * pb] = np.frombuffer(content(key_of(s), pb), np.uint8)
            result(t.write(s, key_of(s), memoryview(mem)[s * pb : (s + 1) * pb]))
        for s in range(2):
            result(t.read(s, key_of(s), memoryview(mem)[(s + 2) * pb : (s + 3) * pb]))
            assert mem[(s + 2) * pb : (s + 3) * pb].tobytes() == content(key_of(s), pb)
        if t.direct_io_active:
            assert t.stats().get("bounce_copies", 0) == 0


def test_odirect_refused_at_open_falls_back(make, monkeypatch, caplog) -> None:
    real_open = os.open

    def no_direct(path, flags, *a, **kw):  # type: ignore[no-untyped-def]
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", no_direct)
    with caplog.at_level(logging.WARNING, logger="dynkv.disk"):
        t = make(num_pages=4, page_bytes=5000, paths=2)
    warnings = [r for r in caplog.records if r.name == "dynkv.disk" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "O_DIRECT" in warnings[0].getMessage()
    assert all(f in warnings[0].getMessage() for f in t.files)
    assert not t.direct_io_active
    write_keys(t, {0: 0, 3: 3})
    dst, _ = unaligned(5000)
    result(t.read(3, key_of(3), dst))
    assert bytes(dst) == content(key_of(3), 5000)
    assert t.stats().get("bounce_copies", 0) == 0, "buffered I/O needs no aligned copy"


def test_odirect_refused_at_io_falls_back(make, monkeypatch, caplog) -> None:
    """Some file systems accept O_DIRECT at open and fail the I/O with EINVAL."""
    import fcntl

    real = os.preadv

    def preadv(fd, bufs, offset):  # type: ignore[no-untyped-def]
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, bufs, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    with caplog.at_level(logging.WARNING, logger="dynkv.disk"):
        t = make(num_pages=2)
    assert not t.direct_io_active
    assert sum("O_DIRECT" in r.getMessage() for r in caplog.records) == 1
    write_keys(t, {1: 1})
    assert read_back(t, 1, key_of(1)) == content(key_of(1), 8192)


def test_direct_io_off_is_quiet(make, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="dynkv.disk"):
        t = make(direct_io=False)
    assert not t.direct_io_active and not caplog.records


# -------------------------------------------------------------- restart, clear


def test_restart_recovers_written_pages(make) -> None:
    t = make(num_pages=10, page_bytes=5000, paths=3)
    written = {0: 0, 4: 4, 5: 50, 9: 9}
    write_keys(t, written)
    write_keys(t, {5: 5})  # overwrite: the last write wins
    written[5] = 5
    t.close()
    t2 = make(num_pages=10, page_bytes=5000, paths=3)
    got = t2.recover()
    assert got == sorted((s, key_of(i)) for s, i in written.items())
    for s, key in got:
        assert read_back(t2, s, key) == content(key, 5000)
    assert t2.last_recover == {"valid": 4, "empty": 6}


def test_recover_reports_a_key_once(make) -> None:
    t = make(num_pages=4)
    write_keys(t, {1: 7, 3: 7})
    assert t.recover() == [(1, key_of(7))]
    assert t.last_recover["duplicate"] == 1


def test_clear_invalidates_everything(make) -> None:
    t = make(num_pages=6, paths=2)
    write_keys(t, {s: s for s in range(6)})
    t.clear()
    assert t.recover() == [] and t.last_recover["stale"] == 6
    with pytest.raises(DiskPageError, match="stale"):
        read_back(t, 2, key_of(2))
    write_keys(t, {3: 33})
    t.close()
    t2 = make(num_pages=6, paths=2)
    assert t2.recover() == [(3, key_of(33))]


def test_write_queued_before_clear_is_invalid(make, monkeypatch) -> None:
    """A write submitted before clear() that lands after it must not bring its page back."""
    gate = threading.Event()
    real = os.pwritev

    def slow(fd, bufs, offset):  # type: ignore[no-untyped-def]
        if threading.current_thread().name.startswith("dynkv-disk"):  # the page write, not clear()'s superblock
            assert gate.wait(TIMEOUT)
        return real(fd, bufs, offset)

    t = make(num_pages=2, io_threads=1)
    monkeypatch.setattr(os, "pwritev", slow)
    fut = t.write(0, key_of(0), memoryview(content(key_of(0), 8192)))
    t.clear()
    gate.set()
    result(fut)
    with pytest.raises(DiskPageError, match="stale"):
        read_back(t, 0, key_of(0))
    assert t.recover() == []


def test_resize_keeps_pages_in_range(make, caplog) -> None:
    t = make(num_pages=8)
    write_keys(t, {1: 1, 6: 6})
    t.close()
    with caplog.at_level(logging.INFO, logger="dynkv.disk"):
        t2 = make(num_pages=4)
    assert any("resizing" in r.getMessage() for r in caplog.records)
    assert os.path.getsize(t2.files[0]) == HEADER_BYTES + 4 * t2.record_bytes
    assert t2.recover() == [(1, key_of(1))]
    t2.close()
    t3 = make(num_pages=16)
    assert t3.recover() == [(1, key_of(1))]
    assert read_back(t3, 1, key_of(1)) == content(key_of(1), 8192)


def test_more_paths_remaps_slots_consistently(make) -> None:
    """Records describe themselves: after adding a path, every recovered (slot, key) still reads right."""
    t = make(num_pages=4, paths=["a"])
    write_keys(t, {s: s for s in range(4)})
    t.close()
    t2 = make(num_pages=8, paths=["a", "b"])
    got = t2.recover()
    assert sorted(k for _, k in got) == sorted(key_of(s) for s in range(4))
    for s, key in got:
        assert read_back(t2, s, key) == content(key, 8192)


def test_page_size_change_reinitializes(make, caplog) -> None:
    t = make(num_pages=4, page_bytes=8192)
    write_keys(t, {0: 0})
    t.close()
    with caplog.at_level(logging.WARNING, logger="dynkv.disk"):
        t2 = make(num_pages=4, page_bytes=8000)
    assert any("reinitializing" in r.getMessage() and "page_bytes=8192" in r.getMessage() for r in caplog.records)
    assert t2.recover() == []


def test_corrupt_superblock_reinitializes(make, caplog) -> None:
    t = make(num_pages=4)
    write_keys(t, {0: 0})
    path = t.files[0]
    t.close()
    poke(path, 30, b"\x00\x01")
    with caplog.at_level(logging.WARNING, logger="dynkv.disk"):
        t2 = make(num_pages=4)
    assert any("no valid superblock" in r.getMessage() for r in caplog.records)
    assert t2.recover() == []


def test_fingerprints_never_share_a_file(make) -> None:
    other = hashlib.blake2b(b"other-model", digest_size=16).digest()
    t = make(num_pages=4)
    write_keys(t, {0: 0})
    u = make(num_pages=4, fingerprint=other)
    assert u.files != t.files
    assert u.recover() == []


def test_foreign_file_under_our_name_is_not_served(make, tmp_path: Path) -> None:
    other = hashlib.blake2b(b"other-model", digest_size=16).digest()
    u = make(num_pages=4, fingerprint=other)
    write_keys(u, {0: 0, 1: 1})
    u.close()
    os.replace(u.files[0], tmp_path / "d0" / file_name(FP))
    t = make(num_pages=4)
    assert t.recover() == [] and t.last_recover["foreign"] == 2
    with pytest.raises(DiskPageError, match="fingerprint"):
        read_back(t, 0, key_of(0))


def test_second_tier_on_same_files_is_refused(make) -> None:
    t = make(num_pages=2)
    with pytest.raises(OSError, match="another dynkv disk tier") as e:
        make(num_pages=2)
    assert e.value.errno == errno.EBUSY and e.value.filename == t.files[0]
    assert f"pid {os.getpid()} (" in str(e.value), "the message names the process holding the file"


_ORPHAN = textwrap.dedent("""
    import fcntl, os, sys, time
    if os.fork():
        os._exit(0)  # the child's parent exits at once: the grandchild holding the lock is an orphan
    fd = os.open(sys.argv[1], os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print(os.getpid(), flush=True)
    deadline = time.monotonic() + 60
    while not os.path.exists(sys.argv[2]) and time.monotonic() < deadline:  # lets go once told to
        time.sleep(0.05)
""")


def orphan_holder(path: str, release: Path) -> tuple[int, int]:
    """An orphaned process holding ``path``'s lock until ``release`` exists: ``(pid, its parent pid)``."""
    proc = subprocess.Popen([sys.executable, "-c", _ORPHAN, path, str(release)], stdout=subprocess.PIPE, text=True)
    holder = int(proc.stdout.readline())
    proc.wait(10)
    with open(f"/proc/{holder}/stat") as f:
        return holder, int(f.read().rsplit(")", 1)[1].split()[1])


def test_busy_file_names_an_orphan_holder(make, tmp_path: Path, monkeypatch) -> None:
    """A restart after kill -9 of vLLM's API server finds its engine's orphan holding the file: it waits a
    bounded time for it, then names it."""
    import dynkv.tiers.diskfile as diskfile

    monkeypatch.setattr(diskfile, "ORPHAN_WAIT_S", 0.5)
    t = make(num_pages=2)
    path = t.files[0]
    t.close()
    holder, ppid = orphan_holder(path, tmp_path / "release")
    try:
        with pytest.raises(OSError, match=f"pid {holder} ") as e:
            make(num_pages=2)
        assert e.value.errno == errno.EBUSY
        assert ("an orphan: its parent is gone; kill it" in str(e.value)) == (ppid == 1), str(e.value)
        assert ("did not let go within 0.5 s" in str(e.value)) == (ppid == 1), str(e.value)
        assert f"child of pid {ppid}" in str(e.value) or ppid == 1
    finally:
        os.kill(holder, signal.SIGKILL)


def test_start_waits_for_an_orphan_holder_to_let_go(make, tmp_path: Path, caplog) -> None:
    """The orphan of a killed engine closes its tiers within seconds: a restart meanwhile waits, then opens."""
    t = make(num_pages=2)
    write_keys(t, {1: 1})
    path = t.files[0]
    t.close()
    release = tmp_path / "release"
    holder, ppid = orphan_holder(path, release)
    opened: list[DiskTier | BaseException] = []
    try:
        if ppid != 1:
            pytest.skip(f"orphans here are adopted by pid {ppid} (a subreaper), not init: not told from engines")

        def start() -> None:
            try:
                opened.append(make(num_pages=2))
            except BaseException as e:  # shown by the assert below
                opened.append(e)

        with caplog.at_level(logging.WARNING, logger="dynkv.disk"):
            opener = threading.Thread(target=start)
            opener.start()
            deadline = time.monotonic() + TIMEOUT
            while f"is held by pid {holder} " not in caplog.text and opener.is_alive():
                assert time.monotonic() < deadline, "the start neither waited nor failed"
                time.sleep(0.02)
            assert opener.is_alive() and not opened, f"the start did not wait for the orphan: {opened}"
            release.touch()
            opener.join(TIMEOUT)
        assert len(opened) == 1 and isinstance(opened[0], DiskTier), opened
        assert opened[0].recover() == [(1, key_of(1))], "the orphan's pages are the restart's"
    finally:
        release.touch()
        with contextlib.suppress(ProcessLookupError):
            os.kill(holder, signal.SIGKILL)


def test_busy_file_with_a_live_parent_fails_at_once(make, tmp_path: Path, monkeypatch) -> None:
    """Another engine on the same path (its parent alive) is a configuration error: no wait."""
    import dynkv.tiers.diskfile as diskfile

    monkeypatch.setattr(diskfile, "ORPHAN_WAIT_S", 3600.0)  # a wait would hang the test past its timeout
    t = make(num_pages=2)
    with pytest.raises(OSError, match="another dynkv disk tier") as e:
        make(num_pages=2)
    assert e.value.errno == errno.EBUSY and "did not let go" not in str(e.value)
    t.close()


# ------------------------------------------------------------------- faults


def test_corrupted_payload_is_an_error(make) -> None:
    t = make(num_pages=3, page_bytes=5000, paths=2)
    write_keys(t, {2: 2})
    path, off = t.location(2)
    poke(path, off + HEADER_BYTES + 1234, bytes([content(key_of(2), 5000)[1234] ^ 0x40]))
    with pytest.raises(DiskPageError, match="payload checksum mismatch") as e:
        read_back(t, 2, key_of(2))
    assert "slot 2" in str(e.value) and path in str(e.value)
    assert t.stats()["page_errors"] == 1
    t.close()
    t2 = make(num_pages=3, page_bytes=5000, paths=2)
    assert t2.recover() == [(2, key_of(2))]  # headers only: the payload is checked when read
    with pytest.raises(DiskPageError, match="payload checksum"):
        read_back(t2, 2, key_of(2))


def test_wrong_key_requested_is_an_error(make) -> None:
    t = make(num_pages=2)
    write_keys(t, {0: 0})
    with pytest.raises(DiskPageError, match=f"holds key {key_of(0).hex()}, not the requested {key_of(1).hex()}"):
        read_back(t, 0, key_of(1))
    with pytest.raises(DiskPageError, match="empty"):
        read_back(t, 1, key_of(1))


def test_overwritten_header_key_is_an_error(make) -> None:
    t = make(num_pages=2)
    write_keys(t, {1: 1})
    path, off = t.location(1)
    poke(path, off + 12, key_of(5))  # the key field, after magic and version
    for key in (key_of(1), key_of(5)):
        with pytest.raises(DiskPageError, match="header checksum mismatch"):
            read_back(t, 1, key)
    assert t.recover() == [] and t.last_recover["corrupt"] == 1


def test_truncated_file_is_an_error_not_a_hang(make) -> None:
    t = make(num_pages=4, page_bytes=5000)
    write_keys(t, {s: s for s in range(4)})
    path, off = t.location(2)
    os.truncate(path, off + HEADER_BYTES + 100)
    with pytest.raises(DiskPageError, match="short read"):
        read_back(t, 2, key_of(2))
    with pytest.raises(DiskPageError, match="short read"):
        read_back(t, 3, key_of(3))
    assert read_back(t, 1, key_of(1)) == content(key_of(1), 5000)
    assert t.recover() == [(0, key_of(0)), (1, key_of(1)), (2, key_of(2))]
    assert t.last_recover["unreadable"] == 1


def test_deleted_file_is_an_error_not_a_hang(make) -> None:
    t = make(num_pages=2, paths=2)
    write_keys(t, {0: 0, 1: 1})
    os.unlink(t.files[0])
    exc = error(t.read(0, key_of(0), aligned(8192)))
    assert isinstance(exc, OSError) and exc.errno == errno.ENOENT and t.files[0] in str(exc)
    exc = error(t.write(0, key_of(2), memoryview(bytes(8192))))
    assert isinstance(exc, OSError) and exc.errno == errno.ENOENT
    assert read_back(t, 1, key_of(1)) == content(key_of(1), 8192)  # the other path still works
    t.close()
    t2 = make(num_pages=2, paths=2)
    assert t2.recover() == [(1, key_of(1))]
    with pytest.raises(DiskPageError, match="empty"):
        read_back(t2, 0, key_of(0))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_write_error_fails_the_future(make, monkeypatch, code: int) -> None:
    t = make(num_pages=2)
    write_keys(t, {0: 0})

    def fail(*a: object) -> int:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "pwritev", fail)
    exc = error(t.write(1, key_of(1), memoryview(content(key_of(1), 8192))))
    assert isinstance(exc, OSError) and exc.errno == code and t.files[0] in str(exc)
    assert t.stats()["write_errors"] == 1
    monkeypatch.undo()
    assert read_back(t, 0, key_of(0)) == content(key_of(0), 8192)
    with pytest.raises(DiskPageError):
        read_back(t, 1, key_of(1))
    write_keys(t, {1: 1})
    assert read_back(t, 1, key_of(1)) == content(key_of(1), 8192)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_path_is_a_clear_error(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    try:
        with pytest.raises(PermissionError, match="not writable") as e:
            DiskTier([str(ro)], 2, 4096, fingerprint=FP)
        assert e.value.filename == str(ro)
        with pytest.raises(PermissionError, match="cannot be created") as e:
            DiskTier([str(ro / "sub")], 2, 4096, fingerprint=FP)
        assert e.value.filename == str(ro / "sub")
    finally:
        ro.chmod(0o700)


def test_path_under_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="cannot be created") as e:
        DiskTier([str(tmp_path / "file" / "sub")], 2, 4096, fingerprint=FP)
    assert e.value.filename == str(tmp_path / "file" / "sub")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        DiskTier([str(tmp_path / "file")], 2, 4096, fingerprint=FP)


def test_missing_directories_are_created(make, tmp_path: Path) -> None:
    t = make(num_pages=2, paths=["a/b/c"])
    assert (tmp_path / "a" / "b" / "c").is_dir() and os.path.exists(t.files[0])


def test_not_enough_space_is_a_value_error(make, monkeypatch, tmp_path: Path) -> None:
    real = os.statvfs

    class Tiny:
        def __init__(self, path: str) -> None:
            self.__dict__.update({k: getattr(real(path), k) for k in dir(real(path)) if k.startswith("f_")})
            self.f_bavail, self.f_frsize = 10, 4096

    monkeypatch.setattr(os, "statvfs", Tiny)
    need = HEADER_BYTES + 100 * record_size(8192)
    with pytest.raises(ValueError, match=f"needs {need} more bytes .* has 40960 bytes") as e:
        make(num_pages=100)
    assert str(tmp_path / "d0") in str(e.value)
    assert not os.listdir(tmp_path / "d0"), "no file is made when it cannot fit"
    monkeypatch.undo()
    make(num_pages=100).close()
    monkeypatch.setattr(os, "statvfs", Tiny)
    make(num_pages=100)  # already allocated: reopening needs no space


def test_bad_arguments(make) -> None:
    t = make(num_pages=2, page_bytes=4096)
    good = memoryview(bytearray(4096))
    for call in (lambda: t.write(2, key_of(0), good), lambda: t.write(-1, key_of(0), good),
                 lambda: t.write(True, key_of(0), good), lambda: t.write(0, b"short", good),
                 lambda: t.write(0, key_of(0), memoryview(bytearray(4095))),
                 lambda: t.read(0, key_of(0), memoryview(bytes(4096))),
                 lambda: t.read(0, key_of(0), memoryview(bytearray(8192))[::2])):
        with pytest.raises(ValueError):
            call()
    for kw in ({"num_pages": 0}, {"page_bytes": 0}, {"io_threads": 0}, {"fingerprint": b""}, {"paths": ["x", "x"]}):
        with pytest.raises(ValueError):
            make(**kw)
    t.close()
    t.close()
    with pytest.raises(RuntimeError, match="closed"):
        t.write(0, key_of(0), good)
    with pytest.raises(RuntimeError, match="closed"):
        t.recover()


def test_non_byte_buffers_are_accepted(make) -> None:
    t = make(num_pages=1, page_bytes=4096)
    src = np.arange(1024, dtype=np.float32).reshape(32, 32)
    result(t.write(0, key_of(0), memoryview(src)))
    dst = np.zeros((32, 32), dtype=np.float32)
    result(t.read(0, key_of(0), memoryview(dst)))
    assert np.array_equal(src, dst)


# ------------------------------------------------------------ crash safety


def _raw(path: str, off: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def test_torn_record_never_serves_wrong_bytes(make) -> None:
    """Any mix of an old and a new record, sector by sector (power loss) or cut at any byte
    (a killed write), reads back exactly one of the two pages or fails."""
    pb = 6000
    t = make(num_pages=1, page_bytes=pb)
    path, off = t.location(0)
    recs = []
    for i in (1, 2):
        write_keys(t, {0: i})
        recs.append(_raw(path, off, t.record_bytes))
    old, new = recs
    n = len(old)

    @settings(max_examples=60, deadline=None)
    @given(data=st.data())
    def check(data: st.DataObject) -> None:
        if data.draw(st.booleans(), label="sector mix"):
            mask = data.draw(st.lists(st.booleans(), min_size=n // 512, max_size=n // 512), label="new sectors")
            torn = b"".join((new if m else old)[i * 512 : (i + 1) * 512] for i, m in enumerate(mask))
        else:
            cut = data.draw(st.integers(0, n), label="cut")
            first, second = (new, old) if data.draw(st.booleans(), label="new first") else (old, new)
            torn = first[:cut] + second[cut:]
        poke(path, off, torn)
        for i in (1, 2):
            dst = aligned(pb)
            exc = t.read(0, key_of(i), dst).exception(timeout=TIMEOUT)
            if exc is None:
                assert bytes(dst) == content(key_of(i), pb)
            else:
                assert isinstance(exc, DiskPageError)
        if torn in (old, new):
            assert t.recover() == [(0, key_of(1 if torn == old else 2))]

    check()


_WRITER = textwrap.dedent("""
    import hashlib, sys
    from dynkv.tiers.disk import DiskTier
    path, pages, page_bytes, direct = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
    fp = hashlib.blake2b(b"test-model", digest_size=16).digest()
    tier = DiskTier([path], pages, page_bytes, fingerprint=fp, direct_io=direct, io_threads=4)
    inflight, i = [], 0
    while True:
        key = hashlib.blake2b(i.to_bytes(8, "little"), digest_size=16).digest()
        inflight.append(tier.write(i % pages, key, memoryview(hashlib.shake_128(key).digest(page_bytes))))
        i += 1
        if len(inflight) >= 8:
            inflight.pop(0).result()
            print(i, flush=True)
""")


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_kill_9_mid_write(tmp_path: Path, direct: bool) -> None:
    pages, pb = 16, (1 << 20) + 4096 * 3
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), str(pages), str(pb), str(int(direct))],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        done = 0
        while done < 3 * pages and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"the writer died before the kill: {proc.stderr.read() if proc.stderr else ''}")
            done = int(line)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL
    with DiskTier([str(tmp_path)], pages, pb, fingerprint=FP, direct_io=direct) as t:
        got = t.recover()
        assert len(got) >= pages // 2, t.last_recover
        served = 0
        for slot, key in got:
            dst = aligned(pb)
            exc = t.read(slot, key, dst).exception(timeout=TIMEOUT)
            if exc is None:
                assert bytes(dst) == content(key, pb), f"slot {slot} served wrong bytes"
                served += 1
            else:
                assert isinstance(exc, DiskPageError), exc
        assert served >= 1


# ---------------------------------------------------------------- model test

_op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 5), st.integers(0, 3)),
    st.tuples(st.just("read"), st.integers(0, 5), st.integers(0, 3)),
    st.tuples(st.just("clear"), st.just(0), st.just(0)),
    st.tuples(st.just("restart"), st.just(0), st.just(0)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(page_bytes=st.sampled_from([4096, 5000]), direct=st.booleans(), ops=st.lists(_op, max_size=25))
def test_random_operations_match_a_model(tmp_path_factory, page_bytes: int, direct: bool,
                                         ops: list[tuple[str, int, int]]) -> None:
    """Reads return the last bytes written for that slot and key, or fail; restarts recover the model."""
    root = tmp_path_factory.mktemp("model")
    paths = [str(root / "a"), str(root / "b")]

    def open_tier() -> DiskTier:
        return DiskTier(paths, 6, page_bytes, fingerprint=FP, direct_io=direct, io_threads=2)

    model: dict[int, tuple[bytes, bytes]] = {}
    version = 0
    t = open_tier()
    try:
        for op, slot, k in ops:
            key = key_of(k)
            if op == "write":
                version += 1
                data = hashlib.shake_128(key + version.to_bytes(4, "little")).digest(page_bytes)
                result(t.write(slot, key, memoryview(data)))
                model[slot] = (key, data)
            elif op == "read":
                dst = aligned(page_bytes) if k % 2 else unaligned(page_bytes)[0]
                exc = t.read(slot, key, dst).exception(timeout=TIMEOUT)
                if model.get(slot, (None,))[0] == key:
                    assert exc is None and bytes(dst) == model[slot][1]
                else:
                    assert isinstance(exc, DiskPageError)
            elif op == "clear":
                t.clear()
                model.clear()
            else:
                t.close()
                t = open_tier()
                firsts: dict[bytes, int] = {}
                for s in sorted(model):
                    firsts.setdefault(model[s][0], s)
                assert t.recover() == sorted((s, key) for key, s in firsts.items())
    finally:
        t.close()


# ------------------------------------------------------------- batched reads


@pytest.mark.parametrize("crc_in_cpp", [True, False], ids=["crc-cpp", "crc-python"])
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_read_many_matches_read_and_fails_page_by_page(make, monkeypatch, direct: bool, crc_in_cpp: bool) -> None:
    """Good pages of a batch load; a corrupt, a wrong-key, an empty and a truncated one fail alone, with read's errors."""
    if not crc_in_cpp:
        monkeypatch.setattr("dynkv.tiers.disk._C.record_crc_available", lambda: False)
    t = make(num_pages=12, page_bytes=3 * 4096, paths=2, direct_io=direct, io_threads=3)
    n = t.page_bytes
    write_keys(t, {s: s for s in range(10)})
    path, off = t.location(4)
    poke(path, off + HEADER_BYTES + 77, bytes([content(key_of(4), n)[77] ^ 0x01]))
    last_path, last_off = t.location(9)
    os.truncate(last_path, last_off + HEADER_BYTES + 100)
    unaligned_dst, raw = unaligned(n)
    dsts = [aligned(n) for _ in range(11)]
    dsts[2] = unaligned_dst  # not fillable in place under O_DIRECT: goes through read()
    wanted = [(s, key_of(s)) for s in range(10)] + [(10, key_of(10))]
    wanted[6] = (6, key_of(7))
    futs = t.read_many([(s, k, d) for (s, k), d in zip(wanted, dsts)], invalidate_bad=True)
    expect_error = {4: "payload checksum mismatch", 6: "not the requested", 9: "short read", 10: "empty"}
    for s, fut, dst in zip(range(11), futs, dsts):
        if s in expect_error:
            with pytest.raises(DiskPageError, match=expect_error[s]):
                result(fut)
        else:
            result(fut)
            assert bytes(dst) == content(key_of(s), n), f"slot {s}"
    assert raw[0] == 0xFF and raw[-1] == 0xFF
    st = t.stats()
    assert st["pages_read"] == 7 and st["page_errors"] == 4
    assert [k for _, k in t.recover()] == [key_of(s) for s in (0, 1, 2, 3, 5, 7, 8)], \
        "records that failed their checks were invalidated, as read() does"


def test_read_many_coalesces_back_to_back_records(make) -> None:
    """One file, one thread: records next to each other go in one request; a cut-off tail fails alone."""
    t = make(num_pages=40, page_bytes=2 * 4096, paths=1, io_threads=1)
    n = t.page_bytes
    write_keys(t, {s: s for s in range(40)})
    path, off = t.location(3)
    poke(path, off + HEADER_BYTES + 5, bytes([content(key_of(3), n)[5] ^ 0x80]))
    path, off = t.location(37)
    os.truncate(path, off + 4096 + 512)  # record 37 cut inside its payload; 38, 39 gone
    dsts = [aligned(n) for _ in range(40)]
    futs = t.read_many([(s, key_of(s), dsts[s]) for s in range(40)])
    for s in range(40):
        if s == 3:
            with pytest.raises(DiskPageError, match="payload checksum mismatch"):
                result(futs[s])
        elif s >= 37:
            with pytest.raises(DiskPageError, match="short read"):
                result(futs[s])
        else:
            result(futs[s])
            assert bytes(dsts[s]) == content(key_of(s), n), f"slot {s}"
    assert t.stats()["pages_read"] == 36


@pytest.mark.parametrize("read_chunk, shares", [(0, [(4, 1), (4, 2), (4, 1)]), (2, [(4, 2), (4, 2), (4, 2)]),
                                                (5, [(5, 1), (5, 2), (2, 1)])])
def test_read_many_deals_runs_of_pages_to_threads(make, read_chunk: int, shares: list[tuple[int, int]]) -> None:
    """Pages in any order are read in file order, dealt to the threads in runs of read_chunk; every byte lands."""
    t = make(num_pages=12, page_bytes=4096, paths=2, io_threads=3, read_chunk=read_chunk)
    n = t.page_bytes
    write_keys(t, {s: s for s in range(12)})
    order = [7, 0, 11, 4, 2, 9, 1, 5, 10, 3, 8, 6]
    dsts = {s: aligned(n) for s in order}
    futs = t.read_many([(s, key_of(s), dsts[s]) for s in order])
    for s, fut in zip(order, futs):
        result(fut)
        assert bytes(dsts[s]) == content(key_of(s), n), f"slot {s}"
    # Slots alternate between the two files: file order is the even slots, then the odd ones.
    got = sorted((pages, runs) for _, _, _, _, pages, runs, _ in t.read_log)
    assert got == sorted(shares)
    assert all(sub <= start <= read <= done for sub, start, read, done, _, _, _ in t.read_log)
    for *_, cost in t.read_log:  # each batch's cost to its thread: time in preadv and checksums, CPU time
        assert cost["read_ms"] > 0 and cost["crc_ms"] >= 0 and cost["user_ms"] >= 0 and cost["sys_ms"] >= 0
        assert cost["minor_faults"] >= 0 and cost["voluntary_switches"] >= 0


def test_read_chunk_must_be_a_count(make) -> None:
    with pytest.raises(ValueError, match="read_chunk=-1"):
        make(num_pages=4, page_bytes=4096, read_chunk=-1)


@pytest.mark.parametrize("align", [True, False], ids=["in-place", "bounced"])
def test_read_many_cancelled_while_queued_reads_nothing(make, align: bool) -> None:
    """A page whose future is cancelled before its batch starts is not read; one whose batch runs cannot be."""
    t = make(16, 4096, io_threads=1)
    write_keys(t, {s: s for s in range(8)})
    gate, entered = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        gate.wait(TIMEOUT)

    t._pool.submit(hold)  # the one I/O thread is busy: every read after this one queues
    assert entered.wait(TIMEOUT)
    bufs = [aligned(4096) if align else unaligned(4096)[0] for _ in range(8)]
    before = t.stats().get("pages_read", 0)
    futs = t.read_many([(s, key_of(s), bufs[s]) for s in range(8)])
    cancelled = [f.cancel() for f in futs[:5]]
    assert cancelled == [True] * 5
    gate.set()
    for f in futs[5:]:
        result(f)
    assert t.stats().get("pages_read", 0) - before == 3, "the cancelled pages were not read"
    for s in range(8):
        assert (bytes(bufs[s]) == content(key_of(s), 4096)) == (s >= 5), f"page {s}: cancelled pages are left alone"
    started = t.read_many([(0, key_of(0), bufs[0])])[0]
    result(started)
    assert not started.cancel(), "a read that ran cannot be cancelled"


@pytest.mark.parametrize("batched", [True, False], ids=["read_many", "read"])
def test_reads_go_ahead_of_queued_writes(make, batched: bool) -> None:
    """One I/O thread held busy; four writes queue, then a read: the read is served first, every page exact."""
    t = make(16, 4096, io_threads=1)
    write_keys(t, {0: 0})
    gate, entered = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        gate.wait(TIMEOUT)

    t._pool.submit(hold)
    assert entered.wait(TIMEOUT)
    order: list[str] = []
    writes = [t.write(s, key_of(s), memoryview(content(key_of(s), 4096))) for s in range(1, 5)]
    for s, f in enumerate(writes, 1):
        f.add_done_callback(lambda _f, s=s: order.append(f"w{s}"))
    assert t.write_bytes_queued == 4 * 4096 and t.write_bytes_running == 0
    dst = aligned(4096)
    read = t.read_many([(0, key_of(0), dst)])[0] if batched else t.read(0, key_of(0), dst)
    read.add_done_callback(lambda _f: order.append("r0"))
    gate.set()
    for f in [read, *writes]:
        result(f)
    assert order == ["r0", "w1", "w2", "w3", "w4"]
    assert bytes(dst) == content(key_of(0), 4096)
    assert all(read_back(t, s, key_of(s)) == content(key_of(s), 4096) for s in range(1, 5))
    assert t.write_bytes_queued == 0 and t.write_bytes_running == 0
