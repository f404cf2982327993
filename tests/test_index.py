"""PageIndex: slots, pins, eviction order, prefix lookup, events; a stateful model check."""

from __future__ import annotations


import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from dynkv.index import IndexEvent, PageIndex, SlotAllocator
from dynkv.policy import EVICTION_POLICIES, FIFOPolicy, FrequencyFilter, LRUPolicy


def k(i: int) -> bytes:
    return i.to_bytes(16, "little")


def stored(idx: PageIndex, tier: str, keys: list[bytes]) -> list[tuple[bytes, int]]:
    got = idx.allocate(tier, keys)
    idx.commit(tier, [key for key, _ in got])
    return got


# -- slot allocator -------------------------------------------------------


def test_slot_allocator() -> None:
    a = SlotAllocator(3)
    assert [a.alloc(), a.alloc(), a.alloc(), a.alloc()] == [0, 1, 2, None]
    a.free(1)
    assert a.num_free == 1 and not a.in_use(1) and a.in_use(0)
    assert a.alloc() == 1
    with pytest.raises(ValueError, match="double free"):
        a.free(5)
    a.free(2)
    with pytest.raises(ValueError, match="double free"):
        a.free(2)
    with pytest.raises(ValueError, match="capacity"):
        SlotAllocator(-1)
    assert SlotAllocator(0).alloc() is None


# -- eviction order -------------------------------------------------------


def test_lru_evicts_least_recently_used() -> None:
    idx = PageIndex({"host": 3}, policy="lru")
    stored(idx, "host", [k(0), k(1), k(2)])
    idx.touch([k(0)])
    idx.lookup([k(1)])
    assert [key for key, _ in idx.victims("host", 3)] == [k(2), k(0), k(1)]
    slot2 = idx.location(k(2), "host")
    got = stored(idx, "host", [k(3)])
    assert got == [(k(3), slot2)]  # the victim's slot is reused
    assert not idx.holds(k(2), "host")
    stored(idx, "host", [k(4)])
    assert not idx.holds(k(0), "host")
    assert idx.stats()["host"].evictions == 2


def test_fifo_ignores_use() -> None:
    idx = PageIndex({"host": 3}, policy="fifo")
    stored(idx, "host", [k(0), k(1), k(2)])
    idx.touch([k(0)])
    idx.lookup([k(0), k(1)])
    stored(idx, "host", [k(3)])
    assert not idx.holds(k(0), "host")
    assert [key for key, _ in idx.victims("host", 5)] == [k(1), k(2), k(3)]


def test_pure_lookup_does_not_reorder() -> None:
    idx = PageIndex({"host": 2})
    stored(idx, "host", [k(0), k(1)])
    idx.lookup([k(0)], touch=False)
    assert idx.victims("host", 1)[0][0] == k(0)


@pytest.mark.parametrize("policy", sorted(EVICTION_POLICIES))
def test_pinned_pages_are_skipped_then_refused(policy: str) -> None:
    idx = PageIndex({"host": 3}, policy=policy)
    stored(idx, "host", [k(0), k(1), k(2)])
    idx.pin("host", [k(0), k(1)])
    stored(idx, "host", [k(3)])  # only k(2) is evictable
    assert idx.holds(k(0), "host") and idx.holds(k(1), "host") and not idx.holds(k(2), "host")
    idx.pin("host", [k(3)])
    assert idx.allocate("host", [k(4), k(5), k(4)]) == []
    st_ = idx.stats()["host"]
    assert st_.refusals == 2 and st_.pinned == 3 and st_.free == 0
    idx.unpin("host", [k(1)])
    assert idx.allocate("host", [k(4)]) == [(k(4), idx_slot(idx, k(4)))]
    assert not idx.holds(k(1), "host")


def idx_slot(idx: PageIndex, key: bytes) -> int:
    return idx._tiers["host"].entries[key].slot


def test_pending_pages_are_never_evicted() -> None:
    idx = PageIndex({"host": 2})
    got = idx.allocate("host", [k(0), k(1)])
    assert len(got) == 2
    assert idx.allocate("host", [k(2)]) == []
    assert idx.lookup([k(0)]).num_keys == 0  # pending is invisible
    idx.commit("host", [k(0)])
    assert idx.lookup([k(0)]).num_keys == 1
    assert len(idx.allocate("host", [k(2)])) == 1
    assert not idx.holds(k(0), "host") and idx.holds(k(1), "host")


def test_pins_count_up_and_down() -> None:
    idx = PageIndex({"host": 1})
    stored(idx, "host", [k(0)])
    idx.pin("host", [k(0)])
    idx.lookup([k(0)], pin=True)
    assert idx.pins(k(0), "host") == 2
    idx.unpin("host", [k(0)])
    assert idx.allocate("host", [k(1)]) == []
    idx.unpin("host", [k(0)])
    assert len(idx.allocate("host", [k(1)])) == 1
    with pytest.raises(ValueError, match="not pinned"):
        idx.unpin("host", [k(1)])


# -- prefix lookup --------------------------------------------------------


def test_longest_prefix_over_tiers() -> None:
    idx = PageIndex({"host": 8, "disk": 8})
    host = dict(stored(idx, "host", [k(0), k(1), k(3)]))
    disk = dict(stored(idx, "disk", [k(1), k(2), k(4)]))
    m = idx.lookup([k(0), k(1), k(2), k(3), k(5), k(4)])
    assert m.num_keys == 4
    # Faster tier first: k(1) is in both and comes from host.
    assert m.locations == (("host", host[k(0)]), ("host", host[k(1)]), ("disk", disk[k(2)]), ("host", host[k(3)]))
    assert m.tiers() == {"host": 3, "disk": 1}
    assert idx.lookup([k(9), k(0)]).num_keys == 0
    assert idx.lookup([]).num_keys == 0
    assert idx.stats()["host"].hits == 3 and idx.stats()["disk"].hits == 1


def test_lookup_pins_in_the_tier_found() -> None:
    idx = PageIndex({"host": 2, "disk": 2})
    stored(idx, "host", [k(0)])
    stored(idx, "disk", [k(0), k(1)])
    m = idx.lookup([k(0), k(1)], pin=True)
    assert m.num_keys == 2
    assert idx.pins(k(0), "host") == 1 and idx.pins(k(0), "disk") == 0 and idx.pins(k(1), "disk") == 1
    with pytest.raises(ValueError, match="unpin it before removing"):
        idx.remove("disk", [k(1)])


def test_lookup_in_a_large_index() -> None:
    n = 100_000
    idx = PageIndex({"host": n})
    keys = [int(x).to_bytes(16, "little") for x in np.random.default_rng(0).integers(0, 2**63, size=n)]
    for i in range(0, n, 4096):
        stored(idx, "host", keys[i : i + 4096])
    m = idx.lookup(keys[5000:5256] + [b"\xff" * 16] + keys[6000:6010])
    assert m.num_keys == 256
    assert list(m.locations) == [("host", idx.location(key, "host")) for key in keys[5000:5256]]


# -- remove, events, stats -----------------------------------------------


def test_remove_pending_and_stored_and_events() -> None:
    events: list[IndexEvent] = []
    idx = PageIndex({"host": 4}, on_event=events.append)
    stored(idx, "host", [k(0), k(1)])
    idx.allocate("host", [k(2)])
    idx.remove("host", [k(2), k(0), k(7)])  # pending abandoned, stored removed, unknown ignored
    assert events == [
        IndexEvent("stored", "host", k(0)),
        IndexEvent("stored", "host", k(1)),
        IndexEvent("removed", "host", k(0)),
    ]
    s = idx.stats()["host"]
    assert (s.stored, s.pending, s.free) == (1, 0, 3)
    assert idx.drain_events() == []  # the callback took them


def test_drain_events_and_evict() -> None:
    idx = PageIndex({"disk": 3})
    stored(idx, "disk", [k(0), k(1), k(2)])
    assert idx.evict("disk", 2) == 2
    assert idx.evict("disk", 5) == 1
    ev = idx.drain_events()
    assert [e.kind for e in ev] == ["stored"] * 3 + ["removed"] * 3
    assert [e.key for e in ev[3:]] == [k(0), k(1), k(2)]
    assert idx.drain_events() == []


def test_errors_name_the_problem() -> None:
    idx = PageIndex({"host": 2})
    with pytest.raises(ValueError, match="unknown tier 'gpu'"):
        idx.allocate("gpu", [k(0)])
    with pytest.raises(ValueError, match="allocate it first"):
        idx.commit("host", [k(0)])
    stored(idx, "host", [k(0)])
    with pytest.raises(ValueError, match="already stored"):
        idx.commit("host", [k(0)])
    with pytest.raises(ValueError, match="expected one of lru, fifo"):
        PageIndex({"host": 1}, policy="mru")
    with pytest.raises(ValueError, match="no tiers"):
        PageIndex({})


def test_custom_policy_factory() -> None:
    idx = PageIndex({"host": 2}, policy=FIFOPolicy)
    assert isinstance(idx._tiers["host"].policy, FIFOPolicy)
    assert isinstance(PageIndex({"host": 2})._tiers["host"].policy, LRUPolicy)


# -- frequency filter ----------------------------------------------------


def test_frequency_filter_admits_after_min_hits() -> None:
    idx = PageIndex({"host": 4}, admit_min_hits=2)
    stored(idx, "host", [k(0), k(1)])  # a store counts once
    assert not idx.admits(k(0))
    idx.lookup([k(0)])  # a hit counts once more
    assert idx.admits(k(0)) and not idx.admits(k(1))
    idx.lookup([k(1)], touch=False)
    assert not idx.admits(k(1))
    assert PageIndex({"host": 1}, admit_min_hits=0).admits(k(5))


def test_frequency_filter_never_undercounts(rng: np.random.Generator) -> None:
    f = FrequencyFilter(width=256, depth=4, sample=10**9)
    counts = rng.integers(0, 6, size=2000)
    for i, c in enumerate(counts):
        for _ in range(c):
            f.record(k(i))
    est = np.array([f.estimate(k(i)) for i in range(len(counts))])
    assert (est >= counts).all()
    assert f.width == 256 and len(f._rows) == 4  # bounded memory


def test_frequency_filter_batches_never_undercount(rng: np.random.Generator) -> None:
    """record_many over a shuffled multiset (keys repeated, counters shared) counts like record, or more."""
    f = FrequencyFilter(width=128, depth=4, sample=10**9)
    counts = rng.integers(0, 6, size=1500)
    batch = [k(i) for i, c in enumerate(counts) for _ in range(c)]
    rng.shuffle(batch)
    for i in range(0, len(batch), 700):
        f.record_many(batch[i : i + 700])
    est = np.array([f.estimate(k(i)) for i in range(len(counts))])
    assert (est >= counts).all()
    alone = FrequencyFilter(width=1 << 16, depth=4)
    alone.record_many([k(1), k(2), k(1)])
    assert (alone.estimate(k(1)), alone.estimate(k(2)), alone.estimate(k(3))) == (2, 1, 0)
    one_by_one, batched = FrequencyFilter(width=1 << 16), FrequencyFilter(width=1 << 16)
    keys = [k(i) for i in range(100)] * 2
    for key in keys:
        one_by_one.record(key)
    batched.record_many(keys)  # the vectorized path hashes keys to the same counters
    assert [one_by_one.estimate(x) for x in keys] == [batched.estimate(x) for x in keys] == [2] * 200


def test_frequency_filter_ages() -> None:
    f = FrequencyFilter(min_hits=2, width=64, sample=100)
    for _ in range(8):
        f.record(k(1))
    assert f.estimate(k(1)) == 8
    for i in range(92):
        f.record(k(1000 + i))
    assert f.estimate(k(1)) <= 4  # halved at 100 recordings


# -- stateful model check ------------------------------------------------

KEYS = [k(i) for i in range(12)]
TIERS = {"host": 4, "disk": 3}


class IndexMachine(RuleBasedStateMachine):
    """Random operation sequences against a reference of what must hold."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[IndexEvent] = []
        self.idx = PageIndex(TIERS, policy="lru", on_event=self.events.append)
        # Reference per tier: key -> pins; pending keys; replay of events.
        self.pins: dict[str, dict[bytes, int]] = {t: {} for t in TIERS}
        self.pending: dict[str, set[bytes]] = {t: set() for t in TIERS}
        self.seen_stored: dict[str, set[bytes]] = {t: set() for t in TIERS}
        self.slots: dict[str, dict[bytes, int]] = {t: {} for t in TIERS}

    @rule(policy=st.sampled_from(sorted(EVICTION_POLICIES)))
    def restart_with_policy(self, policy: str) -> None:
        if any(self.slots[t] for t in TIERS):
            return
        self.idx = PageIndex(TIERS, policy=policy, on_event=self.events.append)

    @rule(tier=st.sampled_from(sorted(TIERS)), keys=st.lists(st.sampled_from(KEYS), max_size=6))
    def allocate(self, tier: str, keys: list[bytes]) -> None:
        before = dict(self.slots[tier])
        got = self.idx.allocate(tier, keys)
        for key, slot in got:
            assert key not in before
            self.slots[tier][key] = slot
            self.pending[tier].add(key)
        # Whatever vanished was evicted: stored and unpinned.
        for key in before:
            if not self.idx.holds(key, tier):
                assert key not in self.pending[tier] and not self.pins[tier].get(key)
                del self.slots[tier][key]
        # A refusal only when nothing was evictable.
        wanted = [key for key in dict.fromkeys(keys) if key not in before]
        if len(got) < len(wanted):
            t = self.idx._tiers[tier]
            assert len(t.policy) == 0 and t.slots.num_free == 0

    @precondition(lambda self: any(self.pending.values()))
    @rule(data=st.data())
    def commit(self, data: st.DataObject) -> None:
        tier = data.draw(st.sampled_from([t for t in TIERS if self.pending[t]]))
        key = data.draw(st.sampled_from(sorted(self.pending[tier])))
        self.idx.commit(tier, [key])
        self.pending[tier].discard(key)

    @precondition(lambda self: any(self.slots.values()))
    @rule(data=st.data())
    def pin(self, data: st.DataObject) -> None:
        tier = data.draw(st.sampled_from([t for t in TIERS if self.slots[t]]))
        key = data.draw(st.sampled_from(sorted(self.slots[tier])))
        self.idx.pin(tier, [key])
        self.pins[tier][key] = self.pins[tier].get(key, 0) + 1

    @precondition(lambda self: any(p for t in TIERS for p in self.pins[t].values()))
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        tier = data.draw(st.sampled_from([t for t in TIERS if any(self.pins[t].values())]))
        key = data.draw(st.sampled_from(sorted(x for x, n in self.pins[tier].items() if n)))
        self.idx.unpin(tier, [key])
        self.pins[tier][key] -= 1

    @rule(keys=st.lists(st.sampled_from(KEYS), max_size=8), pin=st.booleans(), touch=st.booleans())
    def lookup(self, keys: list[bytes], pin: bool, touch: bool) -> None:
        m = self.idx.lookup(keys, pin=pin, touch=touch)
        visible = {t: set(self.slots[t]) - self.pending[t] for t in TIERS}
        n = 0
        for key in keys:
            tier = next((t for t in TIERS if key in visible[t]), None)
            if tier is None:
                break
            assert m.locations[n] == (tier, self.slots[tier][key])
            if pin:
                self.pins[tier][key] = self.pins[tier].get(key, 0) + 1
            n += 1
        assert m.num_keys == n

    @rule(keys=st.lists(st.sampled_from(KEYS), max_size=4))
    def touch(self, keys: list[bytes]) -> None:
        self.idx.touch(keys)

    @rule(tier=st.sampled_from(sorted(TIERS)), key=st.sampled_from(KEYS))
    def remove(self, tier: str, key: bytes) -> None:
        if self.pins[tier].get(key):
            with pytest.raises(ValueError, match="pin"):
                self.idx.remove(tier, [key])
            return
        self.idx.remove(tier, [key])
        self.slots[tier].pop(key, None)
        self.pending[tier].discard(key)

    @rule(tier=st.sampled_from(sorted(TIERS)), n=st.integers(0, 3))
    def evict(self, tier: str, n: int) -> None:
        evictable = len(self.idx._tiers[tier].policy)
        assert self.idx.evict(tier, n) == min(n, evictable)
        for key in list(self.slots[tier]):
            if not self.idx.holds(key, tier):
                assert key not in self.pending[tier] and not self.pins[tier].get(key)
                del self.slots[tier][key]

    @invariant()
    def slots_are_exact(self) -> None:
        for name, cap in TIERS.items():
            t = self.idx._tiers[name]
            used = [e.slot for e in t.entries.values()]
            assert len(used) == len(set(used)), "a slot is handed out twice"
            assert len(used) <= cap, "capacity exceeded"
            free = t.slots._free
            assert len(free) == len(set(free))
            assert sorted(used + free) == list(range(cap)), "a slot is neither indexed nor free"
            assert {key: e.slot for key, e in t.entries.items()} == self.slots[name]

    @invariant()
    def pinned_and_pending_stay(self) -> None:
        for name in TIERS:
            t = self.idx._tiers[name]
            for key, n in self.pins[name].items():
                if n:
                    assert key in t.entries and t.entries[key].pins == n, "a pinned page was evicted"
                    assert key not in t.policy
            for key in self.pending[name]:
                assert key in t.entries and not t.entries[key].stored
                assert key not in t.policy

    @invariant()
    def policy_holds_exactly_evictable(self) -> None:
        for name in TIERS:
            t = self.idx._tiers[name]
            evictable = {key for key, e in t.entries.items() if e.stored and e.pins == 0}
            assert set(t.policy) == evictable and len(t.policy) == len(evictable)

    @invariant()
    def events_replay_to_contents(self) -> None:
        replay: dict[str, set[bytes]] = {t: set() for t in TIERS}
        for e in self.events:
            if e.kind == "stored":
                assert e.key not in replay[e.tier]
                replay[e.tier].add(e.key)
            else:
                assert e.key in replay[e.tier]
                replay[e.tier].remove(e.key)
        for name in TIERS:
            assert replay[name] == set(self.idx.keys(name))

    @invariant()
    def stats_match(self) -> None:
        for name, s in self.idx.stats().items():
            t = self.idx._tiers[name]
            assert s.capacity == TIERS[name]
            assert s.stored + s.pending + s.free == s.capacity
            assert s.pending == len(self.pending[name])
            assert s.pinned == sum(1 for n in self.pins[name].values() if n)
            assert s.stored == sum(1 for e in t.entries.values() if e.stored)


IndexMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestIndexMachine = IndexMachine.TestCase
