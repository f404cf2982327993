"""A worker's synchronous loads: host pages copied in the step whose forward reads them.

A part of :class:`dynkv.worker.Worker` (a base class of it). A step's sync
loads (:attr:`dynkv.protocol.LoadOp.sync`) go as one scatter in layer
groups (one layer each on the copy kernel, a few on the staged path:
:meth:`dynkv.worker.staging.CopyPaths.layer_groups`), each ending in an
event; the forward waits for each group only where the attention of its
first layer needs it (:meth:`SyncLoads.wait_for_layer`). On the staged
path the rank's launch thread queues the copies (a load in groups can be
more copies than the driver queues, and queueing them then waits for the
GPU); the forward waits for a group's event once the thread has recorded it.
They can start before vLLM prepares the step's inputs: from vLLM's
``handle_preemptions`` hook (:meth:`SyncLoads.start_early`), or from the
scheduler itself where it shares the worker's thread
(:meth:`SyncLoads.start_scheduled`). A forward that never asks for a layer
it was given turns that step's blocks into load errors (vLLM recomputes
them), and later steps wait for whole copies.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dynkv.layout import PagedView
from dynkv.memory import PageBuffer
from dynkv.ops import GroupSignal, scatter_layers
from dynkv.protocol import LoadOp, StepPlan, WorkerReport
from dynkv.worker.jobs import Job, Launched, done_future

if TYPE_CHECKING:
    from dynkv.worker.staging import CopyPaths

__all__ = ["SyncLoads", "SyncStep", "same_step"]

log = logging.getLogger("dynkv.worker")


def same_step(a: StepPlan | None, b: StepPlan) -> bool:
    """Whether two plans are one step's (the same object, or a copy of it: the same load jobs)."""
    return a is b or (a is not None and bool(a.loads) and [op.job for op in a.loads] == [op.job for op in b.loads])


@dataclass
class SyncStep:
    """This step's synchronous loads: one event per layer group, which the forward waits on."""

    jobs: list[Job]
    groups: list[tuple[int, int]]
    events: list[Any]  # CUDA events (GPU) or threading.Events (CPU), one per group
    # GPU, queued by the launch thread: how many groups' events are recorded (all once the launch is over)
    queued: GroupSignal | None = None
    waited: set[int] = field(default_factory=set)  # groups the forward waited for
    group_of: list[int] = field(init=False)  # layer -> its group

    def __post_init__(self) -> None:
        self.group_of = [i for i, (b, e) in enumerate(self.groups) for _ in range(b, e)]


class SyncLoads:
    """Sync-load half of the worker; :class:`dynkv.worker.Worker` sets these attributes up."""

    rank: int
    view: PagedView | None
    _streams: tuple[Any, Any] | None
    copy_paths: CopyPaths | None
    _threads: tuple[ThreadPoolExecutor, ThreadPoolExecutor] | None
    _jobs: list[Job]
    _errors: set[int]
    _report: WorkerReport
    _layer_of: dict[str, int]
    _layerwise: bool
    _sync: SyncStep | None
    _early: StepPlan | None
    _step_thread: int | None
    sync_launches: dict[str, int]
    sync_launch_s: dict[str, float]
    sync_launch_at: float | None
    _layer_event_pool: list[Any]
    _launch_cuda: Callable[[str, Callable[[PageBuffer, Any], None], GroupSignal | None], Any]
    _staged_loads: Callable[[], bool]
    _page_buffer: Callable[[], PageBuffer]
    _slice_bytes: Callable[[int], int]
    wait: Callable[[Iterable[str] | None], None]

    def start_early(self, plan: StepPlan, *, layer_hooks: bool = True, site: str = "early") -> None:
        """Launch the plan's sync loads now, before vLLM prepares the step's inputs.

        For a step in which nothing else writes KV blocks before the forward
        (the connector checks that vLLM zeroes and copies no blocks in it):
        the copy then runs while vLLM prepares the inputs instead of after.
        :meth:`start` of the same plan launches the rest; a second call for
        the same plan does nothing.
        ``layer_hooks`` as for :meth:`start`, as far as known this early.
        """
        if same_step(self._early, plan) or self.view is None:  # asleep (sleep mode): start() refuses the plan
            return
        self._end_sync_step()  # a step whose forward never ran (vLLM calls nothing in between)
        self._early = plan
        sync = plan.sync_loads()
        if sync:
            # A copy waited for whole is waited for in start: vLLM's input preparation need not wait for it.
            self._launch_sync(sync, per_layer=self._layerwise and layer_hooks and bool(self._layer_of), wait=False,
                              site=site)

    def start_scheduled(self, plan: StepPlan, preempted: Iterable[str] = (), *, layer_hooks: bool = True) -> bool:
        """From the scheduler, as it builds the step: launch the plan's sync loads now; False where it may not.

        Only where the scheduler runs in the thread that runs this worker's
        steps (TP=1 under vLLM's uni executor): every earlier step's GPU work
        is then queued, and the copy is ordered after it (after the current
        stream and the stream the last step computed on). It then runs while
        vLLM hands the step over and prepares its inputs. Stores still reading
        blocks of ``preempted`` requests finish first, as in vLLM's own hook.
        """
        if self._step_thread != threading.get_ident() or self.view is None:
            return False
        if preempted:
            self.wait(preempted)
        self.start_early(plan, layer_hooks=layer_hooks, site="scheduler")
        return True

    def wait_for_layer(self, layer_name: str) -> None:
        """Before the attention of ``layer_name``: its layer of this step's sync loads is in (GPU: stream-ordered)."""
        st = self._sync
        if st is None or len(st.groups) == 1:
            return
        layer = self._layer_of.get(layer_name)
        if layer is None:
            return
        group = st.group_of[layer]
        if group in st.waited:
            return
        st.waited.add(group)
        self._wait_group(st, group)

    def _launch_sync(self, ops: list[LoadOp], *, per_layer: bool, wait: bool = True, site: str = "late") -> None:
        """This step's sync loads as one scatter, in layer groups; the forward waits on each group's event.

        One group (not ``per_layer``) is waited for at once, unless ``wait`` is False. ``site``: where
        it was launched, counted in :attr:`sync_launches` (``scheduler``, ``early``: vLLM's
        ``handle_preemptions``, ``late``: ``start_load_kv``), and the time the launch took the
        calling thread in :attr:`sync_launch_s`; :attr:`sync_launch_at` is when the last one began
        (``time.monotonic()``).
        """
        assert self.view is not None
        num_layers = self.view.geometry.num_layers
        if not per_layer:
            groups = [(0, num_layers)]
        elif self.copy_paths is not None and self._streams is not None:
            groups = self.copy_paths.layer_groups()
        else:
            groups = [(l, l + 1) for l in range(num_layers)]
        now = time.perf_counter()
        self.sync_launch_at = time.monotonic()
        slots = [s for op in ops for s in op.slots]
        blocks = [b for op in ops for b in op.block_ids]
        self.sync_launches[site] = self.sync_launches.get(site, 0) + len(blocks)
        # One copy for all: its bytes and time go with the first job.
        jobs = [Job(op.job, op.req_id, "load", op.block_ids, op.failed, self._slice_bytes(len(blocks)) if not i else 0,
                     now, None, sync=True) for i, op in enumerate(ops)]
        step = SyncStep(jobs, groups, [])
        try:
            if self._streams is not None:
                step.events = self._layer_events(len(groups))
                paths = self.copy_paths
                assert paths is not None
                # A staged load in groups can be more copies than the driver queues: the launch thread
                # queues it, and the forward waits for each group's event only once it is recorded.
                queued = step.queued = GroupSignal(len(groups)) if self._staged_loads() else None
                handle = self._launch_cuda("load", lambda pages, stream: paths.load(
                    pages, slots, blocks, stream, groups, step.events, after=queued), queued)
            else:
                handle = self._launch_sync_cpu(self._page_buffer(), slots, blocks, step)
        except Exception as e:  # no pool, bad ids: nothing was copied, vLLM recomputes these blocks
            log.error("rank %d: synchronous load of %d blocks failed to start: %s", self.rank, len(blocks), e)
            for job in jobs:
                job.handle, job.error = done_future(), e
            self._jobs.extend(jobs)
            return
        for job in jobs:
            job.handle = handle
        self._jobs.extend(jobs)
        self._sync = step
        self.sync_launch_s[site] = self.sync_launch_s.get(site, 0.0) + time.perf_counter() - now
        if len(groups) == 1 and wait:
            self._wait_whole_sync()

    def _launch_sync_cpu(self, pages: PageBuffer, slots: list[int], blocks: list[int], step: SyncStep) -> Any:
        assert self._threads is not None
        step.events = [threading.Event() for _ in step.groups]

        def run() -> None:
            try:
                scatter_layers(pages, self.view, slots, blocks, step.groups, after=lambda i: step.events[i].set())
            finally:  # a failed copy still lets the forward go on; its blocks are load errors
                for ev in step.events:
                    ev.set()

        return self._threads[0].submit(run)

    def _layer_events(self, n: int) -> list[Any]:
        """``n`` CUDA events for a step's layer groups, created once and recorded again every step.

        Re-recording is safe: a step's launch comes after the step before has
        ended (:meth:`_end_sync_step`), when every wait on its events is queued,
        and a queued wait keeps the record it was queued after.
        """
        import torch

        assert self._streams is not None
        while len(self._layer_event_pool) < n:
            ev = torch.cuda.Event()
            ev.record(self._streams[0])  # torch creates the CUDA event at its first record
            self._layer_event_pool.append(ev)
        return self._layer_event_pool[:n]

    def _wait_group(self, st: SyncStep, group: int) -> None:
        """The current stream waits for ``group`` of ``st`` (queued by the launch thread: once its event is
        recorded). A launch that failed partway recorded only its first groups' events, the others still hold
        an earlier step's; it finished what it had queued before letting any wait go on, and its blocks are
        load errors this step (vLLM recomputes them)."""
        if st.queued is not None:
            st.queued.wait(group)
        self._wait_event(st.events[group])

    def _wait_event(self, ev: Any) -> None:
        if isinstance(ev, threading.Event):
            ev.wait()
            return
        import torch

        assert self.view is not None
        torch.cuda.current_stream(self.view.device).wait_event(ev)

    def _wait_whole_sync(self) -> None:
        """The forward asks for no layer: it waits for the whole of this step's sync loads before it starts."""
        st = self._sync
        if st is None or len(st.waited) == len(st.groups):
            return
        self._wait_group(st, len(st.groups) - 1)  # the groups are copied in order: the last one ends the copy
        st.waited.update(range(len(st.groups)))

    def _end_sync_step(self) -> None:
        """After the forward: check that it waited for every layer of its sync loads."""
        st, self._sync = self._sync, None
        if st is None:
            return
        handle = st.jobs[0].handle
        if isinstance(handle, Future):
            handle.exception()  # CPU: the copy is over (its events are set); its errors count this step
        elif isinstance(handle, Launched):
            handle.future.exception()  # queued or failed: a failed launch's errors count this step
        if len(st.waited) == len(st.groups):
            return
        if len(st.groups) == 1:  # a whole copy launched early whose start never came: later work still follows it
            self._wait_group(st, 0)
            return
        missed = [f"{b}-{e - 1}" if e - b > 1 else str(b) for i, (b, e) in enumerate(st.groups) if i not in st.waited]
        log.warning(
            "rank %d: the forward did not wait for layers %s of its synchronous loads (a CUDA graph captured the "
            "attention?): their %d blocks are recomputed, and later steps wait for whole loads",
            self.rank, missed[:8], sum(len(j.block_ids) for j in st.jobs))
        self._layerwise = False
        self._wait_group(st, len(st.groups) - 1)  # later work on these blocks comes after the copy
        for job in st.jobs:
            self._errors |= set(job.block_ids)
            self._report.failed_blocks |= set(job.block_ids)
