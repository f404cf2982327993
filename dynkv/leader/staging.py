"""Staging slots: a few pages of the host pool past the host tier, for hits that get no host slot.

A disk or shared-tier hit is read into a host page, which the workers copy
to the device. When every host page is pinned or being written (a small host
tier under load, a prompt longer than the host tier), the leader reads the
page into a staging slot instead: a page of the same pool, numbered after the
host tier's, that the workers copy from like any other. A staging slot has no
key in the page index, so nothing that walks the index (snapshots, events,
write-through, exports to decode engines) ever sees it; it is freed once its
load is on the device, or the load gave up or failed. With every staging slot
taken too, the page's block is recomputed, as before.

Stores use them too: a page the host tier does not take is copied into a
staging slot and written from there to the disk tier (write-around,
:mod:`dynkv.leader.tier_flow`), in at most half of the slots, so loads
always find some.
"""

from __future__ import annotations

from collections.abc import Iterable

from dynkv.config import DynKVConfig

__all__ = ["MAX_STAGING_PAGES", "MIN_STAGING_PAGES", "StagingSlots", "staging_pages_for"]

# Default size: a sixteenth of the host tier, at least 64 pages and at most 1024 (the pool grows by
# them, past host_gb: a large host tier should not bring gigabytes of staging it rarely fills).
MIN_STAGING_PAGES = 64
MAX_STAGING_PAGES = 1024
_HOST_SHARE = 16


def staging_pages_for(config: DynKVConfig, host_pages: int) -> int:
    """Staging pages of a leader whose host tier holds ``host_pages`` (``staging_pages``, else the default)."""
    if config.staging_pages is not None:
        return config.staging_pages
    return min(MAX_STAGING_PAGES, max(MIN_STAGING_PAGES, host_pages // _HOST_SHARE))


class StagingSlots:
    """Allocator of the pool slots ``[first, first + count)``; the leader's thread only.

    Parameters
    ----------
    first
        The first staging slot (the host tier's page count).
    count
        How many there are; 0 for none.
    """

    def __init__(self, first: int, count: int) -> None:
        if first < 0 or count < 0:
            raise ValueError(f"staging slots from {first}, {count} of them: expected both >= 0")
        self.first = first
        self.capacity = count
        self._next = first  # slots from here on were never handed out (none is listed: a large pool costs nothing)
        self._free: list[int] = []  # slots given back
        self._taken: set[int] = set()

    @property
    def in_use(self) -> int:
        return len(self._taken)

    def owns(self, slot: int) -> bool:
        """``slot`` is a staging slot (taken or not), not a host-tier page."""
        return self.first <= slot < self.first + self.capacity

    def take(self) -> int | None:
        """A free staging slot, or None when all are taken."""
        if self._free:
            slot = self._free.pop()
        elif self._next < self.first + self.capacity:
            slot, self._next = self._next, self._next + 1
        else:
            return None
        self._taken.add(slot)
        return slot

    def free(self, slots: Iterable[int]) -> None:
        """Give ``slots`` back.

        Raises
        ------
        ValueError
            A slot that is not a taken staging slot (freed twice, or never
            taken): the caller's bookkeeping is wrong.
        """
        for slot in slots:
            if slot not in self._taken:
                raise ValueError(f"staging slot {slot} freed but not taken (staging slots are "
                                 f"{self.first}..{self.first + self.capacity - 1})")
            self._taken.remove(slot)
            self._free.append(slot)
