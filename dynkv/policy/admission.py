"""Admission: which pages earn a slot in a tier.

:class:`FrequencyFilter` counts accesses in bounded memory; the leader writes a
host page through to disk only once its key has been seen
``disk_admit_min_hits`` times, which spares the SSD one-off prompts.
:class:`AdaptiveGate` decides, from the pages that come back after leaving a
tier, whether that tier's admission should be frequency-gated at all.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["GHOSTS_PER_SLOT", "AdaptiveGate", "FrequencyFilter"]

_M64 = (1 << 64) - 1
_BATCH = 32  # FrequencyFilter.record_many: from this many keys on, one vectorized update
# Odd 64-bit constants (digits of pi, e, sqrt 2, sqrt 3, golden ratio, ...).
_ROW_MULTIPLIERS = (
    0x243F6A8885A308D3,
    0xB7E151628AED2A6B,
    0x6A09E667F3BCC909,
    0xBB67AE8584CAA73B,
    0x9E3779B97F4A7C15,
    0x3C6EF372FE94F82B,
    0xA54FF53A5F1D36F1,
    0x510E527FADE682D1,
)


def _fold(key: bytes) -> int:
    h = int.from_bytes(key, "little")
    return (h ^ (h >> 64) ^ (h >> 128)) & _M64


class FrequencyFilter:
    """Approximate access counts in bounded memory: a count-min sketch with aging.

    ``depth`` rows of ``width`` counters; a key's count is the minimum of its
    counters, never below the true count since the last aging. Increments are
    conservative (only the minimal counters grow), which keeps estimates
    tight. After ``sample`` recordings every counter is halved, so old
    popularity fades (TinyLFU's reset).

    Parameters
    ----------
    min_hits
        :meth:`admits` is true from this estimate on; 0 admits everything.
    width
        Counters per row, rounded up to a power of two.
    depth
        Rows (independent hashes), 1 to 8.
    sample
        Recordings between halvings; default ``10 * width``.
    """

    def __init__(self, min_hits: int = 2, *, width: int = 1 << 16, depth: int = 4, sample: int | None = None) -> None:
        if min_hits < 0:
            raise ValueError(f"min_hits={min_hits}: expected >= 0")
        if width < 1 or not 1 <= depth <= 8:
            raise ValueError(f"width={width}, depth={depth}: expected width >= 1 and depth in [1, 8]")
        self.min_hits = min_hits
        self.width = 1 << max(0, (width - 1).bit_length())
        self.depth = depth
        self.sample = sample if sample is not None else 10 * self.width
        self._rows = np.zeros((depth, self.width), dtype=np.int64)
        self._rowidx = np.arange(depth)
        self._shift = 64 - (self.width.bit_length() - 1)
        self._mults = np.array(_ROW_MULTIPLIERS[:depth], dtype=np.uint64)
        self._recorded = 0

    def _cells(self, keys: Sequence[bytes]) -> np.ndarray:
        """``(len(keys), depth)`` counter indices: each key folded to 64 bits, one multiplicative hash per row."""
        if all(len(k) == 16 for k in keys):
            words = np.frombuffer(b"".join(keys), dtype="<u8").reshape(-1, 2)
            x = words[:, 0] ^ words[:, 1]
        else:  # keys need not be 16 bytes (tests, other callers)
            x = np.array([_fold(k) for k in keys], dtype=np.uint64)
        if self._shift >= 64:  # a single counter per row
            return np.zeros((len(keys), self.depth), dtype=np.intp)
        return ((x[:, None] * self._mults[None, :]) >> np.uint64(self._shift)).astype(np.intp)

    def record(self, key: bytes) -> None:
        """Count one access to ``key``."""
        self.record_many((key,))

    def record_many(self, keys: Iterable[bytes]) -> None:
        """Count one access to each of ``keys`` (a key listed twice counts twice), in one vectorized update.

        Each key's minimal counters rise to its minimum plus its count; a counter
        two keys share takes the larger value, so no key is ever undercounted.
        """
        if not isinstance(keys, (list, tuple)):
            keys = list(keys)
        if len(keys) < _BATCH:  # a few keys (a decode step's stores): numpy's per-call cost would dominate
            for key in keys:
                self._record_one(key)
            return
        counted = Counter(keys)
        uniq = list(counted)
        cells = self._cells(uniq)
        rows = self._rows
        counts = rows[self._rowidx, cells]
        low = counts.min(axis=1, keepdims=True)
        grow = counts == low
        new = low + np.fromiter(counted.values(), dtype=rows.dtype, count=len(uniq))[:, None]
        np.maximum.at(rows, (np.broadcast_to(self._rowidx, cells.shape)[grow], cells[grow]),
                      np.broadcast_to(new, cells.shape)[grow])
        self._recorded_more(len(keys))

    def _slots(self, key: bytes) -> list[int]:
        x = _fold(key)  # x >> 64 is 0: a single counter per row needs no special case here
        return [((x * m) & _M64) >> self._shift for m in _ROW_MULTIPLIERS[: self.depth]]

    def _record_one(self, key: bytes) -> None:
        rows = self._rows
        cells = list(enumerate(self._slots(key)))
        low = min(rows.item(r, s) for r, s in cells)
        for r, s in cells:
            if rows.item(r, s) == low:
                rows[r, s] = low + 1
        self._recorded_more(1)

    def _recorded_more(self, n: int) -> None:
        """TinyLFU's reset: every ``sample`` recordings, halve every counter."""
        self._recorded += n
        if self._recorded >= self.sample:
            self._recorded = 0
            self._rows >>= 1

    def estimate(self, key: bytes) -> int:
        """Approximate accesses to ``key`` (never an undercount, before aging)."""
        rows = self._rows
        return min(rows.item(r, s) for r, s in enumerate(self._slots(key)))

    def admits(self, key: bytes) -> bool:
        return self.min_hits == 0 or self.estimate(key) >= self.min_hits


GHOSTS_PER_SLOT = 4
"""Pages an :class:`AdaptiveGate` remembers per slot of its tier after they leave or are kept out (about 150
bytes each), so that a cycle up to this many times the tier still votes when it comes back."""


class AdaptiveGate:
    """Whether a tier's admission should be frequency-gated now: gated while its traffic is a cycle larger
    than the tier, plain LRU while it is recency-friendly.

    Each page the tier evicts or keeps out is remembered (up to
    :data:`GHOSTS_PER_SLOT` per slot) with the access clock of its last use
    (the index's clock counts pages looked up and allocated). When it is
    asked for again, the accesses in between vote: at most the tier's
    capacity means LRU would have kept it (recency: the next turns of
    conversations that come and go, where gating would shut new pages out
    behind old ones seen more often), more means a cycle LRU loses (gating
    keeps a stable part of it). The gate is on while loop votes outnumber
    recency votes; votes halve once a tier's worth has come in, so the
    choice follows the traffic. It does not feed itself: a page the gate
    kept out that returns soon votes for recency and turns the gate off.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.ghosts: OrderedDict[bytes, int] = OrderedDict()
        self.loop_votes = 0.0
        self.recency_votes = 0.0

    @property
    def gating(self) -> bool:
        return self.loop_votes > self.recency_votes

    def vote(self, keys: Sequence[bytes], clock: int) -> None:
        """``keys`` (pages the tier does not hold) are asked for at accesses ``clock + 1`` on."""
        for key in keys:
            clock += 1
            last = self.ghosts.pop(key, None)
            if last is None:
                continue
            if clock - last <= self.capacity:
                self.recency_votes += 1
            else:
                self.loop_votes += 1
        if self.loop_votes + self.recency_votes > self.capacity:
            self.loop_votes /= 2
            self.recency_votes /= 2

    def remember(self, keys: Iterable[bytes], last: int) -> None:
        """``keys`` left the tier (evicted) or were kept out; ``last``: the clock at their last use."""
        ghosts = self.ghosts
        for key in keys:
            ghosts[key] = last
            ghosts.move_to_end(key)
        while len(ghosts) > GHOSTS_PER_SLOT * self.capacity:
            ghosts.popitem(last=False)
