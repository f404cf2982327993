"""A job's handle and how the worker tells it is done: a CPU future, CUDA events, or a launch thread's future."""

from __future__ import annotations

import threading
from concurrent.futures import Future


from dynkv.worker.jobs import Job, Launched, done_future, is_ready, wait_for


class FakeEvent:
    """Stands in for a CUDA event: done once ``finish`` is called; ``synchronize`` waits for that."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self.synced = False

    def finish(self) -> None:
        self._done.set()

    def query(self) -> bool:
        return self._done.is_set()

    def synchronize(self) -> None:
        assert self._done.wait(timeout=30), "an event that never completes"
        self.synced = True


def _job(handle) -> Job:
    return Job(1, "r", "load", (0, 1), (), 0, 0.0, handle)


def test_launched_job_is_ready_only_once_queued_and_copied() -> None:
    fut: Future = Future()
    job = _job(Launched(fut))
    assert not is_ready(job), "the launch thread has not queued it yet"
    start, end = FakeEvent(), FakeEvent()
    fut.set_result((start, end))
    assert not is_ready(job), "queued, not yet copied"
    end.finish()
    assert is_ready(job)
    wait_for(job)
    assert end.synced


def test_launched_job_whose_launch_failed_is_ready_and_waits_for_nothing() -> None:
    fut: Future = Future()
    job = _job(Launched(fut))
    waiter = threading.Thread(target=wait_for, args=(job,))
    waiter.start()
    waiter.join(timeout=0.2)
    assert waiter.is_alive(), "wait_for blocks until the launch is over"
    fut.set_exception(RuntimeError("launch failed"))
    waiter.join(timeout=30)
    assert not waiter.is_alive() and is_ready(job)
    assert isinstance(job.handle.future.exception(), RuntimeError)


def test_other_handles_keep_their_meaning() -> None:
    assert is_ready(_job(done_future()))
    start, end = FakeEvent(), FakeEvent()
    job = _job((start, end))
    assert not is_ready(job)
    end.finish()
    assert is_ready(job)
    wait_for(job)
    assert end.synced
