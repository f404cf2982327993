"""The copy paths between host pages and vLLM's KV cache on a GPU, and which one each direction takes.

Two paths cross PCIe:

``kernel``
    dynkv's copy kernel reads (loads) or writes (stores) pinned host pages
    over UVA, tile by tile, straight into vLLM's paged layout. Few CTAs, and a
    layer-wise load can hand each layer group to the forward as it lands.
    How close it comes to the copy engines' speed depends on the host: 93-95%
    of a plain memcpy on one H200 host, 60% for loads on one H100 host.
``staged``
    each page's slice of this rank crosses PCIe as one long run on the copy
    engines into a small ring of staging pages on the GPU, and a kernel moves
    it between staging and the paged layout on the device (HBM, many times
    faster than PCIe); the two stages overlap chunk by chunk
    (:func:`dynkv.ops.staged_scatter`). The copy engines run near memcpy speed
    on every host, but a page's layers arrive together: a layer-wise load's
    groups are all ready when the whole load is.

:mod:`dynkv.worker.calibrate` measures both on the rank's GPU and picks, per
direction; ``copy_path`` in the config forces one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dynkv.layout import PagedView
from dynkv.memory import PageBuffer, StagingBuffer
from dynkv.ops import gather, scatter_layers, staged_gather, staged_scatter

__all__ = ["COPY_PATHS", "CopyPaths", "staging_for"]

COPY_PATHS = ("kernel", "staged")
# A staging slot holds about this many bytes of a rank's page slices; three slots per direction.
STAGING_CHUNK_BYTES = 8 << 20
STAGING_SLOTS = 3


def staging_for(view: PagedView) -> StagingBuffer:
    """A staging ring sized for ``view``: slots of about :data:`STAGING_CHUNK_BYTES` of this rank's slices."""
    g = view.geometry
    slice_bytes = view.num_heads * g.num_layers * g.tile_bytes
    return StagingBuffer(g, view.device, chunk_pages=max(1, STAGING_CHUNK_BYTES // slice_bytes),
                         num_slots=STAGING_SLOTS)


@dataclass
class CopyPaths:
    """The path of loads (``h2d``) and stores (``d2h``) on one rank's GPU, with the staging rings they use."""

    view: PagedView
    h2d: str = "kernel"
    d2h: str = "kernel"

    def __post_init__(self) -> None:
        for direction in ("h2d", "d2h"):
            if getattr(self, direction) not in COPY_PATHS:
                raise ValueError(f"copy path {getattr(self, direction)!r} for {direction}: expected one of "
                                 f"{', '.join(COPY_PATHS)}")
        # One ring per direction: loads and stores run on their own streams at the same time.
        self._rings = {d: staging_for(self.view) for d in ("h2d", "d2h") if getattr(self, d) == "staged"}

    def staging_bytes(self) -> int:
        return sum(r.nbytes for r in self._rings.values())

    def load(self, pages: PageBuffer, slots: Sequence[int], block_ids: Sequence[int], stream: Any,
             groups: Sequence[tuple[int, int]] | None = None, events: Sequence[Any] = ()) -> None:
        """Pages ``slots`` -> blocks ``block_ids`` on ``stream``; ``events[i]`` recorded once group ``i`` is in."""
        if self.h2d == "staged":
            staged_scatter(pages, self.view, slots, block_ids, self._rings["h2d"], events=events, stream=stream)
        else:
            layers = list(groups) if groups else [(0, self.view.geometry.num_layers)]
            scatter_layers(pages, self.view, slots, block_ids, layers, events=events, stream=stream)

    def store(self, pages: PageBuffer, block_ids: Sequence[int], slots: Sequence[int], stream: Any) -> None:
        """Blocks ``block_ids`` -> pages ``slots`` on ``stream``."""
        if self.d2h == "staged":
            staged_gather(self.view, pages, block_ids, slots, self._rings["d2h"], stream=stream)
        else:
            gather(self.view, pages, block_ids, slots, stream=stream)
