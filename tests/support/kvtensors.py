"""vLLM-style KV caches and pure-torch references for the copy-engine tests.

A KV cache is built the way vLLM allocates one: contiguous storage in one
physical order (one of the six ``LAYOUTS``, or a split K/V order such as
flash-attn's ``KBNHD``), handed to ``PagedView.from_tensors`` as vLLM would hand
it to the connector. Storage is filled with random bytes. Every check compares
raw bytes of whole storages (padding included) against a reference built with
plain torch indexing on a clone, so "written bytes equal the source" and "every
other byte is untouched" are one ``torch.equal``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

import dynkv

SENTINEL = 0xFF

# Forms in which vLLM hands KV tensors over.
#   cross:         one 5-D logical [L, B, H, N, C] tensor (register_cross_layers_kv_cache)
#   cross_layout:  the same storage in its physical order, with layout=<name>
#   layers:        per-layer logical [B, H, N, C] views of one cross-layer buffer
#   layers_layout: per-layer views in physical order, with layout=<name>
#   separate:      one allocation per layer (register_kv_caches), logical views
FORMS = ("cross", "cross_layout", "layers", "layers_layout", "separate")

# Split K/V orders (K: the K/V axis of size 2, D: head_size), L included as
# for make_kv. Per layer (L outermost, dropped for per-layer tensors):
# flash-attn's (2, B, N, H, D), FlashInfer's (B, 2, N, H, D) and (B, 2, H, N, D),
# and (2, B, H, N, D). Cross-layer tensors with L inside.
SPLIT_DIMS_PER_LAYER = ("LKBNHD", "LBKNHD", "LBKHND", "LKBHND")
SPLIT_DIMS_CROSS = ("BLKHND", "KLBNHD")


def all_dtypes() -> list[torch.dtype]:
    """One-, two- and four-byte dtypes; float8 where this torch has it."""
    out = [torch.uint8]
    if hasattr(torch, "float8_e4m3fn"):
        out.append(torch.float8_e4m3fn)
    return out + [torch.float16, torch.bfloat16, torch.float32]


def elem_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def random_bytes(rng: np.random.Generator, n: int, device: Any = "cpu") -> torch.Tensor:
    return torch.from_numpy(rng.integers(0, 256, size=n, dtype=np.uint8)).to(device)


def _perm(src: str, dst: str) -> list[int]:
    return [src.index(a) for a in dst]


@dataclass(frozen=True)
class Shape:
    """Model geometry of a test case (the whole model, all TP ranks)."""

    name: str
    num_heads: int  # H_total
    head_size: int  # K/V head size, or the latent size for MLA
    block_size: int
    mla: bool = False

    def content(self) -> int:
        """Elements per token of one head: K and V packed, or the latent."""
        return self.head_size if self.mla else 2 * self.head_size

    def __str__(self) -> str:
        return self.name


SHAPES = (
    Shape("gqa-h4-d80-n16", num_heads=4, head_size=80, block_size=16),
    Shape("h2-d5-n3", num_heads=2, head_size=5, block_size=3),
    Shape("mla-576-n16", num_heads=1, head_size=576, block_size=16, mla=True),
    Shape("mla-7-n3", num_heads=1, head_size=7, block_size=3, mla=True),
)


@dataclass
class KVCache:
    """One rank's KV cache: storage, the tensors vLLM would pass, and byte views for checks."""

    storages: list[torch.Tensor]  # flat uint8; every byte the cache owns, padding included
    tensors: torch.Tensor | list[torch.Tensor]
    kwargs: dict[str, Any]  # dims= or layout= for PagedView.from_tensors
    split: bool
    num_heads: int  # this rank's heads
    _layers: Callable[[Sequence[torch.Tensor]], list[torch.Tensor]] = field(repr=False)

    def view(self, *, num_heads_total: int | None = None, head_start: int = 0, **kw: Any) -> dynkv.PagedView:
        return dynkv.PagedView.from_tensors(
            self.tensors, num_heads_total=num_heads_total, head_start=head_start, **self.kwargs, **kw
        )

    def layers(self, storages: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Per-layer uint8 views in logical order, over ``storages`` (default: this cache's).

        Packed: ``[B, H, N, C_bytes]``; split: ``[B, 2, H, N, D_bytes]``.
        """
        return self._layers(self.storages if storages is None else storages)

    def snapshot(self) -> list[torch.Tensor]:
        return [s.clone() for s in self.storages]

    def poison(self) -> None:
        for s in self.storages:
            s.fill_(SENTINEL)

    def block(self, layers: Sequence[torch.Tensor], layer: int, block: int) -> torch.Tensor:
        """Packed bytes ``[H, N, C_bytes]`` of one (layer, block); split K/V reads as K then V."""
        t = layers[layer][block]
        return torch.cat([t[0], t[1]], dim=-1) if self.split else t

    def set_block(self, layers: Sequence[torch.Tensor], layer: int, block: int, x: torch.Tensor) -> None:
        t = layers[layer][block]
        if self.split:
            d = t.shape[-1]
            t[0].copy_(x[..., :d])
            t[1].copy_(x[..., d:])
        else:
            t.copy_(x)


def make_kv(
    rng: np.random.Generator,
    *,
    dims: str,
    form: str,
    dtype: torch.dtype,
    num_layers: int,
    num_blocks: int,
    num_heads: int,
    block_size: int,
    content: int,
    pad: int = 0,
    device: Any = "cpu",
) -> KVCache:
    """Build a KV cache filled with random bytes.

    Parameters
    ----------
    dims
        Physical order, L included: a layout name from ``LAYOUTS`` (packed K/V,
        axes LBHNC) or a split order over L, B, K, H, N, D.
    form
        One of ``FORMS``; split caches take ``cross``, ``layers`` or ``separate``
        and are always passed in physical order with ``dims=``.
    content
        Elements of the innermost axis: C (packed) or D (split).
    pad
        Extra elements allocated after each innermost run (never part of the
        KV; they must stay untouched).
    """
    split = "K" in dims
    logical = "LBKHND" if split else "LBHNC"
    if sorted(dims) != sorted(logical) or dims[-1] != logical[-1]:
        raise ValueError(f"bad test dims {dims!r}")
    if split and form not in ("cross", "layers", "separate"):
        raise ValueError(f"split K/V caches take no layout= form, got {form!r}")
    sizes = {"L": num_layers, "B": num_blocks, "K": 2, "H": num_heads, "N": block_size, "C": content, "D": content}
    e = elem_size(dtype)
    logical_layer = logical[1:]

    def alloc(phys: str) -> tuple[torch.Tensor, list[int]]:
        shape = [sizes[a] for a in phys]
        shape[-1] += pad
        return random_bytes(rng, math.prod(shape) * e, device), shape

    def typed(s: torch.Tensor, shape: list[int]) -> torch.Tensor:
        return s.view(dtype).view(shape)[..., :content]

    def as_bytes(s: torch.Tensor, shape: list[int]) -> torch.Tensor:
        return s.view([*shape[:-1], shape[-1] * e])[..., : content * e]

    if form == "separate":
        phys = dims.replace("L", "")
        allocs = [alloc(phys) for _ in range(num_layers)]
        storages = [s for s, _ in allocs]
        shapes = [shape for _, shape in allocs]
        per_layer = [typed(s, shape) for s, shape in allocs]

        def layers_sep(st: Sequence[torch.Tensor]) -> list[torch.Tensor]:
            return [as_bytes(s, shape).permute(_perm(phys, logical_layer)) for s, shape in zip(st, shapes)]

        if split:
            tensors, kwargs = per_layer, {"dims": phys}
        else:
            tensors, kwargs = [t.permute(_perm(phys, logical_layer)) for t in per_layer], {}
        return KVCache(storages, tensors, kwargs, split, num_heads, layers_sep)

    storage, shape = alloc(dims)
    full = typed(storage, shape)
    li = dims.index("L")
    phys_layer = dims.replace("L", "")

    def layers_cross(st: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        b = as_bytes(st[0], shape)
        return [b.select(li, l).permute(_perm(phys_layer, logical_layer)) for l in range(num_layers)]

    if split:
        if form == "cross":
            tensors, kwargs = full, {"dims": dims}
        else:
            tensors, kwargs = [full.select(li, l) for l in range(num_layers)], {"dims": phys_layer}
    elif form == "cross":
        tensors, kwargs = full.permute(_perm(dims, logical)), {}
    elif form == "cross_layout":
        tensors, kwargs = full, {"layout": dims}
    elif form == "layers":
        lg = full.permute(_perm(dims, logical))
        tensors, kwargs = [lg[l] for l in range(num_layers)], {}
    elif form == "layers_layout":
        tensors, kwargs = [full.select(li, l) for l in range(num_layers)], {"layout": dims}
    else:
        raise ValueError(f"unknown form {form!r}")
    return KVCache([storage], tensors, kwargs, split, num_heads, layers_cross)


def make_rank_kv(
    rng: np.random.Generator,
    shape: Shape,
    *,
    dims: str,
    form: str,
    dtype: torch.dtype,
    heads: tuple[int, int],
    num_layers: int = 3,
    num_blocks: int = 6,
    pad: int = 0,
    device: Any = "cpu",
) -> KVCache:
    """KV cache of the TP rank that holds heads ``[h0, h1)`` of ``shape``."""
    content = shape.head_size if "K" in dims else shape.content()
    return make_kv(
        rng,
        dims=dims,
        form=form,
        dtype=dtype,
        num_layers=num_layers,
        num_blocks=num_blocks,
        num_heads=heads[1] - heads[0],
        block_size=shape.block_size,
        content=content,
        pad=pad,
        device=device,
    )


@dataclass
class Pages:
    """Page buffer bytes (``flat``) and the PageBuffer over them."""

    geometry: dynkv.PageGeometry
    flat: torch.Tensor  # uint8
    num_pages: int
    stride: int
    buffer: dynkv.PageBuffer

    def pages(self, flat: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 ``[P, H_total, L, N, C_bytes]`` view of ``flat`` (default: this buffer's bytes)."""
        g = self.geometry
        f = self.flat if flat is None else flat
        rows = f[: self.num_pages * self.stride].view(self.num_pages, self.stride)[:, : g.page_bytes]
        return rows.view(self.num_pages, g.num_heads, g.num_layers, g.block_size, g.token_bytes)


def make_pages(
    geometry: dynkv.PageGeometry,
    num_pages: int,
    *,
    stride_pad: int = 0,
    fill: int | np.random.Generator = SENTINEL,
    device: Any = "cpu",
    pin: bool = False,
) -> Pages:
    """``num_pages`` pages ``page_bytes + stride_pad`` apart, poisoned (or random when ``fill`` is an RNG).

    A few bytes past the last page catch writes beyond the buffer.
    """
    stride = geometry.page_bytes + stride_pad
    e = geometry.elem_bytes
    n = num_pages * stride + min(3 * e, (stride - 1) // e * e)
    if isinstance(fill, np.random.Generator):
        flat = random_bytes(fill, n, device)
    else:
        flat = torch.full((n,), fill, dtype=torch.uint8, device=device)
    if pin:
        flat = flat.pin_memory()
    buf = dynkv.PageBuffer.from_tensor(geometry, flat, page_stride=stride)
    assert buf.num_pages == num_pages
    return Pages(geometry, flat, num_pages, stride, buf)


def pool_pages(
    geometry: dynkv.PageGeometry,
    num_pages: int,
    pool: dynkv.HostPool,
    *,
    stride_pad: int = 0,
    fill: int | np.random.Generator = SENTINEL,
) -> Pages:
    """Pages at the start of a HostPool, poisoned (or random when ``fill`` is an RNG)."""
    stride = geometry.page_bytes + stride_pad
    flat = pool.as_tensor()
    if isinstance(fill, np.random.Generator):
        flat.copy_(random_bytes(fill, flat.numel()))
    else:
        flat.fill_(fill)
    buf = dynkv.PageBuffer.from_pool(geometry, pool, num_pages=num_pages, page_stride=stride)
    return Pages(geometry, flat, num_pages, stride, buf)


def expected_gather(
    kv: KVCache, pages: Pages, head_start: int, block_ids: Sequence[int], slots: Sequence[int],
    layer_range: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Page bytes after ``gather``: each slot's heads ``[h0, h0+H)`` hold the block, layers in order."""
    out = pages.flat.clone()
    pv = pages.pages(out)
    layers = kv.layers()
    h1 = head_start + kv.num_heads
    for b, s in zip(block_ids, slots):
        for l in range(*(layer_range or (0, len(layers)))):
            pv[s, head_start:h1, l].copy_(kv.block(layers, l, b))
    return out


def expected_scatter(
    pages: Pages, kv: KVCache, head_start: int, slots: Sequence[int], block_ids: Sequence[int],
    layer_range: tuple[int, int] | None = None,
) -> list[torch.Tensor]:
    """KV storages after ``scatter``: each block takes the rank's heads of its page."""
    out = kv.snapshot()
    layers = kv.layers(out)
    pv = pages.pages()
    h1 = head_start + kv.num_heads
    for s, b in zip(slots, block_ids):
        for l in range(*(layer_range or (0, len(layers)))):
            kv.set_block(layers, l, b, pv[s, head_start:h1, l])
    return out


def expected_copy(src: KVCache, dst: KVCache, src_ids: Sequence[int], dst_ids: Sequence[int]) -> list[torch.Tensor]:
    out = dst.snapshot()
    dl, sl = dst.layers(out), src.layers()
    for a, b in zip(src_ids, dst_ids):
        for l in range(len(dl)):
            dst.set_block(dl, l, b, src.block(sl, l, a))
    return out


def assert_bytes_equal(
    actual: torch.Tensor | Sequence[torch.Tensor], expected: torch.Tensor | Sequence[torch.Tensor], what: str
) -> None:
    """Exact byte equality, with where the first difference is on failure."""
    acts = [actual] if isinstance(actual, torch.Tensor) else list(actual)
    exps = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    assert len(acts) == len(exps), f"{what}: {len(acts)} buffers, expected {len(exps)}"
    for i, (a, e) in enumerate(zip(acts, exps)):
        assert a.dtype == torch.uint8 and e.dtype == torch.uint8 and a.shape == e.shape
        if torch.equal(a, e):
            continue
        diff = (a != e).nonzero()
        first = tuple(diff[0].tolist())
        raise AssertionError(
            f"{what}: buffer {i} differs in {diff.shape[0]} of {a.numel()} bytes; first at {first}: "
            f"got {int(a[first])}, expected {int(e[first])}"
        )


def block_choice(rng: np.random.Generator, n: int, k: int, *, unique: bool) -> list[int]:
    """``k`` ids in ``[0, n)``; unique for destinations, possibly repeated for sources."""
    return [int(x) for x in rng.choice(n, size=k, replace=not unique)]


PageMaker = Callable[..., Pages]


def cpu_pages(geometry: dynkv.PageGeometry, num_pages: int, *, stride_pad: int = 0, fill: Any = SENTINEL) -> Pages:
    return make_pages(geometry, num_pages, stride_pad=stride_pad, fill=fill)


def no_sync() -> None:
    return None


def _run(sync: Callable[[], None], fn: Callable[..., None], *args: Any, **kw: Any) -> None:
    """One op between two syncs: inputs made on one stream are ready for an op on another, and done before checks."""
    sync()
    fn(*args, **kw)
    sync()


def check_gather_scatter(
    rng: np.random.Generator,
    shape: Shape,
    *,
    dims: str,
    form: str,
    dtype: torch.dtype,
    tp: tuple[int, int],
    device: Any = "cpu",
    page_maker: PageMaker = cpu_pages,
    sync: Callable[[], None] = no_sync,
    pad: int = 0,
    stride_pad: int = 0,
    num_layers: int = 3,
    num_blocks: int = 6,
    num_pages: int = 5,
    entries: int = 4,
    gather: Callable[..., None] | None = None,
    scatter: Callable[..., None] | None = None,
    **op: Any,
) -> None:
    """Gather into poisoned pages, scatter back into a poisoned cache, and scatter random pages.

    ``tp`` is ``(tp_size, rank)``: the cache holds that rank's heads of
    ``shape``. ``op`` goes to gather and scatter (backend, stream, ...);
    ``sync`` runs before and after each op (GPU: ``torch.cuda.synchronize``).
    ``gather`` and ``scatter`` replace :func:`dynkv.gather` and
    :func:`dynkv.scatter` (same arguments), e.g. the staged path's.
    """
    gather = gather or dynkv.gather
    scatter = scatter or dynkv.scatter
    h0, h1 = dynkv.head_range(tp[1], tp[0], shape.num_heads)

    def new_kv() -> KVCache:
        return make_rank_kv(
            rng, shape, dims=dims, form=form, dtype=dtype, heads=(h0, h1), num_layers=num_layers,
            num_blocks=num_blocks, pad=pad, device=device,
        )

    kv = new_kv()
    view = kv.view(num_heads_total=shape.num_heads, head_start=h0)
    assert view.geometry == dynkv.PageGeometry.for_model(
        num_layers=num_layers, num_kv_heads=shape.num_heads, head_size=shape.head_size,
        block_size=shape.block_size, elem_bytes=elem_size(dtype), mla=shape.mla,
    )
    assert (view.num_blocks, view.head_start, view.num_heads) == (num_blocks, h0, h1 - h0)
    source = kv.snapshot()

    # gather: possibly repeated blocks into distinct slots
    pages = page_maker(view.geometry, num_pages, stride_pad=stride_pad)
    ids = block_choice(rng, num_blocks, entries, unique=False)
    slots = block_choice(rng, num_pages, entries, unique=True)
    want = expected_gather(kv, pages, h0, ids, slots)
    _run(sync, gather, view, pages.buffer, ids, slots, **op)
    assert_bytes_equal(pages.flat, want, "gather: pages")
    assert_bytes_equal(kv.storages, source, "gather: source KV")

    # scatter those pages into distinct blocks of a fresh, poisoned cache
    kv2 = new_kv()
    kv2.poison()
    view2 = kv2.view(num_heads_total=shape.num_heads, head_start=h0)
    dst = block_choice(rng, num_blocks, entries, unique=True)
    page_bytes = pages.flat.clone()
    want2 = expected_scatter(pages, kv2, h0, slots, dst)
    _run(sync, scatter, pages.buffer, view2, slots, dst, **op)
    assert_bytes_equal(kv2.storages, want2, "scatter: KV")
    assert_bytes_equal(pages.flat, page_bytes, "scatter: source pages")
    # the round trip, independent of the page reference
    l1, l2 = kv.layers(), kv2.layers()
    for b, d in zip(ids, dst):
        for l in range(num_layers):
            assert torch.equal(kv2.block(l2, l, d), kv.block(l1, l, b)), f"round trip: block {b} -> {d}, layer {l}"

    # scatter random pages, slots possibly repeated
    rpages = page_maker(view.geometry, num_pages, stride_pad=stride_pad, fill=rng)
    kv3 = new_kv()
    kv3.poison()
    view3 = kv3.view(num_heads_total=shape.num_heads, head_start=h0)
    rslots = block_choice(rng, num_pages, entries, unique=False)
    dst3 = block_choice(rng, num_blocks, entries, unique=True)
    page_bytes = rpages.flat.clone()
    want3 = expected_scatter(rpages, kv3, h0, rslots, dst3)
    _run(sync, scatter, rpages.buffer, view3, rslots, dst3, **op)
    assert_bytes_equal(kv3.storages, want3, "scatter of random pages: KV")
    assert_bytes_equal(rpages.flat, page_bytes, "scatter of random pages: source pages")


def check_layer_ranges(
    rng: np.random.Generator,
    shape: Shape,
    *,
    dims: str,
    form: str,
    dtype: torch.dtype,
    tp: tuple[int, int],
    device: Any = "cpu",
    page_maker: PageMaker = cpu_pages,
    sync: Callable[[], None] = no_sync,
    **op: Any,
) -> None:
    """Gather and scatter of layer ranges touch those layers only; scatter_layers in groups equals one scatter."""
    num_layers, num_blocks, num_pages = 5, 6, 5
    h0, h1 = dynkv.head_range(tp[1], tp[0], shape.num_heads)

    def new_kv() -> KVCache:
        return make_rank_kv(rng, shape, dims=dims, form=form, dtype=dtype, heads=(h0, h1), num_layers=num_layers,
                            num_blocks=num_blocks, device=device)

    kv = new_kv()
    view = kv.view(num_heads_total=shape.num_heads, head_start=h0)
    pages = page_maker(view.geometry, num_pages)
    ids, slots = [4, 0, 2], [1, 3, 0]
    want = expected_gather(kv, pages, h0, ids, slots, (1, 3))
    _run(sync, dynkv.gather, view, pages.buffer, ids, slots, layers=(1, 3), **op)
    assert_bytes_equal(pages.flat, want, "gather of layers [1, 3): pages")

    rpages = page_maker(view.geometry, num_pages, fill=rng)
    dst = [5, 1, 3]
    whole = new_kv()
    whole.poison()
    want_all = expected_scatter(rpages, whole, h0, slots, dst)
    for groups in ([(0, 2), (2, 3), (3, 5)], [(l, l + 1) for l in range(num_layers)]):
        kv2 = new_kv()
        kv2.poison()
        view2 = kv2.view(num_heads_total=shape.num_heads, head_start=h0)
        issued: list[int] = []
        _run(sync, dynkv.ops.scatter_layers, rpages.buffer, view2, slots, dst, groups, after=issued.append, **op)
        assert issued == list(range(len(groups)))
        assert_bytes_equal(kv2.storages, want_all, f"scatter in groups {groups}: KV")
        if view2.device.type == "cuda":  # the same groups from one C++ call, an event recorded after each
            kv2.poison()
            events = [torch.cuda.Event() for _ in groups]
            for ev in events:
                ev.record()  # created: torch makes the CUDA event at its first record
            _run(sync, dynkv.ops.scatter_layers, rpages.buffer, view2, slots, dst, groups, events=events, **op)
            assert all(ev.query() for ev in events)
            assert_bytes_equal(kv2.storages, want_all, f"scatter in groups {groups} with events: KV")
            with pytest.raises(ValueError, match="every event must exist already"):
                dynkv.ops.scatter_layers(rpages.buffer, view2, slots, dst, groups,
                                         events=[torch.cuda.Event() for _ in groups], **op)
            with pytest.raises(ValueError, match=f"got 1 events for {len(groups)} layer groups"):
                dynkv.ops.scatter_layers(rpages.buffer, view2, slots, dst, groups, events=events[:1], **op)
        else:
            with pytest.raises(ValueError, match="events are recorded on a GPU stream"):
                dynkv.ops.scatter_layers(rpages.buffer, view2, slots, dst, groups, events=[object()], **op)

    kv3 = new_kv()
    kv3.poison()
    view3 = kv3.view(num_heads_total=shape.num_heads, head_start=h0)
    want3 = expected_scatter(rpages, kv3, h0, slots, dst, (4, 5))
    _run(sync, dynkv.scatter, rpages.buffer, view3, slots, dst, layers=(4, 5), **op)
    assert_bytes_equal(kv3.storages, want3, "scatter of layer 4: KV")

    before = kv3.snapshot()
    for bad in ((3, 3), (-1, 2), (0, num_layers + 1), (5, 6)):
        with pytest.raises(ValueError, match="is not a range of the view's 5 layers"):
            dynkv.scatter(rpages.buffer, view3, slots, dst, layers=bad, **op)
    sync()
    assert_bytes_equal(kv3.storages, before, "refused layer ranges: KV")


def check_copy_blocks(
    rng: np.random.Generator,
    shape: Shape,
    *,
    src: tuple[str, str],
    dst: tuple[str, str],
    dtype: torch.dtype,
    tp: tuple[int, int] = (1, 0),
    device: Any = "cpu",
    sync: Callable[[], None] = no_sync,
    num_layers: int = 3,
    num_blocks: int = 6,
    entries: int = 4,
    **op: Any,
) -> None:
    """copy_blocks from a ``(dims, form)`` cache to a poisoned one of another layout."""
    h0, h1 = dynkv.head_range(tp[1], tp[0], shape.num_heads)
    kw = dict(dtype=dtype, heads=(h0, h1), num_layers=num_layers, num_blocks=num_blocks, device=device)
    a = make_rank_kv(rng, shape, dims=src[0], form=src[1], **kw)
    b = make_rank_kv(rng, shape, dims=dst[0], form=dst[1], **kw)
    b.poison()
    va = a.view(num_heads_total=shape.num_heads, head_start=h0)
    vb = b.view(num_heads_total=shape.num_heads, head_start=h0)
    source = a.snapshot()
    src_ids = block_choice(rng, num_blocks, entries, unique=False)
    dst_ids = block_choice(rng, num_blocks, entries, unique=True)
    want = expected_copy(a, b, src_ids, dst_ids)
    _run(sync, dynkv.copy_blocks, va, vb, src_ids, dst_ids, **op)
    assert_bytes_equal(b.storages, want, "copy_blocks: destination KV")
    assert_bytes_equal(a.storages, source, "copy_blocks: source KV")


def check_staged(
    rng: np.random.Generator,
    shape: Shape,
    *,
    device: Any = "cpu",
    chunk_pages: int = 2,
    num_slots: int = 2,
    num_layers: int = 3,
    num_blocks: int = 11,
    num_pages: int = 12,
    entries: int = 9,
    events: int = 0,
    **kw: Any,
) -> None:
    """The staged path (``staged_gather``/``staged_scatter``) through :func:`check_gather_scatter`'s checks.

    ``entries`` pages over a ring of ``num_slots`` x ``chunk_pages`` staging
    pages: chunks wrap around the ring, the last one partial. The ring starts
    poisoned; with ``events``, every scatter goes in that many layer groups
    (``num_layers`` split evenly), one event each, all recorded after it. ``kw`` goes to :func:`check_gather_scatter`.
    """
    from functools import partial

    from dynkv.memory import StagingBuffer
    from dynkv.ops import staged_gather, staged_scatter

    geometry = dynkv.PageGeometry.for_model(
        num_layers=num_layers, num_kv_heads=shape.num_heads, head_size=shape.head_size,
        block_size=shape.block_size, elem_bytes=elem_size(kw["dtype"]), mla=shape.mla,
    )
    ring = StagingBuffer(geometry, device, chunk_pages=chunk_pages, num_slots=num_slots)
    ring.pages.owner.fill_(SENTINEL)
    evs = []
    groups = None
    if events:
        evs = [torch.cuda.Event() for _ in range(events)]
        for e in evs:
            e.record()
        cut = np.linspace(0, num_layers, events + 1).astype(int)
        groups = [(int(a), int(b)) for a, b in zip(cut[:-1], cut[1:])]
    check_gather_scatter(rng, shape, device=device, num_layers=num_layers, num_blocks=num_blocks,
                         num_pages=num_pages, entries=entries, gather=partial(staged_gather, staging=ring),
                         scatter=partial(staged_scatter, staging=ring, groups=groups, events=evs), **kw)
    assert all(e.query() for e in evs), "every layer-group event was recorded after the scatter"
