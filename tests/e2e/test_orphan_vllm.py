"""A supervisor's restart after ``kill -9`` of vLLM's API server under traffic (CPU build).

The killed API server leaves its engine core (and that core's TP worker)
running as orphans, holding the disk tier's lock and the host pool. The
engine core's leader notices that its parent is gone and stops the engine
(:mod:`dynkv.leader.orphan`). The restart, started at once on the same disk
path while the orphans still run (it would wait for a lock they still held:
``tests/tiers/test_disk.py`` shows that wait), serves the same greedy tokens
from the dead engine's disk pages; the orphans stop, and no pool of the dead
engine stays: no link, no process mapping its memfd, nothing in ``/dev/shm``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import BASE_SEED

from dynkv.testing.model import FIRST_WORD_ID, write_model
from dynkv.testing.server import ServerError, VLLMServer, free_port

pytestmark = pytest.mark.slow

BLOCK = 32
PROMPT_TOKENS = 200


def complete(url: str, prompt: list[int], max_tokens: int = 8) -> list[int]:
    body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                       "ignore_eos": True, "return_token_ids": True}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())["choices"][0]["token_ids"]


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()


def sample(text: str, pattern: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{pattern} ([0-9.e+]+)$", text, re.M))


def group(pgid: int) -> dict[int, str]:
    """Running processes of the group (zombies count as gone): pid -> name."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            name, rest = Path(f"/proc/{entry.name}/stat").read_text().split("(", 1)[1].rsplit(")", 1)
        except (OSError, ValueError):
            continue
        if rest.split()[0] not in ("Z", "X"):
            out[int(entry.name)] = name
    return out


def memfd_holders(label: str) -> set[int]:
    """Pids that map the memfd ``label`` or hold a descriptor of it."""
    want, out = f"/memfd:{label} (deleted)", set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if any(line.rstrip("\n").endswith(" " + want) for line in open(f"/proc/{entry.name}/maps")):
                out.add(int(entry.name))
            elif any(os.readlink(fd.path) == want for fd in os.scandir(f"/proc/{entry.name}/fd")):
                out.add(int(entry.name))
        except OSError:
            continue
    return out


def wait_for(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_restart_after_api_server_killed_under_traffic(tmp_path: Path) -> None:
    model = write_model(tmp_path / "model", preset="tiny")
    rng = np.random.default_rng(BASE_SEED)
    print(f"prompt seed {BASE_SEED}")
    prompts = rng.integers(FIRST_WORD_ID, 1024, size=(3, PROMPT_TOKENS)).tolist()
    traffic = rng.integers(FIRST_WORD_ID, 1024, size=(4, PROMPT_TOKENS)).tolist()
    disk, run = tmp_path / "disk", tmp_path / "run"
    metrics = [free_port(), free_port()]

    def server(i: int) -> VLLMServer:
        extra = {"host_pages": 16, "disk_gb": 0.02, "disk_paths": [str(disk)], "disk_admit_min_hits": 0,
                 "metrics_port": metrics[i]}
        args = ["--dtype", "float32", "--block-size", str(BLOCK), "--max-model-len", "512", "--enforce-eager",
                "--num-gpu-blocks-override", "24", "--max-num-seqs", "4", "--served-model-name", "m", "--seed",
                "0", "--kv-transfer-config",
                json.dumps({"kv_connector": "DynKVConnector", "kv_role": "kv_both", "kv_connector_extra_config": extra})]
        return VLLMServer(str(model), args, log_path=tmp_path / f"vllm{i}.log",
                          env={"VLLM_CPU_KVCACHE_SPACE": "1", "DYNKV_RUN_DIR": str(run)})

    first, again = server(0), server(1)
    try:
        first.start()
        try:
            first.wait_ready(timeout_s=900)
        except ServerError as e:
            pytest.fail(str(e))
        tokens = [complete(first.url, p) for p in prompts]  # written through to disk as they are stored
        pgid = first.pid
        engine = {pid for pid, name in group(pgid).items() if pid != pgid}
        links = {p.name for p in run.iterdir() if p.name.startswith("dynkv-")}
        assert links and all(int(n.rsplit("-", 1)[1]) in engine for n in links), (links, group(pgid))

        # Traffic: long requests in flight when the API server dies (their connections then fail).
        def load(p: list[int]) -> None:
            try:
                complete(first.url, p, max_tokens=200)
            except OSError:
                pass

        senders = [threading.Thread(target=load, args=(p,), daemon=True) for p in traffic]
        for t in senders:
            t.start()
        assert wait_for(lambda: sample(scrape(first.url + "/metrics"), r"vllm:num_requests_running\{[^}]*\}") > 0,
                        120), "no request in flight"
        os.kill(first.pid, signal.SIGKILL)
        print(f"killed the API server {first.pid}; still running: {group(pgid)}")

        again.start()  # at once, as a supervisor would: the orphans may still hold the disk path
        try:
            again.wait_ready(timeout_s=900)
        except ServerError as e:
            pytest.fail(f"{e}\n== the killed server's log:\n{first.log_tail(60)}")
        assert [complete(again.url, p) for p in prompts] == tokens, "the restart's tokens differ"
        hits = sample(scrape(f"http://127.0.0.1:{metrics[1]}/metrics"), r'dynkv_hits_total\{tier="disk"\}')
        assert hits > 0, "the restart served nothing from the dead engine's disk pages"

        assert wait_for(lambda: not group(pgid).keys() - {pgid}, 120), f"orphans still running: {group(pgid)}"
        for name in links:
            assert not os.path.lexists(run / name), f"the dead engine's link {name} stayed"
            assert not memfd_holders(name), f"the dead engine's pool {name} is still mapped"
            assert not os.path.exists(f"/dev/shm/{name}")
        old_log = first.log_path.read_text(errors="replace")
        assert len(re.findall(r"WARNING.*parent process \(pid \d+\) is gone", old_log)) == 1, first.log_tail(60)
        assert "has not stopped within" not in old_log, "the engine did not stop by itself"
        assert "EBUSY" not in again.log_tail(400) and "Errno 16" not in again.log_tail(400)
    finally:
        again.stop()
        first.stop()
