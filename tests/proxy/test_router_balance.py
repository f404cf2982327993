"""``kv`` routing over three and four engines under a simulated multi-turn workload: request shares stay within
1.5x the mean while later turns stay with the engine holding their prefix.

The simulation is the router bench's workload without vLLM: closed-loop workers, each taking the next
conversation when its last one ends and sending its turns one after the other (the prompt is the whole
conversation so far). Engines serve their requests one at a time, at unequal speeds, a request's time the
prompt tokens its engine does not hold plus its answer (give or take 30%; user turns vary in length too); an engine holds what it computed (a stored event
when the request starts, as the proxy assumes) and drops its least recently used conversations past its
capacity (removed events). Time is simulated: the router is handed ``now``.
"""

from __future__ import annotations

import heapq
import os
import random
from collections import OrderedDict
from dataclasses import dataclass, field

import pytest

from dynkv.proxy.block_hash import block_hashes, normalize
from dynkv.proxy.router import Router

BS = 16
TOKEN_S = 1e-3  # seconds per prompt token computed at speed 1
ANSWER_S = 0.05  # seconds of an answer at speed 1


@dataclass
class _Engine:
    speed: float
    free_at: float = 0.0
    held: OrderedDict[int, list[int]] = field(default_factory=OrderedDict)  # conversation -> its block hashes
    capacity: int = 0  # blocks


def _hashes(tokens: list[int]) -> list[int]:
    return [normalize(h) for h in block_hashes(tokens, BS)]


def simulate(router: Router, speeds: list[float], *, conversations: int, turns: int, workers: int,
             prefix: int, user: int, answer: int, capacity_convs: int, seed: int) -> tuple[dict[str, int], int, int]:
    """Runs the workload through ``router``; returns requests per engine, and of the later turns, how many went
    to the engine that served the conversation's previous turn, and how many there were."""
    rng = random.Random(seed)
    urls = list(router.engines)
    conv_blocks = (prefix + turns * (user + answer)) // BS + 1
    engines = {u: _Engine(s, capacity=capacity_convs * conv_blocks) for u, s in zip(urls, speeds)}
    convs = [[rng.randrange(100, 50000) for _ in range(prefix)] for _ in range(conversations)]
    todo = list(range(conversations))
    share = dict.fromkeys(urls, 0)
    last_engine: dict[int, str] = {}
    stayed = later = 0
    events: list[tuple[float, int, str, tuple]] = []  # (time, seq, kind, payload)
    seq = iter(range(1 << 30))

    def send(now: float, c: int, t: int) -> None:
        nonlocal stayed, later
        history = convs[c] + [rng.randrange(100, 50000) for _ in range(rng.randint(user // 2, 2 * user))]
        convs[c] = history
        h = _hashes(history)
        d = router.choose(h, block_size=BS, prompt_tokens=len(history), now=now)
        e = engines[d.engine]
        share[d.engine] += 1
        if t > 0:
            later += 1
            stayed += last_engine[c] == d.engine
        last_engine[c] = d.engine
        held = set(e.held.get(c, ()))
        uncached = len(history) - BS * next((i for i, x in enumerate(h) if x not in held), len(h))
        router.begin(d.engine, len(history), hashes=h, now=now)
        router.index.stored(d.engine, "GPU", h)
        e.held[c] = h
        e.held.move_to_end(c)
        while sum(len(v) for v in e.held.values()) > e.capacity and len(e.held) > 1:
            _, gone = e.held.popitem(last=False)
            router.index.removed(d.engine, "GPU", gone)
        start = max(now, e.free_at)
        e.free_at = start + (uncached * TOKEN_S + ANSWER_S) / e.speed * rng.uniform(0.7, 1.3)
        heapq.heappush(events, (e.free_at, next(seq), "done", (c, t, d.engine, h)))

    def next_conversation(now: float) -> None:
        if todo:
            send(now, todo.pop(0), 0)

    for _ in range(workers):
        next_conversation(0.0)
    while events:
        now, _, _, (c, t, url, h) = heapq.heappop(events)
        router.end(url, len(convs[c]), hashes=h, now=now)
        convs[c] = convs[c] + [rng.randrange(100, 50000) for _ in range(answer)]
        if t + 1 < turns:
            send(now, c, t + 1)
        else:
            next_conversation(now)
    return share, stayed, later


SEED = int(os.environ.get("DYNKV_TEST_SEED", random.randrange(1 << 30)))


@pytest.mark.parametrize("speeds", [[1.0, 0.4, 0.4], [1.0, 1.0, 1.0], [2.0, 1.0, 0.5, 0.5], [3.0, 1.0, 1.0, 1.0]],
                         ids=lambda s: "/".join(map(str, s)))
@pytest.mark.parametrize("workers", [None, 2, 0])  # None: one per engine; 0: two per engine
def test_kv_shares_stay_balanced_and_later_turns_stay_with_their_prefix(speeds: list[float],
                                                                        workers: int | None) -> None:
    print(f"seed {SEED} (DYNKV_TEST_SEED to repeat)")
    urls = [f"http://e{i}:1" for i in range(len(speeds))]
    k = len(speeds) if workers is None else workers or 2 * len(speeds)
    for run in range(3):
        router = Router(urls, "kv")
        share, stayed, later = simulate(router, speeds, conversations=8 * len(speeds), turns=4, workers=k,
                                        prefix=256, user=32, answer=8, capacity_convs=k + 2, seed=SEED + run)
        mean = sum(share.values()) / len(share)
        print(f"run {run}: shares {list(share.values())}, later turns on their engine {stayed}/{later}")
        assert max(share.values()) <= 1.5 * mean, share
        assert stayed >= 0.9 * later, (stayed, later)


def test_round_robin_loses_the_prefix_of_later_turns() -> None:
    """The simulation's yardstick: round-robin balances by construction and keeps few later turns in place."""
    urls = [f"http://e{i}:1" for i in range(3)]
    share, stayed, later = simulate(Router(urls, "round-robin"), [1.0, 0.5, 0.5], conversations=24, turns=4,
                                    workers=3, prefix=256, user=32, answer=8, capacity_convs=5, seed=SEED)
    assert max(share.values()) <= 1.5 * sum(share.values()) / 3
    assert stayed < 0.5 * later
