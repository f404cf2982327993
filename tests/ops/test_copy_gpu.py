"""GPU copy engine: the CPU matrix again, per backend and direction.

D2H: gather into pinned pages (a pinned tensor, or a pinned HostPool); H2D:
scatter from them; D2D: pages in device memory, and copy_blocks between device
views. Backends: the copy kernel ("kernel"), the copy engines batched
("dma": cudaMemcpyBatchAsync, which needs a non-default stream) or one
cudaMemcpyAsync per run ("dma_loop"). Every check synchronizes the device
before it reads bytes. Skipped without a GPU or without the CUDA ops.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from kvtensors import (
    SENTINEL,
    SHAPES,
    SPLIT_DIMS_CROSS,
    SPLIT_DIMS_PER_LAYER,
    Pages,
    Shape,
    assert_bytes_equal,
    block_choice,
    check_copy_blocks,
    check_gather_scatter,
    check_layer_ranges,
    expected_gather,
    make_pages,
    make_rank_kv,
    pool_pages,
    random_bytes,
)

import dynkv
from dynkv import ops

pytestmark = pytest.mark.gpu

CUDA = "cuda"
LAYOUTS = list(dynkv.layout.LAYOUTS)
BACKENDS = ["kernel", "dma", "dma_loop"]
FP8 = getattr(torch, "float8_e4m3fn", torch.uint8)

# (shape, dtype, (tp_size, rank)): between them every vector width of the
# kernel (16, 8, 4, 2 and 1 bytes), GQA replication and MLA.
CASES = [
    (SHAPES[0], torch.bfloat16, (2, 1)),  # 320-byte tokens: 16-byte vectors
    (SHAPES[1], torch.float32, (4, 3)),  # 40-byte tokens: 8; TP=4 over 2 heads replicates
    (SHAPES[3], torch.float32, (2, 1)),  # MLA, 28-byte latent: 4
    (SHAPES[1], torch.uint8, (1, 0)),  # 10-byte tokens: 2
    (SHAPES[3], torch.uint8, (8, 5)),  # MLA, 7-byte latent: 1
    (SHAPES[2], FP8, (1, 0)),  # MLA 576, 1-byte dtype
]


def sync() -> None:
    torch.cuda.synchronize()


def pinned_pages(geometry: dynkv.PageGeometry, num_pages: int, *, stride_pad: int = 0, fill: Any = SENTINEL) -> Pages:
    p = make_pages(geometry, num_pages, stride_pad=stride_pad, fill=fill, pin=True)
    assert p.buffer.pinned
    return p


def device_pages(geometry: dynkv.PageGeometry, num_pages: int, *, stride_pad: int = 0, fill: Any = SENTINEL) -> Pages:
    return make_pages(geometry, num_pages, stride_pad=stride_pad, fill=fill, device=CUDA)


def host_pool_pages(
    geometry: dynkv.PageGeometry, num_pages: int, *, stride_pad: int = 0, fill: Any = SENTINEL
) -> Pages:
    """Pages in a pinned, anonymous HostPool (kept alive by the PageBuffer)."""
    pool = dynkv.HostPool.create(num_pages * (geometry.page_bytes + stride_pad), pin=True)
    assert pool.pinned
    p = pool_pages(geometry, num_pages, pool, stride_pad=stride_pad, fill=fill)
    assert p.buffer.pinned
    return p


PAGES = {"pinned": pinned_pages, "pool": host_pool_pages, "device": device_pages}


@pytest.fixture
def side_stream():
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        yield s
    sync()


@pytest.mark.parametrize("where", ["pinned", "device"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gather_scatter_matrix(rng, side_stream, layout, backend, where):
    """D2H+H2D (pinned pages) or D2D (device pages), on a side stream so "dma" takes the batch API.

    Cross-layer and per-layer tensors alternate over the cases, shifted by the layout.
    """
    for i, (shape, dtype, tp) in enumerate(CASES):
        form = ("cross", "layers")[(i + LAYOUTS.index(layout)) % 2]
        check_gather_scatter(
            rng, shape, dims=layout, form=form, dtype=dtype, tp=tp, device=CUDA, page_maker=PAGES[where],
            sync=sync, backend=backend,
        )


@pytest.mark.parametrize("where", ["pinned", "device"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["LBHNC", "BLNHC", "LHBNC"])
def test_layer_ranges(rng, side_stream, layout, backend, where):
    """Layer ranges and scatter_layers on the GPU: the kernel's page base moves, the DMA runs' too."""
    for i, (shape, dtype, tp) in enumerate(CASES[:3]):
        check_layer_ranges(rng, shape, dims=layout, form=("cross", "layers")[i % 2], dtype=dtype, tp=tp,
                           device=CUDA, page_maker=PAGES[where], sync=sync, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["LBHNC", "BLNHC", "BHLNC"])
def test_pinned_host_pool(rng, side_stream, layout, backend):
    for shape, dtype, tp in CASES[:3]:
        check_gather_scatter(
            rng, shape, dims=layout, form="layers", dtype=dtype, tp=tp, device=CUDA, page_maker=host_pool_pages,
            sync=sync, backend=backend, stride_pad=64,
        )


@pytest.mark.parametrize("where", ["pinned", "pool", "device"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_default_stream(rng, backend, where):
    """On torch's default stream (the legacy stream, handle 0) "dma" falls back to the loop."""
    for shape, dtype, tp in CASES[:2]:
        check_gather_scatter(
            rng, shape, dims="LBNHC", form="cross", dtype=dtype, tp=tp, device=CUDA, page_maker=PAGES[where],
            sync=sync, backend=backend,
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_stream_argument(rng, backend):
    """stream= as a torch Stream and as a raw handle, while another stream is current."""
    s = torch.cuda.Stream()
    for stream in (s, int(s.cuda_stream)):
        check_gather_scatter(
            rng, SHAPES[0], dims="BLHNC", form="layers", dtype=torch.float16, tp=(4, 2), device=CUDA,
            page_maker=pinned_pages, sync=sync, backend=backend, stream=stream,
        )


@pytest.mark.parametrize("where", ["pinned", "device"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dims,form", [(d, "separate") for d in SPLIT_DIMS_PER_LAYER] + [(d, "cross") for d in SPLIT_DIMS_CROSS]
)
def test_split_kv(rng, side_stream, dims, form, backend, where):
    for shape, dtype, tp in ((SHAPES[0], torch.bfloat16, (2, 0)), (SHAPES[1], torch.float32, (4, 1))):
        check_gather_scatter(
            rng, shape, dims=dims, form=form, dtype=dtype, tp=tp, device=CUDA, page_maker=PAGES[where], sync=sync,
            backend=backend,
        )


@pytest.mark.parametrize("dst_layout", LAYOUTS)
@pytest.mark.parametrize("src_layout", LAYOUTS)
def test_copy_blocks_kernel(rng, side_stream, src_layout, dst_layout):
    for shape, dtype, tp in CASES[:3]:
        check_copy_blocks(
            rng, shape, src=(src_layout, "cross"), dst=(dst_layout, "layers"), dtype=dtype, tp=tp, device=CUDA,
            sync=sync, backend="kernel",
        )


@pytest.mark.parametrize("backend", ["dma", "dma_loop", "auto"])
@pytest.mark.parametrize(
    "src,dst", [(("LBHNC", "cross"), ("BLNHC", "separate")), (("LKBNHD", "separate"), ("BHLNC", "layers"))]
)
def test_copy_blocks_dma(rng, side_stream, src, dst, backend):
    for shape, dtype, tp in CASES[:2]:
        check_copy_blocks(rng, shape, src=src, dst=dst, dtype=dtype, tp=tp, device=CUDA, sync=sync, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC", "BHLNC"])
def test_gpu_pages_equal_cpu_pages(seed, layout, backend):
    """The GPU writes the very bytes the CPU path writes for the same cache."""
    shape, dtype, (tp, rank) = SHAPES[0], torch.bfloat16, (2, 1)
    h0, h1 = dynkv.head_range(rank, tp, shape.num_heads)
    kw = dict(dims=layout, form="layers", dtype=dtype, heads=(h0, h1), num_blocks=12)
    cpu = make_rank_kv(np.random.default_rng(seed), shape, **kw)
    gpu = make_rank_kv(np.random.default_rng(seed), shape, device=CUDA, **kw)
    assert all(torch.equal(a, b.cpu()) for a, b in zip(cpu.storages, gpu.storages))
    cv, gv = cpu.view(num_heads_total=4, head_start=h0), gpu.view(num_heads_total=4, head_start=h0)
    rng = np.random.default_rng(seed + 1)
    ids, slots = block_choice(rng, 12, 8, unique=False), block_choice(rng, 10, 8, unique=True)
    a, b = make_pages(cv.geometry, 10), pinned_pages(gv.geometry, 10)
    dynkv.gather(cv, a.buffer, ids, slots)
    sync()
    dynkv.gather(gv, b.buffer, ids, slots, backend=backend)
    sync()
    assert_bytes_equal(b.flat, a.flat, "GPU pages vs CPU pages")


def test_kernel_grid_stride_and_thread_counts(rng, side_stream):
    """Far more tiles than warps: each warp loops over many tiles."""
    shape = Shape("h8-d64-n16", num_heads=8, head_size=64, block_size=16)
    for num_ctas, threads in ((1, 32), (3, 64), (2, 1024), (200, 256)):
        check_gather_scatter(
            rng, shape, dims="LBNHC", form="layers", dtype=torch.bfloat16, tp=(1, 0), device=CUDA,
            page_maker=pinned_pages, sync=sync, backend="kernel", num_ctas=num_ctas, threads=threads,
            num_layers=4, num_blocks=24, num_pages=20, entries=16,
        )


@pytest.mark.parametrize("launch_bytes", [1, 3000, 1 << 16])
def test_split_launches_copy_exactly(rng, side_stream, monkeypatch, launch_bytes):
    """Transfers split into many short launches (down to one tile each) move the same bytes."""
    every = dict.fromkeys(ops.get_tuning().ctas, launch_bytes)
    monkeypatch.setattr(ops, "_TUNING", replace(ops.get_tuning(), launch_bytes=every))
    for where in ("pinned", "device"):
        check_gather_scatter(
            rng, SHAPES[0], dims="LBNHC", form="layers", dtype=torch.bfloat16, tp=(2, 1), device=CUDA,
            page_maker=PAGES[where], sync=sync, backend="kernel", num_layers=4, num_blocks=24, num_pages=20,
            entries=16,
        )


@pytest.mark.parametrize("smem_kib", [1, 100, 200])
def test_reserved_shared_memory_copies_exactly(rng, side_stream, monkeypatch, smem_kib):
    """Copy CTAs that reserve shared memory (above 48 KiB by opting in) move the same bytes."""
    every = dict.fromkeys(ops.get_tuning().ctas, smem_kib << 10)
    monkeypatch.setattr(ops, "_TUNING", replace(ops.get_tuning(), smem_bytes=every))
    for where in ("pinned", "device"):
        check_gather_scatter(
            rng, SHAPES[0], dims="LBNHC", form="layers", dtype=torch.bfloat16, tp=(2, 1), device=CUDA,
            page_maker=PAGES[where], sync=sync, backend="kernel", num_layers=4, num_blocks=24, num_pages=20,
            entries=16, threads=1024,
        )


def test_pool_pages_must_not_straddle_pinned_chunks():
    geom = dynkv.PageGeometry.for_model(num_layers=5, num_kv_heads=3, head_size=64, block_size=16, elem_bytes=2)
    pool = dynkv.HostPool.create(8 * 4096 * 10, pin=True, chunk_bytes=4 * 4096)
    try:
        with pytest.raises(ValueError, match="would straddle the pool's 16384-byte pinned chunks"):
            dynkv.PageBuffer.from_pool(geom, pool)
    finally:
        pool.close()
    with dynkv.HostPool.for_pages(geom, 300, pin=True) as pool:
        assert pool.chunk_bytes % geom.page_bytes == 0 and pool.chunk_bytes % 4096 == 0
        assert dynkv.PageBuffer.from_pool(geom, pool).num_pages == 300


def test_auto_picks_dma_for_long_runs(rng, side_stream, monkeypatch):
    """With dma_min_run set, "auto" sends long contiguous runs to the copy engines; the bytes are the same."""
    assert dynkv._C.resolve_backend(dynkv._C.ExecConfig(dma_min_run=1024), 4096) == dynkv._C.Backend.DMA_BATCH
    assert dynkv._C.resolve_backend(dynkv._C.ExecConfig(dma_min_run=1024), 512) == dynkv._C.Backend.KERNEL
    assert dynkv._C.resolve_backend(dynkv._C.ExecConfig(), 1 << 30) == dynkv._C.Backend.KERNEL
    for min_run in (1, 1 << 40):
        tuning = replace(ops.get_tuning(), dma_min_run={d: min_run for d in ("h2d", "d2h", "d2d", "h2h")})
        monkeypatch.setattr(ops, "_TUNING", tuning)
        for where in ("pinned", "device"):
            check_gather_scatter(
                rng, SHAPES[0], dims="LHBNC", form="cross", dtype=torch.bfloat16, tp=(2, 0), device=CUDA,
                page_maker=PAGES[where], sync=sync, backend="auto",
            )


@pytest.mark.parametrize("backend", ["kernel", "auto"])
def test_pageable_pages_are_refused_by_the_kernel(rng, backend):
    kv = make_rank_kv(rng, SHAPES[0], dims="LBHNC", form="layers", dtype=torch.bfloat16, heads=(0, 4), device=CUDA)
    view = kv.view()
    pages = make_pages(view.geometry, 4)
    assert not pages.buffer.pinned
    before = kv.snapshot()
    with pytest.raises(ValueError, match=r"pages are in pageable host memory, which the GPU kernel cannot reach"):
        dynkv.gather(view, pages.buffer, [0, 1], [0, 1], backend=backend)
    with pytest.raises(ValueError, match=r"pages are in pageable host memory"):
        dynkv.scatter(pages.buffer, view, [0, 1], [2, 3], backend=backend)
    sync()
    assert bool((pages.flat == SENTINEL).all())
    assert_bytes_equal(kv.storages, before, "KV after refused ops")


def test_pageable_host_kv_is_refused_by_the_kernel(rng):
    host_kv = make_rank_kv(rng, SHAPES[0], dims="LBHNC", form="layers", dtype=torch.bfloat16, heads=(0, 4))
    gpu_kv = make_rank_kv(rng, SHAPES[0], dims="LBHNC", form="layers", dtype=torch.bfloat16, heads=(0, 4), device=CUDA)
    gpu_kv.poison()
    before = host_kv.snapshot()
    with pytest.raises(ValueError, match=r"KV tensors are in pageable host memory"):
        dynkv.copy_blocks(host_kv.view(), gpu_kv.view(), [0, 1], [2, 3], backend="kernel")
    sync()
    assert all(bool((s == SENTINEL).all()) for s in gpu_kv.storages)
    assert_bytes_equal(host_kv.storages, before, "host KV after a refused op")


def test_bad_launch_and_ids_copy_nothing(rng):
    kv = make_rank_kv(rng, SHAPES[0], dims="BLHNC", form="layers", dtype=torch.bfloat16, heads=(0, 4), device=CUDA)
    view = kv.view()
    pages = pinned_pages(view.geometry, 4)
    for threads in (48, 2048):
        match = rf"threads={threads} per CTA is not valid: expected a multiple of 32 in \[32, 1024\]"
        with pytest.raises(ValueError, match=match):
            dynkv.gather(view, pages.buffer, [0, 1], [0, 1], backend="kernel", threads=threads)
    saved = ops.get_tuning()
    for smem in (1 << 20, 2 << 20):  # more shared memory than any GPU gives one CTA
        with pytest.raises(ValueError, match=rf"smem_bytes={smem} is"):
            ops.set_tuning(smem_bytes=smem)
            try:
                dynkv.gather(view, pages.buffer, [0, 1], [0, 1], backend="kernel")
            finally:
                ops.set_tuning(smem_bytes=saved.smem_bytes)
    for backend in BACKENDS:
        with pytest.raises(ValueError, match=r"block_ids\[1\]=6 is out of range"):
            dynkv.gather(view, pages.buffer, [0, 6], [0, 1], backend=backend)
        with pytest.raises(ValueError, match=r"slots has 1 more than once"):
            dynkv.gather(view, pages.buffer, [0, 2], [1, 1], backend=backend)
    sync()
    assert bool((pages.flat == SENTINEL).all())


def test_views_on_two_gpus_are_refused(rng):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    a = make_rank_kv(rng, SHAPES[1], dims="LBHNC", form="cross", dtype=torch.float16, heads=(0, 2), device="cuda:0")
    b = make_rank_kv(rng, SHAPES[1], dims="LBHNC", form="cross", dtype=torch.float16, heads=(0, 2), device="cuda:1")
    with pytest.raises(ValueError, match=r"one op spans one GPU"):
        dynkv.copy_blocks(a.view(), b.view(), [0], [0])


@pytest.mark.parametrize("stream", ["default", "side"])
@pytest.mark.parametrize("backend", ["dma", "dma_loop"])
def test_memcpy_batch(rng, backend, stream):
    """Runs D2H, H2D and D2D in one batch, exact to the byte."""
    n = 1 << 20
    dev_src = random_bytes(rng, n, CUDA)
    host_src = random_bytes(rng, n).pin_memory()
    dev_dst = torch.full((n,), SENTINEL, dtype=torch.uint8, device=CUDA)
    host_dst = torch.full((n,), SENTINEL, dtype=torch.uint8).pin_memory()
    runs = []  # (src tensor, src offset, dst tensor, dst offset, length)
    cursor = {id(dev_dst): 0, id(host_dst): 0}
    for i in range(24):
        src = (dev_src, host_src)[i % 2]
        dst = (host_dst, dev_dst, dev_dst, host_dst)[i % 4]
        length = int(rng.integers(1, 20_000))
        off = cursor[id(dst)] + int(rng.integers(0, 64))
        runs.append((src, int(rng.integers(0, n - length)), dst, off, length))
        cursor[id(dst)] = off + length
    want_dev, want_host = dev_dst.clone(), host_dst.clone()
    for src, so, dst, do, length in runs:
        target = want_dev if dst is dev_dst else want_host
        target[do : do + length].copy_(src[so : so + length])
    dev_before, host_before = dev_src.clone(), host_src.clone()
    sync()
    s = torch.cuda.Stream() if stream == "side" else torch.cuda.current_stream()
    dynkv.memcpy_batch(
        [src.data_ptr() + so for src, so, _, _, _ in runs],
        [dst.data_ptr() + do for _, _, dst, do, _ in runs],
        [length for *_, length in runs],
        device=torch.cuda.current_device(),
        backend=backend,
        stream=s,
    )
    sync()
    assert_bytes_equal(dev_dst, want_dev, "memcpy_batch: device destination")
    assert_bytes_equal(host_dst, want_host, "memcpy_batch: host destination")
    assert_bytes_equal(dev_src, dev_before, "memcpy_batch: device source")
    assert_bytes_equal(host_src, host_before, "memcpy_batch: host source")


@pytest.mark.parametrize("stream", ["default", "side"])
@pytest.mark.parametrize("backend", ["dma", "dma_loop"])
def test_memcpy_batch_zero_length_runs(rng, backend, stream):
    """Zero-byte runs (allowed by memcpy_batch's checks) copy nothing and break nothing around them."""
    src = random_bytes(rng, 4096, CUDA)
    dst = torch.full((4096,), SENTINEL, dtype=torch.uint8).pin_memory()
    s = torch.cuda.Stream() if stream == "side" else torch.cuda.current_stream()
    sync()
    dynkv.memcpy_batch(
        [src.data_ptr(), src.data_ptr() + 100, src.data_ptr() + 200],
        [dst.data_ptr(), dst.data_ptr() + 1000, dst.data_ptr() + 3000],
        [512, 0, 700],
        device=torch.cuda.current_device(),
        backend=backend,
        stream=s,
    )
    sync()
    want = torch.full((4096,), SENTINEL, dtype=torch.uint8)
    want[:512] = src[:512].cpu()
    want[3000:3700] = src[200:900].cpu()
    assert_bytes_equal(dst, want, "memcpy_batch with a zero-length run")


def test_gather_to_pinned_pages_equals_reference_on_many_blocks(rng, side_stream):
    """A realistic batch: 64 blocks of an 8-head bf16 model into a pinned HostPool, kernel path."""
    shape = Shape("h8-d128-n16", num_heads=8, head_size=128, block_size=16)
    kv = make_rank_kv(
        rng, shape, dims="LBHNC", form="layers", dtype=torch.bfloat16, heads=(4, 6), num_layers=4, num_blocks=96,
        device=CUDA,
    )
    view = kv.view(num_heads_total=8, head_start=4)
    pages = host_pool_pages(view.geometry, 80)
    ids, slots = block_choice(rng, 96, 64, unique=False), block_choice(rng, 80, 64, unique=True)
    sync()
    want = expected_gather(kv, pages, 4, ids, slots)
    dynkv.gather(view, pages.buffer, ids, slots, backend="kernel")
    sync()
    assert_bytes_equal(pages.flat, want, "gather of 64 blocks")
