"""dynkv under vLLM data parallelism (``--data-parallel-size 2``, CPU build) with host and disk tiers.

Each DP rank is an engine of its own with its own leader: it keeps its disk
pages in ``<disk path>/dp<rank>`` and serves metrics on ``metrics_port`` plus
its local rank (:meth:`dynkv.config.DynKVConfig.for_rank`). Prompts pinned to
a rank (vLLM's ``X-data-parallel-rank`` header) and evicted from its device
cache come back from that rank's tiers with the same tokens; the server then
stops (vLLM's graceful shutdown, ``--shutdown-timeout``) as a whole, leaving no
process and no host pool's link behind.
"""

from __future__ import annotations

import json
import os
import re
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
FULL_BLOCKS = (PROMPT_TOKENS - 1) // BLOCK


def complete(url: str, prompt: list[int], rank: int) -> list[int]:
    body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": 8, "temperature": 0.0, "ignore_eos": True,
                       "return_token_ids": True}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json",
                                                                  "X-data-parallel-rank": str(rank)})
    with urllib.request.urlopen(req, timeout=300) as r:
        choice = json.loads(r.read())["choices"][0]
    return choice.get("token_ids") or choice["text"]


def dynkv_samples(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r'^(dynkv_\w+)\{tier="(\w+)"\} ([0-9.e+]+)$', line)
        if m:
            out[f"{m.group(1)}:{m.group(2)}"] = float(m.group(3))
    return out


def test_two_data_parallel_ranks_keep_their_own_tiers(tmp_path: Path) -> None:
    model = write_model(tmp_path / "model", preset="tiny")
    rng = np.random.default_rng(BASE_SEED)
    print(f"prompt seed {BASE_SEED}")
    prompts = {r: rng.integers(FIRST_WORD_ID, 1024, size=(2, PROMPT_TOKENS)).tolist() for r in (0, 1)}
    fill = rng.integers(FIRST_WORD_ID, 1024, size=(4, PROMPT_TOKENS)).tolist()
    disk, metrics = tmp_path / "disk", free_port()
    extra = {"host_pages": 8, "disk_gb": 0.02, "disk_paths": [str(disk)], "disk_admit_min_hits": 0,
             "metrics_port": metrics}
    args = ["--dtype", "float32", "--block-size", str(BLOCK), "--max-model-len", "512", "--enforce-eager",
            "--num-gpu-blocks-override", "24", "--max-num-seqs", "4", "--data-parallel-size", "2",
            "--served-model-name", "m", "--shutdown-timeout", "60", "--kv-transfer-config",
            json.dumps({"kv_connector": "DynKVConnector", "kv_role": "kv_both", "kv_connector_extra_config": extra})]
    run_dir = tmp_path / "run"
    server = VLLMServer(str(model), args, log_path=tmp_path / "vllm.log",
                        env={"VLLM_CPU_KVCACHE_SPACE": "1", "DYNKV_RUN_DIR": str(run_dir)})
    with server:
        try:
            server.wait_ready(timeout_s=900)
        except ServerError as e:
            pytest.fail(str(e))
        pgid = server.pid
        first = {r: [complete(server.url, p, r) for p in ps] for r, ps in prompts.items()}
        for r in (0, 1):
            for p in fill:  # 24 device blocks: the first prompts leave each rank's device cache
                complete(server.url, p, r)
        again = {r: [complete(server.url, p, r) for p in ps] for r, ps in prompts.items()}
        samples = [dynkv_samples(metrics + r) for r in (0, 1)]
        log = server.log_tail(400)
    code = server.stop()
    assert again == first, "tokens after a hit in dynkv's tiers differ from the first computation"
    for r, s in enumerate(samples):
        served = s.get("dynkv_hits_total:host", 0) + s.get("dynkv_hits_total:disk", 0)
        print(f"rank {r}: {s}")
        assert served == len(prompts[r]) * FULL_BLOCKS, f"rank {r} served {served} pages from its tiers"
        assert any((disk / f"dp{r}").iterdir()), f"rank {r} wrote no disk file in its directory"
    assert not any(disk.glob("*.dynkv*")) and sorted(p.name for p in disk.iterdir()) == ["dp0", "dp1"]
    assert "EBUSY" not in log and "Address already in use" not in log
    assert code == 0 or code is None or code < 0, f"server exited with {code}"
    assert not _survivors(pgid), f"vLLM processes survived stop(): {_survivors(pgid)}"
    assert not [p for p in run_dir.iterdir() if p.name.startswith("dynkv-")], "a host pool's link was left behind"


def _survivors(pgid: int) -> list[str]:
    """Processes of the group still running (zombies count as gone), as ``pid (name)``."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except (OSError, ProcessLookupError):
            continue
        name, rest = stat.split("(", 1)[1].rsplit(")", 1)
        if rest.split()[0] not in ("Z", "X"):
            out.append(f"{entry.name} ({name})")
    return out
