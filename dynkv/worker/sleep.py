"""A worker across vLLM's sleep mode: the device KV cache let go, then taken back.

A part of :class:`dynkv.worker.Worker` (a base class of it). vLLM's sleep
mode frees (or unmaps) the KV cache tensors that the worker copies into and
out of. :meth:`SleepFlow.unregister` first lets every copy in flight finish
(loads, stores, pulls and this step's synchronous loads), fails the stores
kept for a forward that will not come, then drops the view: its pointers, the
tensors it kept alive and the staging rings. From then until the next
:meth:`dynkv.worker.Worker.register` no copy touches device memory: every load
and store a plan asks for is refused and reported failed (the loads' blocks
as load errors, which vLLM recomputes; the stores' pages are dropped by the
leader). The host pool stays attached, so the host and disk tiers keep their
pages across the sleep.

Registering again after a sleep checks the new view against the one before:
the same page geometry, head slice and block count, or a ``ValueError``
saying which differs (the pages in the host and disk tiers are laid out for
the old one). The copy path chosen before the sleep is kept.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from dynkv.protocol import StepPlan, StoreOp
from dynkv.worker.jobs import Job, done_future

if TYPE_CHECKING:
    from collections.abc import Iterable

    from dynkv.layout import PagedView, PageGeometry
    from dynkv.protocol import LoadOp, WorkerReport
    from dynkv.worker.staging import CopyPaths
    from dynkv.worker.sync import SyncStep

__all__ = ["Asleep", "SleepFlow"]

log = logging.getLogger("dynkv.worker")


class Asleep(RuntimeError):
    """A copy asked for while vLLM's KV cache is unregistered (sleep mode): nothing was copied."""


class SleepFlow:
    """Sleep-mode half of the worker; :class:`dynkv.worker.Worker` sets these attributes up."""

    rank: int
    view: PagedView | None
    copy_paths: CopyPaths | None
    _jobs: list[Job]
    _report: WorkerReport
    _stores_next: list[StoreOp]
    _sync: SyncStep | None
    _early: StepPlan | None
    _step_stream: Any
    _layer_of: dict[str, int]
    # Before a sleep: (geometry, head start, heads, blocks) of the view, and the copy path of each direction.
    _slept: tuple[PageGeometry, int, int, int] | None = None
    _slept_paths: tuple[str, str] | None = None

    if TYPE_CHECKING:
        def wait(self, req_ids: Iterable[str] | None = None, *, kind: str | None = None) -> None: ...
        def _end_sync_step(self) -> None: ...
        def _collect(self) -> None: ...

    @property
    def asleep(self) -> bool:
        """Whether the KV cache is unregistered (between :meth:`unregister` and the next register)."""
        return self._slept is not None

    def unregister(self) -> None:
        """vLLM is about to free its KV cache: finish every copy, then forget the device memory.

        Idempotent. The host pool stays attached (its pages survive the
        sleep); :meth:`dynkv.worker.Worker.register` takes a KV cache again.
        """
        if self._slept is not None or self.view is None:
            return
        self._end_sync_step()
        self.wait()  # loads, stores, pulls: GPU copies synchronized, CPU and pull threads done
        stores, self._stores_next = self._stores_next, []
        self._refuse_stores(stores)  # kept for a forward that will not run: their blocks are not written yet
        v = self.view
        self._slept = (v.geometry, v.head_start, v.num_heads, v.num_blocks)
        if self.copy_paths is not None:
            self._slept_paths = (self.copy_paths.h2d, self.copy_paths.d2h)
        self.view, self.copy_paths = None, None  # the pointers, the tensors they kept alive, the staging rings
        self._early, self._step_stream = None, None
        self._collect()
        log.info("rank %d: KV cache unregistered (sleep mode): copies drained, host pool kept", self.rank)

    def _check_restore(self, view: PagedView) -> tuple[str, str] | None:
        """Before taking ``view`` after a sleep: it must match the one before; the copy paths to keep, if any."""
        if self._slept is None:
            return None
        num_blocks = self._slept[3]
        found = (view.geometry, view.head_start, view.num_heads, view.num_blocks)
        for what, before, now in zip(("page geometry", "first head", "heads", "blocks"), self._slept, found):
            if before != now:
                raise ValueError(
                    f"rank {self.rank}: the KV cache restored after sleep has {what} {now}, before the sleep "
                    f"{before}: dynkv's host and disk pages are laid out for the KV cache it had; restore the "
                    "same KV cache configuration, or restart the engine")
        self._slept = None
        paths, self._slept_paths = self._slept_paths, None
        log.info("rank %d: KV cache registered again after sleep (%d blocks)", self.rank, num_blocks)
        return paths

    def _refuse(self, plan: StepPlan) -> None:
        """Asleep: fail every load and store of ``plan`` without touching device memory."""
        self._refuse_loads(plan.loads)
        self._refuse_stores(plan.stores)

    def _refuse_loads(self, ops: Iterable[LoadOp]) -> None:
        now = time.perf_counter()
        for op in ops:
            err = Asleep(f"load job {op.job} refused: the KV cache is unregistered (sleep mode); vLLM recomputes "
                         "its blocks")
            self._jobs.append(Job(op.job, op.req_id, "load", op.block_ids, op.failed, 0, now, done_future(), err,
                                  sync=op.sync))

    def _refuse_stores(self, ops: Iterable[StoreOp]) -> None:
        now = time.perf_counter()
        for op in ops:
            err = Asleep(f"store job {op.job} refused: the KV cache is unregistered (sleep mode)")
            self._jobs.append(Job(op.job, op.req_id, "store", op.block_ids, (), 0, now, done_future(), err))
