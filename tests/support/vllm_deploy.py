"""``worker/disagg_1p1d.sh`` with real vLLM (CPU build) as a test fixture, and what tests read of it.

:class:`Deployment` starts the script (a prefill engine, a decode engine and
``dynkv proxy``) on free ports with the tiny random model; the helpers post
requests, read an engine's Prometheus samples, find an engine's processes,
the shared memory they map and the TCP sockets they listen on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from dynkv.testing.model import PRESETS
from dynkv.testing.server import free_port

ROOT = Path(__file__).resolve().parents[2]
BLOCK = 32
ENGINE_BLOCKS = 64


class Deployment:
    """``worker/disagg_1p1d.sh`` as a child process, and its endpoints."""

    def __init__(self, model: str, log_dir: Path, **env: str) -> None:
        self.ports = {k: free_port() for k in ("PROXY_PORT", "PREFILL_PORT", "DECODE_PORT")}
        self.log_dir = log_dir
        kv_bytes = ENGINE_BLOCKS * BLOCK * PRESETS["tiny"].kv_bytes_per_token()
        extra = (f"--enforce-eager --seed 0 --served-model-name tiny --num-gpu-blocks-override {ENGINE_BLOCKS} "
                 f"--kv-cache-memory-bytes {kv_bytes}")
        self.env = {**os.environ, "MODEL": model, "PYTHON": str(ROOT / ".venv/bin/python"), "DTYPE": "float32",
                    "BLOCK_SIZE": str(BLOCK), "MAX_MODEL_LEN": "512", "SHUTDOWN_TIMEOUT": "20", "EXTRA_ARGS": extra,
                    "DYNKV_HOST_GB": "0.02", "DYNKV_TRANSFER_TIMEOUT_S": "5",
                    "LOG_DIR": str(log_dir), "STOP_TIMEOUT": "20", "SIDE_CHANNEL_PORT": "0",
                    **{k: str(v) for k, v in self.ports.items()},
                    **env}
        self.proc = subprocess.Popen([str(ROOT / "worker/disagg_1p1d.sh")], env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=open(log_dir / "script.log", "wb"), start_new_session=True)

    def url(self, which: str) -> str:
        return f"http://127.0.0.1:{self.ports[which]}"

    def wait_ready(self, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"disagg_1p1d.sh exited ({self.proc.returncode}):\n{self.logs()}")
            try:
                with urllib.request.urlopen(self.url("PROXY_PORT") + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        pytest.fail(f"not ready after {timeout_s} s:\n{self.logs()}")

    def logs(self) -> str:
        def tail(p: Path) -> str:  # without the reference-leak report some builds print at exit
            lines = [x for x in p.read_text(errors="replace").splitlines() if "leaked" not in x and "nanobind" not in x]
            return "\n".join(lines[-25:])

        return "\n".join(f"== {p.name}\n{tail(p)}" for p in sorted(self.log_dir.glob("*.log")))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def engine_pgid(self, which: str) -> int:
        """Process group of the engine listening on ``which`` (the script starts each in its own)."""
        port = str(self.ports[which])
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                args = Path(f"/proc/{entry.name}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"--port" in args and args[args.index(b"--port") + 1] == port.encode():
                return os.getpgid(int(entry.name))
        raise AssertionError(f"no process listens on {which}={port}")


def shm_files(pgid: int | None, prefix: str = "/dev/shm/") -> set[str]:
    """Files under ``prefix`` that the processes of group ``pgid`` (None: any process) map.

    dynkv's host pools are memfds: ``prefix="/memfd:dynkv-"``.
    """
    out: set[str] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if pgid is not None and os.getpgid(int(entry.name)) != pgid:
                continue
            with open(f"/proc/{entry.name}/maps") as f:
                out.update(p for line in f if (p := line.split(maxsplit=5)[-1].strip()).startswith(prefix))
        except OSError:
            continue
    return out


def post(url: str, path: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        raw = r.read().decode()
    if not body.get("stream"):
        return json.loads(raw)
    events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: {")]
    return [t for e in events for c in e["choices"] for t in (c.get("token_ids") or [])]


def tokens_of(answer: Any) -> list[int]:
    return answer if isinstance(answer, list) else answer["choices"][0]["token_ids"]


def metrics(url: str) -> dict[str, float]:
    """``name|label=value...`` -> value of a server's samples, without vLLM's engine and model labels."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = "".join(f"|{k}={v}" for k, v in sorted(s.labels.items()) if k not in ("engine", "model_name"))
            out[s.name + labels] = out.get(s.name + labels, 0.0) + s.value
    return out


def completion(prompt: list[int], **over: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, **over}


def group_pids(pgid: int) -> list[int]:
    """Processes of group ``pgid``."""
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    out.append(int(entry.name))
            except OSError:
                continue
    return out


LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1 and ::1 as /proc/net writes them


def listening(pids: list[int]) -> list[tuple[str, int]]:
    """``(address as /proc/net/tcp* writes it, port)`` of each TCP socket in LISTEN that ``pids`` hold."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # state LISTEN
                addr, port = f[1].split(":")
                out.append((addr, int(port, 16)))
    return out
