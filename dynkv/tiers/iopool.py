"""The disk tier's I/O threads: a read lane and a write lane, reads first.

A request waits for its disk reads; nobody waits for a write-through (its
page stays in the host tier until the write lands). So each thread takes the
oldest read queued, and a write only while no read is. A write already
running is not interrupted: a read submitted now waits at most behind the
writes running on the device, one per thread, which :attr:`IOPool.write_bytes_running`
reports for the cost model to count ahead of it. Reads among themselves run
first in, first out, as the cost model assumes.

Threads start as work comes (up to the pool's size) and wait for work when
there is none; they are daemon threads, so a tier never closed does not hold
the interpreter at exit (a write cut short there fails its checksum on read:
a miss, never wrong bytes).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

__all__ = ["IOPool"]

_Item = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], int]


class IOPool:
    """``threads`` threads that run reads ahead of queued writes; futures as ``concurrent.futures`` gives them.

    A future cancelled while its work is queued is not run (``cancel()``
    returns False once it runs).
    """

    def __init__(self, threads: int, *, name: str = "dynkv-io") -> None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads={threads!r}: expected an integer >= 1")
        self._name = name
        self._cv = threading.Condition()
        self._reads: deque[_Item] = deque()
        self._writes: deque[_Item] = deque()
        self._threads: list[threading.Thread] = []
        self._size = threads
        self._alive = 0
        self._idle = 0
        self._closed = False
        self.write_bytes_queued = 0  # writes submitted, not started
        self.write_bytes_running = 0  # writes started, not finished

    @property
    def size(self) -> int:
        return self._size

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``fn(*args)`` in the read lane (ahead of every queued write)."""
        return self._put(self._reads, fn, args, 0)

    def submit_write(self, nbytes: int, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run ``fn(*args)``, a write of ``nbytes``, once no read is queued."""
        return self._put(self._writes, fn, args, nbytes)

    def resize(self, threads: int) -> None:
        """Run on ``threads`` threads from now on; surplus threads exit after the work they are running."""
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"io_threads={threads!r}: expected an integer >= 1")
        with self._cv:
            self._size = threads
            self._spawn()
            self._cv.notify_all()

    def shutdown(self, wait: bool = True) -> None:
        """Take no more work; the threads finish what is queued, then exit (``wait``: until they have)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            threads = list(self._threads)
        if wait:
            for t in threads:
                if t is not threading.current_thread():
                    t.join()

    def _put(self, lane: deque[_Item], fn: Callable[..., Any], args: tuple[Any, ...], nbytes: int) -> Future[Any]:
        fut: Future[Any] = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("the I/O pool is shut down")
            lane.append((fut, fn, args, nbytes))
            self.write_bytes_queued += nbytes
            self._spawn()
            self._cv.notify()
        return fut

    def _spawn(self) -> None:
        """Start a thread where queued work has none idle to take it (call with the lock held)."""
        waiting = len(self._reads) + len(self._writes)
        while self._alive < self._size and waiting > self._idle:
            t = threading.Thread(target=self._run, name=f"{self._name}-{len(self._threads)}", daemon=True)
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            self._alive += 1
            self._idle += 1  # counted idle until it takes its first item
            t.start()

    def _take(self) -> tuple[_Item, bool] | None:
        """The next item and whether it is a write; None when this thread should exit (lock held by caller)."""
        while True:
            if self._alive > self._size:
                return None
            if self._reads:
                return self._reads.popleft(), False
            if self._writes:
                item = self._writes.popleft()
                self.write_bytes_queued -= item[3]
                self.write_bytes_running += item[3]
                return item, True
            if self._closed:
                return None
            self._cv.wait()

    def _run(self) -> None:
        while True:
            with self._cv:
                got = self._take()
                self._idle -= 1
                if got is None:
                    self._alive -= 1
                    return
            (fut, fn, args, nbytes), write = got
            try:
                if fut.set_running_or_notify_cancel():
                    try:
                        result = fn(*args)
                    except BaseException as e:
                        fut.set_exception(e)
                    else:
                        fut.set_result(result)
            finally:
                with self._cv:
                    if write:
                        self.write_bytes_running -= nbytes
                    self._idle += 1
