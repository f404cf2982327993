"""The copies: typed wrappers over the copy engine of ``dynkv._C``.

Ops
---
gather
    device blocks -> this rank's head slice of pages (D2H, or D2D to staging)
scatter
    the inverse (H2D / D2D)
scatter_layers
    a scatter in layer groups, one launch each (a forward pass can start on
    the first layers while the rest are copied)
copy_blocks
    block to block between two views of one geometry (D2D, H2H)
staged_scatter, staged_gather
    the staged path: page slices (loads: in layer groups if asked) cross
    PCIe on the copy engines as long runs into a ring of staging memory on the
    GPU (:class:`dynkv.memory.StagingBuffer`), and an on-device kernel moves
    them to or from the paged KV cache; the two stages overlap chunk by chunk
memcpy_batch
    plain copies through the copy engines (``cudaMemcpyBatchAsync`` where the
    runtime has it, else a loop); on CPU, the thread pool

Every op is stream-ordered on the GPU (``stream``: a ``torch.cuda.Stream`` or a
raw handle; default: the current stream) and synchronous on the CPU. Bad input
raises ``ValueError`` naming the problem before any byte moves.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

import dynkv._C as _C
from dynkv.env import cuda_compiled
from dynkv.layout import PageGeometry, PagedView
from dynkv.memory import PageBuffer, StagingBuffer

if TYPE_CHECKING:
    import torch

__all__ = [
    "BACKENDS",
    "GroupSignal",
    "Tuning",
    "copy_blocks",
    "gather",
    "get_tuning",
    "memcpy_batch",
    "scatter",
    "scatter_layers",
    "set_tuning",
    "staged_copy_plan",
    "staged_gather",
    "staged_scatter",
]

BackendName = Literal["auto", "kernel", "dma", "dma_loop"]
BACKENDS: dict[str, Any] = {
    "auto": _C.Backend.AUTO,
    "kernel": _C.Backend.KERNEL,
    "dma": _C.Backend.DMA_BATCH,
    "dma_loop": _C.Backend.DMA_LOOP,
}
Direction = Literal["h2d", "d2h", "d2d", "h2h", "staged"]

GroupSignal = _C.GroupSignal
"""How many of a load's layer groups are issued (``GroupSignal(num_groups)``): :func:`staged_scatter` sets it
as ``after`` without Python's GIL, another thread waits with ``wait(group)``; ``set_all()`` ends every wait."""


@dataclass(frozen=True)
class Tuning:
    """Per-direction defaults of the GPU path.

    ``ctas``: CTAs of the copy kernel (small, so copies leave the SMs to
    attention and GEMMs; PCIe saturates with 4 to 8 on an H200; 0 means two
    per SM, for device-to-device copies that are bound by HBM);
    ``launch_bytes``: split kernel transfers into launches of about this
    size (0: one launch), so a GEMM launched meanwhile waits at most one
    launch for its SMs. Stores (``d2h``) run beside the next steps' compute
    and are split; loads feed the step that waits for them and are not.
    ``threads``: threads per CTA; ``smem_bytes``: dynamic shared memory each copy CTA reserves
    and never uses, so that no other kernel's CTA shares its SM (0: none);
    ``dma_min_run``: in ``auto``, transfers whose average contiguous run
    reaches this many bytes go to the copy engines instead (0: never).
    ``staged`` is the on-device kernel of the staged path (staging pages <->
    the KV cache, bound by HBM): a few CTAs outrun PCIe many times over.
    """

    ctas: dict[str, int]
    threads: dict[str, int] | None = None
    dma_min_run: dict[str, int] | None = None
    launch_bytes: dict[str, int] | None = None
    smem_bytes: dict[str, int] | None = None

    def for_direction(self, d: Direction) -> tuple[int, int, int, int, int]:
        """``(ctas, threads, dma_min_run, launch_bytes, smem_bytes)`` of direction ``d``."""
        runs, launches, smem = self.dma_min_run or {}, self.launch_bytes or {}, self.smem_bytes or {}
        return self.ctas.get(d, 8), (self.threads or {}).get(d, 512), runs.get(d, 0), launches.get(d, 0), smem.get(d, 0)


_TUNING = Tuning(
    ctas={"h2d": 8, "d2h": 8, "d2d": 0, "h2h": 8, "staged": 16},
    threads={"h2d": 512, "d2h": 512, "d2d": 512, "h2h": 512, "staged": 512},
    dma_min_run={"h2d": 0, "d2h": 0, "d2d": 0, "h2h": 0, "staged": 0},
    launch_bytes={"h2d": 0, "d2h": 2 << 20, "d2d": 0, "h2h": 0, "staged": 0},
    smem_bytes={"h2d": 0, "d2h": 0, "d2d": 0, "h2h": 0, "staged": 0},
)


def get_tuning() -> Tuning:
    return _TUNING


def set_tuning(**changes: Any) -> Tuning:
    """Replace fields of the process-wide :class:`Tuning`; returns the new one.

    ``threads``, ``launch_bytes`` and ``smem_bytes`` may be one number for every direction.
    """
    global _TUNING
    for key in ("threads", "launch_bytes", "smem_bytes"):
        if isinstance(changes.get(key), int):
            changes[key] = dict.fromkeys(_TUNING.ctas, changes[key])
    _TUNING = replace(_TUNING, **changes)
    return _TUNING


def _ids(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    arr = np.asarray(a)
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"id lists must hold integers, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"id lists must be one-dimensional, got shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _direction(src_dev: torch.device, dst_dev: torch.device) -> Direction:
    s, d = src_dev.type == "cuda", dst_dev.type == "cuda"
    return "d2d" if s and d else "d2h" if s else "h2d" if d else "h2h"


def _exec(
    direction: Direction,
    gpu: torch.device | None,
    backend: BackendName,
    num_ctas: int | None,
    threads: int | None,
    stream: Any,
) -> tuple[Any, int]:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not valid: expected one of {', '.join(BACKENDS)}")
    if gpu is None:
        return _C.ExecConfig(backend=BACKENDS[backend], threads=threads or 0), -1
    ctas, tpb, dma_min_run, launch_bytes, smem_bytes = _TUNING.for_direction(direction)
    if not ctas:
        ctas = 2 * _num_sms(gpu)
    return (
        _C.ExecConfig(
            backend=BACKENDS[backend],
            num_ctas=num_ctas or ctas,
            threads=threads or tpb,
            stream=_stream_handle(stream, gpu),
            dma_min_run=dma_min_run,
            launch_bytes=launch_bytes,
            smem_bytes=smem_bytes,
        ),
        gpu.index if gpu.index is not None else 0,
    )


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    import torch

    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def _stream_handle(stream: Any, device: torch.device) -> int:
    import torch

    if stream is None:
        return int(torch.cuda.current_stream(device).cuda_stream)
    if isinstance(stream, int):
        return stream
    return int(stream.cuda_stream)


def _upload(stream: int, device: torch.device, *arrays: np.ndarray) -> tuple[Any, list[int]]:
    """Copies id arrays to the GPU on the op's stream; returns (keep-alive, pointers)."""
    import torch

    host = torch.from_numpy(np.concatenate(arrays)).pin_memory()
    ext = torch.cuda.ExternalStream(stream, device=device) if stream else torch.cuda.default_stream(device)
    with torch.cuda.stream(ext):
        dev = host.to(device, non_blocking=True)
    ptrs, off = [], 0
    for a in arrays:
        ptrs.append(dev.data_ptr() + off * 8)
        off += len(a)
    return dev, ptrs


def _gpu_of(*devices: torch.device) -> torch.device | None:
    gpus = {d for d in devices if d.type == "cuda"}
    if len(gpus) > 1:
        raise ValueError(f"one op spans one GPU, got {sorted(map(str, gpus))}")
    if gpus and not cuda_compiled():
        raise ValueError("these tensors are on a GPU but this dynkv build has no CUDA ops; rebuild with nvcc")
    return next(iter(gpus), None)


def _host_pinned(obj: PageBuffer | PagedView) -> bool:
    if isinstance(obj, PageBuffer):
        return obj.pinned
    return all(t.is_pinned() for t in obj.tensors)


def _check_host_side(gpu: torch.device | None, backend: BackendName, *sides: PageBuffer | PagedView) -> None:
    """The kernel reaches host memory only through UVA, which needs it pinned."""
    if gpu is None or backend not in ("auto", "kernel"):
        return
    for side in sides:
        if side.device.type == "cpu" and not _host_pinned(side):
            what = "pages" if isinstance(side, PageBuffer) else "KV tensors"
            raise ValueError(
                f"{what} are in pageable host memory, which the GPU kernel cannot reach: "
                "use a pinned HostPool or tensor.pin_memory(), or backend='dma'"
            )


def _check_same_geometry(a: PageGeometry, b: PageGeometry, what: str) -> None:
    if (a.num_layers, a.block_size, a.token_bytes, a.elem_bytes) != (b.num_layers, b.block_size, b.token_bytes, b.elem_bytes):
        raise ValueError(f"{what}: geometries differ ({a} vs {b})")


def gather(
    view: PagedView,
    pages: PageBuffer,
    block_ids: Sequence[int] | np.ndarray | torch.Tensor,
    slots: Sequence[int] | np.ndarray | torch.Tensor,
    *,
    backend: BackendName = "auto",
    num_ctas: int | None = None,
    threads: int | None = None,
    stream: Any = None,
    layers: tuple[int, int] | None = None,
) -> None:
    """Copy this rank's heads of ``block_ids`` into pages ``slots`` (of ``layers`` ``[begin, end)``: all).

    Only the rank's head slice of each page is written; the rest of the page
    is untouched, so the ranks of one engine fill a page together.
    """
    _check_same_geometry(view.geometry, pages.geometry, "gather")
    gpu = _gpu_of(view.device, pages.device)
    _check_host_side(gpu, backend, view, pages)
    ids, sl = _ids(block_ids), _ids(slots)
    cfg, dev = _exec(_direction(view.device, pages.device), gpu, backend, num_ctas, threads, stream)
    keep, ptrs = _maybe_upload(cfg, gpu, backend, ids, sl)
    begin, end = layers or (0, -1)
    _C.gather(pages.geometry.c, view.c, pages.c, ids, sl, cfg, dev, *ptrs, begin, end)
    del keep


def scatter(
    pages: PageBuffer,
    view: PagedView,
    slots: Sequence[int] | np.ndarray | torch.Tensor,
    block_ids: Sequence[int] | np.ndarray | torch.Tensor,
    *,
    backend: BackendName = "auto",
    num_ctas: int | None = None,
    threads: int | None = None,
    stream: Any = None,
    layers: tuple[int, int] | None = None,
) -> None:
    """Copy this rank's head slice of pages ``slots`` into ``block_ids`` (of ``layers`` ``[begin, end)``: all)."""
    scatter_layers(pages, view, slots, block_ids, [layers or (0, view.geometry.num_layers)], backend=backend,
                   num_ctas=num_ctas, threads=threads, stream=stream)


def scatter_layers(
    pages: PageBuffer,
    view: PagedView,
    slots: Sequence[int] | np.ndarray | torch.Tensor,
    block_ids: Sequence[int] | np.ndarray | torch.Tensor,
    groups: Sequence[tuple[int, int]],
    *,
    after: Callable[[int], None] | None = None,
    events: Sequence[Any] = (),
    backend: BackendName = "auto",
    num_ctas: int | None = None,
    threads: int | None = None,
    stream: Any = None,
) -> None:
    """:func:`scatter` in layer groups ``[begin, end)``, in order; ``after(i)`` once group ``i`` is issued.

    On a GPU each group is its own launch on ``stream`` (the ids travel to
    the GPU once), so a forward pass can wait for each group before its
    layers: ``events`` (``torch.cuda.Event`` objects already created, e.g. by a
    first ``record``; one per group) are recorded after each group's launch
    from one C++ call, without a return to Python per group. On the CPU each
    group has been copied when ``after`` runs.
    """
    _check_same_geometry(view.geometry, pages.geometry, "scatter")
    gpu = _gpu_of(view.device, pages.device)
    _check_host_side(gpu, backend, view, pages)
    if events and (gpu is None or after is not None):
        raise ValueError("events are recorded on a GPU stream, in place of after: a GPU scatter without after")
    handles = [int(e.cuda_event) for e in events]
    if 0 in handles:
        raise ValueError("every event must exist already (torch creates a CUDA event at its first record)")
    sl, ids = _ids(slots), _ids(block_ids)
    cfg, dev = _exec(_direction(pages.device, view.device), gpu, backend, num_ctas, threads, stream)
    keep, ptrs = _maybe_upload(cfg, gpu, backend, sl, ids)
    if after is None:
        _C.scatter_groups(pages.geometry.c, pages.c, view.c, sl, ids, cfg, dev, *ptrs, list(groups), handles)
    else:
        for i, (begin, end) in enumerate(groups):
            _C.scatter(pages.geometry.c, pages.c, view.c, sl, ids, cfg, dev, *ptrs, begin, end)
            after(i)
    del keep


def copy_blocks(
    src: PagedView,
    dst: PagedView,
    src_ids: Sequence[int] | np.ndarray | torch.Tensor,
    dst_ids: Sequence[int] | np.ndarray | torch.Tensor,
    *,
    backend: BackendName = "auto",
    num_ctas: int | None = None,
    threads: int | None = None,
    stream: Any = None,
) -> None:
    """Copy blocks ``src_ids`` of ``src`` to ``dst_ids`` of ``dst`` (same geometry, any layouts)."""
    _check_same_geometry(src.geometry, dst.geometry, "copy_blocks")
    gpu = _gpu_of(src.device, dst.device)
    _check_host_side(gpu, backend, src, dst)
    a, b = _ids(src_ids), _ids(dst_ids)
    if src.c.layer_ptrs_equal(dst.c) and np.intersect1d(a, b).size:
        raise ValueError(
            "copy_blocks within one view needs disjoint source and destination ids: "
            f"{np.intersect1d(a, b)[:8].tolist()} appear in both, and the copies would race"
        )
    cfg, dev = _exec(_direction(src.device, dst.device), gpu, backend, num_ctas, threads, stream)
    keep, ptrs = _maybe_upload(cfg, gpu, backend, a, b)
    _C.copy_blocks(src.geometry.c, src.c, dst.c, a, b, cfg, dev, *ptrs)
    del keep


def _check_staged(pages: PageBuffer, view: PagedView, staging: StagingBuffer, what: str) -> torch.device | None:
    _check_same_geometry(view.geometry, pages.geometry, what)
    _check_same_geometry(view.geometry, staging.geometry, what)
    if pages.device.type != "cpu":
        raise ValueError(f"{what}: the staged path moves host pages; these pages are on {pages.device}")
    if staging.device != view.device:
        raise ValueError(f"{what}: the staging buffer is on {staging.device} but the KV cache on {view.device}")
    gpu = _gpu_of(view.device)
    if gpu is not None and not pages.pinned:
        raise ValueError(f"{what}: the pages are in pageable host memory, which the copy engines cannot stream "
                         "from: use a pinned HostPool or tensor.pin_memory()")
    return gpu


def _staged_exec(gpu: torch.device | None, staging: StagingBuffer, num_ctas: int | None, threads: int | None,
                 stream: Any, ids: np.ndarray) -> tuple[Any, Any, np.ndarray, list[int]]:
    stage = np.arange(len(ids), dtype=np.int64)  # a chunk's pages take its slot's staging pages in order
    cfg, _ = _exec("staged", gpu, "kernel", num_ctas, threads, stream)
    if gpu is None or len(ids) == 0:
        return cfg, None, stage, [0, 0]
    keep, ptrs = _upload(cfg.stream, gpu, ids, stage)
    return cfg, keep, stage, ptrs


def staged_scatter(
    pages: PageBuffer,
    view: PagedView,
    slots: Sequence[int] | np.ndarray | torch.Tensor,
    block_ids: Sequence[int] | np.ndarray | torch.Tensor,
    staging: StagingBuffer,
    *,
    groups: Sequence[tuple[int, int]] | None = None,
    events: Sequence[Any] = (),
    after: Callable[[int], None] | GroupSignal | None = None,
    num_ctas: int | None = None,
    threads: int | None = None,
    stream: Any = None,
) -> None:
    """:func:`scatter` through ``staging``: host pages ``slots`` -> this rank's heads of ``block_ids``.

    In layer ``groups`` ``[begin, end)``, in order (``None``: every layer at
    once). For each group, each head's layers of the group cross PCIe as one
    run per page on the copy engines (``staging.stream``) into a staging
    slot, and a kernel on ``stream`` scatters the slot into the KV cache;
    chunks overlap. Complete on ``stream``. ``events`` (already-created
    ``torch.cuda.Event`` objects, one per group) are recorded on ``stream``
    once their group is in, so a forward can wait for each group before its
    layers. ``after(i)`` runs once group ``i`` is issued (GPU: its event
    recorded; CPU: copied), from the calling thread, so that a forward in
    another thread knows when it may wait for the group's event; an
    exception it raises stops the scatter. ``after`` may be a
    :data:`GroupSignal`, set without taking the GIL.
    """
    gpu = _check_staged(pages, view, staging, "staged_scatter")
    if events and gpu is None:
        raise ValueError("events are recorded on a GPU stream; this scatter runs on the CPU")
    spans = [(int(b), int(e)) for b, e in groups] if groups is not None else []  # C++ checks them and the events
    handles = [int(e.cuda_event) for e in events]
    if 0 in handles:
        raise ValueError("every event must exist already (torch creates a CUDA event at its first record)")
    sl, ids = _ids(slots), _ids(block_ids)
    cfg, keep, stage, ptrs = _staged_exec(gpu, staging, num_ctas, threads, stream, ids)
    _C.staged_scatter(pages.geometry.c, pages.c, view.c, sl, ids, stage, staging.ring, cfg, *ptrs, spans, handles,
                      after)
    del keep


def staged_copy_plan(pages: PageBuffer, view: PagedView, slots: Sequence[int] | np.ndarray | torch.Tensor,
                     staging: StagingBuffer, *, groups: Sequence[tuple[int, int]] | None = None,
                     ) -> list[tuple[int, int, int, int]]:
    """The copy-engine operations :func:`staged_scatter` issues for these ``slots``, in order:
    ``(group, first slot, pages, rows)`` each. Pages in adjacent slots join one operation within a chunk
    and a pinned registration; a row is one head's run of the group's layers."""
    _check_staged(pages, view, staging, "staged_copy_plan")
    spans = [(int(b), int(e)) for b, e in groups] if groups is not None else []
    return [tuple(op) for op in _C.staged_copy_plan(pages.geometry.c, pages.c, view.c, _ids(slots), staging.ring, spans)]


def staged_gather(
    view: PagedView,
    pages: PageBuffer,
    block_ids: Sequence[int] | np.ndarray | torch.Tensor,
    slots: Sequence[int] | np.ndarray | torch.Tensor,
    staging: StagingBuffer,
    *,
    num_ctas: int | None = None,
    threads: int | None = None,
    stream: Any = None,
) -> None:
    """:func:`gather` through ``staging``: a kernel on ``stream`` gathers a chunk of blocks into a staging slot,
    the copy engines move each page's slice to the host; chunks overlap. Complete on ``stream``."""
    gpu = _check_staged(pages, view, staging, "staged_gather")
    ids, sl = _ids(block_ids), _ids(slots)
    cfg, keep, stage, ptrs = _staged_exec(gpu, staging, num_ctas, threads, stream, ids)
    _C.staged_gather(pages.geometry.c, view.c, pages.c, ids, sl, stage, staging.ring, cfg, *ptrs)
    del keep


def _maybe_upload(cfg: Any, gpu: torch.device | None, backend: BackendName, a: np.ndarray, b: np.ndarray) -> tuple[Any, list[int]]:
    if gpu is None or backend in ("dma", "dma_loop") or len(a) == 0 or len(a) != len(b):
        return None, [0, 0]
    return _upload(cfg.stream, gpu, a, b)


def memcpy_batch(
    srcs: Sequence[int] | np.ndarray,
    dsts: Sequence[int] | np.ndarray,
    sizes: Sequence[int] | np.ndarray,
    *,
    device: torch.device | int | None = None,
    backend: Literal["dma", "dma_loop"] = "dma",
    threads: int | None = None,
    stream: Any = None,
) -> None:
    """Copy ``sizes[i]`` bytes from ``srcs[i]`` to ``dsts[i]`` (raw addresses).

    ``device``: the GPU whose copy engines move the bytes; ``None`` copies with
    the CPU thread pool (host memory only).
    """
    import torch

    if backend not in ("dma", "dma_loop"):
        raise ValueError(f"backend={backend!r} is not valid for memcpy_batch: expected 'dma' or 'dma_loop'")
    s = np.ascontiguousarray(srcs, dtype=np.uint64)
    d = np.ascontiguousarray(dsts, dtype=np.uint64)
    n = np.ascontiguousarray(sizes, dtype=np.int64)
    if device is None:
        _C.memcpy_batch(s, d, n, _C.ExecConfig(threads=threads or 0), -1)
        return
    gpu = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if not cuda_compiled():
        raise ValueError("memcpy_batch on a GPU needs the CUDA ops; this build has none")
    cfg = _C.ExecConfig(backend=BACKENDS[backend], stream=_stream_handle(stream, gpu))
    _C.memcpy_batch(s, d, n, cfg, gpu.index if gpu.index is not None else 0)
