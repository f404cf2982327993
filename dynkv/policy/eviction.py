"""Eviction: the order in which a tier's evictable pages go (LRU by default, FIFO, S3-FIFO, or your own).

An :class:`EvictionPolicy` per tier; :class:`dynkv.index.PageIndex` asks it for
victims among the stored, unpinned pages.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator
from itertools import chain, islice

__all__ = ["EVICTION_POLICIES", "EvictionPolicy", "FIFOPolicy", "LRUPolicy", "S3FIFOPolicy"]


class EvictionPolicy(ABC):
    """Orders a tier's evictable pages (stored, unpinned).

    The index calls :meth:`add` when a page becomes evictable (committed, or
    its last pin released: a pin is a use), :meth:`discard` when it stops being
    one (pinned, removed), and :meth:`touch` when an evictable page is used.
    """

    @abstractmethod
    def add(self, key: bytes) -> None: ...

    @abstractmethod
    def discard(self, key: bytes) -> None: ...

    @abstractmethod
    def touch(self, key: bytes) -> None: ...

    @abstractmethod
    def pop(self) -> bytes | None:
        """Remove and return the next victim; None when nothing is evictable."""

    @abstractmethod
    def peek(self, n: int) -> list[bytes]:
        """The next ``n`` victims, first first, without removing them."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __contains__(self, key: object) -> bool: ...


class _OrderedPolicy(EvictionPolicy):
    def __init__(self) -> None:
        self._order: OrderedDict[bytes, None] = OrderedDict()

    def add(self, key: bytes) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def discard(self, key: bytes) -> None:
        self._order.pop(key, None)

    def pop(self) -> bytes | None:
        if not self._order:
            return None
        return self._order.popitem(last=False)[0]

    def peek(self, n: int) -> list[bytes]:
        return list(islice(self._order, n))

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._order)


class LRUPolicy(_OrderedPolicy):
    """Least recently used first."""

    def touch(self, key: bytes) -> None:
        self._order.move_to_end(key)


class FIFOPolicy(_OrderedPolicy):
    """First evictable first; uses do not reorder (a released pin re-queues)."""

    def touch(self, key: bytes) -> None:
        pass


class S3FIFOPolicy(EvictionPolicy):
    """S3-FIFO (Yang et al., SOSP 2023): a small probation queue, a main queue and a ghost list.

    A new page enters the small queue (a tenth of the evictable pages); one
    used again before it reaches the head moves to the main queue, one that was
    not is evicted and remembered as a ghost, and a ghost that comes back goes
    straight to the main queue. The main queue gives each page with uses left
    another round (up to three). One-off prefixes pass through the small queue
    without disturbing the pages that are reused, and a cyclic reuse larger
    than the tier keeps part of the cycle resident where LRU keeps none of it.

    The index discards a page from its policy while it is pinned and adds it
    back when the pin is released, a use: the page returns to the queue it
    left with one more use, so a hit does not reset it to probation.
    """

    SMALL_SHARE = 0.1
    GHOST_SHARE = 8  # ghosts remembered per evictable page: reuse farther apart than the tier still counts
    MAX_USES = 3
    _MIN_GHOSTS = 1024
    _MAX_PARKED = 1 << 20

    def __init__(self) -> None:
        self._small: OrderedDict[bytes, None] = OrderedDict()
        self._main: OrderedDict[bytes, None] = OrderedDict()
        self._uses: dict[bytes, int] = {}
        self._ghosts: OrderedDict[bytes, None] = OrderedDict()
        # Pages discarded while evictable (pinned, or removed): their queue and uses, until they come back.
        self._parked: OrderedDict[bytes, tuple[bool, int]] = OrderedDict()

    def add(self, key: bytes) -> None:
        if key in self._uses:
            return
        parked = self._parked.pop(key, None)
        if parked is not None:
            main, uses = parked
            (self._main if main else self._small)[key] = None
            self._uses[key] = min(self.MAX_USES, uses + 1)  # a released pin was a use
        elif key in self._ghosts:  # evicted from probation, and back: reused after all
            del self._ghosts[key]
            self._main[key] = None
            self._uses[key] = 0
        else:
            self._small[key] = None
            self._uses[key] = 0

    def discard(self, key: bytes) -> None:
        uses = self._uses.pop(key, None)
        if uses is None:
            return
        main = key in self._main
        del (self._main if main else self._small)[key]
        self._parked[key] = (main, uses)
        if len(self._parked) > self._MAX_PARKED:  # removed pages never come back: forget the oldest
            self._parked.popitem(last=False)

    def touch(self, key: bytes) -> None:
        if key in self._uses:
            self._uses[key] = min(self.MAX_USES, self._uses[key] + 1)

    def _remember(self, key: bytes) -> None:
        self._ghosts[key] = None
        while len(self._ghosts) > max(self._MIN_GHOSTS, self.GHOST_SHARE * len(self._uses)):
            self._ghosts.popitem(last=False)

    def pop(self) -> bytes | None:
        while self._uses:
            if self._small and (len(self._small) >= self.SMALL_SHARE * len(self._uses) or not self._main):
                key, _ = self._small.popitem(last=False)
                if self._uses[key] > 0:
                    self._main[key] = None  # reused while on probation
                    self._uses[key] = 0
                    continue
                del self._uses[key]
                self._remember(key)
                return key
            key, _ = self._main.popitem(last=False)
            if self._uses[key] > 0:
                self._uses[key] -= 1
                self._main[key] = None
                continue
            del self._uses[key]
            return key
        return None

    def peek(self, n: int) -> list[bytes]:
        """Pages with no use left, small queue first, then the rest in queue order (an estimate of :meth:`pop`)."""
        uses = self._uses
        idle = (k for k in chain(self._small, self._main) if uses[k] == 0)
        busy = (k for k in chain(self._small, self._main) if uses[k] > 0)
        return list(islice(chain(idle, busy), n))

    def __len__(self) -> int:
        return len(self._uses)

    def __contains__(self, key: object) -> bool:
        return key in self._uses

    def __iter__(self) -> Iterator[bytes]:
        yield from self._small
        yield from self._main


EVICTION_POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy, "fifo": FIFOPolicy, "s3fifo": S3FIFOPolicy}
