"""Kernel bandwidth bench (``dynkv bench kernels``).

Moves this TP rank's slice of random blocks of a model-shaped paged KV cache
to and from pages, and reports GB/s next to the plain contiguous memcpy of the
same bytes measured in the same run: every claim is a ratio to that baseline.

Directions: ``h2d`` (scatter pinned host pages into the cache), ``d2h``
(gather), ``d2d`` (gather into pages in GPU memory), ``both`` (a load and a
store at once on two streams, against two concurrent contiguous memcpys). On a
CPU every buffer is host memory: ``h2d``/``d2h`` are scatter/gather between two
host buffers and ``kernel`` is the thread-pool path.

Backends: ``kernel`` (swept over ``--ctas``, CTAs per op), ``dma``
(``cudaMemcpyBatchAsync``), ``dma_loop`` (one ``cudaMemcpyAsync`` per run), and
``torch``: a plain PyTorch reference (per layer ``index_select`` /
``index_copy_``, contiguous staging copies across PCIe). Bytes are this rank's
slices only; GB/s is decimal (1e9 bytes/s) over the median of ``--iters``
timings, each op (or pair, for ``both``) on its own CUDA stream.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import dynkv
from dynkv.layout import LAYOUTS, PageGeometry, PagedView, head_range, layout_dims
from dynkv.ops import HostPool, PageBuffer, get_tuning, set_tuning

if TYPE_CHECKING:
    import torch

__all__ = ["PRESETS", "Preset", "Setup", "baseline_fns", "build_setup", "dynkv_op", "main", "time_fns", "torch_op"]

DESCRIPTION = ("GB/s of dynkv's gather/scatter of random KV blocks of a model-shaped cache, next to a "
               "contiguous memcpy of the same bytes measured in the same run")
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
DIRECTIONS = ("h2d", "d2h", "d2d", "both")
BACKENDS = ("kernel", "dma", "dma_loop", "torch", "hybrid")
# hybrid: loads on the kernel, stores on the copy engines (DMA batch), so the
# two directions of ``both`` do not share SMs; other directions skip it.
_DTYPES = {1: "uint8", 2: "bfloat16", 4: "float32", 8: "float64"}
# ~1 ms of GPU sleep before each timing: holds the streams until every op of the
# case is enqueued, so the two ops of `both` start together.
_GATE_CYCLES = 2_000_000


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


def dynkv_op(s: Setup, kind: str, *, on_device: bool = False, backend: str = "kernel", ctas: int | None = None,
             threads: int | None = None) -> Callable[[], None]:
    """A dynkv ``scatter`` (``kind="load"``) or ``gather`` (``"store"``) on the current stream."""
    pages = s.dev if on_device else s.host
    if pages is None:
        raise ValueError("this setup has no device pages: build it with device_pages=True")
    ids, slots = s.ids[0 if kind == "load" else 1], s.slots(kind)
    kw: dict[str, Any] = {"backend": backend, "num_ctas": ctas, "threads": threads}
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


def time_fns(fns: Sequence[Callable[[], None]], device: torch.device, *, iters: int, warmup: int) -> list[float]:
    """Seconds per repetition of running ``fns`` together (GPU: one stream each).

    GPU times come from CUDA events around all streams; CPU from
    ``time.perf_counter`` (one function, the ops are synchronous there).
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
    for i in range(warmup + iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(_GATE_CYCLES)
        start.record(main)
        for st, fn in zip(streams, fns):
            st.wait_stream(main)
            with torch.cuda.stream(st):
                fn()
        for st in streams:
            main.wait_stream(st)
        end.record(main)
        end.synchronize()
        if i >= warmup:
            out.append(start.elapsed_time(end) / 1e3)
    return out


@dataclass(frozen=True)
class Config:
    """One ``dynkv bench kernels`` run, built once from the command line."""

    preset: str
    layout: str
    device: str
    directions: tuple[str, ...]
    backends: tuple[str, ...]
    ctas: tuple[int, ...]
    blocks: int
    iters: int
    warmup: int
    threads: int
    cta_threads: int | None
    json_path: Path
    plot_path: Path | None
    tile_sweep: bool = False
    gemm: bool = False
    host_pool_gib: float = 0.0
    launch_bytes: tuple[int, ...] = (0,)


def _ops_for(s: Setup, cfg: Config, direction: str, backend: str, ctas: int | None) -> list[Callable[[], None]]:
    kinds = {"h2d": [("load", False)], "d2h": [("store", False)], "d2d": [("store", True)],
             "both": [("load", False), ("store", False)]}[direction]
    if backend == "torch":
        return [torch_op(s, k, on_device=d) for k, d in kinds]
    threads = cfg.threads if cfg.device == "cpu" else cfg.cta_threads
    if backend == "hybrid":
        return [dynkv_op(s, k, on_device=d, backend="kernel" if k == "load" else "dma", ctas=ctas, threads=threads)
                for k, d in kinds]
    return [dynkv_op(s, k, on_device=d, backend=backend, ctas=ctas, threads=threads) for k, d in kinds]


def _row(direction: str, backend: str, ctas: int | None, nbytes: int, times: list[float],
         base: float) -> dict[str, Any]:
    med = statistics.median(times)
    gbps = nbytes / med / 1e9
    return {"direction": direction, "backend": backend, "ctas": ctas, "bytes": nbytes, "times_s": times,
            "median_s": med, "gbps": gbps, "pct_of_memcpy": 100.0 * gbps / base if base else None}


def run_cases(s: Setup, cfg: Config) -> list[dict[str, Any]]:
    """Every (direction, backend, ctas) case, each after its direction's memcpy baseline."""
    from tqdm import tqdm

    cases = [(d, b, c) for d in cfg.directions for b in cfg.backends if b != "hybrid" or d == "both"
             for c in (cfg.ctas if b in ("kernel", "hybrid") and cfg.device == "cuda" else (None,))]
    rows: list[dict[str, Any]] = []
    with tqdm(total=len(cases) + len(cfg.directions), desc="bench", unit="case", leave=False, disable=None) as bar:
        for d in cfg.directions:
            nbytes = s.nbytes * (2 if d == "both" else 1)
            times = time_fns(baseline_fns(s, d, cfg.threads), s.device, iters=cfg.iters, warmup=cfg.warmup)
            base = _row(d, "memcpy", None, nbytes, times, 0.0)
            base["pct_of_memcpy"] = 100.0
            rows.append(base)
            bar.update()
            for _, b, c in (x for x in cases if x[0] == d):
                bar.set_postfix_str(f"{d} {b}{'' if c is None else f' ctas={c}'}")
                times = time_fns(_ops_for(s, cfg, d, b, c), s.device, iters=cfg.iters, warmup=cfg.warmup)
                rows.append(_row(d, b, c, nbytes, times, base["gbps"]))
                bar.update()
    return rows


def tile_sweep(preset: Preset, cfg: Config) -> list[dict[str, Any]]:
    """Kernel (default CTAs) vs DMA batch at 2..64 KiB tiles, set by the block size."""
    import torch

    rows = []
    token = preset.geometry().token_bytes
    dirs = [d for d in cfg.directions if d != "both"] or ["h2d"]
    for kib in (2, 4, 8, 16, 32, 64):
        if (kib * KiB) % token:
            continue
        bs = kib * KiB // token
        blocks = max(1, cfg.blocks * preset.block_size // bs)  # the same bytes per op at every tile size
        s = build_setup(preset, device=cfg.device, blocks=blocks, layout=cfg.layout, block_size=bs,
                        device_pages="d2d" in dirs)
        try:
            for d in dirs:
                gb = {}
                for b in ("kernel", "dma"):
                    ctas = get_tuning().for_direction(d)[0] if b == "kernel" else None
                    t = time_fns(_ops_for(s, cfg, d, b, ctas), s.device, iters=cfg.iters, warmup=cfg.warmup)
                    gb[b] = s.nbytes / statistics.median(t) / 1e9
                rows.append({"tile_kib": kib, "block_size": bs, "direction": d, "blocks": blocks,
                             "kernel_gbps": gb["kernel"], "dma_gbps": gb["dma"],
                             "kernel_over_dma": gb["kernel"] / gb["dma"]})
        finally:
            s.close()
            del s
            torch.cuda.empty_cache()
    return rows


def gemm_slowdown(s: Setup, cfg: Config, n: int = 8192, k: int = 10) -> dict[str, Any]:
    """A bf16 n^3 GEMM alone vs while a scatter and a gather loop on two other streams."""
    import torch

    dev = s.device
    a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty(n, n, device=dev, dtype=torch.bfloat16)

    def gemms() -> None:
        for _ in range(k):
            torch.matmul(a, b, out=c)

    alone = statistics.median(time_fns([gemms], dev, iters=5, warmup=2)) / k
    out: dict[str, Any] = {"n": n, "gemm_alone_ms": alone * 1e3, "tflops_alone": 2 * n**3 / alone / 1e12, "runs": []}
    copy_cfgs = [("kernel", c_, lb) for c_ in cfg.ctas for lb in cfg.launch_bytes]
    copy_cfgs += [(x, None, 0) for x in ("dma",) if x in cfg.backends]
    main = torch.cuda.current_stream(dev)
    side = [torch.cuda.Stream(dev), torch.cuda.Stream(dev)]
    saved = get_tuning()
    for backend, ctas, launch_bytes in copy_cfgs:
        set_tuning(launch_bytes=launch_bytes)
        load, store = (dynkv_op(s, kd, backend=backend, ctas=ctas, threads=cfg.cta_threads)
                       for kd in ("load", "store"))
        per_round = statistics.median(time_fns([load, store], dev, iters=3, warmup=1))
        # Enough copy rounds to outlast the GEMMs several times over.
        reps = max(2, math.ceil(3 * alone * k / per_round))
        times, overlapped = [], True
        for _ in range(3):
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
            for st in side:
                st.wait_stream(main)
            for _ in range(reps):
                for st, fn in zip(side, (load, store)):
                    with torch.cuda.stream(st):
                        fn()
            ev[0].record(main)
            gemms()
            ev[1].record(main)
            ev[2].record(side[0])
            ev[3].record(side[1])
            torch.cuda.synchronize(dev)
            times.append(ev[0].elapsed_time(ev[1]) / 1e3 / k)
            overlapped &= ev[1].elapsed_time(ev[2]) > 0 and ev[1].elapsed_time(ev[3]) > 0
        during = statistics.median(times)
        out["runs"].append({"backend": backend, "ctas": ctas, "launch_bytes": launch_bytes,
                            "gemm_ms": during * 1e3, "slowdown_pct": 100.0 * (during / alone - 1),
                            "copy_gbps_alone": 2 * s.nbytes / per_round / 1e9,
                            "copies_outlasted_gemms": overlapped})
    set_tuning(launch_bytes=saved.launch_bytes)
    return out


def host_pool_speed(size_gib: float) -> dict[str, Any]:
    """Seconds to pin ``size_gib`` with :meth:`HostPool.create` vs ``torch.empty(pin_memory=True)``."""
    import torch

    nbytes = int(size_gib * GiB)
    t0 = time.perf_counter()
    HostPool.create(nbytes, pin=True).close()
    t_dynkv = time.perf_counter() - t0
    t0 = time.perf_counter()
    x = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    t_torch = time.perf_counter() - t0
    del x
    if hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache()
    return {"gib": size_gib, "dynkv_s": t_dynkv, "torch_s": t_torch, "speedup": t_torch / t_dynkv}


def _fmt_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'direction':<10}{'backend':<10}{'ctas':>6}{'GB/s':>10}{'% memcpy':>10}"]
    for r in rows:
        ctas = "-" if r["ctas"] is None else str(r["ctas"])
        lines.append(f"{r['direction']:<10}{r['backend']:<10}{ctas:>6}{r['gbps']:>10.2f}{r['pct_of_memcpy']:>10.1f}")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Bars of % of memcpy per direction and backend (kernel: its best CTA count), the CTA sweep, the tile sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["results"] if r["backend"] != "memcpy"]
    dirs = list(dict.fromkeys(r["direction"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    sweep = [r for r in rows if r["ctas"] is not None]
    panels = 1 + bool(sweep) + bool(report.get("tile_sweep"))
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    ax = axes[0][0]
    width = 0.8 / max(1, len(backends))
    for i, b in enumerate(backends):
        vals = [max((r["pct_of_memcpy"] for r in rows if r["direction"] == d and r["backend"] == b), default=0.0)
                for d in dirs]
        label = b + (" (best CTAs)" if b == "kernel" and sweep else "")
        ax.bar([j + i * width for j in range(len(dirs))], vals, width, label=label)
    ax.axhline(100, color="k", lw=0.8, ls="--")
    ax.set_xticks([j + width * (len(backends) - 1) / 2 for j in range(len(dirs))], dirs)
    ax.set_ylabel("% of contiguous memcpy (same run)")
    ax.set_title(f"{report['config']['preset']} on {report['config']['device']}")
    ax.legend()
    curves = []
    if sweep:
        curves.append(("CTA sweep", "CTAs per op", "kernel, % of memcpy", 100.0, {
            f"{d} (memcpy {report['baselines'][d]:.0f} GB/s)":
                sorted((r["ctas"], r["pct_of_memcpy"]) for r in sweep if r["direction"] == d) for d in dirs}))
    if report.get("tile_sweep"):
        tiles = report["tile_sweep"]
        curves.append(("tile sweep", "tile KiB", "kernel / DMA batch GB/s", 1.0, {
            d: [(r["tile_kib"], r["kernel_over_dma"]) for r in tiles if r["direction"] == d]
            for d in dict.fromkeys(r["direction"] for r in tiles)}))
    for ax, (title, xlabel, ylabel, ref, series) in zip(axes[0][1:], curves):
        for label, pts in series.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.axhline(ref, color="k", lw=0.8, ls="--")
        ax.set(xscale="log", xlabel=xlabel, ylabel=ylabel, title=title)
        ax.set_xscale("log", base=2)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: Config) -> dict[str, Any]:
    """Run the bench of ``cfg``; returns the report that goes to JSON."""
    import torch

    from dynkv.cli import env_report

    preset = PRESETS[cfg.preset]
    if cfg.device == "cpu":
        torch.set_num_threads(cfg.threads)  # the torch reference gets the same cores as dynkv
    s = build_setup(preset, device=cfg.device, blocks=cfg.blocks, layout=cfg.layout,
                    concurrent="both" in cfg.directions, device_pages="d2d" in cfg.directions)
    g = s.geometry
    print(f"dynkv bench kernels: {cfg.preset} (L={g.num_layers} H={g.num_heads} N={g.block_size} "
          f"C={g.token_bytes} B, tile {g.tile_bytes / KiB:g} KiB, heads [{s.heads[0]}, {s.heads[1]})), "
          f"layout {cfg.layout}, {cfg.device}, {s.blocks} random blocks (of {s.view.num_blocks}) x "
          f"{s.slice_bytes / MiB:.3g} MiB = {s.nbytes / MiB:.0f} MiB per op"
          + (f", {cfg.threads} threads" if cfg.device == "cpu" else ""), flush=True)
    report: dict[str, Any] = {
        "env": env_report(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items()},
        "geometry": {**g.__dict__, "tile_bytes": g.tile_bytes, "page_bytes": g.page_bytes, "heads": list(s.heads),
                     "slice_bytes": s.slice_bytes, "cache_blocks": s.view.num_blocks, "bytes_per_op": s.nbytes},
    }
    try:
        report["results"] = run_cases(s, cfg)
        report["baselines"] = {r["direction"]: r["gbps"] for r in report["results"] if r["backend"] == "memcpy"}
        print(_fmt_table(report["results"]))
        if cfg.gemm:
            report["gemm"] = gemm_slowdown(s, cfg)
            for r in report["gemm"]["runs"]:
                ctas = "" if r["ctas"] is None else f" ctas={r['ctas']} launch={r['launch_bytes'] >> 10}KiB"
                print(f"gemm {report['gemm']['n']}^3 bf16 alone {report['gemm']['gemm_alone_ms']:.3f} ms; with "
                      f"{r['backend']}{ctas} copies "
                      f"{r['gemm_ms']:.3f} ms: {r['slowdown_pct']:+.1f}% (copies alone {r['copy_gbps_alone']:.1f} GB/s)"
                      + ("" if r["copies_outlasted_gemms"] else " (copies ended before the GEMMs did)"))
    finally:
        s.close()
    if cfg.tile_sweep:
        report["tile_sweep"] = tile_sweep(preset, cfg)
        for r in report["tile_sweep"]:
            print(f"tile {r['tile_kib']:>2} KiB {r['direction']}: kernel {r['kernel_gbps']:.1f} GB/s, "
                  f"dma {r['dma_gbps']:.1f} GB/s, kernel/dma {r['kernel_over_dma']:.2f}x")
    if cfg.host_pool_gib:
        report["host_pool"] = hp = host_pool_speed(cfg.host_pool_gib)
        print(f"pin {hp['gib']:g} GiB: HostPool.create {hp['dynkv_s']:.2f} s, torch pin_memory "
              f"{hp['torch_s']:.2f} s: {hp['speedup']:.1f}x")
    return report


def _parse_size(text: str) -> int:
    units = {"": 1, "k": KiB, "m": MiB, "g": GiB}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1] if t and t[-1] in "kmg" else ""
    try:
        return int(float(t[: len(t) - len(unit)]) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not valid: expected bytes, e.g. 256M or 1G") from None


def _csv(choices: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r} is not valid: expected a comma list of {', '.join(choices)}")
        return items
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``dynkv bench kernels``; with none, a CPU run that fits a laptop in about a minute."""
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama3-8b")
    p.add_argument("--layout", choices=list(LAYOUTS), default="LBHNC",
                   help="physical KV layout (vLLM's default: LBHNC); the *NHC ones make DMA runs one token long")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when a GPU and the CUDA ops are there")
    p.add_argument("--directions", type=_csv(DIRECTIONS), help="default: h2d,d2h,d2d,both (cuda), h2d,d2h (cpu)")
    p.add_argument("--backends", type=_csv(BACKENDS), help="default: all (cuda), kernel,torch (cpu)")
    p.add_argument("--ctas", default="1,2,4,8,16,32,64", help="kernel CTA counts to sweep, per op (cuda)")
    p.add_argument("--bytes", type=_parse_size, help="bytes per op (default 1G cuda, 256M cpu)")
    p.add_argument("--blocks", type=int, help="random blocks per op (default: from --bytes; >= 1000 on cuda)")
    p.add_argument("--iters", type=int, help="timed repetitions (median reported; default 20 cuda, 10 cpu)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, help="CPU copy threads (default: dynkv's pool size)")
    p.add_argument("--cta-threads", type=int, help="threads per CTA of the GPU kernel (default: dynkv's tuning)")
    p.add_argument("--out", type=Path, default=Path("dynkv-bench"), help="directory for the default JSON and PNG")
    p.add_argument("--json", type=Path, help="JSON report path (default: OUT/kernels-PRESET-DEVICE.json)")
    p.add_argument("--plot", type=Path, help="PNG path (default: OUT/kernels-PRESET-DEVICE.png)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--tile-sweep", action="store_true", help="kernel vs DMA batch at 2..64 KiB tiles (cuda)")
    p.add_argument("--gemm", action="store_true", help="GEMM slowdown while copies stream (cuda)")
    p.add_argument("--launch-bytes", default="0", help="with --gemm: kernel launch sizes to try, e.g. 0,1M,4M "
                   "(0: one launch per op)")
    p.add_argument("--host-pool", type=float, default=0.0, metavar="SIZE_GIB", help="pinning speed vs torch (cuda)")


def config_from_args(args: argparse.Namespace) -> Config:
    """Resolve defaults (which depend on the device) and check the combination."""
    import torch

    gpu_ok = dynkv.cuda_compiled() and torch.cuda.is_available()
    device = args.device or ("cuda" if gpu_ok else "cpu")
    if device == "cuda" and not gpu_ok:
        raise SystemExit("--device cuda needs a visible GPU and a dynkv build with the CUDA ops "
                         f"(GPU visible: {torch.cuda.is_available()}, CUDA ops: {dynkv.cuda_compiled()})")
    cpu = device == "cpu"
    dirs = args.directions or (("h2d", "d2h") if cpu else DIRECTIONS)
    backends = args.backends or (("kernel", "torch") if cpu else BACKENDS)
    if cpu:
        backends = tuple(b for b in backends if b != "hybrid")
    if cpu:
        skipped = [d for d in dirs if d in ("d2d", "both")] + [b for b in backends if b in ("dma", "dma_loop")]
        if skipped:
            print(f"on cpu, skipping {', '.join(skipped)}: every buffer is host memory and there are no copy engines",
                  file=sys.stderr)
        dirs = tuple(d for d in dirs if d not in ("d2d", "both"))
        backends = tuple(b for b in backends if b not in ("dma", "dma_loop"))
        if not dirs or not backends:
            raise SystemExit("nothing to run on cpu: use --directions h2d,d2h and --backends kernel,torch")
    try:
        ctas = tuple(int(x) for x in args.ctas.split(",") if x.strip())
    except ValueError:
        raise SystemExit(f"--ctas {args.ctas!r} is not valid: expected a comma list of integers") from None
    if not ctas or min(ctas) < 1:
        raise SystemExit(f"--ctas {args.ctas!r} is not valid: expected positive integers")
    from dynkv.cli import env_report

    pool = int(env_report()["cpu_copy_threads"])  # type: ignore[call-overload]
    threads = args.threads or pool
    if threads > pool:
        # dynkv's CPU pool is sized on its first copy; this process has not copied yet.
        os.environ["DYNKV_CPU_THREADS"] = str(threads)
    preset = PRESETS[args.preset]
    slice_bytes = preset.geometry().head_slice(*preset.heads())[1]
    nbytes = args.bytes or (256 * MiB if cpu else GiB)
    blocks = args.blocks or max(1 if cpu else 1000, nbytes // slice_bytes)
    if blocks < 1 or (args.iters is not None and args.iters < 1) or args.warmup < 0:
        raise SystemExit(f"--blocks {blocks}, --iters {args.iters}, --warmup {args.warmup}: expected blocks and "
                         "iters >= 1, warmup >= 0")
    stem = f"kernels-{args.preset}-{device}"
    return Config(
        preset=args.preset, layout=args.layout, device=device, directions=tuple(dirs), backends=tuple(backends),
        ctas=ctas, blocks=blocks, iters=args.iters or (10 if cpu else 20), warmup=args.warmup, threads=threads,
        cta_threads=args.cta_threads,
        json_path=args.json or args.out / f"{stem}.json",
        plot_path=None if args.no_plot else (args.plot or args.out / f"{stem}.png"),
        tile_sweep=args.tile_sweep and not cpu, gemm=args.gemm and not cpu,
        host_pool_gib=0.0 if cpu else args.host_pool,
        launch_bytes=tuple(_parse_size(x) for x in args.launch_bytes.split(",") if x.strip()),
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Entry point of ``dynkv bench kernels``: run, print the table, write JSON and PNG."""
    cfg = config_from_args(args)
    if cfg.device == "cpu" and (args.tile_sweep or args.gemm or args.host_pool):
        print("--tile-sweep, --gemm and --host-pool measure GPU paths: skipped on cpu", file=sys.stderr)
    report = run(cfg)
    cfg.json_path.parent.mkdir(parents=True, exist_ok=True)
    cfg.json_path.write_text(json.dumps(report, indent=2))
    print(f"wrote {cfg.json_path}")
    if cfg.plot_path is not None:
        plot(report, cfg.plot_path)
        print(f"wrote {cfg.plot_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m dynkv.bench_kernels [options]``: the same as ``dynkv bench kernels``."""
    p = argparse.ArgumentParser(prog="dynkv bench kernels", description=DESCRIPTION)
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
