"""The orphan watch, without vLLM: a process whose parent is SIGKILLed lets go of its tiers.

Each test builds the tree vLLM builds: this process starts a launcher (the API
server's part), which starts the engine (the engine core's part) with
:mod:`multiprocessing`; the launcher is then killed. The engine reports
through files in ``tmp_path``.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from harness import Model, make_leader

from dynkv.leader.orphan import OrphanWatch, started_by

DEADLINE = 60.0  # bounds a hang; the watch looks every 0.05 s here, every second in an engine


def wait_for(cond: Any, timeout: float = DEADLINE) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _launch(target: Any, *args: Any) -> None:
    """The launcher: starts the engine and waits (until killed)."""
    proc = mp.get_context("spawn").Process(target=target, args=args)
    proc.start()
    proc.join()


def _watched(out: str) -> None:
    """An engine with only the watch: reports that it stays quiet, then what it saw when it fired."""
    fired = threading.Event()
    parent = started_by()
    watch = OrphanWatch(parent, fired.set, interval_s=0.05)
    while watch.polls < 20:
        time.sleep(0.01)
    Path(out, "healthy").write_text(f"{parent} {os.getppid()} {watch.fired}")
    fired.wait(DEADLINE)
    Path(out, "fired").write_text(f"{os.getppid()} {watch.fired}")


def _engine(out: str, disk: str, on_term: str) -> None:
    """An engine with a leader (host and disk tiers), stopping on SIGTERM as vLLM's engine core does."""
    import dynkv.leader.orphan as orphan

    # Where the engine stops on SIGTERM, a grace past any stall of a loaded machine: the watch must not close.
    orphan.POLL_S, orphan.STOP_GRACE_S = 0.05, (DEADLINE if on_term == "stop" else 0.5)
    logging.basicConfig(filename=os.path.join(out, "log"), level=logging.INFO)
    stop = threading.Event()
    if on_term == "stop":
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    elif on_term == "ignore":  # an engine that does not stop on SIGTERM: the watch closes the tiers itself
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # "default": no handler (vLLM in its teardown, or a plain process): not signalled, the watch closes the tiers
    leader = make_leader(Model(), disk_gb=0.01, disk_paths=[disk])
    Path(out, "up").write_text(f"{leader.pool_link}\n{leader.disk.files[0]}")
    stop.wait(DEADLINE if on_term == "stop" else 3 * DEADLINE)
    leader.close()  # vLLM's shutdown: the connector closes the leader on the engine's thread
    Path(out, "stopped").write_text("")


def _tree(tmp_path: Path, target: Any, *args: Any) -> mp.process.BaseProcess:
    launcher = mp.get_context("spawn").Process(target=_launch, args=(target, str(tmp_path), *args))
    launcher.start()
    return launcher


def _engine_pid(launcher_pid: int) -> int:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == launcher_pid and stat[0] not in ("Z", "X"):
                cmd = Path(f"/proc/{entry.name}/cmdline").read_bytes()
                if b"resource_tracker" not in cmd:
                    return int(entry.name)
    raise AssertionError(f"no engine process under the launcher {launcher_pid}")


def test_watch_fires_once_the_parent_is_killed(tmp_path: Path) -> None:
    launcher = _tree(tmp_path, _watched)
    try:
        assert wait_for(lambda: (tmp_path / "healthy").exists()), "the engine did not start"
        parent, ppid, fired = (tmp_path / "healthy").read_text().split()
        assert int(parent) == int(ppid) == launcher.pid and fired == "False", "it fired with its parent alive"
        assert not (tmp_path / "fired").exists()
        os.kill(launcher.pid, signal.SIGKILL)
        assert wait_for(lambda: (tmp_path / "fired").exists()), "the watch did not see its parent go"
        ppid, fired = (tmp_path / "fired").read_text().split()
        assert int(ppid) != launcher.pid and fired == "True"
    finally:
        launcher.kill()
        launcher.join(10)


@pytest.mark.parametrize("on_term", ["stop", "ignore", "default"])
def test_orphaned_leader_lets_go_of_its_tiers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, on_term: str) -> None:
    """SIGTERM (vLLM's stop) closes the tiers on the engine's thread; an engine that ignores it, or has no
    handler of its own (not signalled: it runs on), has them closed by the watch after a grace time."""
    monkeypatch.setenv("DYNKV_RUN_DIR", str(tmp_path / "run"))
    disk = tmp_path / "disk"
    launcher = _tree(tmp_path, _engine, str(disk), on_term)
    engine = None
    try:
        assert wait_for(lambda: (tmp_path / "up").exists()), "the engine did not start"
        link, disk_file = (tmp_path / "up").read_text().splitlines()
        engine = _engine_pid(launcher.pid)
        assert os.path.islink(link)
        with pytest.raises(OSError, match=f"pid {engine} .*child of pid {launcher.pid}"):  # held, not orphaned
            make_leader(Model(), disk_gb=0.01, disk_paths=[str(disk)])
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.join(10)

        assert wait_for(lambda: not os.path.lexists(link)), "the orphan's pool link stayed"
        if on_term == "stop":
            assert wait_for(lambda: (tmp_path / "stopped").exists()), "the engine did not stop on SIGTERM"
        # The lock is free: a restart opens the same file, with the orphan still running where it ignored SIGTERM.
        restart = make_leader(Model(), disk_gb=0.01, disk_paths=[str(disk)])
        try:
            assert restart.disk.files[0] == disk_file
        finally:
            restart.close()
        if on_term != "stop":
            assert Path(f"/proc/{engine}").exists() and not (tmp_path / "stopped").exists()
        log = (tmp_path / "log").read_text()
        assert log.count("parent process (pid ") == 1 and f"(pid {launcher.pid}) is gone" in log, log
        assert ("has not stopped within 0.5 s: closing its tiers now" in log) == (on_term != "stop"), log
        assert ("SIGTERM to pid" in log) == (on_term == "stop"), log
    finally:
        launcher.kill()
        if engine is not None:
            try:
                os.kill(engine, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_close_stops_the_watch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A normal close ends the watch, which never fires after it; close may be called again, from two threads."""
    import dynkv.leader.leader as leader_module

    monkeypatch.setenv("DYNKV_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setattr(leader_module, "started_by", os.getppid)  # watched, as in an engine core
    leader = make_leader(Model(), disk_gb=0.01, disk_paths=[str(tmp_path / "disk")])
    watch = leader._watch
    assert watch is not None and watch.alive
    closers = [threading.Thread(target=leader.close) for _ in range(2)]
    for t in closers:
        t.start()
    for t in closers:
        t.join(DEADLINE)
    assert not watch.alive and not watch.fired
    leader.close()
    restart = make_leader(Model(), disk_gb=0.01, disk_paths=[str(tmp_path / "disk")])  # the lock went
    restart.close()


def test_watch_of_a_parent_already_gone_fires_at_its_first_look() -> None:
    fired = threading.Event()
    watch = OrphanWatch(os.getpid(), fired.set, interval_s=3600)  # not this process's parent
    assert fired.wait(DEADLINE) and watch.fired and watch.polls == 1
    watch.stop()


def test_watch_in_a_process_not_started_by_multiprocessing_is_off() -> None:
    assert started_by() is None  # pytest's own process: its parent may go on purpose (nohup)
