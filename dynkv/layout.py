"""Page geometry, TP head slicing, and PagedView: vLLM's KV tensors as dynkv sees them.

vLLM describes an attention KV cache as a logical ``[L, B, H, N, C]`` array
(layers, blocks, this rank's KV heads, tokens per block, per-token content with
K and V packed) stored in one of six physical stride orders
(``vllm.v1.kv_cache_layout.KVCacheLayout``). A page is the TP-agnostic copy of
one block of the whole model, laid out ``[H_total, L, N, C]`` in bytes, so the
part owned by TP rank ``r`` of ``t`` is one contiguous run.

Nothing here imports vLLM; a ``KVCacheLayout`` member (or its name) is accepted
wherever a layout is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dynkv._C as _C

if TYPE_CHECKING:
    import torch

__all__ = ["LAYOUTS", "PAGE_ALIGN", "PageGeometry", "PagedView", "head_range", "layout_dims", "page_stride"]

# Physical order of the logical axes (L, B, H, N, C) for each layout, as in
# vllm.v1.kv_cache_layout.KVCacheLayout.
LAYOUTS: dict[str, tuple[int, ...]] = {
    "LBHNC": (0, 1, 2, 3, 4),
    "LBNHC": (0, 1, 3, 2, 4),
    "LHBNC": (0, 2, 1, 3, 4),
    "BLHNC": (1, 0, 2, 3, 4),
    "BLNHC": (1, 0, 3, 2, 4),
    "BHLNC": (1, 2, 0, 3, 4),
}
_AXES = "LBHNC"


def _layout_name(layout: Any) -> str:
    name = layout if isinstance(layout, str) else getattr(layout, "name", None)
    if name not in LAYOUTS:
        raise ValueError(f"unknown KV cache layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    return name


def layout_dims(layout: Any, *, per_layer: bool = True) -> str:
    """Physical dim order of a layout as a dims string.

    Parameters
    ----------
    layout
        A ``KVCacheLayout`` member or its name, e.g. ``"LBNHC"``.
    per_layer
        True for the 4-D per-layer tensors (L dropped), False for the 5-D
        cross-layer tensor.
    """
    dims = "".join(_AXES[i] for i in LAYOUTS[_layout_name(layout)])
    return dims.replace("L", "") if per_layer else dims


def head_range(rank: int, tp_size: int, num_heads: int) -> tuple[int, int]:
    """KV heads ``[h0, h1)`` held by TP rank ``rank`` of ``tp_size``.

    With more ranks than KV heads each head is replicated on ``tp_size //
    num_heads`` consecutive ranks (vLLM's GQA replication).
    """
    if tp_size < 1 or not 0 <= rank < tp_size:
        raise ValueError(f"TP rank {rank} of {tp_size} is not valid: expected 0 <= rank < tp_size")
    if num_heads < 1:
        raise ValueError(f"num_heads={num_heads} is not valid: expected >= 1")
    if tp_size <= num_heads:
        if num_heads % tp_size:
            raise ValueError(f"{num_heads} KV heads do not split over TP={tp_size}: expected a divisor")
        per = num_heads // tp_size
        return rank * per, (rank + 1) * per
    if tp_size % num_heads:
        raise ValueError(f"TP={tp_size} is not a multiple of the {num_heads} KV heads it replicates")
    h = rank // (tp_size // num_heads)
    return h, h + 1


@dataclass(frozen=True)
class PageGeometry:
    """Shape of a page: ``[num_heads, num_layers, block_size, token_bytes]`` bytes.

    Parameters
    ----------
    num_layers
        Attention layers in the model (of one KV-cache group).
    num_heads
        All KV heads of the model (``H_total``); 1 for MLA's latent.
    block_size
        Tokens per block.
    token_bytes
        Bytes of one token of one head: ``2 * head_size * dtype_bytes`` (K and
        V), or the latent's bytes for MLA.
    elem_bytes
        dtype size in bytes.
    """

    num_layers: int
    num_heads: int
    block_size: int
    token_bytes: int
    elem_bytes: int

    def __post_init__(self) -> None:
        _C.make_geom(self.num_layers, self.num_heads, self.block_size, self.token_bytes, self.elem_bytes)

    @property
    def c(self) -> _C.PageGeom:
        return _C.make_geom(self.num_layers, self.num_heads, self.block_size, self.token_bytes, self.elem_bytes)

    @property
    def tile_bytes(self) -> int:
        """One (block, layer, head): ``block_size * token_bytes``."""
        return self.block_size * self.token_bytes

    @property
    def page_bytes(self) -> int:
        return self.num_heads * self.num_layers * self.tile_bytes

    def head_slice(self, h0: int, h1: int) -> tuple[int, int]:
        """Byte ``(offset, length)`` of heads ``[h0, h1)`` inside a page."""
        if not 0 <= h0 < h1 <= self.num_heads:
            raise ValueError(f"head range [{h0}, {h1}) lies outside the geometry's {self.num_heads} heads")
        per_head = self.num_layers * self.tile_bytes
        return h0 * per_head, (h1 - h0) * per_head

    @classmethod
    def for_model(
        cls,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_size: int,
        block_size: int,
        elem_bytes: int,
        mla: bool = False,
    ) -> PageGeometry:
        """Geometry of a model: K and V packed per token, or MLA's latent."""
        if mla:
            return cls(num_layers, 1, block_size, head_size * elem_bytes, elem_bytes)
        return cls(num_layers, num_kv_heads, block_size, 2 * head_size * elem_bytes, elem_bytes)


def _permute_to(t: torch.Tensor, dims: str, target: str) -> torch.Tensor:
    if sorted(dims) != sorted(target) or len(set(dims)) != len(dims):
        raise ValueError(f"dims {dims!r} must name each of {target!r} once")
    if t.dim() != len(dims):
        raise ValueError(f"tensor has {t.dim()} dims but dims {dims!r} names {len(dims)}")
    return t.permute(*[dims.index(a) for a in target])


@dataclass(frozen=True, eq=False)
class PagedView:
    """One rank's paged KV cache: per-layer base pointers and byte strides.

    Build it with :meth:`from_tensors`; it keeps the tensors alive.
    """

    geometry: PageGeometry
    c: _C.BlockView
    device: torch.device
    tensors: tuple[torch.Tensor, ...]

    @property
    def num_blocks(self) -> int:
        return self.c.num_blocks

    @property
    def head_start(self) -> int:
        return self.c.head_start

    @property
    def num_heads(self) -> int:
        return self.c.num_heads

    @classmethod
    def from_tensors(
        cls,
        kv_caches: torch.Tensor | Sequence[torch.Tensor],
        *,
        dims: str | None = None,
        layout: Any = None,
        num_heads_total: int | None = None,
        head_start: int = 0,
        block_size: int | None = None,
    ) -> PagedView:
        """View vLLM's KV tensors.

        Parameters
        ----------
        kv_caches
            One tensor per layer, or one cross-layer tensor with an ``L`` axis.
        dims
            Axis names of each tensor in its own dim order: ``B`` blocks, ``H``
            heads, ``N`` tokens, ``C`` per-token content (K and V packed),
            ``L`` layers (cross-layer tensor only); for split K/V tensors ``K``
            (the K/V axis, size 2) and ``D`` (head_size) replace ``C``.
            Default: ``"BHNC"`` per layer, ``"LBHNC"`` cross-layer: vLLM's
            logical order, which is what ``register_kv_caches`` receives.
        layout
            A ``KVCacheLayout`` (or name) whose *physical* order the tensors
            are in; an alternative to ``dims``.
        num_heads_total
            The model's KV heads; default: this rank's heads (TP=1).
        head_start
            Global index of this rank's first head (see :func:`head_range`).
        block_size
            Expected tokens per block, checked against the tensors.
        """
        import torch

        if dims is not None and layout is not None:
            raise ValueError("give dims or layout, not both")
        cross = isinstance(kv_caches, torch.Tensor)
        tensors = [kv_caches] if cross else list(kv_caches)
        if not tensors:
            raise ValueError("no KV cache tensors given")
        if layout is not None:
            dims = layout_dims(layout, per_layer=not cross)
        dims = dims or ("LBHNC" if cross else "BHNC")
        split = "K" in dims
        target = ("L" if cross else "") + ("BKHND" if split else "BHNC")
        views = [_permute_to(t, dims, target) for t in tensors]
        first = tensors[0]
        for t in tensors:
            if t.device != first.device or t.dtype != first.dtype:
                raise ValueError(
                    f"KV tensors disagree: {t.device}/{t.dtype} vs {first.device}/{first.dtype}; "
                    "one view needs one device and dtype"
                )
        elem = first.element_size()
        if cross:
            v = views[0]
            layer_ptrs = [v.data_ptr() + i * v.stride(0) * elem for i in range(v.shape[0])]
            per_layer = v[0]
        else:
            layer_ptrs = [v.data_ptr() for v in views]
            per_layer = views[0]
            for i, v in enumerate(views):
                if v.shape != per_layer.shape or v.stride() != per_layer.stride():
                    raise ValueError(
                        f"layer {i} has shape {tuple(v.shape)} strides {v.stride()}, layer 0 "
                        f"{tuple(per_layer.shape)} {per_layer.stride()}: layers must share one layout"
                    )
        shape, stride = per_layer.shape, per_layer.stride()
        if split:
            nb, parts, nh, n, d = shape
            if parts != 2:
                raise ValueError(f"the K/V axis has size {parts}: expected 2")
            if stride[4] != 1 and d > 1:
                raise ValueError("head_size axis D must be contiguous (stride 1)")
            token_bytes = 2 * d * elem
            part_stride = stride[1] * elem
            sb, sh, sn = stride[0], stride[2], stride[3]
        else:
            nb, nh, n, c = shape
            if stride[3] != 1 and c > 1:
                raise ValueError("content axis C must be contiguous (stride 1)")
            parts, token_bytes, part_stride = 1, c * elem, 0
            sb, sh, sn = stride[0], stride[1], stride[2]
        if block_size is not None and n != block_size:
            raise ValueError(f"tensors hold {n} tokens per block, expected block_size={block_size}")
        geometry = PageGeometry(
            num_layers=len(layer_ptrs),
            num_heads=num_heads_total if num_heads_total is not None else nh,
            block_size=n,
            token_bytes=token_bytes,
            elem_bytes=elem,
        )
        c_view = _C.make_view(
            geometry.c,
            layer_ptrs,
            nb,
            nh,
            head_start,
            parts,
            sb * elem,
            sh * elem,
            sn * elem,
            part_stride,
        )
        return cls(geometry=geometry, c=c_view, device=first.device, tensors=tuple(tensors))


# Pages start on 4 KiB boundaries: O_DIRECT disk I/O straight from the pool,
# and whole OS pages per pinned chunk.
PAGE_ALIGN = 4096


def page_stride(geometry: PageGeometry) -> int:
    """Bytes between consecutive pages of the host pool."""
    return -(-geometry.page_bytes // PAGE_ALIGN) * PAGE_ALIGN
