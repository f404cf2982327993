"""Tier names, and the contract a tier below the host pool implements.

Names are the strings used in the page index, in plans and in metric labels
(``tier="host"``). ``REMOTE`` is the pages a decode engine pulls from a prefill
engine's host pool (disaggregated serving); it is not a store. ``SHARED`` is the
store many engines share (:mod:`dynkv.tiers.shared`).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from typing import Protocol

__all__ = ["DEVICE", "DISK", "HOST", "REMOTE", "SHARED", "SecondaryTier"]

DEVICE = "device"  # vLLM's own KV cache (G1); dynkv only counts its hits
HOST = "host"  # G2: the engine's pinned shared-memory pool
DISK = "disk"  # G3: page files on local disks
REMOTE = "remote"  # matched pages a prefill engine exported, pulled into fresh host slots
SHARED = "shared"  # G4: a store (Redis/Valkey, Mooncake) shared by engines serving the same model


class SecondaryTier(Protocol):
    """A tier the leader promotes pages from into host pages, and writes host pages through to.

    Every call is non-blocking: reads and writes return futures that complete on
    the tier's own threads, and the leader applies their results at its next
    call. A page read back is checked against its key (and the tier's checksum);
    one that fails is reported as failed and never handed over as KV.
    """

    @property
    def num_pages(self) -> int: ...

    def write(self, slot: int, key: bytes, src: memoryview) -> Future[None]:
        """Write one host page under ``key`` to the tier's ``slot``."""
        ...

    def read_many(self, reads: Sequence[tuple[int, bytes, memoryview]], *,
                  invalidate_bad: bool = False) -> list[Future[None]]:
        """Read ``(slot, key, destination)`` pages; a page failing its checks fails its future."""
        ...

    def recover(self) -> list[tuple[int, bytes]]:
        """``(slot, key)`` of every valid page found at start (pages that survive a restart)."""
        ...

    def clear(self) -> None: ...

    def close(self) -> None: ...
