"""The leader's disk-tier traffic: promotions (disk -> host), write-through (host -> disk) and write-around.

A part of :class:`dynkv.leader.leader.Leader` (a base class of it), kept apart
because it is the one part that deals with I/O completions. Reads and writes
run on the disk tier's threads; each completion is queued and applied at the
leader's next call (:meth:`DiskFlow._drain_io`), so the caller never waits on
I/O. A page read that fails its checks is dropped from the disk tier and its
block becomes a load error (vLLM recomputes it); a failed write leaves the
page on the host only.

With the cost model, a load whose disk reads wait too long gives up
(:meth:`DiskFlow._give_up`, when :meth:`dynkv.policy.cost.CostModel.gives_up`
says so, and when its request is aborted): its reads not yet started are
cancelled, it goes out at once with its unread blocks to recompute, and its
reads already running finish into the host tier, where the next turn finds
them.

Write-through is never urgent: the disk tier's threads take reads ahead of
queued writes, and once ``disk_write_backlog_gb`` of writes are submitted and
not yet done, new write-throughs are skipped (counted in
``dynkv_disk_writes_skipped_total``); their pages stay in the host tier, and
a later request that finds them evicted from there recomputes.

Write-around: a page the host tier does not take on a store (its admission
gate keeps the page out, or every host page is pinned) is copied by the
workers into a staging slot instead, and written from there to the disk tier
(``disk_write_around``): without it, gated host admission would leave the
disk tier only the pages the host tier holds anyway. It passes the same
admission filter and backlog as write-through, and holds at most half the
staging slots, so disk hits that get no host slot still find some.

Failed reads are logged at most once per :data:`READ_LOG_EVERY_S` (a
deleted or failing file fails every page read once, as each is dropped: one
line per page would flood), the next line counting those not logged; every
one is counted in ``dynkv_load_errors_total{reason="disk"}``.

Failed writes are logged once per run of failures. After
:data:`WRITE_FAILURES_TO_STOP` in a row (a full file system, a dying disk)
write-through stops, with one line saying so; reads go on. While stopped,
one page in :data:`PROBE_EVERY` offered for writing is still written, and
the first that succeeds turns writes back on, again with one line.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from dynkv.tiers.base import DISK, HOST

if TYPE_CHECKING:
    from dynkv.tiers.disk import DiskTier
    from dynkv.index import PageIndex
    from dynkv.layout import PageGeometry
    from dynkv.leader.records import LoadRecord, RequestRecord
    from dynkv.leader.staging import StagingSlots
    from dynkv.metrics import Metrics
    from dynkv.policy.cost import CostModel

__all__ = ["DiskFlow", "max_disk_writes"]

log = logging.getLogger("dynkv.leader")

# Disk writes in flight before write-through is skipped (and counted): 16 per I/O thread, or a
# quarter of the host tier if more (a write pins its host page until it is on disk).
_WRITES_PER_THREAD = 16
_WRITES_HOST_SHARE = 4


# Failed disk writes in a row that stop write-through, and while stopped, one page in how many is written
# anyway to find out whether the disk takes writes again (counted in pages, not time: no timer to run).
WRITE_FAILURES_TO_STOP = 8
PROBE_EVERY = 64
# At most one line about failed disk reads per this many seconds (see the module).
READ_LOG_EVERY_S = 60.0
_now = time.monotonic  # the clock of that limit (tests replace it)


def max_disk_writes(io_threads: int, host_pages: int) -> int:
    """Bound on disk writes in flight for a leader with these I/O threads and host tier."""
    return max(_WRITES_PER_THREAD * io_threads, host_pages // _WRITES_HOST_SHARE)


class DiskFlow:
    """Disk-tier half of the leader; :class:`dynkv.leader.leader.Leader` sets these attributes up."""

    disk: DiskTier | None
    index: PageIndex
    metrics: Metrics
    geometry: PageGeometry
    exporter: Any
    staging: StagingSlots
    cost: CostModel | None
    shared_cost: CostModel | None
    _page_bytes: int
    _io: queue.SimpleQueue[tuple[Any, ...]]
    _writes: int
    _max_writes: int
    _max_backlog: int  # disk_write_backlog_gb in pages
    _max_around: int  # staging slots write-around may hold (0: off)
    _around_held: int = 0  # staging slots held by write-around: copied to or being written from
    _around_copying: int = 0  # of them, not yet copied (their writes are not in _writes yet)
    # Write failures in a row, whether write-through is stopped, pages offered while it is (see the module).
    _write_streak: int = 0
    _writes_off: bool = False
    _offered_while_off: int = 0
    # Failed reads not logged yet, and when the last line about them was (see the module).
    _reads_unlogged: int = 0
    _read_logged_at: float = float("-inf")
    _promoting: dict[int, LoadRecord]
    _abandoned: dict[int, LoadRecord]  # loads given up, with disk reads still running
    _ready: list[LoadRecord]

    if TYPE_CHECKING:
        def _host_page(self, slot: int) -> memoryview: ...
        def _drop_host(self, keys: Sequence[bytes]) -> None: ...
        def _apply_shared(self, item: tuple[Any, ...]) -> None: ...

    def _promote(self, load: LoadRecord, pages: list[tuple[int, int, bytes]]) -> None:
        """Give disk pages ``(index in the load, disk slot, key)`` new host slots and read them there.

        The load waits for the reads. A page stored to the host tier since the
        lookup is taken from there; one that gets no host slot (every host page
        pinned or pending) is read into a staging slot (:mod:`dynkv.leader.staging`),
        and with none free either it fails, and its block is recomputed.
        """
        assert self.disk is not None
        fresh = []
        for i, disk_slot, key in pages:
            host_slot = self.index.location(key, HOST)
            if host_slot is None:
                fresh.append((i, disk_slot, key))
                continue
            self.index.pin(HOST, [key])
            self.index.unpin(DISK, [key])
            load.slots[i] = host_slot
            load.host_keys.append(key)
        got = dict(self.index.allocate(HOST, [key for _, _, key in fresh], gate=False))
        reads = []
        for i, disk_slot, key in fresh:
            host_slot = got.pop(key, None)  # a key listed twice gets one host slot, its second block staging's
            if host_slot is None:
                host_slot = self.staging.take()
            if host_slot is None:
                self.index.unpin(DISK, [key])
                load.failed.append(load.block_ids[i])
                self.metrics.load_errors.labels("host_full").inc()
                continue
            reads.append((i, disk_slot, key, host_slot))
        load.waiting += len(reads)
        load.disk_reads += len(reads)
        if self.cost is not None:
            self.cost.disk_submitted(load.job, len(reads) * self._page_bytes,
                                     tokens=len(reads) * self.geometry.block_size, page_bytes=self._page_bytes,
                                     probe=load.probe == DISK)
        futs = self.disk.read_many([(d, key, self._host_page(h)) for _, d, key, h in reads], invalidate_bad=True)
        load.reads = [(i, fut) for (i, _, _, _), fut in zip(reads, futs)]
        for (i, _, key, h), fut in zip(reads, futs):
            fut.add_done_callback(
                lambda f, i=i, key=key, h=h: self._io.put(("read", load, i, key, h, f, time.perf_counter())))

    def _weigh_waits(self) -> None:
        """Give up the loads whose disk reads, predicted from now, would land past their deadline (submission
        plus recomputing all their pages) or after recomputing their unread pages would; counted as gave_up."""
        assert self.cost is not None
        for load in list(self._promoting.values()):
            if load.shared_waiting:  # weighed as a disk load only once its shared-tier reads are in
                continue
            decision = self.cost.gives_up(load.job)
            if decision is not None and not decision.load:
                unread = sum(1 for i, _ in load.reads if load.slots[i] is None)
                self.metrics.cost_tokens.labels("gave_up").inc(unread * self.geometry.block_size)
                self._give_up(load)

    def _give_up(self, load: LoadRecord) -> None:
        """Send ``load`` out now, without its disk pages not yet in the host tier (their blocks are recomputed).

        Its reads that have not started are cancelled; those already running
        finish and leave their pages in the host tier, unpinned
        (:meth:`_read_done`).
        """
        load.given_up = True
        for _, fut in load.reads:
            fut.cancel()  # False once the read runs; either way the completion comes through _io
        # Every page not in the host tier yet: disk reads, and shared-tier reads of a cancelled load.
        missing = [load.block_ids[i] for i, slot in enumerate(load.slots) if slot is None]
        done = set(load.failed)
        load.failed += [b for b in missing if b not in done]
        self._promoting.pop(load.job, None)
        if load.waiting:
            self._abandoned[load.job] = load
        self._ready.append(load)

    def _weigh_disk(self, req: RequestRecord, *, probing: bool = False) -> None:
        """Stop the match before its first disk page where reading the disk pages would not pay, or after the
        disk pages of a probe (``probing``: the request was a probe at its previous lookup)."""
        assert self.cost is not None
        first = next((i for i, (tier, _, _) in enumerate(req.match) if tier == DISK), None)
        if first is None:
            return
        disk = sum(1 for tier, _, _ in req.match[first:] if tier == DISK)
        decision = self.cost.disk_pays(disk, self._page_bytes, self.geometry.block_size, probing=probing)
        stop = len(req.match) if decision.load else first
        if decision.probe:  # the match up to its probe's last disk page
            req.probe = DISK
            stop = [i for i, (tier, _, _) in enumerate(req.match) if tier == DISK][decision.disk_pages - 1] + 1
            self.metrics.cost_tokens.labels("probe").inc((stop - first) * self.geometry.block_size)
        elif decision.load:
            self.metrics.cost_tokens.labels("load").inc((stop - first) * self.geometry.block_size)
        if stop < len(req.match):
            self.metrics.cost_tokens.labels("recompute").inc((len(req.match) - stop) * self.geometry.block_size)
            dropped, req.match = req.match[stop:], req.match[:stop]
            for tier, _, key in dropped:
                self.index.unpin(tier, [key])

    def step_begin(self, tokens: int) -> None:
        """vLLM hands a step of ``tokens`` scheduled tokens to the workers (for the cost model's prefill rate)."""
        for c in (self.cost, self.shared_cost):
            if c is not None:
                c.step_begin(tokens)

    def step_end(self) -> None:
        """A step's output came back to the scheduler."""
        g = self.metrics.cost_rates
        for tier, c in (("disk", self.cost), ("shared", self.shared_cost)):
            if c is None:
                continue
            c.step_end()
            if c.prefill_tokens_per_s is not None:
                g.labels("prefill_tokens_per_s").set(c.prefill_tokens_per_s)
            if c.disk_bytes_per_s is not None:  # the model's "disk" is the tier it weighs
                g.labels(f"{tier}_bytes_per_s").set(c.disk_bytes_per_s)
            g.labels(f"{tier}_queue_bytes").set(c.queue_bytes)

    def _spill(self, keys: Sequence[bytes]) -> None:
        """Write committed host pages through to disk, as the frequency filter and back-pressure allow."""
        if self.disk is None:
            return
        for key in keys:
            if self.index.holds(key, DISK):
                continue
            if not self.index.admits(key):
                self.metrics.refused.labels(DISK, "filter").inc()
                continue
            if self._writes >= self._max_writes:
                self.metrics.refused.labels(DISK, "busy").inc()
                continue
            if self._writes >= self._max_backlog:  # reads go first: under a read load, writes wait
                self.metrics.refused.labels(DISK, "backlog").inc()
                self.metrics.writes_skipped.labels("pages").inc()
                self.metrics.writes_skipped.labels("bytes").inc(self._page_bytes)
                continue
            if self._writes_off:
                self._offered_while_off += 1
                if self._offered_while_off % PROBE_EVERY:
                    self.metrics.refused.labels(DISK, "off").inc()
                    continue
            host_slot = self.index.location(key, HOST)
            if host_slot is None:
                continue
            got = self.index.allocate(DISK, [key])
            if not got:
                continue
            self.index.pin(HOST, [key])
            self._writes += 1
            fut = self.disk.write(got[0][1], key, self._host_page(host_slot))
            fut.add_done_callback(lambda f, key=key: self._io.put(("write", key, f, None)))

    def _write_around(self, left: Sequence[tuple[bytes, int]]) -> list[tuple[bytes, int, tuple[int, int]]]:
        """Staging and disk slots for a store's pages the host tier did not take, ``(key, block)`` in prefix order.

        Returns ``(key, block, (staging slot, pending disk slot))`` of those
        written around the host tier: the workers copy them into the staging
        slot, and once every rank has (:meth:`_around_stored`) the page is
        written from there to the disk tier. Pages some tier holds already
        are passed over; the first page refused (disk admission filter,
        backlog, writes stopped, no staging slot within
        ``_max_around``, disk full of pinned pages) ends the run, as a page
        past a gap in a prefix is never found.
        """
        out: list[tuple[bytes, int, tuple[int, int]]] = []
        if not left or self._max_around == 0 or self.disk is None:
            return out
        for key, block in left:
            if self.index.holds(key, HOST) or self.index.holds(key, DISK):
                continue
            reason = None
            if not self.index.admits(key):
                reason = "filter"
            elif self._writes + self._around_copying >= min(self._max_writes, self._max_backlog):
                reason = "backlog"
            elif self._writes_off:
                reason = "off"
            elif self._around_held >= self._max_around:
                reason = "staging"
            if reason is None:
                disk_slot = self.index.allocate(DISK, [key])
                if not disk_slot:
                    break  # counted by the index as a refusal (full)
                staging_slot = self.staging.take()
                if staging_slot is None:
                    self.index.remove(DISK, [key])
                    reason = "staging"
            if reason is not None:
                self.metrics.refused.labels(DISK, f"around_{reason}").inc()
                break
            self._around_held += 1
            self._around_copying += 1
            out.append((key, block, (staging_slot, disk_slot[0][1])))
        return out

    def _around_stored(self, around: dict[bytes, tuple[int, int]], failed: bool) -> None:
        """A store's pages written around the host tier are in their staging slots (or failed): write them."""
        assert self.disk is not None
        for key, (staging_slot, disk_slot) in around.items():
            self._around_copying -= 1
            if failed:
                self.index.remove(DISK, [key])
                self._around_done(staging_slot)
                self.metrics.store_errors.labels(DISK).inc()
                continue
            self._writes += 1
            fut = self.disk.write(disk_slot, key, self._host_page(staging_slot))
            fut.add_done_callback(lambda f, key=key, s=staging_slot: self._io.put(("write", key, f, s)))

    def _around_done(self, staging_slot: int) -> None:
        self.staging.free([staging_slot])
        self._around_held -= 1

    def wait_disk(self, timeout_s: float) -> bool:
        """Block up to ``timeout_s`` for a disk read or write to complete while a load reads; True if one did.

        For a scheduler step with nothing to compute: the alternative is
        returning at once, and vLLM's loop spins on the waiting request.
        """
        if not self._promoting or timeout_s <= 0:
            return False
        try:
            item = self._io.get(timeout=timeout_s)
        except queue.Empty:
            return False
        self._apply_io(item)
        self._drain_io()
        return True

    def _drain_io(self) -> None:
        if self.exporter is not None:
            self.exporter.poll(self.index)
        while True:
            try:
                item = self._io.get_nowait()
            except queue.Empty:
                break
            self._apply_io(item)
        if self.cost is not None and self._promoting:
            self._weigh_waits()

    def _apply_io(self, item: tuple[Any, ...]) -> None:
        if item[0] == "read":
            self._read_done(*item[1:])
        elif item[0] == "write":
            self._write_done(*item[1:])
        else:
            self._apply_shared(item)

    def _read_done(self, load: LoadRecord, i: int, key: bytes, host_slot: int, fut: Future[None], when: float) -> None:
        load.waiting -= 1
        staged = self.staging.owns(host_slot)  # outside the host tier: never committed there
        if fut.cancelled():  # the load gave up before this read started: nothing was read
            self.index.unpin(DISK, [key])
            self._drop_read_slot(key, host_slot, staged)
            self.metrics.disk_given_up.labels("cancelled").inc()
            if self.cost is not None:
                self.cost.disk_read(load.job, self._page_bytes, cancelled=True)
            self._reads_over(load)
            return
        exc = fut.exception()
        load.read_until = max(load.read_until, when)
        self.index.unpin(DISK, [key])
        if self.cost is not None:
            self.cost.disk_read(load.job, self._page_bytes, at=when)
        if exc is None:
            if not staged:
                self.index.commit(HOST, [key])  # given up or not: cached for a later request
            if load.given_up:  # this one recomputes the block; a staging slot has nowhere to cache it
                if staged:
                    self.staging.free([host_slot])
                self.metrics.disk_given_up.labels("landed").inc()
            elif staged:
                load.slots[i] = host_slot
                load.staged.append(host_slot)
            else:
                self.index.pin(HOST, [key])
                load.slots[i] = host_slot
                load.host_keys.append(key)
            direction = "disk_to_staging" if staged else "disk_to_host"
            self.metrics.pages.labels(direction).inc()
            self.metrics.bytes.labels(direction).inc(self.geometry.page_bytes)
        else:
            self._log_read_failure(key, exc)
            self._drop_read_slot(key, host_slot, staged)
            if self.index.pins(key, DISK) == 0:
                self.index.remove(DISK, [key])
            if not load.given_up:  # a given-up load reported its unread blocks already
                load.failed.append(load.block_ids[i])
            self.metrics.load_errors.labels("disk").inc()
        self._reads_over(load)

    def _drop_read_slot(self, key: bytes, slot: int, staged: bool) -> None:
        """Give back the slot of a read that brought nothing: a staging slot, or the pending host page."""
        if staged:
            self.staging.free([slot])
        else:
            self._drop_host([key])

    def _log_read_failure(self, key: bytes, exc: BaseException) -> None:
        """One line for a failed disk read, unless one was logged in the last :data:`READ_LOG_EVERY_S`."""
        self._reads_unlogged += 1
        now = _now()
        if now - self._read_logged_at < READ_LOG_EVERY_S:
            return
        if self._reads_unlogged == 1:
            log.warning("disk page %s failed to load (%s); its block is recomputed (further failed reads are "
                        "logged at most once a minute, all are counted in dynkv_load_errors_total{reason=\"disk\"})",
                        key.hex(), exc)
        else:
            log.warning("%d disk page reads failed in the last %.0f s, the last (page %s) with %s; their blocks "
                        "are recomputed", self._reads_unlogged, now - self._read_logged_at, key.hex(), exc)
        self._reads_unlogged, self._read_logged_at = 0, now

    def _reads_over(self, load: LoadRecord) -> None:
        """After each disk read's completion: once the load's last read is in, it is settled."""
        if not load.waiting:
            self._load_settled(load)

    def _load_settled(self, load: LoadRecord) -> None:
        """The load's last disk or shared-tier read completed: it goes to the workers (unless it gave up)."""
        if load.disk_reads and self.cost is not None:
            self.cost.disk_done(load.job, at=load.read_until or None)
        load.reads = []
        if self._abandoned.pop(load.job, None) is not None:
            return
        if load.disk_reads:
            # The disk phase of the load: from begin_load until its last page was in the host tier.
            self.metrics.latency.labels("disk_to_host").observe(load.read_until - load.started)
        self._promoting.pop(load.job, None)
        self._ready.append(load)

    def _write_done(self, key: bytes, fut: Future[None], staging_slot: int | None) -> None:
        """A disk write completed: of a host page (write-through) or a staging slot (write-around)."""
        self._writes -= 1
        if staging_slot is None:
            self.index.unpin(HOST, [key])
        else:
            self._around_done(staging_slot)
        exc = fut.exception()
        if exc is None:
            self.index.commit(DISK, [key])
            direction = "host_to_disk" if staging_slot is None else "staging_to_disk"
            self.metrics.pages.labels(direction).inc()
            self.metrics.bytes.labels(direction).inc(self.geometry.page_bytes)
            if self._writes_off:
                log.warning("disk tier: writes succeed again after %d failed in a row; write-through is back on",
                            self._write_streak)
                self._writes_off = False
                self.metrics.writes_on.labels(DISK).set(1)
            self._write_streak = 0
            return
        self.index.remove(DISK, [key])
        self.metrics.store_errors.labels(DISK).inc()
        self._write_streak += 1
        if self._write_streak == 1:
            log.warning("disk write of page %s failed (%s); the page stays on the host only (further failures in "
                        "a row are not logged)", key.hex(), exc)
        if self._write_streak >= WRITE_FAILURES_TO_STOP and not self._writes_off:
            self._writes_off = True
            self._offered_while_off = 0
            self.metrics.writes_on.labels(DISK).set(0)
            log.error("disk tier: %d writes in a row failed, the last with %s; write-through stops (pages stay in "
                      "the host tier, disk pages are still read) and one page in %d is tried until one is "
                      "written", self._write_streak, exc, PROBE_EVERY)
