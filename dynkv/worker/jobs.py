"""A worker's record of one job on its rank, and how to tell it is done (:mod:`dynkv.worker`)."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

__all__ = ["Job", "Launched", "done_future", "is_ready", "wait_for"]


@dataclass
class Launched:
    """A GPU copy that a launch thread queues: ``future`` gives its ``(start, end)`` CUDA events once queued,
    or the exception that stopped the launch."""

    future: Future[tuple[Any, Any]]


@dataclass
class Job:
    job: int
    req_id: str
    kind: str  # "load" or "store"
    block_ids: tuple[int, ...]
    failed_blocks: tuple[int, ...]
    nbytes: int
    started: float
    handle: Any  # Future (CPU), (start, end) CUDA events, or Launched (GPU, queued by a launch thread)
    error: BaseException | None = None
    sync: bool = False  # feeds this step's forward: not reported as finished receiving


def done_future() -> Future[None]:
    f: Future[None] = Future()
    f.set_result(None)
    return f


def is_ready(job: Job) -> bool:
    if isinstance(job.handle, Future):
        return job.handle.done()
    if isinstance(job.handle, Launched):
        f = job.handle.future
        return f.done() and (f.exception() is not None or bool(f.result()[1].query()))
    return bool(job.handle[1].query())


def wait_for(job: Job) -> None:
    if isinstance(job.handle, Future):
        job.handle.exception()
    elif isinstance(job.handle, Launched):
        if job.handle.future.exception() is None:
            job.handle.future.result()[1].synchronize()
    else:
        job.handle[1].synchronize()
