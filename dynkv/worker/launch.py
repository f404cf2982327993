"""A worker's GPU copies: queued on the load or store stream, after the work they must follow.

A part of :class:`dynkv.worker.Worker` (a base class of it). A copy follows
what was queued on the copied blocks before its launch (events recorded at
launch, waited for on the copy's stream by whichever thread queues it). Every
staged load is queued by the rank's launch thread: a load in layer groups can
be more copy-engine operations than the driver queues, and queueing them then
waits for the GPU; a thread blocked there holds no other thread's launches on
another stream (docs/notes/2026-12-07-h100-launch-thread-e2e.md), so the
forward's thread goes on. The staging ring is then used from that one thread,
in launch order.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dynkv.layout import PagedView
from dynkv.memory import PageBuffer
from dynkv.ops import GroupSignal
from dynkv.worker.jobs import Launched
from dynkv.worker.staging import CopyPaths

__all__ = ["CudaLaunch"]


class CudaLaunch:
    """GPU-launch half of the worker; :class:`dynkv.worker.Worker` sets these attributes up."""

    rank: int
    view: PagedView | None
    copy_paths: CopyPaths | None
    _streams: tuple[Any, Any] | None
    _step_stream: Any
    _launcher: ThreadPoolExecutor | None
    _page_buffer: Callable[[], PageBuffer]

    def _launch_cuda(self, kind: str, copy: Callable[[PageBuffer, Any], None],
                     release: GroupSignal | None = None) -> Any:
        """Queue ``copy(pages, stream)`` on ``kind``'s stream: ``(start, end)`` CUDA events, or
        :class:`Launched` for a staged load, which the launch thread queues (the calling thread goes on at
        once; ``release``, if given, is set whole once that launch is over, whether it queued the copy or
        failed)."""
        after, pages = self._copy_after(), self._page_buffer()
        if kind != "load" or not self._staged_loads():
            return self._issue_cuda(kind, after, pages, copy)
        if self._launcher is None:
            self._launcher = ThreadPoolExecutor(1, thread_name_prefix=f"dynkv-launch{self.rank}")

        def run() -> tuple[Any, Any]:
            try:
                return self._issue_cuda(kind, after, pages, copy)
            finally:
                if release is not None:
                    release.set_all()

        return Launched(self._launcher.submit(run))

    def _staged_loads(self) -> bool:
        """Loads take the staged path: the launch thread queues every one of them (their staging ring is
        used from one thread, in the order they were launched)."""
        return self.copy_paths is not None and self.copy_paths.h2d == "staged"

    def _copy_after(self) -> list[Any]:
        """Events, recorded now, that a copy launched now must follow (:meth:`_issue_cuda` waits for them on
        its stream, in the thread that queues it: a copy queued later by the launch thread still follows
        only what was queued before its launch, never work queued since)."""
        import torch

        assert self.view is not None
        # A store reads blocks only after the forward that wrote them; a load writes blocks only after
        # work already queued on them (vLLM zeroes fresh blocks; a freed block's last reader). Launched from
        # outside a step (the scheduler's launch), that work may sit on the stream the steps compute on.
        current = torch.cuda.current_stream(self.view.device)
        after = [current.record_event()]
        if self._step_stream is not None and self._step_stream != current:
            after.append(self._step_stream.record_event())
        return after

    def _issue_cuda(self, kind: str, after: list[Any], pages: PageBuffer,
                    copy: Callable[[PageBuffer, Any], None]) -> tuple[Any, Any]:
        import torch

        assert self._streams is not None and self.view is not None
        stream = self._streams[0 if kind == "load" else 1]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.device(self.view.device), torch.cuda.stream(stream):
            for ev in after:
                stream.wait_event(ev)
            start.record(stream)
            try:
                copy(pages, stream)
            except BaseException:
                # A copy that stopped partway may have queued part of its work: it must be over before the
                # blocks count as load errors (vLLM recomputes them, and their pages may be reused).
                torch.cuda.synchronize(self.view.device)
                raise
            end.record(stream)
        return start, end
