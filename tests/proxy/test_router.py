"""The router without HTTP or vLLM: prefix index, the three policies, load balance of a hot prefix, backoff,
and vLLM's block hashes recomputed outside vLLM."""

from __future__ import annotations

import importlib.util
import random

import pytest

from dynkv.proxy.block_hash import block_hashes, none_hash, normalize, stored_hash_ok
from dynkv.proxy.router import PrefixIndex, Router

A, B, C = "http://a:1", "http://b:1", "http://c:1"
BS = 4


def hashes(tokens: list[int]) -> list[int]:
    return [normalize(h) for h in block_hashes(tokens, BS)]


def test_index_longest_prefix_per_engine_best_medium_and_removal() -> None:
    idx = PrefixIndex()
    h = list(range(100, 106))
    idx.stored(A, "GPU", h[:2])
    idx.stored(A, "CPU", h[:4])
    idx.stored(B, "STORAGE", h[:6])
    idx.stored(C, None, h[1:3])  # no medium: vLLM's device cache before media existed
    m = idx.match(h, [A, B, C])
    assert m[A] == ["GPU", "GPU", "CPU", "CPU"]
    assert m[B] == ["STORAGE"] * 6
    assert m[C] == []  # a prefix match starts at the first block
    idx.removed(A, "CPU", [h[1]])
    assert idx.match(h, [A])[A] == ["GPU", "GPU", "CPU", "CPU"]  # still on the device
    idx.removed(A, "GPU", [h[1]])
    assert idx.match(h, [A])[A] == ["GPU"]
    assert idx.counts()[A] == {"GPU": 1, "CPU": 3}
    idx.cleared(A, ["GPU"])
    assert idx.match(h, [A])[A] == ["CPU"]  # h[1] left the host tier before
    assert idx.counts()[A] == {"CPU": 3}
    idx.cleared(B)
    assert idx.match(h, [B])[B] == [] and idx.counts()[B] == {}
    assert idx.match([999], [A, B, C]) == {A: [], B: [], C: []}


def test_round_robin_and_least_loaded() -> None:
    r = Router([A, B, C], "round-robin")
    assert [r.choose().engine for _ in range(6)] == [A, B, C, A, B, C]
    r = Router([A, B, C], "least-loaded")
    r.begin(A, 100)
    r.begin(B, 10)
    assert r.choose().engine == C
    r.begin(C, 10)
    assert r.choose().engine == B  # one request each: fewer prompt tokens in flight
    r.end(A, 100)
    assert r.choose().engine == A


def test_kv_routes_to_the_longest_prefix_weighted_by_tier() -> None:
    rng = random.Random(0)
    tokens = [rng.randrange(1000) for _ in range(8 * BS)]
    h = hashes(tokens)
    r = Router([A, B, C], "kv")
    r.index.stored(A, "STORAGE", h[:6])
    r.index.stored(B, "GPU", h[:4])
    d = r.choose(h, block_size=BS, prompt_tokens=len(tokens))
    # A saves 6 disk blocks at 0.5 = 3 blocks' worth; B saves 4 device blocks: B wins.
    assert d.engine == B and d.predicted_tokens == 4 * BS and d.tiers == {"GPU": 4}
    r.index.stored(A, "CPU", h[:6])  # the host tier's copy beats the disk's: 6 * 0.8 > 4
    d = r.choose(h, block_size=BS, prompt_tokens=len(tokens))
    assert d.engine == A and d.tiers == {"CPU": 6}
    # Nothing cached anywhere: the least loaded, in turn.
    other = hashes([t + 1 for t in tokens])
    got = {r.choose(other, block_size=BS, prompt_tokens=len(tokens)).engine for _ in range(3)}
    assert got == {A, B, C}


def test_kv_spills_a_hot_prefix_once_its_engine_is_busier_than_the_prefix_is_worth() -> None:
    tokens = list(range(16 * BS))
    h = hashes(tokens)
    r = Router([A, B], "kv", load_weight=1.0)
    r.index.stored(A, "GPU", h)
    placed = []
    for _ in range(4):  # each request stays in flight
        d = r.choose(h, block_size=BS, prompt_tokens=len(tokens))
        r.begin(d.engine, len(tokens))
        placed.append(d.engine)
    # 1st: A computes nothing. 2nd: A's 64 tokens in flight against B's 64 to compute, a tie that goes to the
    # engine with fewer requests in flight. 3rd: A 64 in flight, B 64 + 64. 4th: A 128, B 64 + 64, a tie again.
    assert placed == [A, B, A, B]
    # Idle again, the prefix goes back to where it is cached.
    for e in placed:
        r.end(e, len(tokens))
    assert r.choose(h, block_size=BS, prompt_tokens=len(tokens)).engine == A
    # With no weight on load, a hot prefix pins everything to its engine.
    r0 = Router([A, B], "kv", load_weight=0.0)
    r0.index.stored(A, "GPU", h)
    for _ in range(4):
        d = r0.choose(h, block_size=BS, prompt_tokens=len(tokens))
        assert d.engine == A
        r0.begin(A, len(tokens))


def test_new_conversations_go_where_fewer_requests_went_when_nothing_overlaps() -> None:
    """Requests one after the other (never two in flight): a new prompt goes to the engine sent fewer so far,
    however the turns of the calls fall."""
    r = Router([A, B], "kv")
    convs = [hashes([c * 1000 + t for t in range(4 * BS)]) for c in range(8)]
    where = {}
    for rnd in range(4):
        for c in range(rnd + 1):  # conversation c starts in round c, then comes back every round
            d = r.choose(convs[c], block_size=BS, prompt_tokens=4 * BS)
            where.setdefault(c, d.engine)
            assert d.engine == where[c]
            r.begin(d.engine, 4 * BS)
            r.end(d.engine, 4 * BS)
            r.index.stored(d.engine, "GPU", convs[c])
    # Conversation 2 starts when A was sent 3 and B 2; conversation 3 when A was sent 4 and B 5.
    assert where == {0: A, 1: B, 2: B, 3: A}
    assert {e: r.engines[e].routed for e in (A, B)} == {A: 5, B: 5}


def test_kv_counts_conversations_parked_between_turns_as_load() -> None:
    """A conversation whose request ended is parked on its engine (its next turn will come back there) and counts
    as park_weight of its prompt tokens in flight; its own next turn does not count it; it leaves after the TTL."""
    L = 8 * BS
    convs = [list(range(c * 1000, c * 1000 + L)) for c in range(6)]
    r = Router([A, B, C], "kv", park_weight=0.5, session_ttl_s=100.0)
    for c in range(3):  # three conversations ran on A and ended; A's KV events say it holds their blocks
        r.begin(A, L, hashes=hashes(convs[c]), now=1.0)
        r.index.stored(A, "GPU", hashes(convs[c]))
        r.end(A, L, hashes=hashes(convs[c]), now=2.0)
    assert [r.engines[e].parked_tokens for e in (A, B, C)] == [3 * L, 0, 0]
    for e, c in ((B, 3), (C, 4)):  # one request in flight on each of B and C
        r.begin(e, L, hashes=hashes(convs[c]), now=3.0)
    assert [r.engines[e].parked_tokens for e in (A, B, C)] == [3 * L, 0, 0]
    # A new conversation: A idle with 0.5 * 3L parked (1.5L) against L in flight on B and on C.
    new = hashes(convs[5])
    assert r.choose(new, block_size=BS, prompt_tokens=L, now=4.0).engine in (B, C)
    r0 = Router([A, B, C], "kv", park_weight=0.0)
    r0.engines[A].parked_tokens = 3 * L
    r0.begin(B, L)
    r0.begin(C, L)
    assert r0.choose(new, block_size=BS, prompt_tokens=L).engine == A  # the load in flight alone: the idle one
    # Conversation 0's next turn: it holds its prefix on A, whose other parked load (1L) is less than the prefix.
    turn = [*convs[0], *range(50000, 50000 + 2 * BS)]
    d = r.choose(hashes(turn), block_size=BS, prompt_tokens=len(turn), now=5.0)
    assert d.engine == A and d.predicted_tokens == L
    r.begin(A, len(turn), hashes=hashes(turn), now=5.0)
    r.index.stored(A, "GPU", hashes(turn))
    assert r.engines[A].parked_tokens == 2 * L  # it moved on to this prompt, in flight now
    r.end(A, len(turn), hashes=hashes(turn), now=6.0)
    assert r.engines[A].parked_tokens == 2 * L + len(turn)
    # Its turn goes elsewhere (A down, say): it is parked there from then on.
    turn2 = [*turn, *range(60000, 60000 + BS)]
    r.begin(C, len(turn2), hashes=hashes(turn2), now=7.0)
    r.index.stored(C, "GPU", hashes(turn2))
    r.end(C, len(turn2), hashes=hashes(turn2), now=8.0)
    assert [r.engines[e].parked_tokens for e in (A, C)] == [2 * L, len(turn2)]
    # No next turn within the TTL: the conversations leave (those ended at 2.0 first).
    r.choose(new, block_size=BS, prompt_tokens=L, now=102.5)
    assert [r.engines[e].parked_tokens for e in (A, B, C)] == [0, 0, len(turn2)]
    r.choose(new, block_size=BS, prompt_tokens=L, now=108.5)
    assert [r.engines[e].parked_tokens for e in (A, B, C)] == [0, 0, 0]
    assert [r.engines[e].in_flight for e in (A, B, C)] == [0, 1, 1]  # B's and C's requests still run


def test_parked_conversations_leave_once_their_engine_evicted_their_prefix() -> None:
    """A conversation parked on an engine whose KV events say its prompt's last block left every tier (or the
    engine restarted) stops counting there; engines without events, and blocks whose events may still be on
    their way, keep theirs."""
    L = 4 * BS
    convs = [list(range(c * 1000, c * 1000 + L)) for c in range(4)]
    r = Router([A, B], "kv", park_weight=1.0)
    for c, e in ((0, A), (1, A), (2, B)):
        r.begin(e, L, hashes=hashes(convs[c]), now=1.0)
        if e == A:
            r.index.stored(A, "GPU", hashes(convs[c]))
            r.index.stored(A, "CPU", hashes(convs[c])[-1:])
        r.end(e, L, hashes=hashes(convs[c]), now=2.0)
    assert [r.engines[e].parked_tokens for e in (A, B)] == [2 * L, L]
    r.index.removed(A, "GPU", hashes(convs[0]))  # evicted from the device; still in A's host tier
    r.index.removed(A, "GPU", hashes(convs[1]))
    r.index.removed(A, "CPU", hashes(convs[1])[-1:])  # and from the host tier: gone from A
    r.choose(hashes(convs[3]), block_size=BS, prompt_tokens=L, now=2.5)
    assert [r.engines[e].parked_tokens for e in (A, B)] == [2 * L, L], "parked under a second: events may lag"
    r.choose(hashes(convs[3]), block_size=BS, prompt_tokens=L, now=3.5)
    assert [r.engines[e].parked_tokens for e in (A, B)] == [L, L], "B publishes no events: its conversation stays"
    r.index.cleared(A)  # A restarted
    r.choose(hashes(convs[3]), block_size=BS, prompt_tokens=L, now=5.0)
    assert [r.engines[e].parked_tokens for e in (A, B)] == [0, L]


def test_kv_spills_a_prefix_shared_by_many_conversations_by_their_parked_load() -> None:
    """Conversations one after the other, all opening with one 16-block prefix that A holds: nothing is ever in
    flight when the next comes, so the load in flight alone sends every one to A; parked, they spill."""
    shared = list(range(16 * BS))
    # Parked at 0.5: 2 on A, then its 2 x 72 x 0.5 parked tokens outweigh the prefix (64), and the 3rd goes to
    # B, which then holds the prefix too: from there on the two share them.
    for park_weight, want in ((0.0, {A: 8, B: 0}), (0.5, {A: 4, B: 4})):
        r = Router([A, B], "kv", park_weight=park_weight)
        r.index.stored(A, "GPU", hashes(shared))
        got = {A: 0, B: 0}
        for c in range(8):
            prompt = [*shared, *range(10000 * (c + 1), 10000 * (c + 1) + 2 * BS)]
            h = hashes(prompt)
            d = r.choose(h, block_size=BS, prompt_tokens=len(prompt), now=float(c))
            got[d.engine] += 1
            r.begin(d.engine, len(prompt), hashes=h, now=float(c))
            r.index.stored(d.engine, "GPU", h)
            r.end(d.engine, len(prompt), hashes=h, now=c + 0.5)
        assert got == want, park_weight


def test_engines_whose_hashes_differ_get_no_prediction() -> None:
    h = hashes(list(range(4 * BS)))
    r = Router([A, B], "kv")
    r.index.stored(A, "GPU", h)
    r.engines[A].predict = False
    r.begin(B, 1)
    d = r.choose(h, block_size=BS, prompt_tokens=4 * BS)
    assert d.engine == A and d.predicted_tokens == 0  # as if empty: chosen for its load alone


def test_failed_engines_leave_rotation_with_doubling_backoff() -> None:
    r = Router([A, B], "round-robin", backoff_s=1.0, backoff_max_s=5.0)
    r.failed(A, now=100.0, error="refused")
    assert r.up() == [B] and {r.choose().engine for _ in range(4)} == {B}
    assert r.due_probes(100.5) == [] and r.due_probes(101.0) == [A]
    waits = []
    for now in (101.0, 110.0, 120.0, 130.0):
        r.failed(A, now=now)
        waits.append(r.engines[A].retry_at - now)
    assert waits == [2.0, 4.0, 5.0, 5.0]
    r.failed(B, now=130.0)
    assert r.choose() is None
    r.recovered(A)
    assert r.choose().engine == A and r.engines[A].failures == 0
    assert r.choose(exclude=[A]) is None


@pytest.mark.parametrize("bad", [dict(engines=[]), dict(engines=[A, A]), dict(policy="random"),
                                 dict(load_weight=-1.0), dict(backoff_s=0.0), dict(park_weight=1.5),
                                 dict(park_weight=-0.1), dict(session_ttl_s=0.0)])
def test_bad_router_settings_are_named(bad: dict) -> None:
    kw = {"engines": [A, B], "policy": "kv", **bad}
    with pytest.raises(ValueError, match="engine|policy|" + "|".join(k for k in bad if k != "engines")):
        Router(kw.pop("engines"), **kw)


def test_block_hashes_chain_and_check_events() -> None:
    tokens = list(range(3 * BS + 2))
    hs = block_hashes(tokens, BS)
    assert len(hs) == 3 and len(set(hs)) == 3  # the partial block gets none
    assert block_hashes(tokens[: 2 * BS], BS) == hs[:2]  # a prefix's hashes are a prefix
    assert block_hashes(tokens, BS, first_extra=(("cache_salt", "s"),))[0] != hs[0]
    assert block_hashes(tokens, BS, seed="7") != hs
    assert stored_hash_ok(None, tokens[: 2 * BS], BS, hs[:2], algo="sha256", seed=None) is True
    assert stored_hash_ok(hs[0], tokens[BS : 3 * BS], BS, hs[1:3], algo="sha256", seed=None) is True
    assert stored_hash_ok(None, tokens[: 2 * BS], BS, hs[:2], algo="sha256", seed="7") is False
    assert stored_hash_ok(None, tokens[:BS], BS, [normalize(hs[0])], algo="sha256", seed=None) is True  # int form
    assert stored_hash_ok(normalize(hs[0]), tokens[BS : 2 * BS], BS, hs[1:2], algo="sha256", seed=None) is None
    assert stored_hash_ok(None, tokens[:3], BS, hs[:1], algo="sha256", seed=None) is None
    assert normalize(hs[0]) == int.from_bytes(hs[0][-8:], "big")
    with pytest.raises(ValueError, match="expected one of"):
        block_hashes(tokens, BS, algo="md5")
    with pytest.raises(ValueError, match="block_size"):
        block_hashes(tokens, 0)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
@pytest.mark.parametrize("algo", ["sha256", "sha256_cbor"])
def test_block_hashes_are_vllms(algo: str) -> None:
    """The proxy's hashes equal vLLM's own for the same tokens, algorithm, seed and cache salt."""
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core import kv_cache_utils as kcu

    fn = get_hash_fn_by_name(algo)
    kcu.init_none_hash(fn)
    assert kcu.NONE_HASH == none_hash(algo)
    rng = random.Random(1)
    tokens = [rng.randrange(50000) for _ in range(5 * 32 + 7)]
    for extra in (None, (("cache_salt", "tenant-1"),)):
        parent, ref = None, []
        for i in range(5):
            parent = kcu.hash_block_tokens(fn, parent, tokens[i * 32 : (i + 1) * 32], extra if i == 0 else None)
            ref.append(parent)
        assert block_hashes(tokens, 32, algo=algo, first_extra=extra) == ref
