"""Eviction under reuse patterns, through the page index as the leader drives it (pin on a hit, release after).

Multi-turn traffic revisits each conversation's prefix once per turn; when the
conversations' working set exceeds the host tier, LRU evicts every prefix just
before it comes back. These runs replay such cycles (and recency-friendly
traffic) and compare hit ratios per policy; no timing is involved.
"""

from __future__ import annotations

import numpy as np
import pytest

from dynkv.index import PageIndex
from dynkv.policy import EVICTION_POLICIES, S3FIFOPolicy


def k(i: int) -> bytes:
    return int(i).to_bytes(16, "little")


def replay(policy: str, capacity: int, requests: list[list[int]], *, gated: bool = False,
           adaptive: bool = False) -> float:
    """Hit ratio (pages) of requests of page ids through a one-tier index: look up a prefix, store the rest."""
    idx = PageIndex({"host": capacity}, policy=policy, admit_min_hits=0, gated=("host",) if gated else (),
                    adaptive=("host",) if adaptive else ())
    hits = total = 0
    for req in requests:
        keys = [k(i) for i in req]
        m = idx.lookup(keys, pin=True)
        hit = keys[: m.num_keys]
        hits += len(hit)
        total += len(keys)
        rest = keys[m.num_keys:]
        got = [key for key, _ in idx.allocate("host", rest)]
        idx.commit("host", got)
        idx.unpin("host", hit)
    return hits / total


def conversations(n_conv: int, turns: int, prefix_pages: int, rng: np.random.Generator) -> list[list[int]]:
    """Each conversation's later turns revisit its whole prefix (its earlier turns) and add a page."""
    out, next_id = [], 0
    convs = []
    for _ in range(n_conv):
        convs.append(list(range(next_id, next_id + prefix_pages)))
        next_id += prefix_pages
    for _ in range(turns):
        for c in rng.permutation(n_conv):
            convs[c] = convs[c] + [next_id]
            next_id += 1
            out.append(list(convs[c]))
    return out


def churn(active: int, turns: int, prefix_pages: int, total: int, rng: np.random.Generator) -> list[list[int]]:
    """Conversations that come and go: ``active`` at a time, each ``turns`` turns (a page more each), then
    replaced by a new one, until ``total`` have finished. The active ones fit a tier; their history does not."""
    out: list[list[int]] = []
    next_id = 0

    def new() -> list:
        nonlocal next_id
        next_id += prefix_pages
        return [list(range(next_id - prefix_pages, next_id)), 0]

    convs = [new() for _ in range(active)]
    done = 0
    while done < total:
        i = int(rng.integers(active))
        convs[i][0] = convs[i][0] + [next_id]
        next_id += 1
        convs[i][1] += 1
        out.append(list(convs[i][0]))
        if convs[i][1] >= turns:
            convs[i] = new()
            done += 1
    return out


@pytest.mark.parametrize("ratio", [1.5, 2.3, 4.0])
def test_s3fifo_keeps_part_of_a_cycle_that_lru_loses(rng: np.random.Generator, ratio: float) -> None:
    """The issue's second workload: a working set 2.3x the host tier, conversations revisited in turn."""
    reqs = conversations(48, 6, 32, rng)
    working_set = len({p for r in reqs for p in r})
    capacity = int(working_set / ratio)
    lru = replay("lru", capacity, reqs)
    s3 = replay("s3fifo", capacity, reqs)
    gated = replay("lru", capacity, reqs, gated=True)
    adaptive = replay("lru", capacity, reqs, adaptive=True)
    share = capacity / working_set
    later = sum(len(r) for r in reqs[48:]) / sum(len(r) for r in reqs)  # the first turn cannot hit
    print(f"working set {ratio}x the tier: LRU {lru:.3f}, S3-FIFO {s3:.3f}, gated LRU {gated:.3f}, "
          f"adaptive {adaptive:.3f}; "
          f"tier / working set {share:.3f}, later-turn share of pages {later:.3f}")
    if ratio >= 2.3:
        assert lru < 0.5 * share * later, "the pattern defeats LRU (else this test proves nothing)"
    assert gated >= 0.8 * share * later, f"gated admission kept {gated:.3f} of {share * later:.3f}"
    assert gated > lru
    assert adaptive >= 0.8 * share * later, f"adaptive admission kept {adaptive:.3f} of {share * later:.3f}"
    assert adaptive >= 0.9 * gated


@pytest.mark.parametrize("fit", [1.2, 2.0, 4.0])
def test_adaptive_admission_keeps_lru_where_conversations_come_and_go(rng: np.random.Generator, fit: float) -> None:
    """The active conversations fit the tier (``fit`` times their pages), their history does not: LRU keeps
    every next turn, while gating shuts new conversations out behind finished ones seen more often."""
    reqs = churn(8, 6, 32, 150, rng)
    capacity = int(8 * (32 + 6) * fit)
    lru = replay("lru", capacity, reqs)
    gated = replay("lru", capacity, reqs, gated=True)
    adaptive = replay("lru", capacity, reqs, adaptive=True)
    print(f"churn, tier {fit}x the active pages: LRU {lru:.3f}, gated {gated:.3f}, adaptive {adaptive:.3f}")
    assert gated < 0.5 * lru, "the pattern defeats gating (else this test proves nothing)"
    # Over 300 random streams at fit 1.2, adaptive/LRU was 0.895 at worst (median 0.936); at 2.0, 0.991 at
    # worst: the gate's votes lag each new conversation a little where the tier is tight.
    assert adaptive >= 0.88 * lru


def test_adaptive_gate_turns_on_for_a_cycle_and_off_when_traffic_turns_recent(rng: np.random.Generator) -> None:
    cycle = conversations(48, 4, 32, rng)
    capacity = int(len({p for r in cycle for p in r}) / 2.3)
    idx = PageIndex({"host": capacity}, policy="lru", admit_min_hits=0, adaptive=("host",))

    def serve(reqs: list[list[int]]) -> None:
        for req in reqs:
            keys = [k(i) for i in req]
            m = idx.lookup(keys, pin=True)
            idx.commit("host", [key for key, _ in idx.allocate("host", keys[m.num_keys:])])
            idx.unpin("host", keys[: m.num_keys])

    assert not idx.stats()["host"].gated  # nothing has come back yet
    serve(cycle)
    assert idx.stats()["host"].gated
    assert idx.stats()["host"].filtered > 0
    serve([[10**6 + p for p in r] for r in churn(4, 12, 16, 60, rng)])  # the active set fits: pages return soon
    assert not idx.stats()["host"].gated


def test_a_load_gets_host_slots_past_the_gate(rng: np.random.Generator) -> None:
    """Pages read from the disk for a load need host slots now: the gate applies to pages offered for later."""
    idx = PageIndex({"host": 8}, policy="lru", admit_min_hits=0, gated=("host",))
    hot = [k(i) for i in range(8)]
    for _ in range(3):
        idx.commit("host", [key for key, _ in idx.allocate("host", hot)])
        idx.lookup(hot)
    cold = [k(100 + i) for i in range(3)]
    assert idx.allocate("host", cold) == [] and idx.stats()["host"].filtered == 3
    got = idx.allocate("host", cold, gate=False)
    assert [key for key, _ in got] == cold
    assert idx.stats()["host"].evictions == 3


def test_s3fifo_matches_lru_when_the_working_set_fits(rng: np.random.Generator) -> None:
    reqs = conversations(16, 6, 32, rng)
    working_set = len({p for r in reqs for p in r})
    lru = replay("lru", working_set + 8, reqs)
    assert replay("s3fifo", working_set + 8, reqs) == lru
    assert replay("lru", working_set + 8, reqs, gated=True) == lru


def test_s3fifo_on_a_skewed_stream_is_no_worse_than_lru(rng: np.random.Generator) -> None:
    """Zipf-popular shared prefixes with one-off tails: frequency helps, one-offs pass through probation."""
    reqs = []
    for i in range(4000):
        prefix = int(rng.zipf(1.3)) % 200
        reqs.append([prefix * 4 + j for j in range(4)] + [10_000 + i])
    lru, s3 = replay("lru", 150, reqs), replay("s3fifo", 150, reqs)
    gated = replay("lru", 150, reqs, gated=True)
    print(f"zipf: LRU {lru:.3f}, S3-FIFO {s3:.3f}, gated LRU {gated:.3f}")
    assert s3 >= lru - 0.01 and gated >= lru - 0.01


def test_policy_contract() -> None:
    p = S3FIFOPolicy()
    for i in range(20):
        p.add(k(i))
    assert len(p) == 20 and k(3) in p and k(99) not in p
    p.touch(k(0))
    p.discard(k(5))  # pinned
    assert k(5) not in p and len(p) == 19
    p.add(k(5))  # released: back, with a use
    assert k(5) in p
    popped = [p.pop() for _ in range(20)]
    assert None not in popped and sorted(popped) == sorted(k(i) for i in range(20))
    assert p.pop() is None and len(p) == 0
    # a page evicted from probation comes back straight into the main queue
    q = S3FIFOPolicy()
    for i in range(10):
        q.add(k(i))
    first = q.pop()
    q.add(first)
    assert first in q._main
    assert set(q.peek(3)) <= {k(i) for i in range(10)}
    assert "s3fifo" in EVICTION_POLICIES


def test_gated_admission_follows_a_shift_of_the_working_set(rng: np.random.Generator) -> None:
    """An old cycle keeps its pages' counts; a new one that replaces it takes the tier over within a few turns."""
    old = conversations(48, 6, 32, rng)
    new = [[10**6 + p for p in r] for r in conversations(48, 12, 32, rng)]
    working_set = len({p for r in old for p in r})
    capacity = int(working_set / 2.3)
    idx = PageIndex({"host": capacity}, policy="lru", admit_min_hits=0, gated=("host",))
    ratios = []
    for turn, reqs in enumerate([old[i:i + 48] for i in range(0, len(old), 48)] +
                                [new[i:i + 48] for i in range(0, len(new), 48)]):
        hits = total = 0
        for req in reqs:
            keys = [k(i) for i in req]
            m = idx.lookup(keys, pin=True)
            hits, total = hits + m.num_keys, total + len(keys)
            idx.commit("host", [key for key, _ in idx.allocate("host", keys[m.num_keys:])])
            idx.unpin("host", keys[: m.num_keys])
        ratios.append(round(hits / total, 3))
    print("hit ratio per turn (6 old, then 12 new):", ratios)
    assert max(ratios[6:]) >= 0.8 * max(ratios[:6]), "the new cycle never got the tier"


def test_leader_gates_its_host_tier_when_asked(rng: np.random.Generator) -> None:
    from harness import Engine, Model, make_leader

    model = Model()
    leader = make_leader(model, host_pages=12, host_admission="frequency")
    engine = Engine(leader, model, tp=1, num_blocks=96, processes=False)
    try:
        prompts = [rng.integers(0, 1000, 4 * model.block_size).tolist() for _ in range(6)]  # 24 pages, 12 slots
        loaded = 0
        for turn in range(4):
            for i, p in enumerate(prompts):
                out = engine.serve(f"t{turn}-{i}", p + [turn])
                assert out.mismatched == [] and out.load_errors == set()
                loaded += out.loaded
            engine.drain()
        assert leader.metrics.value("dynkv_admissions_refused_total", tier="host", reason="filter") > 0
        assert loaded >= 3 * 12 * 0.8, f"{loaded} pages loaded over three revisiting turns of a 12-page tier"
    finally:
        engine.close()
        leader.close()
