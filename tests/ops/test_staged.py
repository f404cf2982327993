"""The staged copy path: page slices through a staging ring, then an on-device kernel (CPU: memcpys).

The CPU runs the same chunking over the ring as the GPU, so CI checks which
staging page each page goes through and where each rank's slice lands; the
GPU tests add the streams and events that order the two stages.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kvtensors import SHAPES, Shape, check_staged, dtype_id, make_pages, make_rank_kv

import dynkv
import dynkv._C as _C
from dynkv.memory import PageBuffer, StagingBuffer
from dynkv.ops import staged_copy_plan, staged_gather, staged_scatter

TP = [(1, 0), (2, 1), (4, 3)]


@pytest.mark.parametrize("tp", TP, ids=lambda t: f"tp{t[0]}r{t[1]}")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC", "BHLNC"])
def test_staged_matches_the_reference(rng: np.random.Generator, layout: str, shape: Shape, tp: tuple[int, int]) -> None:
    check_staged(rng, shape, dims=layout, form="cross", dtype=torch.bfloat16 if not shape.mla else torch.uint8,
                 tp=tp)


@pytest.mark.parametrize("chunk_pages,num_slots,entries", [(1, 1, 5), (2, 3, 9), (4, 2, 3), (3, 2, 12)])
@pytest.mark.parametrize("form", ["cross", "layers", "separate"])
def test_staged_ring_shapes(rng: np.random.Generator, form: str, chunk_pages: int, num_slots: int,
                            entries: int) -> None:
    """One page per chunk, a call shorter than a chunk, chunks wrapping the ring several times; padded pages."""
    check_staged(rng, SHAPES[0], dims="LBNHC", form=form, dtype=torch.float16, tp=(2, 0), chunk_pages=chunk_pages,
                 num_slots=num_slots, entries=entries, num_pages=max(entries, 6), num_blocks=max(entries, 6) + 1,
                 stride_pad=24)


def test_staging_ring_shape() -> None:
    g = dynkv.PageGeometry.for_model(num_layers=2, num_kv_heads=2, head_size=4, block_size=2, elem_bytes=2)
    ring = StagingBuffer(g, "cpu", chunk_pages=3, num_slots=2)
    assert ring.pages.num_pages == 6 and ring.nbytes == 6 * ring.pages.page_stride
    assert ring.pages.page_stride % 256 == 0 and ring.pages.page_stride >= g.page_bytes
    assert (ring.chunk_pages, ring.num_slots) == (3, 2)


@pytest.mark.parametrize("groups", [[(0, 1), (1, 2), (2, 5)], [(0, 2), (2, 4), (4, 5)], [(0, 5)],
                                    [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)], [(1, 3)]], ids=str)
@pytest.mark.parametrize("tp", [(1, 0), (4, 3)], ids=lambda t: f"tp{t[0]}r{t[1]}")
@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC"])
@pytest.mark.parametrize("order", ["shuffled", "adjacent"])
def test_staged_scatter_in_layer_groups(rng: np.random.Generator, layout: str, tp: tuple[int, int],
                                        groups: list[tuple[int, int]], order: str) -> None:
    """A layer-wise staged load: each group's slices packed in the ring, chunks of more pages than whole slices.

    Exactly the groups' layers of the chosen blocks change, to the pages' bytes; a range that covers not
    every layer leaves the others poisoned. ``adjacent``: runs of pages in adjacent host slots (one copy
    each within a chunk), broken and restarted, across chunk ends.
    """
    shape = SHAPES[0]
    h0, h1 = dynkv.head_range(tp[1], tp[0], shape.num_heads)
    kv = make_rank_kv(rng, shape, dims=layout, form="cross", dtype=torch.bfloat16, heads=(h0, h1), num_layers=5,
                      num_blocks=13)
    view = kv.view(num_heads_total=shape.num_heads, head_start=h0)
    pages = make_pages(view.geometry, 14, fill=rng)
    ring = StagingBuffer(view.geometry, "cpu", chunk_pages=2, num_slots=2)
    ring.pages.owner.fill_(0x5A)
    kv.poison()
    slots = rng.permutation(14)[:11] if order == "shuffled" else np.array([3, 4, 5, 6, 7, 0, 1, 9, 10, 11, 13])
    blocks = rng.permutation(13)[:11]
    staged_scatter(pages.buffer, view, slots, blocks, ring, groups=groups)
    reference = make_rank_kv(rng, shape, dims=layout, form="cross", dtype=torch.bfloat16, heads=(h0, h1),
                             num_layers=5, num_blocks=13)
    rview = reference.view(num_heads_total=shape.num_heads, head_start=h0)
    reference.poison()
    for begin, end in groups:
        dynkv.scatter(pages.buffer, rview, slots, blocks, layers=(begin, end))
    want = reference.snapshot()
    assert all(torch.equal(a, b) for a, b in zip(kv.storages, want))


@pytest.mark.parametrize("tp", [(1, 0), (4, 3)], ids=lambda t: f"tp{t[0]}r{t[1]}")
def test_staged_copies_join_adjacent_slots_within_a_chunk_and_a_registration(rng: np.random.Generator,
                                                                             tp: tuple[int, int]) -> None:
    """Pages in adjacent host slots go as one copy per group and chunk, split where a pinned registration
    begins (the copy engines refuse a copy across two); the load is still the reference's."""
    shape = SHAPES[0]
    h0, h1 = dynkv.head_range(tp[1], tp[0], shape.num_heads)
    kv = make_rank_kv(rng, shape, dims="LBHNC", form="cross", dtype=torch.bfloat16, heads=(h0, h1), num_layers=5,
                      num_blocks=13)
    view = kv.view(num_heads_total=shape.num_heads, head_start=h0)
    whole = make_pages(view.geometry, 14, fill=rng)
    g = view.geometry
    # Registrations of 4 pages, the first holding 3 of these: slots 3, 7 and 11 each begin one.
    c = _C.make_pages(g.c, whole.buffer.c.base, 14, whole.buffer.c.page_stride, reg_pages=4, reg_phase=1)
    pages = PageBuffer(g, c, whole.buffer.device, False, whole.buffer.owner)
    ring = StagingBuffer(g, "cpu", chunk_pages=2, num_slots=2)
    groups = [(0, 2), (2, 4), (4, 5)]
    slots = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 13])
    plan = staged_copy_plan(pages, view, slots, ring, groups=groups)
    for gi in range(len(groups)):
        ops = [(first, n, rows) for grp, first, n, rows in plan if grp == gi]
        assert [s for first, n, _ in ops for s in range(first, first + n)] == slots.tolist()  # in order, each once
        assert all(rows == h1 - h0 for *_, rows in ops)
        for first, n, _ in ops:  # no copy runs into a registration that begins after its first page
            assert not any((s + 1) % 4 == 0 for s in range(first + 1, first + n)), (gi, first, n)
        assert {3, 7, 12} <= {first for first, _, _ in ops}  # registration starts and the gap begin copies
        assert max(n for _, n, _ in ops) > 1  # and adjacent pages did join
    shuffled = staged_copy_plan(pages, view, [5, 0, 9, 2, 11], ring, groups=groups)
    assert [n for *_, n, _ in shuffled] == [1] * 15
    assert all((n, rows) == (1, 1) for _, _, n, rows in staged_copy_plan(pages, view, slots, ring))  # whole slices
    kv.poison()
    blocks = rng.permutation(13)[:11]
    staged_scatter(pages, view, slots, blocks, ring, groups=groups)
    reference = make_rank_kv(rng, shape, dims="LBHNC", form="cross", dtype=torch.bfloat16, heads=(h0, h1),
                             num_layers=5, num_blocks=13)
    rview = reference.view(num_heads_total=shape.num_heads, head_start=h0)
    reference.poison()
    dynkv.scatter(whole.buffer, rview, slots, blocks)
    want = reference.snapshot()
    assert all(torch.equal(a, b) for a, b in zip(kv.storages, want))
    with pytest.raises(ValueError, match="reg_phase=4 is not valid"):
        _C.make_pages(g.c, whole.buffer.c.base, 14, whole.buffer.c.page_stride, reg_pages=4, reg_phase=4)


def _whole_rank(rng: np.random.Generator, *, num_layers: int, num_blocks: int):
    """One rank holding every head (LBHNC, bf16), as many host pages as blocks, a ring of 2 slots of 2 pages."""
    kv = make_rank_kv(rng, SHAPES[0], dims="LBHNC", form="cross", dtype=torch.bfloat16, heads=(0, 4),
                      num_layers=num_layers, num_blocks=num_blocks)
    view = kv.view(num_heads_total=4)
    pages = make_pages(view.geometry, num_blocks, fill=rng)
    return kv, view, pages, StagingBuffer(view.geometry, "cpu", chunk_pages=2, num_slots=2)


def test_staged_scatter_calls_after_once_each_group_is_in(rng: np.random.Generator) -> None:
    """``after(i)`` runs once per group, in order, when the group's layers have landed (CPU: copied); an
    exception it raises stops the scatter there and reaches the caller."""
    kv, view, pages, ring = _whole_rank(rng, num_layers=5, num_blocks=8)
    slots, blocks = [6, 1, 3, 0, 5], [2, 7, 0, 4, 1]
    groups = [(0, 2), (2, 3), (3, 5)]
    reference = make_rank_kv(rng, SHAPES[0], dims="LBHNC", form="cross", dtype=torch.bfloat16, heads=(0, 4),
                             num_layers=5, num_blocks=8)
    rview = reference.view(num_heads_total=4)
    reference.poison()
    dynkv.scatter(pages.buffer, rview, slots, blocks)
    want = reference.snapshot()
    kv.poison()
    poisoned = kv.snapshot()
    seen: list[int] = []

    def after(i: int) -> None:  # group i's layers are in, the next group's are not yet
        seen.append(i)
        now, ref, old = kv.layers(), kv.layers(want), kv.layers(poisoned)
        for layer in range(5):
            landed = torch.equal(now[layer], ref[layer])
            assert landed == (layer < groups[i][1]), (i, layer)
            assert landed or torch.equal(now[layer], old[layer])

    staged_scatter(pages.buffer, view, slots, blocks, ring, groups=groups, after=after)
    assert seen == [0, 1, 2]
    kv.poison()

    def stop(i: int) -> None:
        seen.append(i)
        if i == 1:
            raise RuntimeError("stop after group 1")

    seen.clear()
    with pytest.raises(RuntimeError, match="stop after group 1"):
        staged_scatter(pages.buffer, view, slots, blocks, ring, groups=groups, after=stop)
    assert seen == [0, 1]
    assert torch.equal(kv.layers()[4], kv.layers(poisoned)[4])  # group 2 never ran


def test_group_signal_counts_issued_groups_across_threads(rng: np.random.Generator) -> None:
    """A GroupSignal as ``after``: set for each group without the GIL; a waiter in another thread wakes for the
    group it waits for, and set_all ends every wait (a launch that failed)."""
    import threading

    _, view, pages, ring = _whole_rank(rng, num_layers=4, num_blocks=6)
    signal = dynkv.ops.GroupSignal(4)
    assert (signal.issued, signal.num_groups) == (0, 4)
    woke: list[int] = []
    waiter = threading.Thread(target=lambda: (signal.wait(3), woke.append(signal.issued)))
    waiter.start()
    waiter.join(timeout=0.2)
    assert waiter.is_alive() and woke == [], "nothing is issued yet: the waiter blocks"
    staged_scatter(pages.buffer, view, [0, 1, 2], [3, 4, 5], ring, groups=[(0, 1), (1, 2), (2, 3), (3, 4)],
                   after=signal)
    waiter.join(timeout=30)
    assert woke == [4] and signal.issued == 4
    failed = dynkv.ops.GroupSignal(5)
    failed.set(1)
    assert failed.issued == 2
    late = threading.Thread(target=failed.wait, args=(4,))
    late.start()
    late.join(timeout=0.2)
    assert late.is_alive(), "group 4 is not issued: the waiter blocks"
    failed.set_all()
    late.join(timeout=30)
    assert not late.is_alive() and failed.issued == 5


def test_staged_layer_groups_are_checked(rng: np.random.Generator) -> None:
    shape = SHAPES[0]
    kv = make_rank_kv(rng, shape, dims="LBHNC", form="cross", dtype=torch.bfloat16, heads=(0, 4), num_layers=3,
                      num_blocks=4)
    view = kv.view(num_heads_total=4)
    pages = make_pages(view.geometry, 4, fill=rng)
    ring = StagingBuffer(view.geometry, "cpu", chunk_pages=1, num_slots=2)
    before = kv.snapshot()
    for bad in ((2, 2), (-1, 1), (0, 4)):
        with pytest.raises(ValueError, match="is not a range of the view's 3 layers"):
            staged_scatter(pages.buffer, view, [0, 1], [0, 1], ring, groups=[(0, 1), bad])
    assert all(torch.equal(a, b) for a, b in zip(kv.storages, before))


def test_staged_bad_input_is_refused_before_any_byte_moves(rng: np.random.Generator) -> None:
    shape = SHAPES[0]
    kv = make_rank_kv(rng, shape, dims="LBHNC", form="cross", dtype=torch.bfloat16, heads=(0, 4), num_blocks=6)
    view = kv.view(num_heads_total=4)
    pages = make_pages(view.geometry, 6, fill=rng)
    ring = StagingBuffer(view.geometry, "cpu", chunk_pages=2, num_slots=2)
    before_kv, before_pages = kv.snapshot(), pages.flat.clone()
    with pytest.raises(ValueError, match=r"slots\[1\]=6 is out of range"):
        staged_scatter(pages.buffer, view, [0, 6], [0, 1], ring)
    with pytest.raises(ValueError, match=r"block_ids has 1 more than once"):
        staged_scatter(pages.buffer, view, [0, 1], [1, 1], ring)
    with pytest.raises(ValueError, match="length mismatch"):
        staged_scatter(pages.buffer, view, [0, 1, 2], [0, 1], ring)
    with pytest.raises(ValueError, match=r"slots has 2 more than once"):
        staged_gather(view, pages.buffer, [0, 1], [2, 2], ring)
    with pytest.raises(ValueError, match="events are recorded on a GPU stream"):
        staged_scatter(pages.buffer, view, [0], [0], ring, events=[object()])
    other = dynkv.PageGeometry.for_model(num_layers=3, num_kv_heads=4, head_size=8, block_size=16, elem_bytes=2)
    with pytest.raises(ValueError, match="geometries differ"):
        staged_scatter(pages.buffer, view, [0], [0], StagingBuffer(other, "cpu"))
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="expected an integer >= 1"):
            StagingBuffer(view.geometry, "cpu", chunk_pages=bad)
    assert all(torch.equal(a, b) for a, b in zip(kv.storages, before_kv))
    assert torch.equal(pages.flat, before_pages)


# ------------------------------------------------------------------------------------------------ GPU


def _gpu_pages(geometry: dynkv.PageGeometry, num_pages: int, **kw):
    return make_pages(geometry, num_pages, pin=True, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("tp", TP, ids=lambda t: f"tp{t[0]}r{t[1]}")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.uint8, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("layout", ["LBHNC", "LBNHC", "BLHNC", "BHLNC"])
def test_gpu_staged_matches_the_reference(rng: np.random.Generator, layout: str, dtype: torch.dtype, shape: Shape,
                                          tp: tuple[int, int]) -> None:
    check_staged(rng, shape, dims=layout, form="layers", dtype=dtype, tp=tp, device="cuda",
                 page_maker=_gpu_pages, sync=torch.cuda.synchronize, events=3)


@pytest.mark.gpu
def test_gpu_staged_joined_copies_stop_at_pinned_registrations(rng: np.random.Generator) -> None:
    """A pool pinned in registrations of 4 pages, a layer-wise load through runs of adjacent slots across
    them: each registration's pages go as their own copies, and the blocks get the reference's bytes."""
    from dynkv.memory import HostPool

    shape = SHAPES[0]
    kv = make_rank_kv(rng, shape, dims="LBHNC", form="cross", dtype=torch.bfloat16, heads=(0, 4), num_layers=6,
                      num_blocks=20, device="cuda")
    view = kv.view(num_heads_total=4)
    g = view.geometry
    with HostPool.create(16 * g.page_bytes, pin=True, chunk_bytes=4 * g.page_bytes) as pool:
        pages = PageBuffer.from_pool(g, pool, offset=g.page_bytes, num_pages=15)
        assert (pages.c.reg_pages, pages.c.reg_phase) == (4, 1)
        host = pool.as_tensor()
        host.copy_(torch.from_numpy(rng.integers(0, 256, host.numel(), dtype=np.uint8)))
        ring = StagingBuffer(g, "cuda", chunk_pages=4, num_slots=2)
        slots = np.arange(1, 14)
        blocks = rng.permutation(20)[:13]
        groups = [(0, 2), (2, 4), (4, 6)]
        plan = staged_copy_plan(pages, view, slots, ring, groups=groups)
        assert max(n for _, _, n, _ in plan) > 1
        assert all((s + 1) % 4 for _, first, n, _ in plan for s in range(first + 1, first + n))
        events = [torch.cuda.Event() for _ in groups]
        for ev in events:
            ev.record()
        kv.poison()
        staged_scatter(pages, view, slots, blocks, ring, groups=groups, events=events)
        torch.cuda.synchronize()
        got = kv.snapshot()
        kv.poison()
        dynkv.scatter(pages, view, slots, blocks)
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip(got, kv.snapshot()))


@pytest.mark.gpu
@pytest.mark.parametrize("chunk_pages,num_slots,entries", [(1, 1, 7), (2, 3, 11), (8, 2, 40)])
def test_gpu_staged_ring_wraps(rng: np.random.Generator, chunk_pages: int, num_slots: int, entries: int) -> None:
    """Chunks reuse each slot only after the previous user of that slot is done with it (events, not syncs)."""
    check_staged(rng, SHAPES[0], dims="LBNHC", form="cross", dtype=torch.bfloat16, tp=(2, 1), device="cuda",
                 page_maker=_gpu_pages, sync=torch.cuda.synchronize, chunk_pages=chunk_pages, num_slots=num_slots,
                 entries=entries, num_pages=entries + 3, num_blocks=entries + 2, stride_pad=4096 - 40)


@pytest.mark.gpu
def test_gpu_staged_refuses_pageable_pages_and_a_ring_elsewhere(rng: np.random.Generator) -> None:
    kv = make_rank_kv(rng, SHAPES[0], dims="LBHNC", form="cross", dtype=torch.bfloat16, heads=(0, 4),
                      num_blocks=4, device="cuda")
    view = kv.view(num_heads_total=4)
    pageable = make_pages(view.geometry, 4, fill=rng)
    ring = StagingBuffer(view.geometry, "cuda", chunk_pages=2, num_slots=2)
    with pytest.raises(ValueError, match="pageable host memory"):
        staged_scatter(pageable.buffer, view, [0], [0], ring)
    with pytest.raises(ValueError, match="the staging buffer is on cpu"):
        staged_scatter(_gpu_pages(view.geometry, 4, fill=rng).buffer, view, [0], [0],
                       StagingBuffer(view.geometry, "cpu"))
    device_pages = make_pages(view.geometry, 4, fill=rng, device="cuda")
    with pytest.raises(ValueError, match="moves host pages"):
        staged_gather(view, device_pages.buffer, [0], [0], ring)
