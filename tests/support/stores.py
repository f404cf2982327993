"""Real stores on loopback ports for the shared tier's tests: ``redis-server`` (alone or a 3-node
cluster) and ``mooncake_master``.

Each server runs in its own temporary directory and is stopped (SIGTERM, then
SIGKILL) when its fixture ends. A fixture skips, naming the missing binary,
only where the binary is absent (``.ci/run`` installs them). Readiness is
polled (a PING, or the port accepting), never slept for.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["MooncakeMaster", "RedisServer", "free_port", "mooncake_master", "redis_cluster", "redis_server"]

_READY_S = 60.0  # generous: the machine may be shared


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    while True:
        port = free_port()
        if port + 10000 < 65536 and _free(port + 10000):
            return port
        port -= 20000
        if port > 1024 and _free(port) and _free(port + 10000):
            return port


def _wait_port(port: int, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + _READY_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {_READY_S:g} s")


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class RedisServer:
    """One ``redis-server`` (or a cluster of ``nodes``) on free loopback ports.

    ``maxmemory`` / ``policy``: the store's memory limit and eviction policy
    (``allkeys-lru``, ``noeviction``, ...).
    """

    def __init__(self, workdir: Path, *, nodes: int = 1, maxmemory: str | None = None,
                 policy: str | None = None, password: str | None = None) -> None:
        self.workdir, self.nodes, self.maxmemory, self.policy, self.password = workdir, nodes, maxmemory, policy, password
        self.ports: list[int] = []
        self.procs: list[subprocess.Popen] = []

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.nodes == 1:
            return f"redis://{auth}127.0.0.1:{self.ports[0]}/0"
        return f"redis+cluster://{auth}" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def _args(self, port: int) -> list[str]:
        d = self.workdir / str(port)
        d.mkdir(parents=True, exist_ok=True)
        args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(d), "--daemonize", "no", "--protected-mode", "no"]
        if self.maxmemory:
            args += ["--maxmemory", self.maxmemory, "--maxmemory-policy", self.policy or "allkeys-lru"]
        if self.password:
            args += ["--requirepass", self.password]
        if self.nodes > 1:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", str(d / "nodes.conf"),
                     "--cluster-node-timeout", "5000"]
        return args

    def start(self) -> RedisServer:
        if not self.ports:
            self.ports = [free_port() if self.nodes == 1 else cluster_port() for _ in range(self.nodes)]
        self.procs = []
        for port in self.ports:
            with open(self.workdir / f"redis-{port}.log", "ab") as log:  # the child keeps its own descriptor
                self.procs.append(subprocess.Popen(self._args(port), stdout=log, stderr=subprocess.STDOUT))
        for port, proc in zip(self.ports, self.procs):
            _wait_port(port, proc, "redis-server")
        if self.nodes > 1 and not (self.workdir / "created").exists():
            cmd = ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                   "--cluster-replicas", "0", "--cluster-yes"]
            if self.password:
                cmd[1:1] = ["-a", self.password]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}")
            (self.workdir / "created").touch()
            self._wait_cluster()
        return self

    def _wait_cluster(self) -> None:
        deadline = time.monotonic() + _READY_S
        while time.monotonic() < deadline:
            ok = all("cluster_state:ok" in subprocess.run(["redis-cli", "-p", str(p), "cluster", "info"],
                                                          capture_output=True, text=True, timeout=30).stdout
                     for p in self.ports)
            if ok:
                return
            time.sleep(0.1)
        raise RuntimeError("the redis cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for proc in self.procs:
            _stop(proc)

    def kill(self) -> None:
        """SIGKILL every node (the store dies mid-run)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


class MooncakeMaster:
    """``mooncake_master`` on a free loopback port (its metadata exchange is P2P; no HTTP metadata server)."""

    BINARY = "mooncake_master"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.holders: list[subprocess.Popen] = []

    @classmethod
    def binary(cls, name: str = BINARY) -> str | None:
        here = Path(sys.executable).with_name(name)
        return str(here) if here.exists() else shutil.which(name)

    @property
    def url(self) -> str:
        return f"mooncake://127.0.0.1:{self.port}"

    def start(self, **flags: str) -> MooncakeMaster:
        binary = self.binary()
        assert binary is not None
        args = [binary, f"-rpc_port={self.port}", f"-metrics_port={free_port()}", "-enable_http_metadata_server=false",
                "-rpc_address=127.0.0.1", *(f"-{k}={v}" for k, v in flags.items())]
        with open(self.workdir / "mooncake_master.log", "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        _wait_port(self.port, self.proc, "mooncake_master")
        return self

    def hold(self, segment_mb: int) -> None:
        """Start a standalone ``mooncake_client`` that mounts ``segment_mb`` MiB into the store (stopped with the
        master): pages put there outlive the processes that wrote them, for engines run one after another with
        ``segment_mb=0``. Skips where the binary is absent."""
        binary = self.binary("mooncake_client")
        if binary is None:
            pytest.skip("mooncake_client is not installed (pip install mooncake-transfer-engine-non-cuda; "
                        "make setup does)")
        port = free_port()
        args = [binary, f"-master_server_address=127.0.0.1:{self.port}", "-metadata_server=P2PHANDSHAKE",
                "-host=127.0.0.1", f"-port={port}", "-protocol=tcp", f"-global_segment_size={segment_mb}MB"]
        with open(self.workdir / f"mooncake_client-{port}.log", "ab") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        self.holders.append(proc)
        _wait_port(port, proc, "mooncake_client")  # listens once its segment is mounted

    def stop(self) -> None:
        for proc in self.holders:
            _stop(proc)
        _stop(self.proc)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _need(binary: str | None, name: str) -> None:
    if binary is None:
        pytest.skip(f"{name} is not installed (.ci/run installs it: apt-get install redis-server)")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh ``redis-server`` on a loopback port."""
    _need(shutil.which("redis-server"), "redis-server")
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisServer]:
    """Three ``redis-server --cluster-enabled yes`` nodes made one cluster by ``redis-cli --cluster create``."""
    _need(shutil.which("redis-server"), "redis-server")
    _need(shutil.which("redis-cli"), "redis-cli")
    (tmp_path / "cluster").mkdir()
    server = RedisServer(tmp_path / "cluster", nodes=3).start()
    yield server
    server.stop()


@pytest.fixture
def mooncake_master(tmp_path: Path) -> Iterator[MooncakeMaster]:
    """A fresh ``mooncake_master`` on a loopback port."""
    if MooncakeMaster.binary() is None:
        pytest.skip("mooncake_master is not installed (pip install mooncake-transfer-engine-non-cuda; "
                    "make setup does)")
    (tmp_path / "mooncake").mkdir()
    master = MooncakeMaster(tmp_path / "mooncake").start()
    yield master
    master.stop()
