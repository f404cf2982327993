"""A worker's pulls of pages from a prefill engine (disaggregated serving).

A part of :class:`dynkv.worker.Worker` (a base class of it). A load whose
plan names a :class:`dynkv.protocol.PullSpec` runs on a pull thread: a NIXL
read of this rank's head slice of the remote pages into the host pool
(:mod:`dynkv.disagg.puller`), then the scatter into the device blocks. When
the pull fails, the pulled blocks become load errors (vLLM recomputes them)
and the rest of the load still lands.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from dynkv.layout import PagedView, head_range
from dynkv.memory import PageBuffer
from dynkv.ops import scatter
from dynkv.protocol import LoadOp
from dynkv.worker.jobs import Job, done_future

if TYPE_CHECKING:
    from dynkv.config import DynKVConfig
    from dynkv.keys import ModelFingerprint

__all__ = ["PullFlow"]

log = logging.getLogger("dynkv.worker")

# Pulls in flight per rank: several requests' pages cross the network at once.
_PULL_THREADS = 4


class PullFlow:
    """Pull half of the worker; :class:`dynkv.worker.Worker` sets these attributes up."""

    config: DynKVConfig
    rank: int
    world_size: int
    view: PagedView | None
    fingerprint: ModelFingerprint | None
    engine_id: str
    _jobs: list[Job]
    _streams: tuple[Any, Any] | None
    _puller: Any
    _pull_threads: ThreadPoolExecutor | None
    _puller_lock: threading.Lock
    _closing: threading.Event

    if TYPE_CHECKING:
        def _page_buffer(self) -> PageBuffer: ...
        def _slice_bytes(self, n: int) -> int: ...

    def _prepare(self) -> None:
        """Background: attach the host pool and start the NIXL agent before the first pull needs them."""
        try:
            self._puller_for(self._page_buffer())
        except Exception as e:  # the first pull tries again, and reports what fails
            log.warning("rank %d: could not prepare pulls ahead (%s); the first pull will", self.rank, e)

    def _launch_pull(self, op: LoadOp) -> None:
        rec = Job(op.job, op.req_id, "load", op.block_ids, op.failed, self._slice_bytes(len(op.block_ids)),
                   time.perf_counter(), None)
        if self._pull_threads is None:
            self._pull_threads = ThreadPoolExecutor(_PULL_THREADS, thread_name_prefix=f"dynkv-pull{self.rank}")
        try:
            pages = self._page_buffer()  # here, not on a pull thread: the pool is attached once
            rec.handle = self._pull_threads.submit(self._pull_and_scatter, op, pages, time.monotonic())
        except Exception as e:  # no host pool: the job fails, the step goes on
            log.error("rank %d: load job %d failed to start: %s", self.rank, op.job, e)
            rec.handle, rec.error = done_future(), e
        self._jobs.append(rec)

    def _pull_and_scatter(self, op: LoadOp, pages: PageBuffer, admitted: float) -> tuple[int, float]:
        """Pull thread: this rank's slice of the remote pages, then the scatter; ``(bytes, seconds)`` pulled.

        ``admitted``: when the pull was queued (its ``transfer_timeout_s`` counts from then)."""
        from dynkv.disagg.puller import PullError

        assert op.pull is not None and self.view is not None
        t0 = time.perf_counter()
        try:
            nbytes = self._puller_for(pages).pull(op.pull, admitted=admitted)
        except Exception as e:  # PullError, or NIXL missing: the pulled blocks are recomputed
            pulled = set(op.pull.local_slots)
            keep = [(b, s) for b, s in zip(op.block_ids, op.slots) if s not in pulled]
            self._scatter_now(pages, [s for _, s in keep], [b for b, _ in keep])
            lost = tuple(b for b, s in zip(op.block_ids, op.slots) if s in pulled)
            raise PullError(str(e), lost) from None
        seconds = time.perf_counter() - t0
        self._scatter_now(pages, op.slots, op.block_ids)
        return nbytes, seconds

    def _scatter_now(self, pages: PageBuffer, slots: Any, block_ids: Any) -> None:
        if not block_ids:
            return
        if self._streams is None:
            scatter(pages, self.view, slots, block_ids)
            return
        import torch

        stream = self._streams[0]
        with torch.cuda.stream(stream):
            scatter(pages, self.view, slots, block_ids, stream=stream)
        stream.synchronize()

    def _puller_for(self, pages: PageBuffer) -> Any:
        with self._puller_lock:
            if self._closing.is_set():
                raise RuntimeError(f"dynkv worker {self.rank} is closed: no more pulls")
            if self._puller is None:
                from dynkv.disagg.nixl import ucx_devices
                from dynkv.disagg.puller import Puller
                from dynkv.disagg.wire import Handshake

                if self.fingerprint is None or self.view is None:
                    raise RuntimeError("dynkv worker was built without the model fingerprint: it cannot pull pages")
                g, pool = self.view.geometry, pages.owner
                local = Handshake.describe(engine_id=self.engine_id, fingerprint=self.fingerprint, geometry=g,
                                           page_stride=pages.page_stride, num_pages=pages.num_pages,
                                           pool_addr=pool.ptr)
                devices, force = ucx_devices(self.config.side_channel_host, self.config.ucx_net_devices)
                self._puller = Puller(local, pool.nbytes, head_range(self.rank, self.world_size, g.num_heads),
                                      rank=self.rank, world_size=self.world_size,
                                      timeout_s=self.config.transfer_timeout_s, net_devices=devices,
                                      force_devices=force, secret=(self.config.transfer_secret or "").encode()
                                      or None)
            return self._puller
