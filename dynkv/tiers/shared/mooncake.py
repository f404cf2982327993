"""Mooncake Store backend of the shared tier (the only importer of ``mooncake``).

``mooncake://MASTER_HOST:PORT`` names the store's master; options go in the
query: ``segment_mb`` (memory this client mounts into the store, default 256;
0 for a client that only reads and writes, where standalone
``mooncake_client`` processes hold the pages), ``buffer_mb`` (the client's
transfer buffer, default 64), ``protocol`` (``tcp`` default, ``rdma``),
``device`` (RDMA devices), ``host`` (this client's address, default
127.0.0.1), ``metadata`` (default ``P2PHANDSHAKE``: no metadata server).

Pages move in place: the host pool is registered with the transfer engine,
and each page goes out as two buffers (its header, then the page in the
pool) through ``batch_put_from_multi_buffers`` and comes back the same way
through ``batch_get_into_multi_buffers``. The shared tier keeps a batch's
headers side by side in one registered buffer; a part outside registered
memory goes through a registered scratch buffer.

The client library has no per-call timeout. Against a dead master a batch
call returns -900 after about 4 s (with Python's GIL released: the lookup's
wait is bounded by the tier, and the -900 marks the store down), and
``setup`` blocks for about 90 s holding the GIL, which would stop the whole
process. So setup starts only once the master accepts a TCP connection within
``timeout_s``, on its own thread, given up after ``timeout_s`` (one at a
time). Pages stored in an engine's segment go when that engine exits.
"""

from __future__ import annotations

import ctypes
import socket
import threading
from collections.abc import Sequence
from urllib.parse import parse_qs, urlsplit

import numpy as np
from mooncake.store import MooncakeDistributedStore

from dynkv.tiers.shared.base import GOT, MISSING, WRONG_SIZE, StoreUnavailable, redact

__all__ = ["MooncakeBackend"]

_NOT_FOUND = -704
_RPC_FAILED = -900
_OPTIONS = {"segment_mb": "256", "buffer_mb": "64", "protocol": "tcp", "device": "", "host": "127.0.0.1",
            "metadata": "P2PHANDSHAKE"}
_setting_up = threading.Lock()  # one setup at a time: a dead master holds each for ~90 s


_from_buffer, _addressof = ctypes.c_char.from_buffer, ctypes.addressof


def _address(buf: memoryview) -> int:
    if not buf.readonly and len(buf):  # ctypes: about 6x faster than numpy's view, for writable memory
        return _addressof(_from_buffer(buf))
    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data)


class MooncakeBackend:
    """Batched exists / put / get of page values in Mooncake Store, from and into registered memory.

    Parameters
    ----------
    url
        ``mooncake://MASTER_HOST:PORT[?segment_mb=..&buffer_mb=..&protocol=..&device=..&host=..&metadata=..]``.
    timeout_s
        The most :meth:`__init__` waits for the client to set up.

    Raises
    ------
    ValueError
        An unknown or malformed option.
    StoreUnavailable
        Setup failed or did not finish within ``timeout_s``.
    """

    def __init__(self, url: str, *, timeout_s: float) -> None:
        self.url = redact(url)
        parts = urlsplit(url)
        opts = dict(_OPTIONS)
        for k, v in parse_qs(parts.query, keep_blank_values=True).items():
            if k not in _OPTIONS:
                raise ValueError(f"{self.url}: unknown option {k!r}; expected {', '.join(_OPTIONS)}")
            opts[k] = v[-1]
        try:
            segment, buffer = int(opts["segment_mb"]) << 20, int(opts["buffer_mb"]) << 20
        except ValueError:
            raise ValueError(f"{self.url}: segment_mb and buffer_mb take whole MiB") from None
        master = parts.netloc.rsplit("@", 1)[-1]
        host, _, port = master.rpartition(":")
        try:  # against a dead master the setup call would hold the GIL for about 90 s
            socket.create_connection((host, int(port)), timeout=timeout_s).close()
        except OSError as e:
            raise StoreUnavailable(f"mooncake store {self.url}: master unreachable ({e.strerror or e})") from None
        self._store = MooncakeDistributedStore()
        self._lock = threading.Lock()
        self._regions: list[tuple[int, int]] = []
        result: list[int] = []
        if not _setting_up.acquire(blocking=False):
            raise StoreUnavailable(f"mooncake store {self.url}: an earlier setup is still waiting on the master")

        def setup() -> None:
            try:
                result.append(self._store.setup(opts["host"], opts["metadata"], segment, buffer, opts["protocol"],
                                                opts["device"], master))
            finally:
                _setting_up.release()

        t = threading.Thread(target=setup, name="dynkv-mooncake-setup", daemon=True)
        t.start()
        t.join(timeout_s)
        if not result:
            raise StoreUnavailable(f"mooncake store {self.url}: no answer from the master within {timeout_s:g} s")
        if result[0] != 0:
            raise StoreUnavailable(f"mooncake store {self.url}: setup failed ({result[0]})")

    def register(self, buf: memoryview) -> None:
        if not len(buf):
            return
        addr = _address(buf)
        rc = self._store.register_buffer(addr, len(buf))
        if rc != 0:
            raise StoreUnavailable(f"mooncake store {self.url}: registering {len(buf)} bytes failed ({rc})")
        with self._lock:
            self._regions.append((addr, addr + len(buf)))

    def _stage(self, heads: memoryview, pages: Sequence[memoryview]) -> tuple[list[list[int]], list[list[int]],
                                                                         list[tuple[memoryview, int]], np.ndarray | None]:
        """Pointers and sizes of each value's two parts (its header in ``heads``, its page); a part outside
        registered memory gets a place in a scratch buffer, returned with the parts to copy (part, offset in
        scratch). None when every part is registered: the usual case, pages in the host pool and the tier's
        header buffer, where this costs one address per page."""
        if not pages:
            return [], [], [], None
        n = len(heads) // len(pages)
        regions = self._regions
        staged: list[tuple[memoryview, int]] = []
        off = 0
        hp = _address(heads) if len(heads) else 0
        for lo, hi in regions:
            if lo <= hp and hp + len(heads) <= hi:
                break
        else:
            staged.append((heads, 0))
            off = len(heads)
        pp: list[int] = []
        lo = hi = 0
        for page in pages:  # inline: the pages of a batch mostly lie in one region (the host pool)
            m = len(page)
            a = _addressof(_from_buffer(page)) if m and not page.readonly else _address(page)
            if not (lo <= a and a + m <= hi):
                for lo, hi in regions:
                    if lo <= a and a + m <= hi:
                        break
                else:
                    lo = hi = 0
                    staged.append((page, off))
                    a = -1 - off  # patched below to its place in scratch
                    off += m
            pp.append(a)
        scratch = None
        if staged:
            scratch = np.empty(off, dtype=np.uint8)
            base = int(scratch.ctypes.data)
            if staged[0][0] is heads:
                hp = base
            pp = [base - 1 - a if a < 0 else a for a in pp]
        ptrs = [[hp + i * n, a] for i, a in enumerate(pp)]
        sizes = [[n, len(page)] for page in pages]
        return ptrs, sizes, staged, scratch

    def _with_scratch(self, scratch: np.ndarray | None, fn):  # type: ignore[no-untyped-def]
        if scratch is None:
            return fn()
        addr = int(scratch.ctypes.data)
        rc = self._store.register_buffer(addr, scratch.nbytes)
        if rc != 0:
            raise StoreUnavailable(f"mooncake store {self.url}: registering a scratch buffer failed ({rc})")
        try:
            return fn()
        finally:
            self._store.unregister_buffer(addr)

    def exists(self, keys: Sequence[str]) -> list[bool]:
        out = self._store.batch_is_exist(list(keys))
        if out and all(r < 0 for r in out):
            raise StoreUnavailable(f"mooncake store {self.url}: existence check failed ({out[0]})")
        return [r == 1 for r in out]

    def put(self, keys: Sequence[str], heads: memoryview, pages: Sequence[memoryview]) -> list[bool]:
        ptrs, sizes, staged, scratch = self._stage(heads, pages)
        for part, off in staged:
            scratch[off : off + len(part)] = np.frombuffer(part, dtype=np.uint8)  # type: ignore[index]
        out = self._with_scratch(scratch, lambda: self._store.batch_put_from_multi_buffers(list(keys), ptrs, sizes))
        if out and all(r == _RPC_FAILED for r in out):
            raise StoreUnavailable(f"mooncake store {self.url}: put failed ({_RPC_FAILED}: no answer from the master)")
        return [r == 0 for r in out]

    def get(self, keys: Sequence[str], heads: memoryview, pages: Sequence[memoryview]) -> list[int]:
        ptrs, sizes, staged, scratch = self._stage(heads, pages)
        out = self._with_scratch(scratch, lambda: self._store.batch_get_into_multi_buffers(list(keys), ptrs, sizes))
        if out and all(r == _RPC_FAILED for r in out):
            raise StoreUnavailable(f"mooncake store {self.url}: get failed ({_RPC_FAILED}: no answer from the master)")
        for part, off in staged:
            np.frombuffer(part, dtype=np.uint8)[:] = scratch[off : off + len(part)]  # type: ignore[index]
        codes = []
        for r, size in zip(out, sizes):
            if r == _NOT_FOUND:
                codes.append(MISSING)
            elif r == sum(size):
                codes.append(GOT)
            elif r < 0 and r not in (-600, -800):  # -600/-800: a value larger/smaller than the buffers
                codes.append(MISSING)  # the key's replica is not readable now (being evicted, say)
            else:
                codes.append(WRONG_SIZE)
        return codes

    def remove(self, keys: Sequence[str]) -> None:
        self._store.batch_remove(list(keys), True)

    def close(self) -> None:
        self._store.close()

    @property
    def client(self) -> MooncakeDistributedStore:
        """The ``mooncake`` client (the bench measures the store's own batch put/get through it)."""
        return self._store
