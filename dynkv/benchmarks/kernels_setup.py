"""The model-shaped KV cache and the timed ops of ``dynkv bench kernels``.

A :class:`Setup` holds one TP rank's paged KV cache of a preset model, random
block ids, host (pinned) and device pages; :func:`dynkv_op`, :func:`torch_op`
and :func:`baseline_fns` build the operations that are timed, and
:func:`time_fns` times them (CUDA events around one stream per op).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

import dynkv
from dynkv.layout import PageGeometry, PagedView, head_range, layout_dims
from dynkv.memory import HostPool, PageBuffer

if TYPE_CHECKING:
    import torch

__all__ = ["BACKENDS", "DIRECTIONS", "LAYER_WISE", "PRESETS", "Preset", "Setup", "baseline_fns", "build_setup",
           "dynkv_op", "staged_copies", "time_fns", "torch_op"]

DIRECTIONS = ("h2d", "d2h", "d2d", "both")
BACKENDS = ("kernel", "staged", "dma", "dma_loop", "torch", "hybrid", "layers", "staged_layers", "staged_shuffled")
LAYER_WISE = ("layers", "staged_layers", "staged_shuffled")
# hybrid: loads on the kernel, stores on the copy engines (DMA batch), so the
# two directions of ``both`` do not share SMs; other directions skip it.
# layers: loads on the kernel, one launch per layer with an event recorded
# after each (one C++ call), as a worker's synchronous loads go; h2d only.
# staged: whole page slices on the copy engines through a staging ring on the
# device, then an on-device kernel (dynkv.worker.staging); not d2d.
# staged_layers: a staged load in the layer groups a worker's layer-wise
# loads take on that path, an event after each group; h2d on cuda only. Its
# pages are in adjacent host slots, as a fresh pool hands them out (they join
# one copy per group and chunk); staged_shuffled: the same pages in shuffled
# slots, as in a pool after evictions (one copy per page and group).
_DTYPES = {1: "uint8", 2: "bfloat16", 4: "float32", 8: "float64"}
# A GPU sleep before each timing holds the streams until every op of the case is
# enqueued, so the two ops of `both` start together. It lasts at least _GATE_MIN_S
# and twice the longest enqueue seen so far: with a fixed 1 ms, a llama3-70b-tp8
# staged load was still being enqueued while it ran, its store started only after
# it, and `both` measured 53% of memcpy where both at once reach 97%.
_GATE_MIN_S = 1e-3
_SLEEP_RATE: dict[int, float] = {}  # device -> torch.cuda._sleep cycles per second


@dataclass(frozen=True)
class Preset:
    """A model's KV geometry and the TP rank whose slice is moved."""

    num_layers: int
    num_kv_heads: int
    head_size: int  # elements of K (or V) per head; MLA: of the latent
    block_size: int
    elem_bytes: int = 2
    tp_size: int = 1
    tp_rank: int = 0
    mla: bool = False

    def geometry(self, block_size: int | None = None) -> PageGeometry:
        return PageGeometry.for_model(num_layers=self.num_layers, num_kv_heads=self.num_kv_heads,
                                      head_size=self.head_size, block_size=block_size or self.block_size,
                                      elem_bytes=self.elem_bytes, mla=self.mla)

    def heads(self) -> tuple[int, int]:
        return head_range(self.tp_rank, self.tp_size, 1 if self.mla else self.num_kv_heads)


PRESETS: dict[str, Preset] = {
    "llama3-8b": Preset(num_layers=32, num_kv_heads=8, head_size=128, block_size=16),
    "llama3-70b-tp8": Preset(num_layers=80, num_kv_heads=8, head_size=128, block_size=16, tp_size=8),
    "deepseek-mla": Preset(num_layers=61, num_kv_heads=1, head_size=576, block_size=64, mla=True),
    "tiny": Preset(num_layers=4, num_kv_heads=2, head_size=32, block_size=4),
}


@dataclass(eq=False)
class Setup:
    """Buffers of one geometry for one rank.

    The cache has twice the blocks the ops touch, picked at random, so device
    access is scattered. Pages are a freshly allocated run of slots: loads read
    slots ``[0, n)``, stores write ``[store0, store0 + n)`` (disjoint from the
    loads when ``concurrent``). ``scratch`` (on the cache's device) holds the
    memcpy baseline's buffers and the torch reference's staging; ``pinned``
    (GPU only) is the baseline's host side: one ``cudaHostAlloc``, since one
    copy-engine copy may not span two of the host pool's registrations.
    """

    geometry: PageGeometry
    heads: tuple[int, int]
    blocks: int
    device: torch.device
    view: PagedView
    kv: list[torch.Tensor]  # per layer, logical [B, H_local, N, C] views of the cache
    ids: np.ndarray  # [2, blocks]: load targets, store sources
    ids_dev: torch.Tensor
    store0: int
    host: PageBuffer
    host5: torch.Tensor  # host pages as [P, H_total, L, N, C]
    scratch: torch.Tensor  # [1 or 2, blocks, H_local, L, N, C]
    dev: PageBuffer | None = None
    dev5: torch.Tensor | None = None
    pinned: torch.Tensor | None = None
    chunk_pages: int = 1 << 62  # pages per pinned registration of the host pool
    pools: list[HostPool] = field(default_factory=list)
    rings: dict[str, Any] = field(default_factory=dict)  # the staged path's rings, per op kind

    def staging(self, kind: str) -> Any:
        """The staging ring of the staged path's ``kind`` ops (one per kind: loads and stores overlap in ``both``)."""
        if kind not in self.rings:
            from dynkv.worker.staging import staging_for

            self.rings[kind] = staging_for(self.view)
        return self.rings[kind]

    @property
    def slice_bytes(self) -> int:
        return self.geometry.head_slice(*self.heads)[1]

    @property
    def nbytes(self) -> int:
        """Bytes one op moves: blocks x this rank's slice of a page."""
        return self.blocks * self.slice_bytes

    def slots(self, kind: str) -> np.ndarray:
        first = 0 if kind == "load" else self.store0
        return np.arange(first, first + self.blocks, dtype=np.int64)

    def page_groups(self, kind: str) -> list[tuple[int, int]]:
        """``[lo, hi)`` ranges of an op's pages that each lie in one pinned registration."""
        first, k = (0 if kind == "load" else self.store0), self.chunk_pages
        cuts = [first, *range(first - first % k + k, first + self.blocks, k), first + self.blocks]
        return [(a - first, b - first) for a, b in zip(cuts, cuts[1:])]

    def close(self) -> None:
        self.rings.clear()
        for p in self.pools:
            p.close()
        self.pools.clear()


def _flat(t: torch.Tensor) -> torch.Tensor:
    import torch

    return t.reshape(-1).view(torch.uint8)


def build_setup(preset: Preset, *, device: str, blocks: int, layout: str = "LBHNC", block_size: int | None = None,
                concurrent: bool = False, device_pages: bool = False, seed: int = 0) -> Setup:
    """Allocate a cache, pages and scratch for ``blocks`` blocks per op.

    Parameters
    ----------
    preset
        Model geometry and TP slice.
    device
        ``"cpu"`` or ``"cuda"``; on ``cuda`` the host pages are a pinned :class:`HostPool`.
    blocks
        Blocks each op moves.
    layout
        One of the six ``KVCacheLayout`` names; L-outermost layouts get one
        tensor per layer, the others one cross-layer tensor (as vLLM does).
    block_size
        Override the preset's tokens per block (the tile sweep).
    concurrent
        Room for a load and a store at once (disjoint blocks and pages).
    device_pages
        Also allocate pages in GPU memory (the ``d2d`` direction).
    seed
        Seed of the random block ids.
    """
    import torch

    geom = preset.geometry(block_size)
    h0, h1 = preset.heads()
    dev = torch.device(device)
    dtype = getattr(torch, _DTYPES[geom.elem_bytes])
    used = blocks * (2 if concurrent else 1)
    sizes = {"L": geom.num_layers, "B": 2 * used, "H": h1 - h0, "N": geom.block_size,
             "C": geom.token_bytes // geom.elem_bytes}
    dims = layout_dims(layout, per_layer=False)
    if dims[0] == "L":
        tensors = [torch.empty([sizes[a] for a in dims[1:]], dtype=dtype, device=dev) for _ in range(geom.num_layers)]
        view = PagedView.from_tensors(tensors, dims=dims[1:], num_heads_total=geom.num_heads, head_start=h0)
        kv = [t.permute(*[dims[1:].index(a) for a in "BHNC"]) for t in tensors]
    else:
        tensors = [torch.empty([sizes[a] for a in dims], dtype=dtype, device=dev)]
        view = PagedView.from_tensors(tensors[0], dims=dims, num_heads_total=geom.num_heads, head_start=h0)
        kv = list(tensors[0].permute(*[dims.index(a) for a in "LBHNC"]).unbind(0))
    for t in tensors:
        t.fill_(1)  # faults host memory in, so no timing sees the zero page
    perm = np.random.default_rng(seed).permutation(2 * used)
    ids = np.stack([perm[:blocks], perm[blocks:2 * blocks] if concurrent else perm[:blocks]]).astype(np.int64)
    num_pages = used
    pools: list[HostPool] = []
    chunk_pages = num_pages
    if dev.type == "cuda":
        # Registrations hold whole pages, as the worker's pool does.
        pool = HostPool.for_pages(geom, num_pages, pin=True)
        chunk_pages = pool.chunk_bytes // geom.page_bytes
        pools.append(pool)
        host = PageBuffer.from_pool(geom, pool, num_pages=num_pages)
        host_t = pool.as_tensor()[: num_pages * geom.page_bytes]
    else:
        host_t = torch.empty(num_pages * geom.page_bytes, dtype=torch.uint8).fill_(1)
        host = PageBuffer.from_tensor(geom, host_t)
    shape5 = (num_pages, geom.num_heads, geom.num_layers, geom.block_size, sizes["C"])
    setup = Setup(
        geometry=geom, heads=(h0, h1), blocks=blocks, device=dev, view=view, kv=kv, ids=ids,
        ids_dev=torch.as_tensor(ids, device=dev), store0=blocks if concurrent else 0, host=host,
        host5=host_t.view(dtype).view(shape5),
        scratch=torch.empty((2 if concurrent else 1, blocks, h1 - h0, *shape5[2:]), dtype=dtype, device=dev).fill_(1),
        chunk_pages=chunk_pages, pools=pools,
    )
    if dev.type == "cuda":
        setup.pinned = torch.empty(setup.scratch.numel() * geom.elem_bytes, dtype=torch.uint8, pin_memory=True)
    if device_pages and dev.type == "cuda":
        dev_t = torch.ones(num_pages * geom.page_bytes, dtype=torch.uint8, device=dev)
        setup.dev, setup.dev5 = PageBuffer.from_tensor(geom, dev_t), dev_t.view(dtype).view(shape5)
    return setup


def layer_wise_slots(slots: np.ndarray, backend: str) -> np.ndarray:
    """The host slots of a layer-wise load on ``backend``: ``staged_shuffled`` shuffles them."""
    return np.random.default_rng(1).permutation(slots) if backend == "staged_shuffled" else slots


def staged_copies(s: Setup, direction: str, backend: str) -> int | None:
    """Copy-engine operations of one staged load (:func:`dynkv.ops.staged_copy_plan`); None for other cases."""
    if direction != "h2d" or s.device.type != "cuda" or backend not in ("staged", "staged_layers", "staged_shuffled"):
        return None
    from dynkv.worker.staging import layer_groups

    groups = None if backend == "staged" else layer_groups(s.geometry, "staged")
    slots = layer_wise_slots(s.slots("load"), backend)
    return len(dynkv.ops.staged_copy_plan(s.host, s.view, slots, s.staging("load"), groups=groups))


def dynkv_op(s: Setup, kind: str, *, on_device: bool = False, backend: str = "kernel", ctas: int | None = None,
             threads: int | None = None) -> Callable[[], None]:
    """A dynkv ``scatter`` (``kind="load"``) or ``gather`` (``"store"``) on the current stream."""
    pages = s.dev if on_device else s.host
    if pages is None:
        raise ValueError("this setup has no device pages: build it with device_pages=True")
    ids, slots = s.ids[0 if kind == "load" else 1], s.slots(kind)
    kw: dict[str, Any] = {"backend": backend, "num_ctas": ctas, "threads": threads}
    if backend in LAYER_WISE:  # a worker's layer-wise load on the kernel or the staged path
        what = "per-layer load" if backend == "layers" else "layer-wise staged load"
        slots = layer_wise_slots(slots, backend)
        if kind != "load" or s.device.type != "cuda":
            raise ValueError(f"backend {backend!r} is the GPU's {what}: h2d on cuda only")
        import torch

        from dynkv.worker.staging import layer_groups

        groups = layer_groups(s.geometry, "kernel" if backend == "layers" else "staged")
        events = [torch.cuda.Event() for _ in groups]
        for ev in events:
            ev.record()  # torch creates the CUDA event at its first record
        if backend == "layers":
            kw["backend"] = "kernel"
            return lambda: dynkv.ops.scatter_layers(pages, s.view, slots, ids, groups, events=events, **kw)
        ring = s.staging(kind)
        return lambda: dynkv.ops.staged_scatter(pages, s.view, slots, ids, ring, groups=groups, events=events,
                                                num_ctas=ctas, threads=threads)
    if backend == "staged":
        if on_device:
            raise ValueError("backend 'staged' moves host pages: not d2d")
        ring, kw = s.staging(kind), {"num_ctas": ctas, "threads": threads}
        if kind == "load":
            return lambda: dynkv.ops.staged_scatter(pages, s.view, slots, ids, ring, **kw)
        return lambda: dynkv.ops.staged_gather(s.view, pages, ids, slots, ring, **kw)
    if kind == "load":
        return lambda: dynkv.scatter(pages, s.view, slots, ids, **kw)
    return lambda: dynkv.gather(s.view, pages, ids, slots, **kw)


def torch_op(s: Setup, kind: str, *, on_device: bool = False) -> Callable[[], None]:
    """The PyTorch reference of :func:`dynkv_op`.

    Per layer one ``index_select`` (store) or ``index_copy_`` (load) on the
    cache's device; pages across PCIe go through a staging buffer there with
    contiguous copies (one per pinned registration, or per page when TP > 1
    strides the rank's slices), as one would write it without a custom kernel.
    """
    pages5 = s.dev5 if on_device else s.host5
    if pages5 is None:
        raise ValueError("this setup has no device pages: build it with device_pages=True")
    h0, h1 = s.heads
    first = 0 if kind == "load" else s.store0
    pages = pages5[first:first + s.blocks, h0:h1]
    stage = s.scratch[0 if kind == "load" else -1] if pages5.device != s.device else None
    ids = s.ids_dev[0 if kind == "load" else 1]
    # TP > 1: the rank's slices are strided across pages, so one copy per page
    # (each slice is contiguous) instead of torch's pageable bounce buffer.
    groups = s.page_groups(kind) if pages.is_contiguous() else [(i, i + 1) for i in range(s.blocks)]

    def load() -> None:
        src = pages
        if stage is not None:
            for lo, hi in groups:
                stage[lo:hi].copy_(pages[lo:hi], non_blocking=True)
            src = stage
        for layer, t in enumerate(s.kv):
            t.index_copy_(0, ids, src[:, :, layer])

    def store() -> None:
        dst = stage if stage is not None else pages
        for layer, t in enumerate(s.kv):
            dst[:, :, layer].copy_(t.index_select(0, ids))
        if stage is not None:
            for lo, hi in groups:
                pages[lo:hi].copy_(stage[lo:hi], non_blocking=True)

    return load if kind == "load" else store


def baseline_fns(s: Setup, direction: str, threads: int | None = None) -> list[Callable[[], None]]:
    """The contiguous memcpy of :attr:`Setup.nbytes` (two, concurrent, for ``both``)."""
    nb = s.nbytes
    host, scr = _flat(s.host5), _flat(s.scratch)
    if s.device.type == "cpu":
        src, dst = (host, scr) if direction == "h2d" else (scr, host)
        return [lambda: dynkv.memcpy_batch([src.data_ptr()], [dst.data_ptr()], [nb], threads=threads)]
    pin = s.pinned
    if pin is None:
        raise ValueError("a GPU setup carries a pinned baseline buffer; this one has none (built by hand?)")
    fns = {
        "h2d": lambda: scr[:nb].copy_(pin[:nb], non_blocking=True),
        "d2h": lambda: pin[-nb:].copy_(scr[-nb:], non_blocking=True),
    }
    if direction == "d2d":
        if s.dev5 is None:
            raise ValueError("d2d needs device pages: build the setup with device_pages=True")
        dev = _flat(s.dev5)
        return [lambda: scr[:nb].copy_(dev[:nb])]
    return [fns["h2d"], fns["d2h"]] if direction == "both" else [fns[direction]]


def _sleep_rate(device: torch.device) -> float:
    """Cycles per second of ``torch.cuda._sleep`` on ``device`` (measured once)."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SLEEP_RATE:
        cycles = 20_000_000
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(cycles // 10)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        _SLEEP_RATE[index] = cycles / max(start.elapsed_time(end) / 1e3, 1e-6)
    return _SLEEP_RATE[index]


def time_fns(fns: Sequence[Callable[[], None]], device: torch.device, *, iters: int, warmup: int,
             enqueue: list[float] | None = None, queue_bound: list[bool] | None = None) -> list[float]:
    """Seconds per repetition of running ``fns`` together (GPU: one stream each).

    GPU times come from CUDA events around all streams; CPU from
    ``time.perf_counter`` (one function, the ops are synchronous there).
    On a GPU the host's seconds to enqueue all of ``fns`` in each timed
    repetition are appended to ``enqueue``; at least one warmup repetition runs
    (it sizes the gate that holds the streams until everything is enqueued).
    Ops whose enqueue waits for the GPU itself (more pending copies than the
    driver queues: every enqueue lasts as long as the gate) cannot be held
    back by any gate; they are timed without one, from their first enqueue,
    and ``True`` is appended to ``queue_bound``.
    """
    import torch

    out: list[float] = []
    if device.type == "cpu":
        if len(fns) != 1:
            raise ValueError("the CPU ops are synchronous: time one function at a time")
        for i in range(warmup + iters):
            t0 = time.perf_counter()
            fns[0]()
            if i >= warmup:
                out.append(time.perf_counter() - t0)
        return out
    main = torch.cuda.current_stream(device)
    streams = [torch.cuda.Stream(device) for _ in fns]
    rate, gate_s = _sleep_rate(device), _GATE_MIN_S
    warmup = max(1, warmup)
    i = blocked = 0
    while len(out) < iters:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if gate_s:
            torch.cuda._sleep(int(rate * gate_s))
        start.record(main)
        t0 = time.perf_counter()
        for st, fn in zip(streams, fns):
            st.wait_stream(main)
            with torch.cuda.stream(st):
                fn()
        took = time.perf_counter() - t0
        for st in streams:
            main.wait_stream(st)
        end.record(main)
        end.synchronize()
        # A repetition whose enqueue outlasted the gate did not start its ops together: sized anew, not kept.
        if i >= warmup and (took < gate_s or not gate_s):
            out.append(start.elapsed_time(end) / 1e3)
            if enqueue is not None:
                enqueue.append(took)
        # A gate sized at twice an earlier enqueue that still lasts as long as the enqueue: the host waited
        # for the GPU. Twice so, the gate goes (doubling it would only double the wait).
        if gate_s > _GATE_MIN_S and took >= 0.9 * gate_s:
            blocked += 1
            if blocked == 2:
                gate_s = 0.0
                if queue_bound is not None:
                    queue_bound.append(True)
        if gate_s:
            gate_s = max(gate_s, 2 * took + _GATE_MIN_S)
        i += 1
        if i > warmup + 4 * iters + 4:
            raise RuntimeError(f"enqueueing the ops kept outlasting the gate ({took * 1e3:.1f} ms, gate "
                               f"{gate_s * 1e3:.1f} ms): their timings would not be of the ops run together")
    return out
