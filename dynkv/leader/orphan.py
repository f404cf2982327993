"""Noticing that the engine's parent is gone: an orphaned engine core must let go of its tiers.

vLLM runs the scheduler, and with it the leader, in an engine-core process
that its API server starts (with :mod:`multiprocessing`) and stops. When the
API server is killed outright (SIGKILL, the OOM killer), nothing stops the
engine core: it lives on as an orphan that no client can reach, holding the
disk tier's locks, the host pool (through its TP workers' mappings too) and
the metrics port, and a supervisor's restart on the same disk paths fails.

:class:`OrphanWatch` is a daemon thread that compares :func:`os.getppid` with
the parent the process was started by, once a second. A poll of the parent
id, not ``prctl(PR_SET_PDEATHSIG)``: the death signal follows the parent
*thread* that forked the process (a launcher thread that ends fires it in a
healthy engine), is cleared by a later fork, must be set by the child itself
before its parent could die, and would have to be a signal: a poll of the id
costs one system call a second, sees a reparenting to a subreaper as well as
to pid 1, and can be stopped. The id is compared with the parent seen at
start, not with 1, so a healthy engine under a subreaper never fires, and an
engine whose parent died before the watch began fires at its first poll.
When it fires, the leader stops the engine (:func:`stop_orphaned_engine`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable

__all__ = ["POLL_S", "STOP_GRACE_S", "OrphanWatch", "started_by", "stop_orphaned_engine"]

log = logging.getLogger("dynkv.leader")

POLL_S = 1.0  # between two looks at the parent: one getppid() a second


def started_by() -> int | None:
    """Pid of the process that started this one with :mod:`multiprocessing` (vLLM's API server for its
    engine core), or None where this process was not started so (a user's own script, an in-process engine):
    such a process may outlive its parent on purpose (``nohup``), and is never watched."""
    parent = multiprocessing.parent_process()
    return None if parent is None or parent.pid is None else int(parent.pid)


class OrphanWatch:
    """Calls ``on_orphan`` once, on its own thread, when this process's parent is no longer ``parent``.

    Parameters
    ----------
    parent
        The pid of the parent that started this process.
    on_orphan
        What to do then; it runs on the watch's thread, which ends after it.
    interval_s
        Seconds between two looks at the parent; default :data:`POLL_S`.
    """

    def __init__(self, parent: int, on_orphan: Callable[[], None], *, interval_s: float | None = None) -> None:
        interval_s = POLL_S if interval_s is None else interval_s
        if interval_s <= 0:
            raise ValueError(f"interval_s={interval_s}: expected > 0")
        self.parent = parent
        self.polls = 0  # looks at the parent so far
        self.fired = False
        self._on_orphan = on_orphan
        self._interval = interval_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="dynkv-orphan-watch", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        """Stop watching; idempotent. Waits for the thread unless it has fired: its ``on_orphan`` may be
        waiting for what the caller is about to do."""
        with self._lock:
            self._stop.set()
            join = not self.fired
        if join and threading.current_thread() is not self._thread:
            self._thread.join()

    def _run(self) -> None:
        while True:
            orphaned = os.getppid() != self.parent
            self.polls += 1
            if orphaned:
                break
            if self._stop.wait(self._interval):
                return
        with self._lock:
            if self._stop.is_set():  # a normal close got there first: nothing to take over
                return
            self.fired = True
        try:
            self._on_orphan()
        except Exception:  # a daemon thread's exception would only reach stderr
            log.exception("dynkv: closing the tiers of an orphaned engine failed")


STOP_GRACE_S = 10.0  # how long an orphaned engine's own shutdown may take before the watch closes the tiers


def stop_orphaned_engine(engine_id: str, parent: int, closed: threading.Event, close: Callable[[], None], *,
                         grace_s: float | None = None) -> None:
    """Stop this orphaned engine, and close its tiers if it has not within ``grace_s`` (default
    :data:`STOP_GRACE_S`).

    Where the process handles SIGTERM (vLLM's engine core does: it is the
    API server's own request to stop it), it is sent that: the engine thread
    ends the requests in flight, stops its TP workers (whose mappings hold the
    host pool's memory too) and shuts the connector down, so the tiers close
    on the thread that uses them (``closed`` is set then). Where it does not
    (SIGTERM ignored, or at its default action: vLLM has begun its teardown,
    which closes the tiers), no signal is sent. Closing the tiers from this
    thread while the engine thread may be inside a leader call could fail
    that call, so it is done only once the engine has not stopped by itself
    in time (a long drain, ``--shutdown-timeout``; no handler).
    """
    handled = callable(signal.getsignal(signal.SIGTERM))
    grace = STOP_GRACE_S if grace_s is None else grace_s
    doing = (f"stopping it (SIGTERM to pid {os.getpid()}), which closes its tiers" if handled
             else f"its tiers close as it stops, or in {grace:g} s")
    log.warning("dynkv %s: this engine's parent process (pid %d) is gone and no client can reach the engine: %s "
                "(disk locks, host pool and its link, metrics port) so that a restart on the same disk paths can "
                "start", engine_id, parent, doing)
    if handled:
        os.kill(os.getpid(), signal.SIGTERM)
    if not closed.wait(grace):
        log.warning("dynkv %s: the orphaned engine has not stopped within %g s: closing its tiers now",
                    engine_id, grace)
        close()
