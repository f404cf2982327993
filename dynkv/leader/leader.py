"""The leader: what lives where, and each step's plan for the workers.

One leader per engine, in vLLM's scheduler process. It owns the page index,
the host tier (a memfd that the TP ranks attach through a link,
:mod:`dynkv.tiers.host`) and the disk tier, and it never blocks its caller on
I/O: disk reads and writes run on the disk tier's threads and their
completions are picked up at the next call.

Flow of a page::

    store(): device block --(workers, after the forward)--> pending host slot
              (a page the host tier does not take: a staging slot, then
              written around the host tier to disk, ``disk_write_around``)
    update(): all ranks done -> host page committed; if the frequency filter
              admits it, written through to disk (host page pinned meanwhile)
              and, once seen shared_admit_min_hits times, written behind to the
              shared tier
    lookup(): longest prefix over host then disk, pinned; then the pages
              after it that the shared tier holds (asked with a time budget)
    begin_load(): disk and shared-tier pages are read into fresh host slots
              (staging slots where the host tier has none free,
              :mod:`dynkv.leader.staging`) first; the load job goes out once
              every page is on the host (or has failed)
    update(): all ranks loaded -> pins released

Disaggregated serving adds two paths (:mod:`dynkv.disagg`): a prefill engine
exports a finished request's host pages to a decode engine (:meth:`export`,
after :meth:`start_export`); a decode engine matches the pages a prefill
engine exported (:meth:`match_remote`) and its load job first pulls them into
fresh host slots, which become cached pages once every rank has its slice
(:mod:`dynkv.leader.remote_flow`).

A page whose disk or shared-tier read fails its checks is dropped (from the
disk tier; the shared tier is other engines' too) and its block is reported as
a load error, so vLLM recomputes it: never wrong KV.

In vLLM's engine-core process the leader watches the process's parent: an
engine whose API server was killed outright is stopped, so that its tiers
close and a restart on the same disk paths can start
(:mod:`dynkv.leader.orphan`).

The class is kept whole (about 650 lines): what remains here is the life of a
job (lookup, load, store, plan, acknowledgement, completion) over one index and
one set of records; the disk traffic and the cost model
(:mod:`dynkv.leader.tier_flow`), the shared tier's
(:mod:`dynkv.leader.shared_flow`), P/D (:mod:`dynkv.leader.remote_flow`),
the records (:mod:`dynkv.leader.records`) and the orphan watch are apart.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import Any

from dynkv.config import DynKVConfig
from dynkv.index import IndexEvent, PageIndex
from dynkv.keys import ModelFingerprint
from dynkv.layout import PAGE_ALIGN, PageGeometry, page_stride
from dynkv.leader.orphan import OrphanWatch, started_by, stop_orphaned_engine
from dynkv.leader.records import Acks, LoadRecord, RequestRecord, StoreRecord
from dynkv.leader.remote_flow import RemoteFlow
from dynkv.leader.shared_flow import SharedFlow
from dynkv.leader.staging import StagingSlots, staging_pages_for
from dynkv.leader.tier_flow import DiskFlow, max_disk_writes
from dynkv.metrics import Metrics
from dynkv.policy.cost import CostModel
from dynkv.memory import HostPool
from dynkv.protocol import LoadOp, PullSpec, StepPlan, StoreOp, WorkerReport
from dynkv.tiers.base import DISK, HOST, REMOTE, SHARED
from dynkv.tiers.host import host_pages_for, pool_name_for, publish_pool, reap_stale_pools, run_dir, withdraw_pool

__all__ = ["Leader"]

log = logging.getLogger("dynkv.leader")


class Leader(DiskFlow, SharedFlow, RemoteFlow):
    """Page index, host and disk tiers, and the per-step plan of one engine.

    Parameters
    ----------
    config
        The engine's dynkv settings.
    geometry
        Page geometry of the whole model (all KV heads).
    fingerprint
        The model's fingerprint: seeds keys and names the disk files.
    world_size
        TP ranks; a job completes when each has reported it.
    engine_id
        Names the host pool (``pool_name``) the workers attach.
    metrics
        Where to count; default a fresh :class:`Metrics`.

    Raises
    ------
    ValueError
        Bad sizes, a host tier larger than the memory available, an unusable
        disk path or run directory; the message names the setting.
    """

    def __init__(
        self,
        config: DynKVConfig,
        geometry: PageGeometry,
        fingerprint: ModelFingerprint,
        *,
        world_size: int = 1,
        engine_id: str = "dynkv",
        metrics: Metrics | None = None,
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size={world_size}: expected >= 1")
        self.config = config
        self.geometry = geometry
        self.fingerprint = fingerprint
        self.world_size = world_size
        self.engine_id = engine_id
        self.metrics = metrics if metrics is not None else Metrics()
        self._close_lock = threading.Lock()
        self._closed = threading.Event()
        self._watch: OrphanWatch | None = None
        self.page_stride = page_stride(geometry)
        self._page_bytes = geometry.page_bytes
        self.num_host_pages = host_pages_for(config, self.page_stride)
        # Pool pages past the host tier, for hits that get no host slot (dynkv.leader.staging).
        self.staging = StagingSlots(self.num_host_pages, staging_pages_for(config, self.num_host_pages))
        reap_stale_pools()
        links = run_dir()
        self.pool_name = f"{pool_name_for(engine_id, fingerprint)}-{os.getpid()}"
        HostPool.unlink(self.pool_name)
        # The leader never copies device memory, so it does not pin; each worker pins when it attaches.
        # A memfd: its memory goes with the last process that maps it, however the engine ends.
        try:
            self.pool = HostPool.for_pages(
                geometry, self.num_host_pages + self.staging.capacity, name=self.pool_name, memfd=True, pin=False, page_stride=self.page_stride
            )
        except ValueError as e:  # larger than the machine's memory, say: name the setting
            size = f"host_pages={config.host_pages}" if config.host_pages is not None else f"host_gb={config.host_gb:g}"
            raise ValueError(f"dynkv config {size}: {e} (the pool holds {self.staging.capacity} staging pages "
                             "besides: see staging_pages)") from None
        if not self.pool.memfd:
            log.warning("no memfd_create on this kernel: host pool %s is in /dev/shm, and stays there if this "
                        "process is killed (until the next dynkv leader on this host starts)", self.pool.path)
        self._host = memoryview(self.pool.as_tensor().numpy())
        self.disk: Any = None
        tiers = {HOST: self.num_host_pages}
        if config.disk_gb > 0:
            from dynkv.tiers.disk import DiskTier

            record = PAGE_ALIGN + self.page_stride
            num_disk = int(config.disk_gb * (1 << 30)) // record
            if num_disk < 1:
                raise ValueError(f"dynkv config disk_gb={config.disk_gb:g} holds no page of {record} bytes")
            try:
                self.disk = DiskTier(
                    config.disk_paths,
                    num_disk,
                    geometry.page_bytes,
                    fingerprint=fingerprint.digest(),
                    direct_io=config.disk_direct_io,
                    io_threads=config.io_threads,
                )
            except OSError as e:  # a file given as a directory, no space, a file held by another engine
                self.pool.close()
                raise type(e)(e.errno, f"dynkv config disk_paths: {e.strerror}", e.filename) from None
            tiers[DISK] = self.disk.num_pages
        self.index = PageIndex(tiers, policy=config.eviction, admit_min_hits=config.disk_admit_min_hits,
                               gated=(HOST,) if config.host_admission == "frequency" else (),
                               adaptive=(HOST,) if config.host_admission == "auto" else ())
        if self.disk is not None:
            found = self.disk.recover()
            adopted = self.index.adopt(DISK, ((key, slot) for slot, key in found))
            log.info("disk tier: %d pages found under %s", adopted, ", ".join(config.disk_paths))
        self._events: list[IndexEvent] = []
        self._jobs = itertools.count(1)
        self._reqs: dict[str, RequestRecord] = {}
        self._ready: list[LoadRecord] = []
        self._promoting: dict[int, LoadRecord] = {}
        self._abandoned: dict[int, LoadRecord] = {}
        self._stores: list[StoreRecord] = []
        self._finished: list[str] = []
        self._inflight: dict[int, LoadRecord | StoreRecord] = {}
        self._acks: dict[int, Acks] = {}
        self._io: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._importing: set[bytes] = set()  # host pages reserved for pulls
        self.exporter: Any = None
        self._writes = 0
        self._counted: dict[str, tuple[int, int, int]] = {}
        self._max_writes = max_disk_writes(config.io_threads, tiers[HOST])
        # The write backlog's bound, in pages: a write is skipped once this many are in flight.
        self._max_backlog = -(-int(config.disk_write_backlog_gb * (1 << 30)) // self._page_bytes)
        # Staging slots that write-around may hold at once (the rest stay for loads).
        self._max_around = self.staging.capacity // 2 if config.disk_write_around and self.disk is not None else 0
        for tier, cap in tiers.items():
            self.metrics.capacity.labels(tier).set(cap)
            self.metrics.writes_on.labels(tier).set(1)
        self.metrics.staging.labels("capacity").set(self.staging.capacity)
        self.metrics.staging.labels("in_use").set(0)
        self.cost = None
        if config.cost_model and self.disk is not None:  # writes running on the device are ahead of any read
            self.cost = CostModel(writes_ahead=lambda disk=self.disk: disk.write_bytes_running)
        self.shared: Any = None
        self.shared_cost: CostModel | None = None
        self._shared_writes = 0
        self._max_shared_writes = max(4 * config.shared_batch_pages, tiers[HOST] // 4)  # as the disk's bound
        self._held: OrderedDict[bytes, None] = OrderedDict()
        if config.remote_url is not None:
            from dynkv.tiers.shared.tier import SharedTier

            self.shared = SharedTier(
                config.remote_url, fingerprint=fingerprint.digest(), page_bytes=geometry.page_bytes,
                namespace=config.shared_namespace, batch_pages=config.shared_batch_pages,
                timeout_s=config.shared_timeout_s, lookup_timeout_s=config.shared_lookup_ms / 1e3,
                io_threads=min(config.io_threads, 4), username=os.environ.get("DYNKV_SHARED_USERNAME") or None,
                password=os.environ.get("DYNKV_SHARED_PASSWORD") or None)
            self.shared.register(self._host)
            if config.cost_model:  # the same load-or-recompute choice, on the store's measured bandwidth
                self.shared_cost = CostModel()
        self.pool_link = publish_pool(self.pool, links)  # now that it is ready, the workers may attach it
        if config.metrics_port is not None:
            try:
                self.metrics.serve(config.metrics_port)
            except OSError as e:
                self.close()
                raise ValueError(f"dynkv config metrics_port={config.metrics_port}: cannot listen there "
                                 f"({e.strerror}); give a free port, or none") from None
        parent = started_by()
        if parent is not None:  # an engine core: once its API server is gone, it must let go (leader/orphan.py)
            self._watch = OrphanWatch(parent, lambda: stop_orphaned_engine(engine_id, parent, self._closed,
                                                                           self.close))
        log.info("%s", self.describe())

    def describe(self) -> str:
        """One line of what this leader set up: tiers, sizes, paths, policies."""
        c, gib = self.config, 1 << 30
        host = (f"host tier {self.num_host_pages * self.page_stride / gib:.1f} GiB ({self.num_host_pages} pages of "
                f"{self._page_bytes / 2**20:.2f} MiB) and {self.staging.capacity} staging pages "
                f"({self.staging.capacity * self.page_stride / gib:.2f} GiB), pool {self.pool.nbytes / gib:.1f} GiB "
                f"({'memfd' if self.pool.memfd else 'shm'} {self.pool.path})")
        if self.disk is None:
            disk = "no disk tier"
        else:
            disk = (f"disk tier {c.disk_gb:g} GiB over {', '.join(c.disk_paths)} "
                    f"({self.index.stats()[DISK].stored} pages recovered)")
        shared = "no shared tier" if self.shared is None else (
            f"shared tier {c.shared_store()} ({'up' if self.shared.up else 'down, retrying'}), "
            f"namespace {c.shared_namespace}")
        return (f"dynkv {self.engine_id}: {host}; {disk}; {shared}; eviction {c.eviction}; "
                f"{'layer-wise host loads' if c.layerwise else 'asynchronous loads'}; "
                f"cost model {'on' if self.cost is not None or self.shared_cost is not None else 'off'}; model {self.fingerprint.model_id} "
                f"(weights {self.fingerprint.weights[:24] or 'unidentified'}), TP {self.world_size}")

    # -- scheduler-facing calls --------------------------------------------

    def lookup(self, req_id: str, keys: Sequence[bytes], num_computed_blocks: int = 0) -> int:
        """Blocks after the first ``num_computed_blocks`` that dynkv can load.

        The matched pages are pinned until :meth:`begin_load` or
        :meth:`request_finished`; a repeated lookup for the same request
        replaces the previous one.
        """
        self._drain_io()
        req = self._reqs.setdefault(req_id, RequestRecord())
        self._release_match(req)
        todo = list(keys[num_computed_blocks:])
        m = self.index.lookup(todo, pin=True)
        req.match = [(tier, slot, key) for (tier, slot), key in zip(m.locations, todo)]
        probing, req.probe = req.probe, None  # a request let through as a probe that asks again stays the probe
        if self.cost is not None:
            self._weigh_disk(req, probing=probing == DISK)
        if len(req.match) == m.num_keys:  # the cost model kept the whole local match: ask the shared tier on
            self._match_shared(req, todo, probing=probing == SHARED)
        if not req.looked_up:
            req.looked_up = True
            self.metrics.hits.labels("device").inc(num_computed_blocks)
            self.metrics.misses.inc(len(todo) - max(m.num_keys, len(req.match)))
        return len(req.match)

    def on_host(self, req_id: str, n: int) -> bool:
        """True when the request's first ``n`` matched pages are all in the host tier (a sync load can take them)."""
        req = self._reqs.get(req_id)
        return req is not None and 0 < n <= len(req.match) and all(t == HOST for t, _, _ in req.match[:n])

    def begin_load(self, req_id: str, block_ids: Sequence[int], *, sync: bool = False) -> dict[str, int]:
        """Load the request's matched pages into ``block_ids`` (its first ``len(block_ids)`` matches).

        ``sync``: vLLM computes the request in the step of the next plan, so
        the load is in that plan; every page must be in the host tier. A
        negative block id leaves its page unloaded (a sliding-window group
        holds no block there). Returns how many of the loaded pages each tier
        (host, disk, remote) supplies.
        """
        req = self._reqs.get(req_id)
        if req is None or len(block_ids) > len(req.match):
            have = 0 if req is None else len(req.match)
            raise ValueError(f"request {req_id!r}: {len(block_ids)} blocks to load but {have} pages were matched")
        if req.load is not None:
            raise ValueError(f"request {req_id!r} is already loading (job {req.load.job})")
        if sync and block_ids and not self.on_host(req_id, len(block_ids)):
            raise ValueError(f"request {req_id!r}: a synchronous load needs every page in the host tier")
        use, rest = req.match[: len(block_ids)], req.match[len(block_ids) :]
        if any(b < 0 for b in block_ids):
            rest += [m for m, b in zip(use, block_ids) if b < 0]
            use = [m for m, b in zip(use, block_ids) if b >= 0]
            block_ids = [b for b in block_ids if b >= 0]
        req.match = rest
        self._release_match(req)
        if not use:
            return {}
        load = LoadRecord(next(self._jobs), req_id, [int(b) for b in block_ids], [None] * len(use), sync=sync,
                          started=time.perf_counter(), probe=req.probe)
        req.load = load
        tiers = Counter(t for t, _, _ in use)
        for tier, n in tiers.items():
            self.metrics.hits.labels(tier).inc(n)
        on_disk: list[tuple[int, int, bytes]] = []
        shared: list[tuple[int, bytes]] = []
        for i, (tier, slot, key) in enumerate(use):
            if tier == HOST:
                load.slots[i] = slot
                load.host_keys.append(key)
            elif tier == REMOTE:
                load.slots[i] = slot
                load.remote = req.remote
                load.pulls.append((slot, req.remote_slots.pop(key)))
                load.pulled_keys.append(key)
            elif tier == SHARED:
                shared.append((i, key))
            else:
                on_disk.append((i, slot, key))
        if on_disk:
            self._promote(load, on_disk)
        if shared:
            self._fetch_shared(load, shared)
        if load.waiting:
            self._promoting[load.job] = load
        else:
            self._ready.append(load)
        return dict(tiers)

    def store(self, req_id: str, keys: Sequence[bytes], block_ids: Sequence[int]) -> int:
        """Offload full blocks ``block_ids`` (with page ``keys``) to the host tier.

        Pages the host tier already holds are skipped; when it is full of
        pinned or pending pages the rest are refused (counted). Returns how
        many pages will be stored.
        """
        return self.store_many([(req_id, keys, block_ids)])[0]

    def store_many(self, stores: Sequence[tuple[str, Sequence[bytes], Sequence[int]]]) -> list[int]:
        """:meth:`store` of several requests ``(req_id, keys, block_ids)`` (a decode step's), one host allocation.

        A page two of them store is stored once, for the first. Returns how
        many pages each will store.
        """
        for req_id, keys, block_ids in stores:  # every argument checked before anything is allocated
            if len(keys) != len(block_ids):
                raise ValueError(f"store for {req_id!r}: {len(keys)} keys but {len(block_ids)} blocks")
        self._drain_io()
        got = dict(self.index.allocate(HOST, [k for _, keys, _ in stores for k in keys]))
        counts = []
        for req_id, keys, block_ids in stores:
            st = StoreRecord(0, req_id, [], [], [])
            left = []
            for key, block in zip(keys, block_ids):
                slot = got.pop(key, None) if got else None
                if slot is not None:
                    st.keys.append(key)
                    st.block_ids.append(int(block))
                    st.slots.append(slot)
                else:
                    left.append((key, int(block)))
            for key, block, slots in self._write_around(left):  # to the disk tier, past the host tier
                st.around[key] = slots
                st.keys.append(key)
                st.block_ids.append(block)
                st.slots.append(slots[0])
            counts.append(len(st.keys))
            if not st.keys:
                continue
            st.job = next(self._jobs)
            self._stores.append(st)
            req = self._reqs.get(req_id)
            if req is None:
                req = self._reqs[req_id] = RequestRecord()
            req.stores.add(st.job)
        return counts

    def request_finished(self, req_id: str) -> bool:
        """vLLM finished the request; True while its stores are in flight (delay freeing its blocks)."""
        self._drain_io()
        req = self._reqs.get(req_id)
        if req is None:
            return False
        self._release_match(req)
        req.finished = True
        if req.load is not None and req.load.job in self._promoting:
            req.load.cancelled = True
            self._give_up(req.load)  # its reads not started yet are not made
        if req.stores:
            self._finished.append(req_id)
            return True
        self._forget(req_id, req)
        return False

    def build_plan(self) -> StepPlan:
        """This step's loads (pages all on the host), stores, and finished requests."""
        self._drain_io()
        plan = StepPlan(finished=self._finished)
        self._finished = []
        for load in self._ready:
            if load.cancelled:
                # vLLM frees an aborted request's blocks only once every rank reports its load
                # finished: send an empty op so they do.
                self._end_load(load)
                plan.loads.append(LoadOp(load.job, load.req_id, (), ()))
                continue
            pairs = [(b, s) for b, s in zip(load.block_ids, load.slots) if s is not None]
            pull = None
            if load.pulls:
                r = load.remote
                pull = PullSpec(r.engine_id, r.host, r.port, r.instance, r.transfer,
                                tuple(s for s, _ in load.pulls), tuple(s for _, s in load.pulls))
            plan.loads.append(LoadOp(load.job, load.req_id, tuple(b for b, _ in pairs), tuple(s for _, s in pairs),
                                     tuple(load.failed), pull, load.sync))
            self._inflight[load.job] = load
        self._ready = []
        for st in self._stores:
            plan.stores.append(StoreOp(st.job, st.req_id, tuple(st.block_ids), tuple(st.slots)))
            self._inflight[st.job] = st
        self._stores = []
        self._update_gauges()
        return plan

    def update(self, report: WorkerReport) -> None:
        """Take the workers' (merged) report: complete jobs every rank has finished."""
        self._drain_io()
        for counts, failed in ((report.done, False), (report.failed, True)):
            for job, n in counts.items():
                if job not in self._inflight:
                    continue
                acks = self._acks.setdefault(job, Acks())
                if failed:
                    acks.failed += n
                else:
                    acks.done += n
                if acks.done + acks.failed >= self.world_size:
                    del self._acks[job]
                    self._complete(self._inflight.pop(job), acks.failed > 0)
        for direction, (nbytes, seconds) in report.moved.items():
            self.metrics.bytes.labels(direction).inc(nbytes)
            self.metrics.latency.labels(direction).observe(seconds)
        for direction, choice in report.copy_paths.items():
            for path in ("kernel", "staged"):
                self.metrics.copy_path.labels(direction, path).set(1.0 if choice.get("path") == path else 0.0)
            for path, gbps in choice.get("gbps", {}).items():
                self.metrics.copy_path_gbps.labels(direction, path).set(float(gbps))
        if self.exporter is not None:  # stores just committed may complete an export
            self.exporter.poll(self.index)

    def fail_inflight(self) -> set[int]:
        """Give up on every job sent to workers (a worker died): returns the blocks whose loads failed."""
        failed: set[int] = set()
        for job in list(self._inflight):
            op = self._inflight.pop(job)
            self._acks.pop(job, None)
            if isinstance(op, LoadRecord):
                failed.update(op.block_ids)
            self._complete(op, True)
        return failed

    # -- tiers ---------------------------------------------------------------

    def reset(self) -> int:
        """Drop every unpinned page of every tier (vLLM's ``reset_cache``); returns how many went."""
        self._drain_io()
        n = 0
        for tier in self.index.tiers:
            idle = [k for k in self.index.keys(tier) if self.index.pins(k, tier) == 0]
            self.index.remove(tier, idle)
            n += len(idle)
        if self.disk is not None and self.index.stats()[DISK].stored == 0:
            self.disk.clear()
        return n

    def take_events(self) -> list[IndexEvent]:
        """Stored/removed events since the last call (for KV-aware routing)."""
        return self.index.drain_events()

    def stats(self) -> dict[str, Any]:
        """Tier occupancy and counters, JSON-able."""
        self._drain_io()
        out: dict[str, Any] = {t: vars(s) for t, s in self.index.stats().items()}
        out["staging"] = {"capacity": self.staging.capacity, "in_use": self.staging.in_use}
        out["requests"] = len(self._reqs)
        out["jobs_in_flight"] = len(self._inflight)
        out["disk_writes_in_flight"] = self._writes
        out["shared_writes_in_flight"] = self._shared_writes
        out["shared_up"] = self.shared is not None and self.shared.up
        return out

    def idle(self) -> bool:
        """No job queued, in flight, or waiting on disk I/O."""
        self._drain_io()
        return not (self._inflight or self._ready or self._stores or self._promoting or self._abandoned
                    or self._writes or self._shared_writes)

    def close(self) -> None:
        """Wait for disk and shared-tier I/O, then release the tiers (the host pool's link is removed).

        Idempotent; the engine's shutdown and the orphan watch may call it at
        once, and one of them closes.
        """
        if self._watch is not None:
            self._watch.stop()
        with self._close_lock:
            if not self._closed.is_set():
                self._close_tiers()
                self._closed.set()

    def _close_tiers(self) -> None:
        if self.shared is not None:
            self.shared.close()
            self._drain_io()
            self.shared = None
        if self.disk is not None:
            self.disk.close()
            self._drain_io()
            self.disk = None
        if self.exporter is not None:  # deregisters the pool from NIXL before it is unmapped
            self.exporter.close()
            self.exporter = None
        self._host = memoryview(b"")
        withdraw_pool(self.pool_link)
        self.pool.close()
        self.metrics.close()  # frees metrics_port for an engine started after this one

    def __enter__(self) -> Leader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------

    def _host_page(self, slot: int) -> memoryview:
        off = slot * self.page_stride
        return self._host[off : off + self._page_bytes]

    def _release_match(self, req: RequestRecord) -> None:
        for tier, _, key in req.match:
            if tier == SHARED:
                continue  # nothing held: the store keeps or evicts the page as it will
            if tier == REMOTE:
                self.index.remove(HOST, [key])
                self._importing.discard(key)
                req.remote_slots.pop(key, None)
            else:
                self.index.unpin(tier, [key])
        req.match = []

    def _forget(self, req_id: str, req: RequestRecord) -> None:
        if req.load is None and not req.stores:
            self._reqs.pop(req_id, None)

    def _complete(self, op: LoadRecord | StoreRecord, failed: bool) -> None:
        if isinstance(op, LoadRecord):
            keys, pulled = op.host_keys, op.pulled_keys
            if failed:
                self.metrics.load_errors.labels("remote" if pulled else "worker").inc(len(pulled or op.block_ids))
                req = self._reqs.get(op.req_id)
                if pulled and req is not None:
                    req.pull_failed = True
            else:
                self.metrics.pages.labels("h2d").inc(len(keys) + len(pulled) + len(op.staged))
                if pulled:  # every rank wrote its slice: whole pages
                    if getattr(op.remote, "trusted", False):  # params under the deployment's MAC: cached
                        self.index.commit(HOST, pulled)
                    else:  # unverifiable: they served this request's load, and serve no other
                        self.index.remove(HOST, pulled)
                    self._importing.difference_update(pulled)
                    self.metrics.pages.labels("remote_to_host").inc(len(pulled))
                    op.pulled_keys = []
                    if not getattr(op.remote, "trusted", False):
                        pulled = []
            self._end_load(op)
            if not failed:  # a hit may have lifted the pages over the disk tier's admission threshold
                self._spill(keys + pulled)
                self._share(keys + pulled)
            return
        hosted = [k for k in op.keys if k not in op.around] if op.around else op.keys
        if failed:
            self._drop_host(hosted)
            self.metrics.store_errors.labels(HOST).inc(len(hosted))
        else:
            self.index.commit(HOST, hosted)
            self.metrics.pages.labels("d2h").inc(len(op.keys))
            self._spill(hosted)
            self._share(hosted, computed=True)
        if op.around:
            self._around_stored(op.around, failed)
        req = self._reqs.get(op.req_id)
        if req is not None:
            req.stores.discard(op.job)
            if req.finished:
                self._forget(op.req_id, req)

    def _end_load(self, load: LoadRecord) -> None:
        self.index.unpin(HOST, load.host_keys)
        load.host_keys = []
        self.staging.free(load.staged)  # on the device now, or not wanted: never a host page
        load.staged = []
        if load.pulled_keys:  # not pulled (failed or cancelled): give the slots back
            self.index.remove(HOST, load.pulled_keys)
            self._importing.difference_update(load.pulled_keys)
            load.pulled_keys = []
        req = self._reqs.get(load.req_id)
        if req is not None and req.load is load:
            req.load = None
            if req.finished:
                self._forget(load.req_id, req)

    def _drop_host(self, keys: Sequence[bytes]) -> None:
        """Remove host pages whose bytes never arrived; exports holding them give up their pins first."""
        if self.exporter is not None:
            self.exporter.forget(keys, self.index)
        self.index.remove(HOST, keys)

    def _update_gauges(self) -> None:
        if self.shared is not None:
            self.metrics.tier_up.labels(SHARED).set(1.0 if self.shared.up else 0.0)
        # Evictions and "full" refusals happen inside every allocate (stores, promotions,
        # write-through); the index counts them, and the metrics follow its totals here.
        for tier, s in self.index.stats().items():
            seen_evictions, seen_refusals, seen_filtered = self._counted.get(tier, (0, 0, 0))
            self.metrics.evictions.labels(tier).inc(s.evictions - seen_evictions)
            self.metrics.refused.labels(tier, "full").inc((s.refusals - s.filtered) - (seen_refusals - seen_filtered))
            if s.filtered > seen_filtered:
                self.metrics.refused.labels(tier, "filter").inc(s.filtered - seen_filtered)
            self._counted[tier] = (s.evictions, s.refusals, s.filtered)
            self.metrics.gated.labels(tier).set(1.0 if s.gated else 0.0)
            self.metrics.occupancy.labels(tier, "stored").set(s.stored)
            self.metrics.occupancy.labels(tier, "pending").set(s.pending)
            self.metrics.occupancy.labels(tier, "pinned").set(s.pinned)
        self.metrics.staging.labels("in_use").set(self.staging.in_use)

