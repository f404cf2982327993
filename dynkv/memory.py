"""Page memory: the host pool (shared memory, pinned in chunks) and page buffers.

:class:`HostPool` is the memory of the host tier (one memfd per engine, mapped
by every TP rank); :class:`PageBuffer` is a run of pages on the
host or a device, in the page format of :mod:`dynkv.layout`;
:class:`StagingBuffer` is a small ring of pages on a GPU that the staged copy
path moves pages through. The copies
between pages and vLLM's KV cache are in :mod:`dynkv.ops`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

import dynkv._C as _C
from dynkv.env import cuda_compiled
from dynkv.layout import PageGeometry

if TYPE_CHECKING:
    import torch

__all__ = ["HostPool", "PageBuffer", "StagingBuffer", "chunk_for"]


class HostPool:
    """Host memory for pages, on shared memory so TP ranks share it.

    Parameters
    ----------
    nbytes
        Size; rounded up to 4 KiB.
    name
        Name under ``/dev/shm``; ``None`` for an anonymous, process-private
        pool. With ``memfd``, the memfd's label instead.
    memfd
        Make the pool a memfd: nothing in ``/dev/shm``, and the kernel frees the
        memory once the last process that holds or maps it is gone, however it
        ends (a killed creator leaves nothing behind). Other processes attach
        by :attr:`path` while the creator lives. Where the kernel has no
        ``memfd_create``, the pool is the named ``/dev/shm`` segment instead
        (:attr:`memfd` is then False). Needs ``name``.
    pin
        Register with CUDA (page-locked, GPU-mapped). Default: when the CUDA
        ops are compiled in and a GPU is visible.
    chunk_bytes
        Registration granularity; keep it a multiple of the page stride so no
        page straddles two registrations.
    threads
        Threads that fault in and pin the chunks.
    """

    def __init__(self, handle: Any) -> None:
        self._h = handle

    @classmethod
    def create(
        cls,
        nbytes: int,
        *,
        name: str | None = None,
        memfd: bool = False,
        pin: bool | None = None,
        chunk_bytes: int = 256 << 20,
        threads: int | None = None,
    ) -> HostPool:
        return cls(_C.HostPool.create(name or "", int(nbytes), _want_pin(pin), chunk_bytes, _pool_threads(threads),
                                      memfd))

    @classmethod
    def for_pages(
        cls,
        geometry: PageGeometry,
        num_pages: int,
        *,
        name: str | None = None,
        memfd: bool = False,
        pin: bool | None = None,
        page_stride: int | None = None,
        threads: int | None = None,
    ) -> HostPool:
        """A pool for ``num_pages`` pages whose pinned chunks hold whole pages."""
        stride = page_stride or geometry.page_bytes
        return cls.create(num_pages * stride, name=name, memfd=memfd, pin=pin, chunk_bytes=chunk_for(stride),
                          threads=threads)

    @classmethod
    def attach(
        cls, name_or_path: str, *, pin: bool | None = None, chunk_bytes: int = 256 << 20, threads: int | None = None
    ) -> HostPool:
        """Map an existing pool: a ``/dev/shm`` name, or an absolute path (a creator's :attr:`path`, or a link to it)."""
        return cls(_C.HostPool.attach(name_or_path, _want_pin(pin), chunk_bytes, _pool_threads(threads)))

    @staticmethod
    def unlink(name: str) -> bool:
        """Remove a stale ``/dev/shm`` name; True if there was one."""
        return bool(_C.HostPool.unlink(name))

    @property
    def ptr(self) -> int:
        return int(self._h.ptr)

    @property
    def nbytes(self) -> int:
        return int(self._h.size)

    @property
    def name(self) -> str:
        return str(self._h.name)

    @property
    def path(self) -> str:
        """Where another process attaches the pool: ``/proc/<pid>/fd/<fd>`` for a memfd (valid while its
        creator lives), ``/dev/shm/<name>`` for a named pool, the path it was attached by; "" if anonymous."""
        return str(self._h.path)

    @property
    def memfd(self) -> bool:
        """This process created the pool as a memfd."""
        return bool(self._h.memfd)

    @property
    def pinned(self) -> bool:
        return bool(self._h.pinned)

    @property
    def chunk_bytes(self) -> int:
        return int(self._h.chunk_bytes)

    def as_tensor(self) -> torch.Tensor:
        """The pool as a flat uint8 CPU tensor (shares memory; keeps the pool alive)."""
        import ctypes

        import torch

        if self.ptr == 0:
            raise ValueError("host pool is closed")
        buf = (ctypes.c_uint8 * self.nbytes).from_address(self.ptr)
        t = torch.from_numpy(np.ctypeslib.as_array(buf))
        t._dynkv_pool = self  # type: ignore[attr-defined]
        return t

    def close(self) -> None:
        self._h.close()

    def __enter__(self) -> HostPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def chunk_for(page_stride: int, target: int = 256 << 20) -> int:
    """Pinning chunk near ``target`` bytes holding whole pages (and whole OS pages)."""
    unit = math.lcm(page_stride, 4096)
    return unit * max(1, target // unit)


def _want_pin(pin: bool | None) -> bool:
    if pin is not None:
        return pin
    return cuda_compiled() and _C.cuda_device_count() > 0


def _pool_threads(threads: int | None) -> int:
    return threads if threads else min(16, os.cpu_count() or 1)


@dataclass(frozen=True, eq=False)
class PageBuffer:
    """``num_pages`` pages, ``page_stride`` bytes apart, on one device.

    Build with :meth:`from_tensor` or :meth:`from_pool`; it keeps its memory alive.
    """

    geometry: PageGeometry
    c: _C.PageSet
    device: torch.device
    pinned: bool
    owner: Any

    @property
    def num_pages(self) -> int:
        return self.c.num_pages

    @property
    def page_stride(self) -> int:
        return self.c.page_stride

    @classmethod
    def from_tensor(cls, geometry: PageGeometry, tensor: torch.Tensor, page_stride: int | None = None) -> PageBuffer:
        """Pages in a contiguous tensor (any dtype), ``page_stride`` bytes apart."""
        if not tensor.is_contiguous():
            raise ValueError("page tensor must be contiguous")
        stride = page_stride if page_stride is not None else geometry.page_bytes
        nbytes = tensor.numel() * tensor.element_size()
        if stride <= 0:
            raise ValueError(f"page_stride={stride} is not valid: expected > 0")
        num_pages = nbytes // stride
        c = _C.make_pages(geometry.c, tensor.data_ptr(), num_pages, stride)
        pinned = tensor.device.type == "cpu" and tensor.is_pinned()
        return cls(geometry, c, tensor.device, pinned, tensor)

    @classmethod
    def from_pool(
        cls,
        geometry: PageGeometry,
        pool: HostPool,
        *,
        offset: int = 0,
        num_pages: int | None = None,
        page_stride: int | None = None,
    ) -> PageBuffer:
        """Pages inside a :class:`HostPool`, starting ``offset`` bytes in."""
        import torch

        stride = page_stride if page_stride is not None else geometry.page_bytes
        if stride <= 0:
            raise ValueError(f"page_stride={stride} is not valid: expected > 0")
        if not 0 <= offset <= pool.nbytes:
            raise ValueError(f"offset={offset} lies outside the {pool.nbytes}-byte pool")
        fit = (pool.nbytes - offset) // stride
        n = fit if num_pages is None else num_pages
        if n > fit:
            raise ValueError(f"page buffer too small: {n} pages of {stride} bytes need {n * stride} bytes "
                             f"but the pool has {pool.nbytes - offset} past offset {offset}")
        chunk = pool.chunk_bytes
        if pool.pinned and pool.nbytes > chunk and (chunk % stride or (offset % chunk) % stride):
            # The copy engines refuse a copy that spans two registrations.
            raise ValueError(
                f"pages of {stride} bytes at offset {offset} would straddle the pool's {chunk}-byte pinned "
                "chunks: create the pool with HostPool.for_pages, or chunk_bytes=dynkv.memory.chunk_for(page_stride)"
            )
        # Where the pinned chunks end: the staged path joins pages of adjacent slots into one copy, never across.
        reg_pages, reg_phase = 0, 0
        if pool.pinned and pool.nbytes > chunk:
            reg_pages, reg_phase = chunk // stride, (offset % chunk) // stride
        c = _C.make_pages(geometry.c, pool.ptr + offset, n, stride, reg_pages, reg_phase)
        return cls(geometry, c, torch.device("cpu"), pool.pinned, pool)


class StagingBuffer:
    """A ring of staging pages on one device, for the staged copy path (:func:`dynkv.ops.staged_scatter`).

    ``num_slots`` slots of ``chunk_pages`` pages: the copy engines move page
    slices (or, in a layer-wise load, each page's slice of a layer group,
    packed, so that a slot holds more of them) between host pages and one slot
    while a kernel moves the previous slot's between staging and the paged KV
    cache. On a GPU the
    ring has its own stream for the copy engines and CUDA events that order
    the two stages; on the CPU the same chunking runs with memcpys.

    Parameters
    ----------
    geometry
        The pages' geometry; a staging page holds a whole page.
    device
        Where the staging pages live (the KV cache's device).
    chunk_pages, num_slots
        Pages per slot and slots in the ring (memory: their product in pages).
    """

    def __init__(self, geometry: PageGeometry, device: Any, *, chunk_pages: int = 4, num_slots: int = 3) -> None:
        import torch

        for name, v in (("chunk_pages", chunk_pages), ("num_slots", num_slots)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r}: expected an integer >= 1")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # compared with the KV cache's device
        stride = -(-geometry.page_bytes // 256) * 256  # 256-byte aligned pages: 16-byte vector copies throughout
        self.device = device
        self.stream: Any = None
        if device.type == "cuda":
            if not cuda_compiled():
                raise ValueError("a staging buffer on a GPU needs the CUDA ops; this build has none")
            self.stream = torch.cuda.Stream(device)
        tensor = torch.empty(chunk_pages * num_slots * stride, dtype=torch.uint8, device=device)
        self.pages = PageBuffer.from_tensor(geometry, tensor, page_stride=stride)
        index = device.index if self.stream else -1
        self.ring = _C.StagingRing(self.pages.c, chunk_pages, index, int(self.stream.cuda_stream) if self.stream else 0)

    @property
    def geometry(self) -> PageGeometry:
        return self.pages.geometry

    @property
    def chunk_pages(self) -> int:
        return int(self.ring.chunk_pages)

    @property
    def num_slots(self) -> int:
        return int(self.ring.num_slots)

    @property
    def nbytes(self) -> int:
        return self.pages.num_pages * self.pages.page_stride

