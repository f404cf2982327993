"""Pages are TP-agnostic: what any TP size writes, any TP size reads.

The reference is TP=1: one engine holding every head. A producer of TP=t has
each rank gather its head slice (dynkv.head_range) into one shared page
buffer; the pages must be byte-identical to TP=1's. A consumer of another TP
size scatters each rank's slice back; each rank must end up with exactly the
heads a TP engine of that size holds: the TP=1 tensors' heads, sliced.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kvtensors import (
    SENTINEL,
    KVCache,
    Shape,
    assert_bytes_equal,
    block_choice,
    dtype_id,
    expected_gather,
    make_pages,
    make_rank_kv,
)

import dynkv

LAYOUTS = list(dynkv.layout.LAYOUTS)
L, B, P, ENTRIES = 3, 7, 6, 4


def rank_copy(
    rng: np.random.Generator,
    full: KVCache,
    shape: Shape,
    heads: tuple[int, int],
    dims: str,
    form: str,
    dtype: torch.dtype,
) -> KVCache:
    """The cache a TP rank holding ``heads`` would have for the same model state as ``full``."""
    kv = make_rank_kv(rng, shape, dims=dims, form=form, dtype=dtype, heads=heads, num_layers=L, num_blocks=B)
    src, dst = full.layers(), kv.layers()
    for l in range(L):
        for b in range(B):
            kv.set_block(dst, l, b, full.block(src, l, b)[heads[0] : heads[1]])
    return kv


def check_tp_transfer(
    rng: np.random.Generator,
    shape: Shape,
    *,
    dtype: torch.dtype,
    producer_tp: int,
    consumer_tp: int,
    layouts: tuple[str, str, str],
    forms: tuple[str, str, str] = ("cross", "layers", "layers"),
    producer_ranks: list[int] | None = None,
) -> None:
    """TP=1 pages == pages of ``producer_tp`` ranks; ``consumer_tp`` ranks load their exact slices."""
    H = shape.num_heads
    kw = dict(dtype=dtype, num_layers=L, num_blocks=B)
    full = make_rank_kv(rng, shape, dims=layouts[0], form=forms[0], heads=(0, H), **kw)
    full_view = full.view()
    g = full_view.geometry
    ids = block_choice(rng, B, ENTRIES, unique=False)
    slots = block_choice(rng, P, ENTRIES, unique=True)

    ref = make_pages(g, P)
    want = expected_gather(full, ref, 0, ids, slots)
    dynkv.gather(full_view, ref.buffer, ids, slots)
    assert_bytes_equal(ref.flat, want, "TP=1 gather")

    pages = make_pages(g, P)
    ranks = list(range(producer_tp)) if producer_ranks is None else producer_ranks
    for r in ranks:
        h0, h1 = dynkv.head_range(r, producer_tp, H)
        kv = rank_copy(rng, full, shape, (h0, h1), layouts[1], forms[1], dtype)
        view = kv.view(num_heads_total=H, head_start=h0)
        assert view.geometry == g
        # only this rank's heads of each page change; the rest keeps what other ranks wrote (or the poison)
        want = expected_gather(kv, pages, h0, ids, slots)
        dynkv.gather(view, pages.buffer, ids, slots)
        assert_bytes_equal(pages.flat, want, f"TP={producer_tp} rank {r} gather")
    assert_bytes_equal(pages.flat, ref.flat, f"pages of TP={producer_tp} vs TP=1")

    page_bytes = pages.flat.clone()
    dst = block_choice(rng, B, ENTRIES, unique=True)
    fl = full.layers()
    for r in range(consumer_tp):
        h0, h1 = dynkv.head_range(r, consumer_tp, H)
        kv = make_rank_kv(rng, shape, dims=layouts[2], form=forms[2], heads=(h0, h1), **kw)
        kv.poison()
        want = kv.snapshot()
        wl = kv.layers(want)
        for b, d in zip(ids, dst):
            for l in range(L):
                kv.set_block(wl, l, d, full.block(fl, l, b)[h0:h1])
        dynkv.scatter(pages.buffer, kv.view(num_heads_total=H, head_start=h0), slots, dst)
        assert_bytes_equal(kv.storages, want, f"TP={consumer_tp} rank {r} scatter")
    assert_bytes_equal(pages.flat, page_bytes, "pages after the consumers' scatters")


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bfloat16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_tp4_pages_equal_tp1_and_tp2_loads_its_heads(rng, layout, dtype):
    other = LAYOUTS[(LAYOUTS.index(layout) + 3) % len(LAYOUTS)]
    for shape in (Shape("h8-d16-n5", 8, 16, 5), Shape("h4-d80-n16", 4, 80, 16)):
        check_tp_transfer(rng, shape, dtype=dtype, producer_tp=4, consumer_tp=2, layouts=(layout, layout, other))
        check_tp_transfer(
            rng, shape, dtype=dtype, producer_tp=4, consumer_tp=2, layouts=(other, layout, layout),
            forms=("layers", "separate", "cross"),
        )


@pytest.mark.parametrize(
    "num_heads,producer_tp,consumer_tp",
    [(8, 2, 8), (8, 8, 1), (8, 1, 4), (4, 4, 4), (2, 4, 8), (2, 8, 1), (2, 1, 4), (4, 8, 2)],
)
def test_any_tp_to_any_tp(rng, num_heads, producer_tp, consumer_tp):
    """Including GQA replication: more ranks than KV heads (each head on tp // heads ranks)."""
    shape = Shape(f"h{num_heads}-d12-n3", num_heads, 12, 3)
    check_tp_transfer(
        rng, shape, dtype=torch.bfloat16, producer_tp=producer_tp, consumer_tp=consumer_tp,
        layouts=("LBHNC", "BLNHC", "LHBNC"), forms=("layers", "separate", "cross"),
    )


def test_gqa_replicas_one_writer_per_head(rng):
    """With replicated heads one rank per head is enough to fill the page."""
    shape = Shape("h2-d12-n3", 2, 12, 3)
    writers = [0, 2]  # ranks 0-1 hold head 0, ranks 2-3 head 1
    assert [dynkv.head_range(r, 4, 2) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    check_tp_transfer(
        rng, shape, dtype=torch.float16, producer_tp=4, consumer_tp=4, layouts=("BHLNC", "LBNHC", "BLHNC"),
        producer_ranks=writers,
    )


@pytest.mark.parametrize("consumer_tp", [1, 2, 8])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_mla_rank0_stores_every_rank_loads(rng, layout, consumer_tp):
    """MLA: H_total=1, the latent is replicated; rank 0 stores, every rank loads the same page."""
    shape = Shape("mla-576-n16", 1, 576, 16, mla=True)
    assert all(dynkv.head_range(r, 8, 1) == (0, 1) for r in range(8))
    check_tp_transfer(
        rng, shape, dtype=torch.bfloat16, producer_tp=4, consumer_tp=consumer_tp,
        layouts=(layout, layout, LAYOUTS[-1 - LAYOUTS.index(layout)]), producer_ranks=[0],
    )


def test_rank_slice_of_page_is_one_contiguous_run(rng):
    """The part of a page a rank owns is one run at head_slice(h0, h1); nothing else is written."""
    shape = Shape("h8-d16-n5", 8, 16, 5)
    for tp in (1, 2, 4, 8):
        for r in range(tp):
            h0, h1 = dynkv.head_range(r, tp, 8)
            kv = make_rank_kv(
                rng, shape, dims="BLNHC", form="layers", dtype=torch.bfloat16, heads=(h0, h1), num_layers=L,
                num_blocks=B,
            )
            view = kv.view(num_heads_total=8, head_start=h0)
            pages = make_pages(view.geometry, 1)
            dynkv.gather(view, pages.buffer, [3], [0])
            off, length = view.geometry.head_slice(h0, h1)
            assert (off, length) == (r * (8 // tp) * L * 5 * 64, (8 // tp) * L * 5 * 64)
            written = (pages.flat != SENTINEL).nonzero().flatten()
            assert int(written.min()) >= off and int(written.max()) < off + length
            assert bool((pages.flat[:off] == SENTINEL).all()) and bool((pages.flat[off + length :] == SENTINEL).all())
