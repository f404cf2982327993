"""The leader's shared-tier traffic: lookups past the local tiers, reads into host pages, write-behind.

A part of :class:`dynkv.leader.leader.Leader` (a base class of it), next to
:mod:`dynkv.leader.tier_flow` and shaped like it: a shared-tier hit is read
into a fresh host page on the tier's threads, the completion is queued and
applied at the leader's next call, and the load goes to the workers once
every page is on the host (or has failed), as a disk hit does. Host pages
admitted by the frequency filter (``shared_admit_min_hits``) are written
behind, in batches, their host pages pinned meanwhile.

A lookup asks the store about the pages after the local match only, and
waits at most ``shared_lookup_ms``; no answer is a miss. With ``cost_model``
the pages found are loaded only while their read (the tier's queue plus
these pages at its measured bandwidth) lands before the engine would
recompute them (:mod:`dynkv.policy.cost`, a model of its own for this tier; one
whose estimate has refused for a while lets the first pages of a match
through as a probe that measures the store again). A page the store
evicted between lookup and read is a miss (``dynkv_tier_misses``); one that
fails its checks, or a store that dies meanwhile, is a load error
(``dynkv_load_errors{reason="shared"}``): vLLM recomputes its block either way.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from dynkv.tiers.base import HOST, SHARED
from dynkv.tiers.shared.base import StoreUnavailable
from dynkv.tiers.shared.tier import PageFuture, SharedPageMissing

if TYPE_CHECKING:
    import queue

    from dynkv.config import DynKVConfig
    from dynkv.index import PageIndex
    from dynkv.layout import PageGeometry
    from dynkv.leader.records import LoadRecord, RequestRecord
    from dynkv.leader.staging import StagingSlots
    from dynkv.metrics import Metrics
    from dynkv.policy.cost import CostModel
    from dynkv.tiers.shared.tier import SharedTier

__all__ = ["SharedFlow"]

log = logging.getLogger("dynkv.leader")

_KNOWN = 1 << 16  # keys remembered as held by the store (spares an existence check per write)


class SharedFlow:
    """Shared-tier half of the leader; :class:`dynkv.leader.leader.Leader` sets these attributes up."""

    shared: SharedTier | None
    shared_cost: CostModel | None
    config: DynKVConfig
    index: PageIndex
    staging: StagingSlots
    metrics: Metrics
    geometry: PageGeometry
    _io: queue.SimpleQueue[tuple[Any, ...]]
    _promoting: dict[int, LoadRecord]
    _shared_writes: int
    _max_shared_writes: int
    _held: OrderedDict[bytes, None]

    if TYPE_CHECKING:
        def _host_page(self, slot: int) -> memoryview: ...
        def _drop_host(self, keys: Sequence[bytes]) -> None: ...
        def _load_settled(self, load: LoadRecord) -> None: ...

    def _match_shared(self, req: RequestRecord, todo: Sequence[bytes], *, probing: bool = False) -> None:
        """Extend the request's match with the pages after it that the store holds (the first of them only where
        the cost model probes the store; ``probing``: the request was that probe at its previous lookup)."""
        if self.shared is None or len(req.match) >= len(todo):
            return
        rest = todo[len(req.match) :]
        n = self.shared.count_stored(rest)
        if n is None:
            self.metrics.lookup_timeouts.labels(SHARED).inc()
            n = 0
        if not req.looked_up:
            self.metrics.tier_misses.labels(SHARED).inc(len(rest) - n)
        if n and self.shared_cost is not None:
            decision = self.shared_cost.disk_pays(n, self.geometry.page_bytes, self.geometry.block_size,
                                                  probing=probing)
            take = decision.disk_pages if decision.load else 0
            if decision.probe:
                req.probe = SHARED
            if take:
                self.metrics.cost_tokens.labels("probe" if decision.probe else "load").inc(
                    take * self.geometry.block_size)
            if take < n:
                self.metrics.cost_tokens.labels("recompute").inc((n - take) * self.geometry.block_size)
            n = take
        req.match.extend((SHARED, -1, key) for key in rest[:n])

    def _fetch_shared(self, load: LoadRecord, pages: list[tuple[int, bytes]]) -> None:
        """Give shared-tier pages ``(index in the load, key)`` new host slots (else staging slots) and read them there."""
        assert self.shared is not None
        fresh = []
        for i, key in pages:
            host_slot = self.index.location(key, HOST)
            if host_slot is None:
                fresh.append((i, key))
                continue
            self.index.pin(HOST, [key])  # stored on the host since the lookup: take it from there
            load.slots[i] = host_slot
            load.host_keys.append(key)
        got = dict(self.index.allocate(HOST, [key for _, key in fresh], gate=False))
        reads = []
        for i, key in fresh:
            host_slot = got.pop(key, None)
            if host_slot is None:  # every host page pinned or pending: a staging slot, while one is free
                host_slot = self.staging.take()
            if host_slot is None:
                load.failed.append(load.block_ids[i])
                self.metrics.load_errors.labels("host_full").inc()
                continue
            reads.append((i, key, host_slot))
        load.waiting += len(reads)
        load.shared_waiting += len(reads)
        if self.shared_cost is not None and reads:
            self.shared_cost.disk_submitted(load.job, len(reads) * self.geometry.page_bytes,
                                            probe=load.probe == SHARED)
        started = time.perf_counter()
        futs = self.shared.read_many([(key, self._host_page(h)) for _, key, h in reads])
        for (i, key, h), fut in zip(reads, futs):
            fut.add_done_callback(
                lambda f, i=i, key=key, h=h: self._io.put(("shared_read", load, i, key, h, f, started,
                                                           time.perf_counter())))

    def _share(self, keys: Sequence[bytes], *, computed: bool = False) -> None:
        """Write committed host pages behind to the shared tier, as admission and back-pressure allow.

        ``computed``: pages this engine just computed, which its lookup did
        not find in the store: sent without asking the store first.
        """
        if self.shared is None or not keys:
            return
        if not self.shared.up:
            self.metrics.refused.labels(SHARED, "down").inc(len(keys))
            return
        want = self.config.shared_admit_min_hits
        batch = []
        for key in keys:
            if key in self._held and not computed:  # computed: the store lost it since (evicted, or restarted)
                continue
            if want > 1 and self.index.frequency.estimate(key) < want:
                self.metrics.refused.labels(SHARED, "filter").inc()
                continue
            if self._shared_writes >= self._max_shared_writes:
                self.metrics.refused.labels(SHARED, "busy").inc()
                continue
            host_slot = self.index.location(key, HOST)
            if host_slot is None:
                continue
            self.index.pin(HOST, [key])
            self._shared_writes += 1
            self._held[key] = None  # a second store of the page meanwhile is not written twice
            batch.append((key, self._host_page(host_slot)))
        started = time.perf_counter()
        for (key, _), fut in zip(batch, self.shared.write_many(batch, check=not computed)):
            fut.add_done_callback(lambda f, key=key: self._io.put(("shared_write", key, f, started)))
        self._trim_held()

    def _trim_held(self) -> None:
        while len(self._held) > _KNOWN:
            self._held.popitem(last=False)

    def _apply_shared(self, item: tuple[Any, ...]) -> None:
        if item[0] == "shared_read":
            self._shared_read_done(*item[1:])
        else:
            self._shared_write_done(*item[1:])

    def _shared_read_done(self, load: LoadRecord, i: int, key: bytes, host_slot: int, fut: PageFuture,
                          started: float, now: float) -> None:
        """One shared-tier read completed at ``now`` (its thread's clock; applied at the leader's next call)."""
        exc = fut.exception()
        load.read_until = max(load.read_until, now)
        staged = self.staging.owns(host_slot)  # outside the host tier: never committed there
        if exc is None:
            if staged and load.given_up:
                self.staging.free([host_slot])
            elif staged:
                load.slots[i] = host_slot
                load.staged.append(host_slot)
            else:
                self.index.commit(HOST, [key])
                if not load.given_up:  # a load that went out without this page leaves it cached for the next
                    self.index.pin(HOST, [key])
                    load.slots[i] = host_slot
                    load.host_keys.append(key)
            self._held[key] = None
            self._held.move_to_end(key)
            direction = "shared_to_staging" if staged else "shared_to_host"
            self.metrics.pages.labels(direction).inc()
            self.metrics.bytes.labels(direction).inc(self.geometry.page_bytes)
            self.metrics.latency.labels("shared_to_host").observe(now - started)
        else:
            if staged:
                self.staging.free([host_slot])
            else:
                self._drop_host([key])
            self._held.pop(key, None)
            if not load.given_up:  # a given-up load reported its unread blocks already
                load.failed.append(load.block_ids[i])
            if isinstance(exc, SharedPageMissing):
                self.metrics.tier_misses.labels(SHARED).inc()
            else:
                if not isinstance(exc, StoreUnavailable):
                    log.warning("shared page %s failed to load (%s); its block is recomputed", key.hex(), exc)
                self.metrics.load_errors.labels(SHARED).inc()
        load.waiting -= 1
        load.shared_waiting -= 1
        if load.shared_waiting == 0 and self.shared_cost is not None:
            self.shared_cost.disk_done(load.job, at=load.read_until or None)
        if load.waiting == 0:
            self._load_settled(load)

    def _shared_write_done(self, key: bytes, fut: PageFuture, started: float) -> None:
        self._shared_writes -= 1
        self.index.unpin(HOST, [key])
        exc = fut.exception()
        if exc is None and fut.result():
            self.metrics.pages.labels("host_to_shared").inc()
            self.metrics.bytes.labels("host_to_shared").inc(self.geometry.page_bytes)
            self.metrics.latency.labels("host_to_shared").observe(time.perf_counter() - started)
            return
        self._held.pop(key, None)
        if exc is None:
            self.metrics.refused.labels(SHARED, "full").inc()
        else:
            self.metrics.store_errors.labels(SHARED).inc()
