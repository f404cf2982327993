"""The leader's page index: which tier holds which key, in which slot.

Pure bookkeeping, no I/O: the leader asks it where a prefix lives, reserves
slots for pages it is about to store, commits them once written, and pins
pages while a copy reads them. Every operation is O(1) per key.

A page in a tier is *pending* (slot reserved, bytes being written; invisible
to lookups, never evicted) or *stored* (visible). Stored pages with no pin are
the eviction candidates, ordered by the tier's :class:`EvictionPolicy`. Every
page that becomes visible or stops being visible is reported as an
:class:`IndexEvent` (for KV-aware routing), so replaying the events gives the
stored contents of each tier.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from dynkv.policy.admission import AdaptiveGate, FrequencyFilter
from dynkv.policy.eviction import EVICTION_POLICIES, EvictionPolicy

__all__ = [
    "IndexEvent",
    "PageIndex",
    "PrefixMatch",
    "SlotAllocator",
    "TierStats",
]


class SlotAllocator:
    """Fixed-capacity slot numbers ``[0, capacity)``: a free stack and an in-use map.

    Lowest slots go out first on a fresh allocator, which keeps a lightly used
    pool's pages (and disk file offsets) compact.
    """

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"capacity={capacity!r}: expected an integer >= 0")
        self.capacity = capacity
        self._free = list(range(capacity - 1, -1, -1))
        self._used = bytearray(capacity)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self) -> int | None:
        """A free slot, or None when all are in use."""
        if not self._free:
            return None
        slot = self._free.pop()
        self._used[slot] = 1
        return slot

    def take(self, slots: Iterable[int]) -> None:
        """Claim particular free slots (pages found on disk after a restart); one pass over the free list."""
        for slot in slots:
            if not 0 <= slot < self.capacity or self._used[slot]:
                raise ValueError(f"slot {slot} is not free (capacity {self.capacity})")
            self._used[slot] = 1
        self._free = [s for s in self._free if not self._used[s]]

    def free(self, slot: int) -> None:
        if not 0 <= slot < self.capacity or not self._used[slot]:
            raise ValueError(f"slot {slot} is not in use (capacity {self.capacity}): double free?")
        self._used[slot] = 0
        self._free.append(slot)

    def in_use(self, slot: int) -> bool:
        return 0 <= slot < self.capacity and bool(self._used[slot])


@dataclass(frozen=True)
class IndexEvent:
    """A page became visible (``"stored"``) or stopped being visible (``"removed"``) in a tier."""

    kind: Literal["stored", "removed"]
    tier: str
    key: bytes


@dataclass(frozen=True)
class PrefixMatch:
    """Result of :meth:`PageIndex.lookup`.

    ``locations[i]`` is ``(tier, slot)`` of the ``i``-th key, for the
    ``num_keys`` leading keys that some tier holds.
    """

    num_keys: int
    locations: tuple[tuple[str, int], ...]

    def tiers(self) -> dict[str, int]:
        """Matched keys per tier."""
        out: dict[str, int] = {}
        for tier, _ in self.locations:
            out[tier] = out.get(tier, 0) + 1
        return out


@dataclass(frozen=True)
class TierStats:
    """Occupancy and counters of one tier."""

    capacity: int
    stored: int
    pending: int
    pinned: int
    free: int
    hits: int
    evictions: int
    refusals: int
    filtered: int = 0  # of the refusals: by frequency-gated admission
    gated: bool = False  # admission is frequency-gated now


class _Entry:
    __slots__ = ("last", "pins", "slot", "stored")

    def __init__(self, slot: int, last: int = 0) -> None:
        self.slot = slot
        self.pins = 0
        self.stored = False
        self.last = last  # the index's access clock at this page's last use (adaptive tiers only)


class _Tier:
    def __init__(self, name: str, capacity: int, policy: EvictionPolicy) -> None:
        self.name = name
        self.slots = SlotAllocator(capacity)
        self.policy = policy
        self.entries: dict[bytes, _Entry] = {}
        self.num_stored = 0
        self.num_pinned = 0
        self.hits = 0
        self.evictions = 0
        self.refusals = 0
        self.filtered = 0
        self.gate: AdaptiveGate | None = None  # adaptive admission (see PageIndex)


class PageIndex:
    """Key -> (tier, slot) for the leader, with pins, eviction and events.

    Parameters
    ----------
    tiers
        Tier name -> capacity in pages, fastest first (lookups prefer earlier
        tiers), e.g. ``{"host": 4096, "disk": 65536}``.
    policy
        ``"lru"``, ``"fifo"``, ``"s3fifo"``, or a callable returning a fresh
        :class:`EvictionPolicy` (one per tier).
    admit_min_hits
        Threshold of the frequency filter (see :meth:`admits`).
    frequency
        A :class:`FrequencyFilter` to use instead of a default one.
    gated
        Tiers with frequency-gated admission: once full, a new page enters
        only if the frequency filter has seen it more often than the page it
        would evict (TinyLFU), so a cycle of reuse larger than the tier keeps a
        stable part of itself resident instead of evicting each page just
        before it comes back.
    adaptive
        Tiers whose admission is gated only while their traffic is a cycle
        larger than the tier (:class:`dynkv.policy.admission.AdaptiveGate`,
        fed with the pages that come back after leaving the tier).
    on_event
        Called with each :class:`IndexEvent` as it happens; without it events
        queue up for :meth:`drain_events`.
    """

    def __init__(
        self,
        tiers: Mapping[str, int],
        *,
        policy: str | Callable[[], EvictionPolicy] = "lru",
        admit_min_hits: int = 2,
        frequency: FrequencyFilter | None = None,
        on_event: Callable[[IndexEvent], None] | None = None,
        gated: Iterable[str] = (),
        adaptive: Iterable[str] = (),
    ) -> None:
        if not tiers:
            raise ValueError("no tiers given: expected e.g. {'host': num_pages}")
        if isinstance(policy, str):
            if policy not in EVICTION_POLICIES:
                raise ValueError(f"eviction policy {policy!r}: expected one of {', '.join(EVICTION_POLICIES)}")
            policy = EVICTION_POLICIES[policy]
        self._tiers = {name: _Tier(name, cap, policy()) for name, cap in tiers.items()}
        self._gated = frozenset(gated)
        self._adaptive = frozenset(adaptive) - self._gated
        for name in self._gated | self._adaptive:  # (unknown names raise)
            self._tier(name).gate = AdaptiveGate(self._tier(name).slots.capacity) if name in self._adaptive else None
        self._clock = 0  # pages looked up or allocated so far (the adaptive tiers' reuse distances)
        self.frequency = frequency if frequency is not None else FrequencyFilter(admit_min_hits)
        self._on_event = on_event
        self._events: list[IndexEvent] = []

    # -- queries ---------------------------------------------------------

    @property
    def tiers(self) -> tuple[str, ...]:
        """Tier names, fastest first."""
        return tuple(self._tiers)

    def _tier(self, name: str) -> _Tier:
        tier = self._tiers.get(name)
        if tier is None:
            raise ValueError(f"unknown tier {name!r}: this index has {', '.join(self._tiers)}")
        return tier

    def lookup(self, keys: Sequence[bytes], *, touch: bool = True, pin: bool = False) -> PrefixMatch:
        """How many leading ``keys`` some tier holds (stored), and where.

        Parameters
        ----------
        keys
            A request's page keys, in order.
        touch
            Count the matched pages as used: recency for the policy, and one
            access each for the frequency filter. False for a pure query.
        pin
            Pin each matched page in the tier it was found in (release with
            :meth:`unpin`), so it stays put while it is loaded.
        """
        tiers = list(self._tiers.values())
        locations: list[tuple[str, int]] = []
        for key in keys:
            for tier in tiers:
                entry = tier.entries.get(key)
                if entry is not None and entry.stored:
                    break
            else:
                break
            locations.append((tier.name, entry.slot))
            tier.hits += 1
            if touch:
                self._clock += 1
                entry.last = self._clock
            if pin:
                # A page pinned here leaves its policy, and its last unpin puts it back as the newest:
                # that is its touch.
                if entry.pins == 0:
                    tier.num_pinned += 1
                    tier.policy.discard(key)
                entry.pins += 1
            elif touch and entry.pins == 0:
                tier.policy.touch(key)
        if touch:
            self.frequency.record_many(keys[: len(locations)])
        return PrefixMatch(len(locations), tuple(locations))

    def location(self, key: bytes, tier: str, *, pending: bool = False) -> int | None:
        """Slot of ``key`` in ``tier`` if stored there (or, with ``pending``, reserved), else None."""
        entry = self._tier(tier).entries.get(key)
        return entry.slot if entry is not None and (entry.stored or pending) else None

    def holds(self, key: bytes, tier: str) -> bool:
        """True when ``tier`` has ``key``, stored or pending (no need to store it again)."""
        return key in self._tier(tier).entries

    def keys(self, tier: str) -> Iterator[bytes]:
        """Stored keys of ``tier``."""
        return (k for k, e in self._tier(tier).entries.items() if e.stored)

    def pins(self, key: bytes, tier: str) -> int:
        entry = self._tier(tier).entries.get(key)
        return 0 if entry is None else entry.pins

    def admits(self, key: bytes) -> bool:
        """Whether the frequency filter lets ``key`` into the disk tier."""
        return self.frequency.admits(key)

    def victims(self, tier: str, n: int) -> list[tuple[bytes, int]]:
        """The next ``n`` pages eviction would take from ``tier``, as ``(key, slot)``.

        For demotion: pin them, copy them down, then :meth:`remove` them.
        """
        t = self._tier(tier)
        return [(k, t.entries[k].slot) for k in t.policy.peek(n)]

    # -- changes ---------------------------------------------------------

    def allocate(self, tier: str, keys: Sequence[bytes], *, gate: bool = True) -> list[tuple[bytes, int]]:
        """Reserve a slot of ``tier`` for each key it does not hold yet.

        Keys the tier already holds (stored or pending) when called are
        skipped, and count as used (so LRU does not evict them for this very
        request). When the tier is full the policy's victims are evicted
        (``"removed"`` events). When nothing is evictable (all pinned or
        pending) the remaining keys get no slot and each counts as a refusal.
        ``gate=False`` lets the keys past frequency-gated admission: pages
        a load needs in this tier now (read from the disk or the shared
        tier, pulled from a prefill engine), not pages offered for later.

        Returns
        -------
        list[tuple[bytes, int]]
            ``(key, slot)`` of each new pending page, in ``keys`` order; pass
            the keys to :meth:`commit` once written, or :meth:`remove` to give
            the slots back.
        """
        t = self._tier(tier)
        wanted: list[bytes] = []
        for key in dict.fromkeys(keys):
            entry = t.entries.get(key)
            if entry is None:
                wanted.append(key)
            elif entry.stored and entry.pins == 0:
                t.policy.touch(key)
        out: list[tuple[bytes, int]] = []
        adaptive = t.gate
        if adaptive is not None:
            adaptive.vote(wanted, self._clock)
            self._clock += len(wanted)
        gated = gate and (t.name in self._gated or (adaptive is not None and adaptive.gating))
        counts_all = t.name in self._gated or adaptive is not None
        if counts_all:
            self.frequency.record_many(wanted)  # a refused page was still seen: its count can grow past the victims'
        for i, key in enumerate(wanted):
            slot = t.slots.alloc()
            if slot is None and gated and not self._beats_victim(t, key):
                t.filtered += len(wanted) - i  # a page no more used than the one it would replace stays out
                t.refusals += len(wanted) - i
                if adaptive is not None:
                    adaptive.remember(wanted[i:], self._clock)
                break
            if slot is None and self._evict_one(t):
                slot = t.slots.alloc()
            if slot is None:
                t.refusals += len(wanted) - i  # later pages of a prefix are no use without this one
                break
            t.entries[key] = _Entry(slot, self._clock)
            out.append((key, slot))
        if not counts_all:
            self.frequency.record_many(k for k, _ in out)
        return out

    def _beats_victim(self, t: _Tier, key: bytes) -> bool:
        """Frequency-gated admission (TinyLFU): ``key`` is let in only if seen more often than the next victim,
        by more than one: in a cycle the victim may simply not have come round yet this time."""
        victim = t.policy.peek(1)
        return not victim or self.frequency.estimate(key) > self.frequency.estimate(victim[0]) + 1

    def adopt(self, tier: str, pages: Iterable[tuple[bytes, int]]) -> int:
        """Index pages already present in given slots (a disk tier after a restart).

        Each ``(key, slot)`` becomes stored, as if allocated and committed;
        a key already indexed or a slot already taken is skipped. Returns how
        many pages were adopted.
        """
        t = self._tier(tier)
        taken: dict[int, bytes] = {}
        seen: set[bytes] = set()
        for key, slot in pages:
            if key in t.entries or key in seen or slot in taken or not 0 <= slot < t.slots.capacity:
                continue
            if not t.slots.in_use(slot):
                taken[slot] = key
                seen.add(key)
        t.slots.take(taken)
        for slot, key in taken.items():
            t.entries[key] = _Entry(slot)
        self.commit(tier, taken.values())
        return len(taken)

    def commit(self, tier: str, keys: Iterable[bytes]) -> None:
        """Mark pending pages stored (their bytes are written): visible and evictable."""
        t = self._tier(tier)
        for key in keys:
            entry = self._entry(t, key)
            if entry.stored:
                raise ValueError(f"page {key.hex()} is already stored in tier {tier!r}")
            entry.stored = True
            t.num_stored += 1
            if entry.pins == 0:
                t.policy.add(key)
            self._emit("stored", tier, key)

    def pin(self, tier: str, keys: Iterable[bytes]) -> None:
        """Keep pages in ``tier`` until :meth:`unpin`; pins count up."""
        t = self._tier(tier)
        for key in keys:
            self._pin(t, key, self._entry(t, key))

    def unpin(self, tier: str, keys: Iterable[bytes]) -> None:
        """Release one pin of each page; a stored page with none left is evictable again."""
        t = self._tier(tier)
        entries, add = t.entries, t.policy.add
        for key in keys:
            entry = entries.get(key) or self._entry(t, key)  # _entry names a page the tier lacks
            if entry.pins == 0:
                raise ValueError(f"page {key.hex()} in tier {tier!r} is not pinned")
            entry.pins -= 1
            if entry.pins == 0:
                t.num_pinned -= 1
                if entry.stored:
                    add(key)

    def touch(self, keys: Iterable[bytes]) -> None:
        """Count pages as used, in every tier that stores them (recency and frequency)."""
        keys = list(keys)
        self.frequency.record_many(keys)
        for key in keys:
            for t in self._tiers.values():
                entry = t.entries.get(key)
                if entry is not None and entry.stored and entry.pins == 0:
                    t.policy.touch(key)

    def remove(self, tier: str, keys: Iterable[bytes]) -> None:
        """Drop pages from ``tier`` and free their slots.

        A pending page is simply abandoned (its store failed or was cancelled);
        a stored one emits ``"removed"``. Keys the tier does not hold are
        ignored; pinned pages cannot be removed.
        """
        t = self._tier(tier)
        for key in keys:
            entry = t.entries.get(key)
            if entry is None:
                continue
            if entry.pins:
                raise ValueError(
                    f"page {key.hex()} in tier {tier!r} has {entry.pins} pin(s): unpin it before removing"
                )
            self._drop(t, key, entry)

    def evict(self, tier: str, n: int) -> int:
        """Evict up to ``n`` pages of ``tier`` now; returns how many went."""
        t = self._tier(tier)
        done = 0
        while done < n and self._evict_one(t):
            done += 1
        return done

    def drain_events(self) -> list[IndexEvent]:
        """Events since the last drain, oldest first (when no ``on_event`` is set)."""
        events, self._events = self._events, []
        return events

    def stats(self) -> dict[str, TierStats]:
        return {
            name: TierStats(
                capacity=t.slots.capacity,
                stored=t.num_stored,
                pending=len(t.entries) - t.num_stored,
                pinned=t.num_pinned,
                free=t.slots.num_free,
                hits=t.hits,
                evictions=t.evictions,
                refusals=t.refusals,
                filtered=t.filtered,
                gated=name in self._gated or (t.gate is not None and t.gate.gating),
            )
            for name, t in self._tiers.items()
        }

    # -- internals -------------------------------------------------------

    def _entry(self, t: _Tier, key: bytes) -> _Entry:
        entry = t.entries.get(key)
        if entry is None:
            raise ValueError(f"page {key.hex()} is not in tier {t.name!r}: allocate it first")
        return entry

    def _pin(self, t: _Tier, key: bytes, entry: _Entry) -> None:
        if entry.pins == 0:
            t.num_pinned += 1
            t.policy.discard(key)
        entry.pins += 1

    def _evict_one(self, t: _Tier) -> bool:
        key = t.policy.pop()
        if key is None:
            return False
        t.evictions += 1
        entry = t.entries[key]
        if t.gate is not None:
            t.gate.remember((key,), entry.last)
        self._drop(t, key, entry)
        return True

    def _drop(self, t: _Tier, key: bytes, entry: _Entry) -> None:
        del t.entries[key]
        t.slots.free(entry.slot)
        if entry.stored:
            t.num_stored -= 1
            t.policy.discard(key)
            self._emit("removed", t.name, key)

    def _emit(self, kind: Literal["stored", "removed"], tier: str, key: bytes) -> None:
        event = IndexEvent(kind, tier, key)
        if self._on_event is not None:
            self._on_event(event)
        else:
            self._events.append(event)
