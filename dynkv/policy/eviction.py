"""Eviction: the order in which a tier's evictable pages go (LRU by default, FIFO, or your own).

An :class:`EvictionPolicy` per tier; :class:`dynkv.index.PageIndex` asks it for
victims among the stored, unpinned pages.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator
from itertools import islice

__all__ = ["EVICTION_POLICIES", "EvictionPolicy", "FIFOPolicy", "LRUPolicy"]


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


EVICTION_POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy, "fifo": FIFOPolicy}
