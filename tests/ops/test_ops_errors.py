"""Bad input raises ValueError naming the problem, before any byte moves.

Each failing call gets valid entries first and the bad one last, so a copy
that started before checking would show in the poisoned destinations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from kvtensors import SENTINEL, KVCache, Pages, Shape, make_pages, make_rank_kv

import dynkv
from dynkv import _C

SHAPE = Shape("h4-d8-n4", num_heads=4, head_size=8, block_size=4)
B, P = 6, 4


@dataclass
class Scene:
    src: KVCache  # random, TP rank holding heads [2, 4) of 4
    dst: KVCache  # poisoned, same heads
    src_view: dynkv.PagedView
    dst_view: dynkv.PagedView
    pages: Pages  # poisoned
    source: list[torch.Tensor]

    def assert_nothing_copied(self) -> None:
        assert bool((self.pages.flat == SENTINEL).all()), "pages were written"
        assert all(bool((s == SENTINEL).all()) for s in self.dst.storages), "destination KV was written"
        for a, b in zip(self.src.storages, self.source):
            assert torch.equal(a, b), "source KV changed"


@pytest.fixture
def scene(rng) -> Scene:
    src = make_rank_kv(rng, SHAPE, dims="LBNHC", form="layers", dtype=torch.bfloat16, heads=(2, 4), num_blocks=B)
    dst = make_rank_kv(rng, SHAPE, dims="BHLNC", form="cross", dtype=torch.bfloat16, heads=(2, 4), num_blocks=B)
    dst.poison()
    sv = src.view(num_heads_total=4, head_start=2)
    dv = dst.view(num_heads_total=4, head_start=2)
    return Scene(src, dst, sv, dv, make_pages(sv.geometry, P), src.snapshot())


OPS = ["gather", "scatter", "copy_blocks"]


def call(s: Scene, op: str, src_ids, dst_ids, **kw) -> None:
    """``op`` from the source side (blocks, or pages for scatter) to its destination."""
    if op == "gather":
        dynkv.gather(s.src_view, s.pages.buffer, src_ids, dst_ids, **kw)
    elif op == "scatter":
        dynkv.scatter(s.pages.buffer, s.dst_view, src_ids, dst_ids, **kw)
    else:
        dynkv.copy_blocks(s.src_view, s.dst_view, src_ids, dst_ids, **kw)


# names of (source ids, destination ids) in the messages, and the bound of each
NAMES = {"gather": ("block_ids", "slots"), "scatter": ("slots", "block_ids"), "copy_blocks": ("src_ids", "dst_ids")}
BOUNDS = {"gather": (B, P), "scatter": (P, B), "copy_blocks": (B, B)}


@pytest.mark.parametrize("op", OPS)
def test_source_id_out_of_range(scene, op):
    name, bound = NAMES[op][0], BOUNDS[op][0]
    for bad in (bound, -1, 2**40):
        with pytest.raises(ValueError, match=rf"{name}\[2\]={bad} is out of range: expected \[0, {bound}\)"):
            call(scene, op, [0, 1, bad], [0, 1, 2])
    scene.assert_nothing_copied()


@pytest.mark.parametrize("op", OPS)
def test_destination_id_out_of_range(scene, op):
    name, bound = NAMES[op][1], BOUNDS[op][1]
    for bad in (bound, -1, bound + 7):
        with pytest.raises(ValueError, match=rf"{name}\[2\]={bad} is out of range: expected \[0, {bound}\)"):
            call(scene, op, [0, 1, 2], [0, 1, bad])
    scene.assert_nothing_copied()


def test_uint64_ids_that_wrap_negative_are_out_of_range(scene):
    with pytest.raises(ValueError, match=r"block_ids\[1\]=-1 is out of range"):
        dynkv.gather(scene.src_view, scene.pages.buffer, np.array([0, 2**64 - 1], dtype=np.uint64), [0, 1])
    scene.assert_nothing_copied()


@pytest.mark.parametrize("op", OPS)
def test_length_mismatch(scene, op):
    a, b = NAMES[op]
    with pytest.raises(ValueError, match=rf"length mismatch: {a} has 3 entries but {b} has 2"):
        call(scene, op, [0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match=rf"length mismatch: {a} has 1 entries but {b} has 2"):
        call(scene, op, [0], [0, 1])
    scene.assert_nothing_copied()


@pytest.mark.parametrize("op", OPS)
def test_duplicate_destination(scene, op):
    name = NAMES[op][1]
    with pytest.raises(ValueError, match=rf"{name} has 1 more than once: a destination may appear only once"):
        call(scene, op, [0, 1, 2], [1, 3, 1])
    scene.assert_nothing_copied()


@pytest.mark.parametrize("op", OPS)
def test_non_integer_ids(scene, op):
    for bad in ([0.0, 1.0], np.array([0.5, 1.5]), torch.tensor([0.0, 1.0]), [True, False], ["0", "1"]):
        with pytest.raises(ValueError, match=r"id lists must hold integers, got dtype"):
            call(scene, op, [0, 1], bad)
        with pytest.raises(ValueError, match=r"id lists must hold integers, got dtype"):
            call(scene, op, bad, [0, 1])
    scene.assert_nothing_copied()


@pytest.mark.parametrize("op", OPS)
def test_ids_of_wrong_ndim(scene, op):
    for bad in (np.zeros((2, 1), dtype=np.int64), torch.zeros(1, 2, dtype=torch.int64), 3):
        with pytest.raises(ValueError, match=r"id lists must be one-dimensional, got shape"):
            call(scene, op, bad, [0, 1])
    scene.assert_nothing_copied()


@pytest.mark.parametrize("op", OPS)
def test_bad_backend_name(scene, op):
    match = r"backend='fastest' is not valid: expected one of auto, kernel, dma, dma_loop"
    with pytest.raises(ValueError, match=match):
        call(scene, op, [0, 1], [0, 1], backend="fastest")
    scene.assert_nothing_copied()


@pytest.mark.parametrize("op", OPS)
def test_more_threads_than_the_cpu_pool(scene, op):
    n = _C.max_cpu_threads() + 1
    with pytest.raises(ValueError, match=rf"threads={n} exceeds the CPU pool size"):
        call(scene, op, [0, 1], [0, 1], threads=n)
    scene.assert_nothing_copied()


def test_view_heads_outside_the_page_geometry(scene):
    """Pages of a 2-head model cannot take heads [2, 4)."""
    g = scene.src_view.geometry
    small = dynkv.PageGeometry(g.num_layers, 2, g.block_size, g.token_bytes, g.elem_bytes)
    pages = make_pages(small, P)
    with pytest.raises(ValueError, match=r"view head range \[2, 4\) lies outside the geometry's 2 heads"):
        dynkv.gather(scene.src_view, pages.buffer, [0], [0])
    with pytest.raises(ValueError, match=r"view head range \[2, 4\) lies outside the geometry's 2 heads"):
        dynkv.scatter(pages.buffer, scene.dst_view, [0], [0])
    assert bool((pages.flat == SENTINEL).all())
    scene.assert_nothing_copied()


def test_geometry_mismatch_between_view_and_pages(scene):
    g = scene.src_view.geometry
    for other in (
        dynkv.PageGeometry(g.num_layers + 1, g.num_heads, g.block_size, g.token_bytes, g.elem_bytes),
        dynkv.PageGeometry(g.num_layers, g.num_heads, g.block_size + 1, g.token_bytes, g.elem_bytes),
        dynkv.PageGeometry(g.num_layers, g.num_heads, g.block_size, g.token_bytes + 2, g.elem_bytes),
    ):
        pages = make_pages(other, P)
        with pytest.raises(ValueError, match=r"gather: geometries differ"):
            dynkv.gather(scene.src_view, pages.buffer, [0], [0])
        with pytest.raises(ValueError, match=r"scatter: geometries differ"):
            dynkv.scatter(pages.buffer, scene.dst_view, [0], [0])
        assert bool((pages.flat == SENTINEL).all())
    scene.assert_nothing_copied()


def test_copy_blocks_needs_the_same_heads(rng, scene):
    other = make_rank_kv(rng, SHAPE, dims="LBHNC", form="cross", dtype=torch.bfloat16, heads=(0, 2), num_blocks=B)
    match = r"copy_blocks needs the same heads on both sides: source holds \[0, 2\), destination \[2, 4\)"
    with pytest.raises(ValueError, match=match):
        dynkv.copy_blocks(other.view(num_heads_total=4, head_start=0), scene.dst_view, [0], [0])
    scene.assert_nothing_copied()


def test_copy_blocks_within_one_view_refuses_overlapping_ids(scene):
    match = r"copy_blocks within one view needs disjoint source and destination ids: \[2\] appear in both"
    with pytest.raises(ValueError, match=match):
        dynkv.copy_blocks(scene.src_view, scene.src_view, [1, 2], [2, 3])
    for a, b in zip(scene.src.storages, scene.source):
        assert torch.equal(a, b), "source KV changed"


def test_copy_blocks_geometry_mismatch(rng, scene):
    n8 = Shape("n8", 4, 8, 8)
    other = make_rank_kv(rng, n8, dims="LBHNC", form="cross", dtype=torch.bfloat16, heads=(2, 4), num_blocks=B)
    with pytest.raises(ValueError, match=r"copy_blocks: geometries differ"):
        dynkv.copy_blocks(other.view(num_heads_total=4, head_start=2), scene.dst_view, [0], [0])
    scene.assert_nothing_copied()


def test_head_range_outside_the_geometry(scene):
    t = scene.src.tensors
    with pytest.raises(ValueError, match=r"head range \[3, 5\) lies outside the geometry's 4 heads"):
        dynkv.PagedView.from_tensors(t, num_heads_total=4, head_start=3)
    with pytest.raises(ValueError, match=r"head range \[-1, 1\) lies outside the geometry's 4 heads"):
        dynkv.PagedView.from_tensors(t, num_heads_total=4, head_start=-1)
    with pytest.raises(ValueError, match=r"head range \[0, 2\) lies outside the geometry's 1 heads"):
        dynkv.PagedView.from_tensors(t, num_heads_total=1)
    g = scene.src_view.geometry
    with pytest.raises(ValueError, match=r"head range \[3, 5\) lies outside the geometry's 4 heads"):
        g.head_slice(3, 5)
    with pytest.raises(ValueError, match=r"head range \[2, 2\) lies outside"):
        g.head_slice(2, 2)
    scene.assert_nothing_copied()


def test_head_range_rejects_bad_tp():
    with pytest.raises(ValueError, match=r"TP rank 2 of 2 is not valid"):
        dynkv.head_range(2, 2, 8)
    with pytest.raises(ValueError, match=r"TP rank -1 of 2 is not valid"):
        dynkv.head_range(-1, 2, 8)
    with pytest.raises(ValueError, match=r"TP rank 0 of 0 is not valid"):
        dynkv.head_range(0, 0, 8)
    with pytest.raises(ValueError, match=r"num_heads=0 is not valid"):
        dynkv.head_range(0, 1, 0)
    with pytest.raises(ValueError, match=r"6 KV heads do not split over TP=4"):
        dynkv.head_range(0, 4, 6)
    with pytest.raises(ValueError, match=r"TP=12 is not a multiple of the 8 KV heads"):
        dynkv.head_range(0, 12, 8)


def test_misaligned_layer_pointer(scene):
    """torch will not make a misaligned bf16 tensor, so build the view from raw pointers."""
    g = scene.src_view.geometry
    t = torch.empty(4096, dtype=torch.uint8)
    base = t.data_ptr() + (-t.data_ptr()) % 16
    bs, hs, ts = 2 * 4 * g.token_bytes, 4 * g.token_bytes, g.token_bytes
    ptrs = [base + l * B * bs for l in range(g.num_layers)]
    _C.make_view(g.c, ptrs, B, 2, 2, 1, bs, hs, ts, 0)  # aligned: fine
    ptrs[1] += 1
    match = r"layer pointer 1 \(0x[0-9a-f]+\) is misaligned: expected a multiple of the dtype size 2 bytes"
    with pytest.raises(ValueError, match=match):
        _C.make_view(g.c, ptrs, B, 2, 2, 1, bs, hs, ts, 0)
    ptrs[1] -= 1
    for i, name in enumerate(("block_stride", "head_stride", "token_stride", "part_stride")):
        strides = [bs, hs, ts, 0]
        strides[i] += 1
        match = rf"{name}={strides[i]} is misaligned: expected a multiple of the dtype size 2"
        with pytest.raises(ValueError, match=match):
            _C.make_view(g.c, ptrs, B, 2, 2, 1, *strides)
    with pytest.raises(ValueError, match=r"layer pointer 0 is null"):
        _C.make_view(g.c, [0] * g.num_layers, B, 2, 2, 1, bs, hs, ts, 0)
    with pytest.raises(ValueError, match=r"length mismatch: 2 layer pointers for a geometry of 3 layers"):
        _C.make_view(g.c, ptrs[:2], B, 2, 2, 1, bs, hs, ts, 0)
    scene.assert_nothing_copied()


def test_misaligned_page_buffer(scene):
    g = scene.src_view.geometry
    t = torch.full((3 * g.page_bytes + 2,), SENTINEL, dtype=torch.uint8)
    odd = t[1:] if t.data_ptr() % 2 == 0 else t[:-1]
    assert odd.data_ptr() % 2 == 1
    match = r"page buffer pointer \(0x[0-9a-f]+\) is misaligned: expected a multiple of the dtype size 2"
    with pytest.raises(ValueError, match=match):
        dynkv.PageBuffer.from_tensor(g, odd)
    match = rf"page_stride={g.page_bytes + 1} is misaligned: expected a multiple of the dtype size 2"
    with pytest.raises(ValueError, match=match):
        dynkv.PageBuffer.from_tensor(g, t[:-2], page_stride=g.page_bytes + 1)
    with pytest.raises(ValueError, match=r"page buffer pointer is null"):
        _C.make_pages(g.c, 0, 1, g.page_bytes)
    assert bool((t == SENTINEL).all())
    scene.assert_nothing_copied()


def test_page_buffer_too_small(scene):
    g = scene.src_view.geometry
    t = torch.full((4 * g.page_bytes,), SENTINEL, dtype=torch.uint8)
    small = g.page_bytes - 2
    match = rf"page buffer too small: page_stride={small} bytes but a page of this geometry needs {g.page_bytes}"
    with pytest.raises(ValueError, match=match):
        dynkv.PageBuffer.from_tensor(g, t, page_stride=small)
    for bad in (0, -g.page_bytes):
        with pytest.raises(ValueError, match=rf"page_stride={bad} is not valid: expected > 0"):
            dynkv.PageBuffer.from_tensor(g, t, page_stride=bad)
    # a tensor smaller than one page holds no page: every slot is out of range
    tiny = dynkv.PageBuffer.from_tensor(g, t[: g.page_bytes - 2])
    assert tiny.num_pages == 0
    with pytest.raises(ValueError, match=r"slots\[0\]=0 is out of range: expected \[0, 0\)"):
        dynkv.gather(scene.src_view, tiny, [0], [0])
    assert bool((t == SENTINEL).all())
    scene.assert_nothing_copied()


def test_page_tensor_not_contiguous(scene):
    g = scene.src_view.geometry
    t = torch.full((2, 4 * g.page_bytes), SENTINEL, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"page tensor must be contiguous"):
        dynkv.PageBuffer.from_tensor(g, t[:, ::2])
    with pytest.raises(ValueError, match=r"page tensor must be contiguous"):
        dynkv.PageBuffer.from_tensor(g, t.t())
    scene.assert_nothing_copied()


def test_page_buffer_from_pool_too_small(scene):
    g = scene.src_view.geometry
    with dynkv.HostPool.create(3 * g.page_bytes, pin=False) as pool:
        fit = pool.nbytes // g.page_bytes
        dynkv.PageBuffer.from_pool(g, pool, num_pages=fit)
        with pytest.raises(ValueError, match=rf"page buffer too small: {fit + 1} pages of {g.page_bytes} bytes need"):
            dynkv.PageBuffer.from_pool(g, pool, num_pages=fit + 1)
        with pytest.raises(ValueError, match=r"page buffer too small: 1 pages of"):
            dynkv.PageBuffer.from_pool(g, pool, offset=pool.nbytes - g.page_bytes + 2, num_pages=1)
        with pytest.raises(ValueError, match=rf"offset={pool.nbytes + 2} lies outside the {pool.nbytes}-byte pool"):
            dynkv.PageBuffer.from_pool(g, pool, offset=pool.nbytes + 2)
        with pytest.raises(ValueError, match=r"page buffer too small: page_stride"):
            dynkv.PageBuffer.from_pool(g, pool, page_stride=g.page_bytes - 2)
        with pytest.raises(ValueError, match=r"page buffer pointer \(0x[0-9a-f]+\) is misaligned"):
            dynkv.PageBuffer.from_pool(g, pool, offset=1)
    scene.assert_nothing_copied()


def test_bad_kv_tensors(rng):
    kv = make_rank_kv(rng, SHAPE, dims="LBHNC", form="cross", dtype=torch.bfloat16, heads=(0, 4), num_blocks=B)
    full = kv.tensors  # logical [L, B, H, N, C]
    layers = [full[l] for l in range(full.shape[0])]
    cases = [
        (lambda: dynkv.PagedView.from_tensors(full[0]), r"tensor has 4 dims but dims 'LBHNC' names 5"),
        (lambda: dynkv.PagedView.from_tensors([t[0] for t in layers]), r"tensor has 3 dims but dims 'BHNC' names 4"),
        (lambda: dynkv.PagedView.from_tensors(layers, dims="BHNX"), r"dims 'BHNX' must name each of 'BHNC' once"),
        (lambda: dynkv.PagedView.from_tensors(layers, dims="BHHC"), r"dims 'BHHC' must name each of 'BHNC' once"),
        (lambda: dynkv.PagedView.from_tensors(layers, layout="LNBHC"), r"unknown KV cache layout 'LNBHC'"),
        (lambda: dynkv.PagedView.from_tensors(layers, layout="LBHNC", dims="BHNC"), r"give dims or layout, not both"),
        (lambda: dynkv.PagedView.from_tensors([]), r"no KV cache tensors given"),
        (
            lambda: dynkv.PagedView.from_tensors(layers, block_size=8),
            r"tensors hold 4 tokens per block, expected block_size=8",
        ),
        (
            lambda: dynkv.PagedView.from_tensors([t.transpose(2, 3).contiguous() for t in layers], dims="BHCN"),
            r"content axis C must be contiguous",
        ),
        (
            lambda: dynkv.PagedView.from_tensors([layers[0], layers[1][:3]]),
            r"layer 1 has shape \(3, 4, 4, 16\).*layers must share one layout",
        ),
        (lambda: dynkv.PagedView.from_tensors([layers[0], layers[1].contiguous().float()]), r"KV tensors disagree"),
        (
            lambda: dynkv.PagedView.from_tensors(torch.zeros(257, 2, 1, 4, 4)),
            r"num_layers=257 is not valid: expected 1\.\.256",
        ),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()


def test_bad_split_kv_tensors():
    t = torch.zeros(3, 4, 5, 2, 8, dtype=torch.float16)  # K axis of size 3
    with pytest.raises(ValueError, match=r"the K/V axis has size 3: expected 2"):
        dynkv.PagedView.from_tensors([t, t], dims="KBNHD")
    t = torch.zeros(2, 4, 5, 8, 2, dtype=torch.float16)  # D strided by the H axis inside it
    with pytest.raises(ValueError, match=r"head_size axis D must be contiguous"):
        dynkv.PagedView.from_tensors([t, t], dims="KBNDH")


def test_bad_geometry():
    with pytest.raises(ValueError, match=r"elem_bytes=3 is not a dtype size: expected 1, 2, 4 or 8"):
        dynkv.PageGeometry(2, 2, 4, 12, 3)
    with pytest.raises(ValueError, match=r"token_bytes=5 is misaligned: expected a multiple of the dtype size 2"):
        dynkv.PageGeometry(2, 2, 4, 5, 2)
    for args, match in (
        ((0, 2, 4, 8, 2), r"num_layers=0 is not valid"),
        ((2, 0, 4, 8, 2), r"num_heads=0 is not valid"),
        ((2, 2, 0, 8, 2), r"block_size=0 is not valid"),
        ((2, 2, 4, 0, 2), r"token_bytes=0 is not valid"),
    ):
        with pytest.raises(ValueError, match=match):
            dynkv.PageGeometry(*args)
