"""Routing over N engines: policies, the prefix index, and each engine's health.

:class:`PrefixIndex` records which engine holds which block in which medium
(vLLM's device cache ``GPU``; dynkv's host tier ``CPU``; its disk
``STORAGE``), fed by KV events (:mod:`dynkv.proxy.events`). :class:`Router`
picks an engine for a request:

- ``round-robin``: engines in turn.
- ``least-loaded``: fewest requests in flight (then fewest prompt tokens in
  flight).
- ``kv``: least cost, where an engine's cost is the prompt tokens it would
  compute (those past its cached prefix, each cached token counted by its
  medium's weight: a device hit saves all of its prefill, a host or disk hit
  less, as loading it takes time) plus ``load_weight`` times its load.

An engine's load (``kv``) is the prompt tokens it is busy with plus
``park_weight`` (default 0.5) times the prompt tokens of the conversations
parked on it. A conversation is known by its latest prompt (the hash of its
last full block); a prompt that extends an earlier one is that
conversation's next turn. Between turns a conversation is parked on the
engine that served its latest prompt: that engine holds its prefix, so its
next turn will come back there. It stays parked until that next turn
arrives, ``session_ttl_s`` passes without one, or the engine's KV events
say it no longer holds the prompt's last block (evicted from every tier). The load in flight says
where work is now; parked conversations say where it will come back.
Without them a new conversation, which matches nowhere, goes to whichever
engine is idle at that moment, so an engine that is often idle when
conversations start (a faster one, or one whose conversations just ended)
collects them, and all their later turns with them. With them it goes to
the engine carrying the least work, in flight and to come.

A conversation's own parked tokens do not count against its engine when
its next turn is placed (moving it would take them along), so a later turn
stays with its prefix unless its engine carries, besides it, more load than
the prefix is worth. A hot prefix (the same prompt many times, or one
shared prefix under many conversations) spills to a second engine once the
first is busier than the prefix is worth, by requests in flight or by the
conversations parked on it; the second then caches it too.
``park_weight`` 0 leaves the load in flight alone.

Ties go to the engine with fewer requests in flight, then to the one that
was sent fewer requests so far (so new conversations, which match nowhere,
balance the engines' shares even when requests rarely overlap), then in
turn. Engines that failed are out of rotation until ``retry_at``; each
failure in a row doubles the wait (up to ``backoff_max_s``). Nothing here
does I/O or reads a clock of its own: the server passes ``now``, so the
tests drive time.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = ["MEDIA", "PARK_WEIGHT", "POLICIES", "SESSION_TTL_S", "Decision", "EngineState", "PrefixIndex", "Router",
           "TIER_WEIGHTS"]

POLICIES = ("round-robin", "least-loaded", "kv")
MEDIA = ("GPU", "CPU", "STORAGE")
# Share of a block's prefill that a cached copy saves, by medium: a device block costs nothing to use; a host
# block is copied in alongside the forward; a disk block is read first.
TIER_WEIGHTS = {"GPU": 1.0, "CPU": 0.8, "STORAGE": 0.5}
_OTHER_WEIGHT = 0.3  # media named by other publishers (a shared store, a peer)
PARK_WEIGHT = 0.5  # default: a parked conversation's token against a token in flight
SESSION_TTL_S = 300.0  # default: how long a conversation without a next turn stays parked
EVICTED_CHECK_S = 1.0  # how often (and after how long parked) a conversation's prefix is checked on its engine


def _medium(medium: str | None) -> str:
    # vLLM before the medium field published device events without one.
    return "GPU" if medium is None else medium


class PrefixIndex:
    """Block hash -> engine -> media holding it; thread-safe (one writer per engine, readers on the event loop)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._blocks: dict[int, dict[str, set[str]]] = {}
        self._held: dict[str, dict[str, set[int]]] = {}  # engine -> medium -> hashes

    def stored(self, engine: str, medium: str | None, hashes: Iterable[int]) -> None:
        """``engine`` holds ``hashes`` in ``medium``."""
        m = _medium(medium)
        with self._lock:
            mine = self._held.setdefault(engine, {}).setdefault(m, set())
            for h in hashes:
                self._blocks.setdefault(h, {}).setdefault(engine, set()).add(m)
                mine.add(h)

    def removed(self, engine: str, medium: str | None, hashes: Iterable[int]) -> None:
        """``engine`` no longer holds ``hashes`` in ``medium``."""
        m = _medium(medium)
        with self._lock:
            mine = self._held.get(engine, {}).get(m)
            for h in hashes:
                if mine is not None:
                    mine.discard(h)
                self._drop(h, engine, m)

    def cleared(self, engine: str, media: Iterable[str] | None = None) -> None:
        """``engine`` holds nothing (in ``media``; default all of them): a reset, a restart, lost history."""
        with self._lock:
            held = self._held.get(engine, {})
            for m in list(held) if media is None else list(media):
                for h in held.pop(m, ()):
                    self._drop(h, engine, m)

    def _drop(self, h: int, engine: str, m: str) -> None:
        engines = self._blocks.get(h)
        if engines is None or m not in engines.get(engine, ()):
            return
        engines[engine].discard(m)
        if not engines[engine]:
            del engines[engine]
            if not engines:
                del self._blocks[h]

    def match(self, hashes: Sequence[int], engines: Iterable[str]) -> dict[str, list[str]]:
        """Per engine, the best medium of each leading block it holds (the longest cached prefix)."""
        out: dict[str, list[str]] = {e: [] for e in engines}
        live = set(out)
        with self._lock:
            for h in hashes:
                holders = self._blocks.get(h, {})
                for e in list(live):
                    media = holders.get(e)
                    if not media:
                        live.discard(e)
                        continue
                    out[e].append(min(media, key=lambda x: -TIER_WEIGHTS.get(x, _OTHER_WEIGHT)))
                if not live:
                    break
        return out

    def holds(self, engine: str, h: int) -> bool:
        """Whether ``engine`` holds block ``h`` in any medium."""
        with self._lock:
            return bool(self._blocks.get(h, {}).get(engine))

    def engines(self) -> set[str]:
        """Engines whose blocks the index has heard of (held now or not)."""
        with self._lock:
            return set(self._held)

    def held(self, engine: str) -> dict[str, set[int]]:
        """The blocks ``engine`` holds, per medium (a copy; media holding none left out)."""
        with self._lock:
            return {m: set(s) for m, s in self._held.get(engine, {}).items() if s}

    def counts(self) -> dict[str, dict[str, int]]:
        """Blocks held per engine and medium."""
        with self._lock:
            return {e: {m: len(s) for m, s in media.items()} for e, media in self._held.items()}


@dataclass
class EngineState:
    """One engine as the router sees it."""

    url: str
    up: bool = True
    failures: int = 0  # in a row
    retry_at: float = 0.0
    in_flight: int = 0
    in_flight_tokens: int = 0
    routed: int = 0  # requests sent to it so far
    parked_tokens: int = 0  # prompt tokens of the conversations parked on it (see Router)
    last_error: str = ""
    predict: bool = True  # False once its block hashes turned out not to be ours


@dataclass
class _Session:
    """A conversation as the router sees it: the engine that served its latest prompt, and that prompt."""

    engine: str
    tokens: int
    busy: int = 0  # its requests in flight
    last: float = 0.0  # when its latest request ended


@dataclass(frozen=True)
class Decision:
    """Where a request goes and why."""

    engine: str
    predicted_tokens: int = 0  # prompt tokens the engine holds (any medium)
    tiers: dict[str, int] = field(default_factory=dict)  # of those blocks, per medium


class Router:
    """Picks an engine per request.

    Parameters
    ----------
    engines
        Engine base URLs.
    policy
        One of :data:`POLICIES`.
    load_weight
        ``kv``: cost of one prompt token of an engine's load, against one
        prompt token to compute.
    park_weight
        ``kv``: how much a token of a conversation parked on an engine (its
        latest prompt, no request in flight) counts in that engine's load,
        against a token in flight.
    session_ttl_s
        ``kv``: a conversation stops counting as parked this long after its
        latest request ended without a next one.
    tier_weights
        ``kv``: share of a block's prefill saved when cached in each medium.
    backoff_s, backoff_max_s
        Wait after a failure, doubled per failure in a row, capped.
    """

    def __init__(self, engines: Sequence[str], policy: str = "kv", *, load_weight: float = 1.0,
                 park_weight: float = PARK_WEIGHT, session_ttl_s: float = SESSION_TTL_S,
                 tier_weights: dict[str, float] | None = None, backoff_s: float = 1.0,
                 backoff_max_s: float = 30.0, index: PrefixIndex | None = None) -> None:
        if not engines:
            raise ValueError("no engines: pass --engine URL at least once")
        if len(set(engines)) != len(engines):
            raise ValueError(f"engines {list(engines)} name one engine twice")
        if policy not in POLICIES:
            raise ValueError(f"routing policy {policy!r}: expected one of {', '.join(POLICIES)}")
        if load_weight < 0 or backoff_s <= 0 or backoff_max_s < backoff_s:
            raise ValueError(f"load_weight={load_weight}, backoff_s={backoff_s}, backoff_max_s={backoff_max_s}: "
                             "expected load_weight >= 0 and 0 < backoff_s <= backoff_max_s")
        if not 0 <= park_weight <= 1 or session_ttl_s <= 0:
            raise ValueError(f"park_weight={park_weight}, session_ttl_s={session_ttl_s}: expected "
                             "0 <= park_weight <= 1 and session_ttl_s > 0")
        self.engines = {u: EngineState(u) for u in engines}
        self.policy = policy
        self.load_weight = load_weight
        self.park_weight, self.session_ttl_s = park_weight, session_ttl_s
        self.tier_weights = {**TIER_WEIGHTS, **(tier_weights or {})}
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self.index = index if index is not None else PrefixIndex()
        self._turn = itertools.count()
        # Conversations by the hash of the last full block of their latest prompt, least recently ended first.
        self._sessions: OrderedDict[int, _Session] = OrderedDict()
        self._now = 0.0
        self._pruned_at = 0.0

    # -- health ---------------------------------------------------------------

    def failed(self, engine: str, now: float, error: str = "") -> None:
        """``engine`` failed a request or a probe: out of rotation until its backoff passes."""
        st = self.engines[engine]
        st.up = False
        st.last_error = error
        st.retry_at = now + min(self.backoff_max_s, self.backoff_s * 2 ** min(st.failures, 30))
        st.failures += 1

    def recovered(self, engine: str) -> None:
        """``engine`` answered again: back in rotation."""
        st = self.engines[engine]
        st.up, st.failures, st.retry_at, st.last_error = True, 0, 0.0, ""

    def due_probes(self, now: float) -> list[str]:
        """Engines out of rotation whose backoff has passed (probe them, then :meth:`recovered` or :meth:`failed`)."""
        return [u for u, st in self.engines.items() if not st.up and st.retry_at <= now]

    def up(self) -> list[str]:
        return [u for u, st in self.engines.items() if st.up]

    # -- load -----------------------------------------------------------------

    def begin(self, engine: str, prompt_tokens: int, *, hashes: Sequence[int] | None = None,
              now: float | None = None) -> None:
        """A request of ``prompt_tokens`` (block hashes ``hashes``, if known) was sent to ``engine``."""
        st = self.engines[engine]
        st.in_flight += 1
        st.in_flight_tokens += prompt_tokens
        st.routed += 1
        if not hashes or self.policy != "kv":
            return
        self._tick(now)
        prev = self._own_session(hashes)
        if prev is not None and prev != hashes[-1] and self._sessions[prev].busy == 0:
            self._unpark(self._sessions.pop(prev))  # the conversation moved on to this prompt
        s = self._sessions.get(hashes[-1])
        if s is None:
            s = self._sessions[hashes[-1]] = _Session(engine, prompt_tokens)
        elif s.busy == 0:
            self._unpark(s)
        s.busy += 1
        s.engine, s.tokens = engine, prompt_tokens
        self._sessions.move_to_end(hashes[-1])

    def end(self, engine: str, prompt_tokens: int, *, hashes: Sequence[int] | None = None,
            now: float | None = None) -> None:
        """A request that :meth:`begin` announced ended (answered, failed or cancelled)."""
        st = self.engines[engine]
        st.in_flight -= 1
        st.in_flight_tokens -= prompt_tokens
        if not hashes or self.policy != "kv":
            return
        self._tick(now)
        s = self._sessions.get(hashes[-1])
        if s is None or s.busy == 0:
            return
        s.busy -= 1
        if s.busy == 0:
            s.last = self._now
            self._sessions.move_to_end(hashes[-1])
            self.engines[s.engine].parked_tokens += s.tokens

    def _unpark(self, s: _Session) -> None:
        if s.busy == 0:
            self.engines[s.engine].parked_tokens -= s.tokens

    def _own_session(self, hashes: Sequence[int]) -> int | None:
        """The conversation a prompt continues: the longest of its prefixes that was a prompt before."""
        return next((h for h in reversed(hashes) if h in self._sessions), None)

    def _tick(self, now: float | None) -> None:
        """Time moves to ``now`` (None: it stands still); conversations idle for ``session_ttl_s`` are dropped."""
        if now is not None:
            self._now = max(self._now, now)
        gone = []
        for h, s in self._sessions.items():  # idle ones in the order they ended; those in flight passed over
            if s.busy:
                continue
            if s.last + self.session_ttl_s > self._now:
                break
            gone.append(h)
        for h in gone:
            self._unpark(self._sessions.pop(h))
        if self._now >= self._pruned_at + EVICTED_CHECK_S:
            self._pruned_at = self._now
            self._drop_evicted()

    def _drop_evicted(self) -> None:
        """Parked conversations whose engine no longer holds their prompt's last block (evicted from every tier,
        or the engine restarted) leave: their next turn is recomputed wherever it goes. Only engines that the
        index has heard from, and only conversations parked for :data:`EVICTED_CHECK_S` (their blocks' events
        may still be on the way)."""
        known = self.index.engines()
        gone = [h for h, s in self._sessions.items()
                if not s.busy and s.engine in known and s.last + EVICTED_CHECK_S <= self._now
                and not self.index.holds(s.engine, h)]
        for h in gone:
            self._unpark(self._sessions.pop(h))

    # -- choice ---------------------------------------------------------------

    def choose(self, hashes: Sequence[int] | None = None, *, block_size: int = 0, prompt_tokens: int = 0,
               exclude: Iterable[str] = (), now: float | None = None) -> Decision | None:
        """The engine for a request, or None when no engine is in rotation.

        ``hashes`` are the prompt's block hashes (normalized), used by ``kv``
        (which without them acts as ``least-loaded``); ``prompt_tokens`` its
        length; ``exclude`` engines already tried for it; ``now`` the time
        (None: as at the last call).
        """
        skip = set(exclude)
        cands = [u for u in self.up() if u not in skip]
        if not cands:
            return None
        turn = next(self._turn)
        order = {u: (i - turn) % len(cands) for i, u in enumerate(cands)}  # whose turn it is, for ties
        if self.policy == "round-robin":
            return self._decide(min(cands, key=order.__getitem__), hashes, block_size)
        if self.policy == "least-loaded" or not hashes or not block_size:
            return self._decide(min(cands, key=lambda u: (self.engines[u].in_flight,
                                                          self.engines[u].in_flight_tokens,
                                                          self.engines[u].routed, order[u])),
                                hashes, block_size)
        matched = self.index.match(hashes, [u for u in cands if self.engines[u].predict])
        total = max(prompt_tokens, len(hashes) * block_size)
        self._tick(now)
        key = self._own_session(hashes)
        own = self._sessions[key] if key is not None else None
        if own is not None and own.busy:
            own = None  # parked nowhere: it has a request in flight

        def cost(u: str) -> tuple[float, int, int, int]:
            st = self.engines[u]
            saved = sum(self.tier_weights.get(m, _OTHER_WEIGHT) for m in matched.get(u, ())) * block_size
            parked = st.parked_tokens - (own.tokens if own is not None and own.engine == u else 0)
            load = st.in_flight_tokens + self.park_weight * parked
            return (total - saved + self.load_weight * load, st.in_flight, st.routed, order[u])

        best = min(cands, key=cost)
        return self._decision(best, matched.get(best, []), block_size)

    def _decide(self, engine: str, hashes: Sequence[int] | None, block_size: int) -> Decision:
        """A decision by another policy still says what the engine holds (for the metrics)."""
        if not hashes or not block_size or not self.engines[engine].predict:
            return Decision(engine)
        return self._decision(engine, self.index.match(hashes, [engine])[engine], block_size)

    @staticmethod
    def _decision(engine: str, media: list[str], block_size: int) -> Decision:
        tiers: dict[str, int] = {}
        for m in media:
            tiers[m] = tiers.get(m, 0) + 1
        return Decision(engine, len(media) * block_size, tiers)
