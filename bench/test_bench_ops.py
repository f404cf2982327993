"""Every copy op, per direction and backend, with GB/s and % of memcpy in extra_info.

CPU directions are ``h2h`` (every buffer is host memory; ``kernel`` is the
thread pool). GPU benchmarks carry ``@pytest.mark.gpu``. ``torch`` is the plain
PyTorch reference of the same copy. Run ``pytest bench`` (sizes: conftest.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import dynkv
from dynkv.benchmarks.kernels_setup import Setup, baseline_fns, dynkv_op, torch_op

gpu = pytest.mark.gpu
CPU_BACKENDS = ["kernel", "torch"]
GPU_BACKENDS = ["kernel", "dma", "dma_loop", "torch"]


def _cases(gpu_directions: list[str], backends: list[str] = GPU_BACKENDS) -> list[Any]:
    cpu = [pytest.param("h2h", b, id=f"h2h-{b}") for b in CPU_BACKENDS]
    return cpu + [pytest.param(d, b, id=f"{d}-{b}", marks=gpu) for d in gpu_directions for b in backends]


def _setup(request: pytest.FixtureRequest, direction: str) -> Setup:
    return request.getfixturevalue("cpu_setup" if direction == "h2h" else "gpu_setup")


def _op(s: Setup, kind: str, on_device: bool, backend: str) -> Callable[[], None]:
    if backend == "torch":
        return torch_op(s, kind, on_device=on_device)
    return dynkv_op(s, kind, on_device=on_device, backend=backend)


@pytest.mark.parametrize(("direction", "backend"), _cases(["d2h", "d2d"]))
def test_gather(request: pytest.FixtureRequest, measure: Any, direction: str, backend: str) -> None:
    s = _setup(request, direction)
    measure(_op(s, "store", direction == "d2d", backend), s, direction)


@pytest.mark.parametrize(("direction", "backend"), _cases(["h2d", "d2d"]))
def test_scatter(request: pytest.FixtureRequest, measure: Any, direction: str, backend: str) -> None:
    s = _setup(request, direction)
    measure(_op(s, "load", direction == "d2d", backend), s, direction)


@pytest.mark.parametrize(("direction", "backend"), _cases(["d2d"]))
def test_copy_blocks(request: pytest.FixtureRequest, measure: Any, direction: str, backend: str) -> None:
    """Random blocks to other random blocks of the same cache (as a prefix-cache copy-on-write does)."""
    s = _setup(request, direction)
    src, dst = s.ids[1], s.ids[0]
    if backend == "torch":
        src_t, dst_t = s.ids_dev[1], s.ids_dev[0]

        def fn() -> None:
            for t in s.kv:
                t.index_copy_(0, dst_t, t.index_select(0, src_t))
    else:
        def fn() -> None:
            dynkv.copy_blocks(s.view, s.view, src, dst, backend=backend)
    measure(fn, s, direction)


def _tile_runs(s: Setup, direction: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One run per (block, head, layer) tile between the cache and pages: what the DMA backends submit."""
    kv0 = s.kv[0]
    if not s.view.c.tile_contiguous:
        pytest.skip("tiles are token-strided in this layout: no one-run-per-tile memcpy")
    g, (h0, h1) = s.geometry, s.heads
    elem = kv0.element_size()
    kind = "load" if direction == "h2d" else "store"
    ids, slots = s.ids[0 if kind == "load" else 1], s.slots(kind)
    pages = s.dev5 if direction == "d2d" else s.host5
    e, h, layer = np.meshgrid(np.arange(s.blocks), np.arange(h1 - h0), np.arange(g.num_layers), indexing="ij")
    base = np.array([t.data_ptr() for t in s.kv], dtype=np.uint64)
    cache = base[layer] + (ids[e] * kv0.stride(0) * elem + h * kv0.stride(1) * elem).astype(np.uint64)
    page = (pages.data_ptr() + slots[e] * g.page_bytes + ((h0 + h) * g.num_layers + layer) * g.tile_bytes)
    src, dst = (page.astype(np.uint64), cache) if kind == "load" else (cache, page.astype(np.uint64))
    return src.ravel(), dst.ravel(), np.full(src.size, g.tile_bytes, dtype=np.int64)


@pytest.mark.parametrize("shape", ["tiles", "contiguous"])
@pytest.mark.parametrize(
    ("direction", "backend"),
    [pytest.param("h2h", "pool", id="h2h-pool")]
    + [pytest.param(d, b, id=f"{d}-{b}", marks=gpu) for d in ("h2d", "d2h", "d2d") for b in ("dma", "dma_loop")],
)
def test_memcpy_batch(request: pytest.FixtureRequest, measure: Any, direction: str, backend: str, shape: str) -> None:
    """Raw runs: every tile of a gather/scatter as its own copy, or one contiguous copy (the baseline itself)."""
    s = _setup(request, direction)
    if shape == "contiguous":
        fn = baseline_fns(s, "h2d" if direction == "h2h" else direction)[0]
        if direction != "h2h":  # the baseline is torch's copy_; here the same bytes go through memcpy_batch
            src, dst = _contiguous_ptrs(s, direction)
            fn = _memcpy(s, [src], [dst], [s.nbytes], backend)
        measure(fn, s, direction)
        return
    srcs, dsts, sizes = _tile_runs(s, "d2h" if direction == "h2h" else direction)
    measure(_memcpy(s, srcs, dsts, sizes, backend), s, direction)


def _contiguous_ptrs(s: Setup, direction: str) -> tuple[int, int]:
    scratch = s.scratch.data_ptr()
    other = (s.dev5 if direction == "d2d" else s.pinned).data_ptr()
    return (other, scratch) if direction in ("h2d", "d2d") else (scratch, other)


def _memcpy(s: Setup, srcs: Any, dsts: Any, sizes: Any, backend: str) -> Callable[[], None]:
    if s.device.type == "cpu":
        return lambda: dynkv.memcpy_batch(srcs, dsts, sizes)
    return lambda: dynkv.memcpy_batch(srcs, dsts, sizes, device=s.device, backend=backend)
