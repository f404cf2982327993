"""A killed engine leaves no host memory behind: SIGKILL its leader and every TP worker, and the pool is gone.

The leader's host pool is a memfd, which the kernel frees with the last
process that maps it: nothing of it is named in /dev/shm, and its link in the
run directory dangles (holding nothing) until the next leader removes it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from typing import Any

import pytest
from harness import Engine, Model, make_leader

from dynkv.layout import page_stride

POOL_BYTES = 128 << 20  # large enough to see in /proc/meminfo's Shmem


def _engine_main(conn: Any, host_pages: int) -> None:
    """The engine's scheduler process: a leader and two TP worker processes that have attached its pool."""
    import torch

    torch.set_num_threads(1)
    model = Model()
    leader = make_leader(model, tp=2, host_pages=host_pages)
    engine = Engine(leader, model, tp=2, processes=True)
    engine.serve("a", list(range(4 * model.block_size)))  # its stores make both ranks attach the pool
    engine.drain()
    conn.send({"leader": os.getpid(), "workers": [r.proc.pid for r in engine.ranks], "name": leader.pool_name,
               "path": leader.pool.path, "link": leader.pool_link, "nbytes": leader.pool.nbytes})
    conn.recv()  # until killed


def holders(label: str) -> set[int]:
    """Pids of the processes that map the memfd ``label`` or hold a descriptor of it."""
    want = f"/memfd:{label} (deleted)"
    out = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/maps") as f:
                if any(line.rstrip("\n").endswith(" " + want) for line in f):
                    out.add(int(entry.name))
                    continue
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                if os.readlink(fd.path) == want:
                    out.add(int(entry.name))
                    break
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return out


def shmem() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Shmem:"))


def wait_for(cond: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_sigkilled_engine_leaves_no_pool(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("DYNKV_RUN_DIR", str(tmp_path / "run"))
    host_pages = POOL_BYTES // page_stride(Model().geometry())
    before = shmem()
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_engine_main, args=(child, host_pages))  # not a daemon: it has children
    proc.start()
    child.close()
    pids: list[int] = [proc.pid]
    try:
        assert conn.poll(180), "the engine did not come up"
        info = conn.recv()
        pids = [info["leader"], *info["workers"]]
        name, path, link = info["name"], info["path"], info["link"]
        # Up: the leader and both ranks map the memfd; /dev/shm holds nothing of it.
        assert holders(name) == set(pids)
        assert path == f"/proc/{info['leader']}/fd/{path.rsplit('/', 1)[1]}" and os.readlink(link) == path
        assert not [n for n in os.listdir("/dev/shm") if n.startswith("dynkv-") and n.endswith(f"-{pids[0]}")]
        with_pool = shmem()

        for pid in pids:  # the OOM killer, or vLLM's SIGTERM with shutdown-timeout 0, runs no shutdown
            os.kill(pid, signal.SIGKILL)
        proc.join(10)

        assert wait_for(lambda: not holders(name)), f"still mapped by {holders(name)}"
        assert not os.path.exists(path)
        assert not [n for n in os.listdir("/dev/shm") if n.startswith("dynkv-") and n.endswith(f"-{pids[0]}")]
        assert os.path.islink(link) and not os.path.exists(link), "the link dangles: it holds no memory"
        if with_pool - before >= info["nbytes"] // 2:  # Shmem counts the pool on this kernel: see it go
            assert wait_for(lambda: shmem() <= with_pool - info["nbytes"] // 2), (
                f"Shmem {shmem()} bytes, {with_pool} with the pool of {info['nbytes']} bytes")
        else:
            print(f"Shmem rose by {with_pool - before} bytes for a {info['nbytes']}-byte pool: not checked")

        # The next leader on the host removes the dead one's link.
        leader = make_leader(Model())
        leader.close()
        assert not os.path.lexists(link)
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.join(10)
