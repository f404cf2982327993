"""The worker: one per TP rank, moving its head slice between device blocks and host pages.

It attaches the leader's shared host pool through the leader's link, runs loads (host -> device)
as soon as a step's plan arrives and stores (device -> host) once the step's
forward has written the blocks, each on its own CUDA stream (on CPU: its own
thread), and reports finished and failed jobs without ever blocking on them.
A load that first pulls pages from a prefill engine (disaggregated serving)
runs on a pull thread (:mod:`dynkv.worker.pull`). On a GPU, staged loads are
queued by a launch thread (:mod:`dynkv.worker.launch`).

A *synchronous* load (:attr:`LoadOp.sync`: host pages of a request computed
in the same step) feeds that step's forward pass. With ``layerwise`` it is
copied layer by layer and the forward waits for each layer only where its
attention needs it (:meth:`Worker.wait_for_layer`); otherwise the forward
waits for the whole copy. Should a forward run without asking for a layer
(a CUDA graph that captured the attention), its sync blocks are reported as
load errors, vLLM recomputes them, and later steps wait for whole copies.
Those loads live in :mod:`dynkv.worker.sync`.

Across vLLM's sleep mode the worker lets go of the KV cache and takes it
back (:mod:`dynkv.worker.sleep`): no copy touches device memory in between.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from dynkv.config import DynKVConfig
from dynkv.keys import ModelFingerprint
from dynkv.layout import PagedView, page_stride
from dynkv.memory import HostPool, PageBuffer, chunk_for
from dynkv.ops import gather, scatter
from dynkv.protocol import LoadOp, StepPlan, StoreOp, WorkerReport
from dynkv.tiers.host import live_pools, pool_link, pool_owner, run_dirs
from dynkv.worker.jobs import Job as _Job
from dynkv.worker.jobs import Launched
from dynkv.worker.jobs import done_future as _done_future
from dynkv.worker.jobs import is_ready as _ready
from dynkv.worker.jobs import wait_for as _wait
from dynkv.worker.launch import CudaLaunch
from dynkv.worker.pull import PullFlow
from dynkv.worker.sleep import SleepFlow
from dynkv.worker.staging import CopyPaths
from dynkv.worker.sync import SyncLoads, SyncStep, same_step

__all__ = ["LOAD_PRIORITY", "Worker", "in_process"]

log = logging.getLogger("dynkv.worker")
LOAD_PRIORITY = 0  # CUDA stream priority of loads (vLLM computes at 0; -1, above it, measured no faster: docs/notes/2026-11-21-e2e-traces.md)
# Single-rank workers by pool name, for a scheduler in the same process (vLLM's uni executor).
_IN_PROCESS: weakref.WeakValueDictionary[str, Worker] = weakref.WeakValueDictionary()


def in_process(pool_name: str) -> Worker | None:
    """The engine's only worker if it lives in this process (TP=1, vLLM's uni executor), else None."""
    return _IN_PROCESS.get(pool_name)


class Worker(SyncLoads, PullFlow, SleepFlow, CudaLaunch):
    """Device side of one TP rank.

    Parameters
    ----------
    config
        The engine's dynkv settings (``init_timeout_s`` bounds the wait for
        the host pool).
    rank, world_size
        This rank of the engine's TP group.
    pool_name
        The leader's host pool (:attr:`dynkv.leader.Leader.pool_name`).
    fingerprint, engine_id
        The engine's model and id: a prefill engine's pages are pulled only
        when its handshake names the same model (needed for pulls only).
    prepare_pulls
        A decode engine's rank: attach the host pool and create the NIXL
        agent in the background once registered, instead of at the first
        pull (the agent alone takes about half a second to start).
    """

    def __init__(self, config: DynKVConfig, *, rank: int, world_size: int, pool_name: str,
                 fingerprint: ModelFingerprint | None = None, engine_id: str = "dynkv",
                 prepare_pulls: bool = False) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of {world_size}: expected 0 <= rank < world_size")
        self.config = config
        self.rank = rank
        self.world_size = world_size
        self.pool_name = pool_name
        self.view: PagedView | None = None
        self._pages: PageBuffer | None = None
        self._stores_next: list[StoreOp] = []
        self._jobs: list[_Job] = []
        self._report = WorkerReport()
        self._recving: set[str] = set()
        self._sending: set[str] = set()
        self._errors: set[int] = set()
        self._failed_reqs: set[str] = set()  # requests with a failed load, for vLLM's request-level failures
        self._finishing: set[str] = set()
        self._lock = threading.Lock()
        self._streams: tuple[Any, Any] | None = None
        self.copy_paths: CopyPaths | None = None  # GPU: how pages cross PCIe in each direction
        self._threads: tuple[ThreadPoolExecutor, ThreadPoolExecutor] | None = None
        self._writes_pages = True
        self.fingerprint = fingerprint
        self.engine_id = engine_id
        self._puller: Any = None
        self._pull_threads: ThreadPoolExecutor | None = None
        self._launcher: ThreadPoolExecutor | None = None  # queues every staged load (GPU), made at first use
        self._puller_lock = threading.Lock()
        self._prepare_pulls = prepare_pulls
        self._attach_lock = threading.Lock()
        self._closing = threading.Event()
        self._layer_of: dict[str, int] = {}
        self._sync: SyncStep | None = None
        self._early: StepPlan | None = None  # the plan whose sync loads start_early launched
        self._step_thread: int | None = None  # the thread of the last start(), and its current stream
        self._step_stream: Any = None
        self.sync_launches: dict[str, int] = {}  # blocks of sync loads by where they were launched
        self.sync_launch_s: dict[str, float] = {}  # the launching thread's time in them, by the same sites
        self.sync_launch_at: float | None = None  # time.monotonic() when the last one began
        self._layer_event_pool: list[Any] = []  # CUDA events of sync-load layer groups, reused every step
        self._layerwise = config.layerwise
        self._load_priority = LOAD_PRIORITY

    def register(self, view: PagedView, layer_names: dict[str, int] | None = None) -> None:
        """The rank's KV cache; the host pool is attached at the first plan (the leader creates it later).

        ``layer_names`` maps vLLM's attention layer names to layers of
        ``view`` (layers sharing one KV cache map to the same), for
        :meth:`wait_for_layer`. After :meth:`unregister` (sleep mode), the
        KV cache taken back must have the geometry, head slice and block
        count it had (``ValueError`` otherwise).
        """
        restored = self.asleep
        paths = self._check_restore(view)
        self.view = view
        self._layer_of = dict(layer_names or {})
        g = view.geometry
        # Replicated heads (MLA, or more ranks than KV heads): the first replica stores, all load.
        replicas = max(1, self.world_size // g.num_heads) if view.num_heads < g.num_heads or g.num_heads == 1 else 1
        self._writes_pages = self.rank % replicas == 0
        if view.device.type == "cuda":
            import torch

            if self._streams is None:
                self._streams = (torch.cuda.Stream(view.device, priority=self._load_priority),
                                 torch.cuda.Stream(view.device))
            self.copy_paths = self._choose_copy_paths(view, paths)
        elif self._threads is None:
            self._threads = (
                ThreadPoolExecutor(1, thread_name_prefix=f"dynkv-load{self.rank}"),
                ThreadPoolExecutor(1, thread_name_prefix=f"dynkv-store{self.rank}"),
            )
        if self.world_size == 1:
            _IN_PROCESS[self.pool_name] = self
        if self._prepare_pulls and not restored:
            threading.Thread(target=self._prepare, name=f"dynkv-pull-prep{self.rank}", daemon=True).start()

    def _choose_copy_paths(self, view: PagedView, kept: tuple[str, str] | None = None) -> CopyPaths:
        """The copy path of loads and stores on this GPU (:mod:`dynkv.worker.calibrate`, or ``kept`` from before
        a sleep); the kernel if that fails."""
        from dynkv.worker import calibrate

        try:
            if kept is not None:
                return CopyPaths(view, *kept)
            choice = calibrate.choose(view, mode=self.config.copy_path)
            paths = CopyPaths(view, h2d=choice["h2d"].path, d2h=choice["d2h"].path)
        except Exception as e:  # out of GPU memory for the scratch or the staging ring: the kernel needs neither
            log.warning("rank %d: copy-path calibration failed (%s); loads and stores use the copy kernel",
                        self.rank, e)
            return CopyPaths(view)
        log.info("rank %d: copy paths: %s%s", self.rank, calibrate.describe(choice),
                 f"; staging {paths.staging_bytes() / 2**20:.0f} MiB" if paths.staging_bytes() else "")
        self._report.copy_paths = calibrate.as_dict(choice)
        return paths

    @property
    def load_priority(self) -> int:
        return self._load_priority

    def set_load_priority(self, priority: int) -> None:
        """Priority of the GPU stream that loads run on (lower is more urgent; vLLM computes at 0).

        A higher priority (-1) lets the copy kernel's CTAs take SMs first as
        the forward frees them; inside vLLM it measured no faster than the
        default :data:`LOAD_PRIORITY` (docs/notes/2026-11-21-e2e-traces.md). Waits for copies in
        flight first.
        """
        self._load_priority = int(priority)
        if self._streams is not None and self.view is not None:
            import torch

            self.wait(kind="load")  # loads the launch thread has yet to queue too
            self._streams[0].synchronize()
            self._streams = (torch.cuda.Stream(self.view.device, priority=self._load_priority), self._streams[1])

    # -- per step ------------------------------------------------------------

    def start(self, plan: StepPlan, *, layer_hooks: bool = True) -> None:
        """Launch the plan's loads now; keep its stores for :meth:`after_forward`.

        ``layer_hooks``: this step's forward calls :meth:`wait_for_layer` for
        every attention layer (False for a forward replayed as one CUDA
        graph: it then waits for the whole of this step's sync loads).
        Sync loads that :meth:`start_early` launched for this plan are not
        launched again.
        """
        self._finishing.update(plan.finished)
        if self.asleep:  # sleep mode: nothing touches the freed KV cache
            self._refuse(plan)
            return
        self._stores_next = list(plan.stores)
        self._step_thread = threading.get_ident()
        if self._streams is not None and self.view is not None:
            import torch

            self._step_stream = torch.cuda.current_stream(self.view.device)
        early, self._early = same_step(self._early, plan), None
        if not early:
            self._end_sync_step()  # a step whose forward never ran (vLLM calls nothing in between)
        sync = plan.sync_loads()
        for op in plan.loads:
            if op not in sync:
                self._launch_load(op)
        if early:
            if not layer_hooks or (self._sync is not None and len(self._sync.groups) == 1):
                self._wait_whole_sync()
        elif sync:
            self._launch_sync(sync, per_layer=self._layerwise and layer_hooks and bool(self._layer_of))

    def after_forward(self) -> None:
        """Launch this step's stores: the forward has written their blocks."""
        self._end_sync_step()
        ops, self._stores_next = self._stores_next, []
        if ops:
            self._launch_stores(ops)

    def poll(self) -> WorkerReport:
        """Jobs this rank finished since the last call (never blocks)."""
        self._collect()
        report, self._report = self._report, WorkerReport()
        return report

    def finished(self) -> tuple[set[str], set[str]]:
        """``(finished_sending, finished_recving)`` request ids since the last call, as vLLM expects."""
        self._collect()
        busy = {j.req_id for j in self._jobs if j.kind == "store"}
        done = {r for r in self._finishing if r not in busy}
        self._finishing -= done
        sending, self._sending = self._sending | done, set()
        recving, self._recving = self._recving, set()
        return sending, recving

    def load_error_blocks(self) -> set[int]:
        """Device blocks whose load failed since the last call (vLLM recomputes them)."""
        self._end_sync_step()
        self._collect()
        errors, self._errors = self._errors, set()
        return errors

    def failed_requests(self) -> set[str]:
        """Requests with a failed load since the last call (their blocks are in :meth:`load_error_blocks` too)."""
        self._collect()
        failed, self._failed_reqs = self._failed_reqs, set()
        return failed

    def wait(self, req_ids: Iterable[str] | None = None, *, kind: str | None = None) -> None:
        """Block until the jobs of ``req_ids`` (default all), of ``kind`` (``"load"``, ``"store"``; default
        both), are done: before vLLM reuses their blocks."""
        wanted = None if req_ids is None else set(req_ids)
        for job in list(self._jobs):
            if (wanted is None or job.req_id in wanted) and (kind is None or job.kind == kind):
                _wait(job)
        self._collect()

    def close(self) -> None:
        """Finish outstanding jobs and detach from the host pool (freed with its last mapping)."""
        self._closing.set()
        if _IN_PROCESS.get(self.pool_name) is self:
            del _IN_PROCESS[self.pool_name]  # the scheduler launches nothing more on it
        self.wait()
        for ex in (*(self._threads or ()), self._pull_threads, self._launcher):
            if ex is not None:
                ex.shutdown(wait=True)
        with self._puller_lock:
            puller, self._puller = self._puller, None
        if puller is not None:  # deregisters the pool from NIXL before it is unmapped
            puller.close()
        with self._attach_lock:
            pages, self._pages = self._pages, None
        if pages is not None:
            pages.owner.close()

    def host_pages(self) -> PageBuffer:
        """The leader's host pool as this rank's pages (attached at the first call)."""
        return self._page_buffer()

    # -- internals -------------------------------------------------------------

    def _page_buffer(self) -> PageBuffer:
        with self._attach_lock:  # the step's thread and the pull preparation may both ask first
            if self._pages is None:
                self._pages = self._attach()
            return self._pages

    def _attach(self) -> PageBuffer:
        if self.view is None:
            raise RuntimeError("dynkv worker got a plan before register(): no KV cache to copy into")
        stride = page_stride(self.view.geometry)
        deadline = time.monotonic() + self.config.init_timeout_s
        while True:
            missing: Exception | None = None
            t0 = time.perf_counter()
            link = self._resolve_pool()
            if link is not None:
                try:
                    pool = HostPool.attach(link, chunk_bytes=chunk_for(stride))
                    break
                except ValueError as e:  # the leader went away between the look and the open
                    if "No such file" not in str(e):
                        raise
                    missing = e
            if self._closing.is_set():
                raise RuntimeError(f"dynkv worker {self.rank} closed while waiting for its host pool") from missing
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"dynkv worker {self.rank}: host pool {self.pool_name!r} did not appear within "
                    f"init_timeout_s={self.config.init_timeout_s:g} s in any of {', '.join(run_dirs())}; "
                    "is the leader running, as this user, with the same DYNKV_RUN_DIR?"
                ) from missing
            time.sleep(0.05)
        log.info("rank %d attached host pool %s via %s (%.1f GiB, pinned=%s) in %.2f s",
                 self.rank, self.pool_name, link, pool.nbytes / 2**30, pool.pinned, time.perf_counter() - t0)
        return PageBuffer.from_pool(self.view.geometry, pool, page_stride=stride)

    def _resolve_pool(self) -> str | None:
        """The link to the live pool for ``pool_name`` (an exact name, or a prefix the leader appended its
        pid to), or None while there is none."""
        if pool_owner(self.pool_name) is not None:
            return pool_link(self.pool_name)
        live = live_pools(self.pool_name)
        if len(live) > 1:
            log.warning("rank %d: %d live host pools under %s; attaching the newest", self.rank, len(live), self.pool_name)
        return live[0] if live else None

    def _slice_bytes(self, n: int) -> int:
        assert self.view is not None
        return n * self.view.num_heads * self.view.geometry.num_layers * self.view.geometry.tile_bytes

    def _launch_load(self, op: LoadOp) -> None:
        if op.pull is not None:
            self._launch_pull(op)
            return
        self._launch(op.job, op.req_id, "load", op.block_ids, op.failed, lambda pages, stream: (
            scatter(pages, self.view, op.slots, op.block_ids) if self.copy_paths is None
            else self.copy_paths.load(pages, op.slots, op.block_ids, stream)))

    def _launch_stores(self, ops: list[StoreOp]) -> None:
        """A step's stores (a decode step fills a block of every running request) as one gather.

        One launch instead of one per request; the jobs share its handle, and
        its bytes and time go with the first job. A failure fails them all:
        their pages are not stored. A replica that stores nothing (replicated
        heads: the first replica writes the pages) reports the jobs done.
        """
        blocks = [b for op in ops for b in op.block_ids] if self._writes_pages else []
        slots = [s for op in ops for s in op.slots]
        now, error, handle = time.perf_counter(), None, None
        try:
            if not blocks:
                handle = _done_future()
            elif self._streams is not None:
                paths = self.copy_paths
                assert paths is not None
                handle = self._launch_cuda("store", lambda pages, stream: paths.store(pages, blocks, slots, stream))
            else:
                assert self._threads is not None
                handle = self._threads[1].submit(gather, self.view, self._page_buffer(), blocks, slots)
        except Exception as e:  # bad ids, missing pool: the jobs fail, the step goes on
            log.error("rank %d: %d store jobs failed to start: %s", self.rank, len(ops), e)
            handle, error = _done_future(), e
        for i, op in enumerate(ops):
            nbytes = self._slice_bytes(len(blocks)) if i == 0 else 0
            self._jobs.append(_Job(op.job, op.req_id, "store", op.block_ids, (), nbytes, now, handle, error))

    def _launch(
        self,
        job: int,
        req_id: str,
        kind: str,
        block_ids: tuple[int, ...],
        failed: tuple[int, ...],
        copy: Callable[[PageBuffer, Any], None] | None,
    ) -> None:
        nbytes = self._slice_bytes(len(block_ids)) if copy is not None else 0
        rec = _Job(job, req_id, kind, block_ids, failed, nbytes, time.perf_counter(), None)
        try:
            if copy is None or not block_ids:
                rec.handle = _done_future()
            elif self._streams is not None:
                rec.handle = self._launch_cuda(kind, copy)
            else:
                assert self._threads is not None
                ex = self._threads[0 if kind == "load" else 1]
                pages = self._page_buffer()
                rec.handle = ex.submit(copy, pages, None)
        except Exception as e:  # bad ids, missing pool: the job fails, the step goes on
            log.error("rank %d: %s job %d failed to start: %s", self.rank, kind, job, e)
            rec.handle, rec.error = _done_future(), e
        self._jobs.append(rec)

    def _collect(self) -> None:
        with self._lock:
            still: list[_Job] = []
            for job in self._jobs:
                if not _ready(job):
                    still.append(job)
                    continue
                self._finish(job)
            self._jobs = still

    def _finish(self, job: _Job) -> None:
        error, seconds = job.error, time.perf_counter() - job.started
        pulled: Any = None
        if isinstance(job.handle, Future):
            error = error or job.handle.exception()
            pulled = job.handle.result() if error is None else None
        elif isinstance(job.handle, Launched):
            error = error or job.handle.future.exception()
            if error is None:
                start, end = job.handle.future.result()
                seconds = start.elapsed_time(end) / 1e3
        elif isinstance(job.handle, tuple):
            seconds = job.handle[0].elapsed_time(job.handle[1]) / 1e3
        r = self._report
        if error is None:
            r.done[job.job] = r.done.get(job.job, 0) + 1
            direction = "h2d" if job.kind == "load" else "d2h"
            b, s = r.moved.get(direction, (0, 0.0))
            if job.nbytes:
                r.moved[direction] = (b + job.nbytes, s + seconds)
            if pulled is not None:
                b, s = r.moved.get("remote_to_host", (0, 0.0))
                r.moved["remote_to_host"] = (b + pulled[0], s + pulled[1])
        else:
            log.error("rank %d: %s job %d failed: %s", self.rank, job.kind, job.job, error)
            r.failed[job.job] = r.failed.get(job.job, 0) + 1
        if job.kind == "load":
            lost = getattr(error, "blocks", None)  # a failed pull: only the pulled blocks are lost
            bad = set(job.failed_blocks) | (set(job.block_ids if lost is None else lost) if error is not None else set())
            r.failed_blocks |= bad
            self._errors |= bad
            if bad:
                self._failed_reqs.add(job.req_id)
            if not job.sync:
                self._recving.add(job.req_id)
