"""The copy paths between host pages and vLLM's KV cache on a GPU, and which one each direction takes.

Two paths cross PCIe:

``kernel``
    dynkv's copy kernel reads (loads) or writes (stores) pinned host pages
    over UVA, tile by tile, straight into vLLM's paged layout. Few CTAs, and a
    layer-wise load can hand each layer group to the forward as it lands.
    How close it comes to the copy engines' speed depends on the host: 93-95%
    of a plain memcpy on one H200 host, 60% for loads on one H100 host.
``staged``
    page slices cross PCIe as long runs on the copy engines into a small ring
    of staging memory on the GPU, and a kernel moves them between staging and
    the paged layout on the device (HBM, many times faster than PCIe); the two
    stages overlap chunk by chunk (:func:`dynkv.ops.staged_scatter`). The copy
    engines run near memcpy speed on every host when each run is long enough:
    a layer-wise load goes in groups of layers whose run per page and head is
    at least :data:`STAGED_GROUP_RUN` bytes (one layer's tile is a few KiB,
    where the copy engines reach a third of their speed), and the forward
    waits for the first group instead of one layer.

:mod:`dynkv.worker.calibrate` measures both on the rank's GPU and picks, per
direction; ``copy_path`` in the config forces one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dynkv.layout import PageGeometry, PagedView
from dynkv.memory import PageBuffer, StagingBuffer
from dynkv.ops import GroupSignal, gather, scatter_layers, staged_gather, staged_scatter

__all__ = ["COPY_PATHS", "CopyPaths", "in_slot_order", "layer_groups", "staging_for"]

COPY_PATHS = ("kernel", "staged")
# A staging slot holds about this many bytes of a rank's page slices; three slots per direction.
STAGING_CHUNK_BYTES = 8 << 20
STAGING_SLOTS = 3
# A staged layer-wise load's groups span enough layers for a run of at least this many bytes per page and head:
# DMA batches of 32 KiB runs reached 95.6% of a plain memcpy on an H100 (8 KiB runs: about 30%) ...
STAGED_GROUP_RUN = 32 << 10
# ... but a load has at least this many groups where the model has the layers, so that the forward waits for
# an eighth of it at most before its first layer.
STAGED_MIN_GROUPS = 8


def staging_for(view: PagedView) -> StagingBuffer:
    """A staging ring sized for ``view``: slots of about :data:`STAGING_CHUNK_BYTES` of this rank's slices."""
    g = view.geometry
    slice_bytes = view.num_heads * g.num_layers * g.tile_bytes
    return StagingBuffer(g, view.device, chunk_pages=max(1, STAGING_CHUNK_BYTES // slice_bytes),
                         num_slots=STAGING_SLOTS)


def in_slot_order(slots: Sequence[int], block_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """A staged load's ``(slots, block_ids)`` pairs sorted by host slot.

    Pages of adjacent host slots join one copy per group and chunk (:func:`dynkv.ops.staged_copy_plan`); in
    slot order they do however they were handed out (a pool's free list returns an evicted prompt's slots in
    reverse). Mismatched lists come back as they are, for :func:`dynkv.ops.staged_scatter`'s own error.
    """
    slots, block_ids = np.asarray(slots, dtype=np.int64), np.asarray(block_ids, dtype=np.int64)
    if len(slots) == len(block_ids):
        order = np.argsort(slots, kind="stable")
        slots, block_ids = slots[order], block_ids[order]
    return slots, block_ids


def layer_groups(geometry: PageGeometry, path: str) -> list[tuple[int, int]]:
    """The layer groups ``[begin, end)`` of a layer-wise load on ``path``.

    ``kernel``: one layer each. ``staged``: as few layers as give each page
    and head a run of :data:`STAGED_GROUP_RUN` bytes, but no fewer than
    :data:`STAGED_MIN_GROUPS` groups (the last group may be shorter).
    """
    per = 1
    if path == "staged":
        per = max(1, min(-(-STAGED_GROUP_RUN // geometry.tile_bytes), -(-geometry.num_layers // STAGED_MIN_GROUPS)))
    return [(b, min(b + per, geometry.num_layers)) for b in range(0, geometry.num_layers, per)]


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
        self._groups = layer_groups(self.view.geometry, self.h2d)

    def staging_bytes(self) -> int:
        return sum(r.nbytes for r in self._rings.values())

    def layer_groups(self) -> list[tuple[int, int]]:
        """The layer groups of a layer-wise load on this rank's load path (:func:`layer_groups`)."""
        return self._groups

    def load(self, pages: PageBuffer, slots: Sequence[int], block_ids: Sequence[int], stream: Any,
             groups: Sequence[tuple[int, int]] | None = None, events: Sequence[Any] = (),
             after: Callable[[int], None] | GroupSignal | None = None) -> None:
        """Pages ``slots`` -> blocks ``block_ids`` on ``stream``; ``events[i]`` recorded once group ``i`` is in.

        ``after(i)`` (staged path only) once group ``i``'s event is recorded, in the calling thread.
        """
        if after is not None and self.h2d != "staged":
            raise ValueError("after: a staged load's callback (the kernel path records its events in one call)")
        layers = list(groups) if groups else [(0, self.view.geometry.num_layers)]
        if self.h2d == "staged":
            slots, block_ids = in_slot_order(slots, block_ids)
            staged_scatter(pages, self.view, slots, block_ids, self._rings["h2d"], groups=layers, events=events,
                           after=after, stream=stream)
        else:
            scatter_layers(pages, self.view, slots, block_ids, layers, events=events, stream=stream)

    def store(self, pages: PageBuffer, block_ids: Sequence[int], slots: Sequence[int], stream: Any) -> None:
        """Blocks ``block_ids`` -> pages ``slots`` on ``stream``."""
        if self.d2h == "staged":
            staged_gather(self.view, pages, block_ids, slots, self._rings["d2h"], stream=stream)
        else:
            gather(self.view, pages, block_ids, slots, stream=stream)
