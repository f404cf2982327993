"""CPU copy engine: gather, scatter and copy_blocks, byte-exact, over every layout.

The matrix: six stride orders x cross-layer / per-layer tensors x 1-, 2- and
4-byte dtypes x shapes (odd head sizes and block sizes, MLA) x TP head slices.
The CPU path runs the same index math as the CUDA kernels (geometry.h), so
this is the CI check of the addresses the GPU computes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from kvtensors import (
    FORMS,
    SENTINEL,
    SHAPES,
    SPLIT_DIMS_CROSS,
    SPLIT_DIMS_PER_LAYER,
    Pages,
    Shape,
    all_dtypes,
    assert_bytes_equal,
    check_copy_blocks,
    check_gather_scatter,
    check_layer_ranges,
    dtype_id,
    elem_size,
    expected_gather,
    expected_scatter,
    make_kv,
    make_pages,
    make_rank_kv,
)

import dynkv

LAYOUTS = list(dynkv.layout.LAYOUTS)
DTYPES = all_dtypes()
# (tp_size, rank): the whole model, a middle slice, the last slice (GQA-replicated where tp > heads)
TP = [(1, 0), (2, 1), (4, 3)]


def tp_id(tp: tuple[int, int]) -> str:
    return f"tp{tp[0]}r{tp[1]}"


@pytest.mark.parametrize("tp", TP, ids=tp_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("form", ["cross", "layers"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gather_scatter_matrix(rng, layout, form, dtype, shape, tp):
    check_gather_scatter(rng, shape, dims=layout, form=form, dtype=dtype, tp=tp)


@pytest.mark.parametrize("tp", [(1, 0), (4, 3)], ids=tp_id)
@pytest.mark.parametrize("form", ["cross", "layers"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layer_ranges(rng, layout, form, tp):
    """Layer ranges (layer-by-layer loads): only those layers move; groups in order equal one scatter."""
    check_layer_ranges(rng, SHAPES[1], dims=layout, form=form, dtype=torch.bfloat16, tp=tp)
    check_layer_ranges(rng, SHAPES[3], dims=layout, form=form, dtype=torch.uint8, tp=tp)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("form", ["cross_layout", "layers_layout", "separate"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gather_scatter_forms(rng, layout, form, dtype):
    """Physical-order tensors with layout=, and one allocation per layer."""
    for shape, tp in ((SHAPES[0], (2, 0)), (SHAPES[1], (4, 2)), (SHAPES[3], (2, 1))):
        check_gather_scatter(rng, shape, dims=layout, form=form, dtype=dtype, tp=tp)


@pytest.mark.parametrize("form", ["cross", "layers", "separate"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_padded_tokens_and_pages(rng, layout, form):
    """Padding after each token's C and between pages is never written."""
    for dtype, pad, stride_pad in ((torch.bfloat16, 3, 2), (torch.float32, 1, 64), (torch.uint8, 5, 4099)):
        check_gather_scatter(
            rng, SHAPES[1], dims=layout, form=form, dtype=dtype, tp=(1, 0), pad=pad,
            stride_pad=stride_pad * elem_size(dtype),
        )


@pytest.mark.parametrize("tp", [(1, 0), (4, 1)], ids=tp_id)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.bfloat16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize(
    "dims,form",
    [(d, f) for d in SPLIT_DIMS_PER_LAYER for f in ("separate", "layers")] + [(d, "cross") for d in SPLIT_DIMS_CROSS],
)
def test_split_kv(rng, dims, form, dtype, tp):
    """Split K/V tensors (flash-attn's (2, B, N, H, D) and friends) with dims=."""
    for shape in SHAPES[:2]:
        check_gather_scatter(rng, shape, dims=dims, form=form, dtype=dtype, tp=tp)
    check_gather_scatter(rng, SHAPES[1], dims=dims, form=form, dtype=dtype, tp=tp, pad=2)


@pytest.mark.parametrize("dims", SPLIT_DIMS_PER_LAYER + SPLIT_DIMS_CROSS)
def test_split_kv_page_is_k_then_v(rng, dims):
    """A page of a split cache equals the page of a packed cache holding [K | V] per token."""
    shape, dtype, L, B = SHAPES[0], torch.bfloat16, 2, 5
    form = "cross" if dims in SPLIT_DIMS_CROSS else "separate"
    kw = dict(dtype=dtype, heads=(0, 4), num_layers=L, num_blocks=B)
    split = make_rank_kv(rng, shape, dims=dims, form=form, **kw)
    packed = make_rank_kv(rng, shape, dims="LBHNC", form="layers", **kw)
    sl, pl = split.layers(), packed.layers()
    d = shape.head_size * elem_size(dtype)
    for l in range(L):
        pl[l].copy_(torch.cat([sl[l][:, 0], sl[l][:, 1]], dim=-1))
        assert torch.equal(pl[l][..., :d], sl[l][:, 0]) and torch.equal(pl[l][..., d:], sl[l][:, 1])
    g = split.view().geometry
    assert g == packed.view().geometry
    a, b = make_pages(g, B), make_pages(g, B)
    ids = list(range(B))
    dynkv.gather(split.view(), a.buffer, ids, ids)
    dynkv.gather(packed.view(), b.buffer, ids, ids)
    assert_bytes_equal(a.flat, b.flat, "split vs packed pages")


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bfloat16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("dst_layout", LAYOUTS)
@pytest.mark.parametrize("src_layout", LAYOUTS)
def test_copy_blocks_across_layouts(rng, src_layout, dst_layout, dtype):
    for i, shape in enumerate(SHAPES):
        forms = ("cross", "layers") if i % 2 else ("layers", "separate")
        check_copy_blocks(rng, shape, src=(src_layout, forms[0]), dst=(dst_layout, forms[1]), dtype=dtype, tp=(2, 1))


@pytest.mark.parametrize(
    "src,dst", [(("LKBNHD", "separate"), ("LBNHC", "layers")), (("BHLNC", "cross"), ("LBKHND", "layers"))]
)
def test_copy_blocks_split_and_packed(rng, src, dst):
    check_copy_blocks(rng, SHAPES[0], src=src, dst=dst, dtype=torch.float16, tp=(4, 3))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_copy_blocks_within_one_cache(rng, layout):
    """Block to block inside one cache (disjoint source and destination blocks)."""
    kv = make_rank_kv(rng, SHAPES[0], dims=layout, form="layers", dtype=torch.bfloat16, heads=(0, 4), num_blocks=8)
    perm = [int(x) for x in rng.permutation(8)]
    src_ids, dst_ids = perm[:3], perm[3:6]
    before = kv.snapshot()
    lb = kv.layers(before)
    want = kv.snapshot()
    lw = kv.layers(want)
    for a, b in zip(src_ids, dst_ids):
        for l in range(3):
            kv.set_block(lw, l, b, kv.block(lb, l, a))
    view = kv.view()
    dynkv.copy_blocks(view, view, src_ids, dst_ids)
    assert_bytes_equal(kv.storages, want, "copy_blocks in place")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_large_transfer_uses_thread_pool(rng, layout):
    """Over 1 MiB: the copy is split over the CPU pool (and byte ranges split inside runs)."""
    shape = Shape("h8-d128-n16", num_heads=8, head_size=128, block_size=16)
    for threads in (None, 1, dynkv._C.max_cpu_threads()):
        check_gather_scatter(
            rng, shape, dims=layout, form="layers", dtype=torch.bfloat16, tp=(1, 0), num_layers=2,
            num_blocks=10, num_pages=8, entries=6, threads=threads,
        )


@pytest.mark.parametrize(
    "conv",
    [
        tuple,
        np.array,
        lambda x: np.array(x, dtype=np.int32),
        lambda x: np.array(x, dtype=np.uint16),
        torch.tensor,
        lambda x: torch.tensor(x, dtype=torch.int32),
    ],
    ids=["tuple", "int64-array", "int32-array", "uint16-array", "int64-tensor", "int32-tensor"],
)
def test_id_list_types(rng, conv):
    kv = make_rank_kv(rng, SHAPES[0], dims="LBNHC", form="layers", dtype=torch.float16, heads=(0, 4))
    view = kv.view()
    ids, slots = [5, 0, 3], [1, 4, 2]
    p = make_pages(view.geometry, 5)
    want = expected_gather(kv, p, 0, ids, slots)
    dynkv.gather(view, p.buffer, conv(ids), conv(slots))
    assert_bytes_equal(p.flat, want, "gather")
    back = make_rank_kv(rng, SHAPES[0], dims="BHLNC", form="cross", dtype=torch.float16, heads=(0, 4))
    back.poison()
    want = expected_scatter(p, back, 0, slots, ids)
    dynkv.scatter(p.buffer, back.view(), conv(slots), conv(ids))
    assert_bytes_equal(back.storages, want, "scatter")


def test_empty_id_lists_copy_nothing(rng):
    kv = make_rank_kv(rng, SHAPES[0], dims="LBHNC", form="cross", dtype=torch.bfloat16, heads=(0, 4))
    view = kv.view()
    p = make_pages(view.geometry, 2)
    before = kv.snapshot()
    for empty in ([], np.array([], dtype=np.int64), torch.tensor([], dtype=torch.int64)):
        dynkv.gather(view, p.buffer, empty, empty)
        dynkv.scatter(p.buffer, view, empty, empty)
        dynkv.copy_blocks(view, view, empty, empty)
    assert bool((p.flat == SENTINEL).all())
    assert_bytes_equal(kv.storages, before, "KV after empty ops")


def test_page_tensor_of_any_dtype(rng):
    """PageBuffer.from_tensor takes a tensor of any dtype; pages are its bytes."""
    kv = make_rank_kv(rng, SHAPES[1], dims="BLNHC", form="layers", dtype=torch.bfloat16, heads=(0, 2))
    view = kv.view()
    g = view.geometry
    t = torch.full((4 * g.page_bytes // 4,), float("nan"), dtype=torch.float32)
    buf = dynkv.PageBuffer.from_tensor(g, t)
    assert buf.num_pages == 4
    pages = Pages(g, t.view(torch.uint8), 4, g.page_bytes, buf)
    ids, slots = [1, 2], [3, 0]
    want = expected_gather(kv, pages, 0, ids, slots)
    dynkv.gather(view, buf, ids, slots)
    assert_bytes_equal(pages.flat, want, "float32 page tensor")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    layout=st.sampled_from(LAYOUTS + list(SPLIT_DIMS_PER_LAYER)),
    form=st.sampled_from(FORMS),
    dtype=st.sampled_from(DTYPES),
    heads=st.sampled_from([1, 2, 3, 4, 6, 8]),
    tp=st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16]),
    head_size=st.integers(1, 40),
    block_size=st.integers(1, 9),
    num_layers=st.integers(1, 4),
    num_blocks=st.integers(1, 7),
    pad=st.integers(0, 3),
    stride_pad=st.integers(0, 9),
    mla=st.booleans(),
)
def test_random_geometry(
    seed, layout, form, dtype, heads, tp, head_size, block_size, num_layers, num_blocks, pad, stride_pad, mla
):
    """Any geometry, layout, form and TP slicing (hypothesis shrinks a failure to its smallest case)."""
    split = "K" in layout
    if split:
        form = form if form in ("cross", "layers", "separate") else "layers"
        mla = False
    heads = 1 if mla else heads
    assume(heads % tp == 0 or tp % heads == 0)  # what vLLM accepts (head_range refuses the rest)
    rank = seed % tp
    shape = Shape("random", num_heads=heads, head_size=head_size, block_size=block_size, mla=mla)
    entries = min(num_blocks, 3)
    check_gather_scatter(
        np.random.default_rng(seed), shape, dims=layout, form=form, dtype=dtype, tp=(tp, rank), pad=pad,
        stride_pad=stride_pad * elem_size(dtype), num_layers=num_layers, num_blocks=num_blocks,
        num_pages=entries + 1, entries=entries,
    )


def test_kv_builder_covers_every_byte(rng):
    """The builder's byte views are the tensors' bytes, and cover every non-padding byte once."""
    for layout in LAYOUTS + ["LKBNHD"]:
        for form in ("cross", "layers", "separate"):
            kv = make_kv(
                rng, dims=layout, form=form, dtype=torch.bfloat16, num_layers=2, num_blocks=3, num_heads=2,
                block_size=3, content=4, pad=1,
            )
            if not kv.split:  # packed tensors are handed over in logical order: compare as bytes
                for t, lv in zip(kv.tensors, kv.layers()):
                    assert torch.equal(t.view(torch.uint8), lv)
            kv.poison()
            for lv in kv.layers():
                assert bool((lv == SENTINEL).all())
                lv.zero_()
            pad_bytes = sum(int((s == SENTINEL).sum()) for s in kv.storages)
            total = sum(s.numel() for s in kv.storages)
            assert pad_bytes * 5 == total, (layout, form)  # one padding element per four content elements


def test_stores_split_into_bounded_launches_by_default() -> None:
    """Stores run beside later steps' compute, in launches a GEMM can wait out; loads go in one launch."""
    from dynkv import ops

    saved = ops.get_tuning()
    try:
        assert saved.for_direction("d2h")[3] == 2 << 20 and saved.for_direction("h2d")[3] == 0
        t = ops.set_tuning(launch_bytes=1 << 16)
        assert {d: t.for_direction(d)[3] for d in ("h2d", "d2h", "d2d", "h2h")} == dict.fromkeys(
            ("h2d", "d2h", "d2d", "h2h"), 1 << 16)
        t = ops.set_tuning(launch_bytes={**saved.launch_bytes, "d2h": 0})
        assert t.for_direction("d2h")[3] == 0 and t.ctas == saved.ctas
        t = ops.set_tuning(smem_bytes=1 << 10, threads={"h2d": 1024})
        assert t.for_direction("h2d")[1::3] == (1024, 1 << 10) and t.for_direction("d2h")[1::3] == (512, 1 << 10)
    finally:
        ops.set_tuning(launch_bytes=saved.launch_bytes, smem_bytes=saved.smem_bytes, threads=saved.threads)
    assert ops.get_tuning() == saved
