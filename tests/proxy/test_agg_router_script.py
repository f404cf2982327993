"""``worker/agg_router.sh``'s plan (``DRY_RUN=1``): engines with KV events and matching hash settings, the proxy
over them and over engines elsewhere."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "worker" / "agg_router.sh"


def plan(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), "--max-model-len", "4096"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DRY_RUN": "1", "NUM_GPUS": "0", **env})


def test_engines_publish_events_and_the_proxy_follows_them_and_remote_engines() -> None:
    out = plan(NUM_ENGINES="2", EVENTS_PORT="6000", HASH_SEED="7", ROUTER_POLICY="least-loaded",
               REMOTE_ENGINES="http://10.0.0.7:8100=tcp://10.0.0.7:5700=tcp://10.0.0.7:5701")
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(":", 1) for line in out.stdout.splitlines())
    assert sorted(lines) == ["engine0", "engine1", "proxy"]
    for i in (0, 1):
        argv = shlex.split(lines[f"engine{i}"])
        assert f"PORT={8100 + i}" in argv and "PYTHONHASHSEED=7" in argv and argv[-2:] == ["--max-model-len", "4096"]
        cfg = json.loads(argv[argv.index("--kv-events-config") + 1])
        assert cfg["endpoint"] == f"tcp://*:{6000 + 2 * i}"
        assert cfg["replay_endpoint"] == f"tcp://127.0.0.1:{6001 + 2 * i}"
        assert argv[argv.index("--prefix-caching-hash-algo") + 1] == "sha256"
    proxy = shlex.split(lines["proxy"])
    assert proxy[proxy.index("--policy") + 1] == "least-loaded" and proxy[proxy.index("--hash-seed") + 1] == "7"
    engines = [proxy[k + 1] for k, a in enumerate(proxy) if a == "--engine"]
    events = [proxy[k + 1] for k, a in enumerate(proxy) if a == "--kv-events"]
    assert engines == ["http://127.0.0.1:8100", "http://127.0.0.1:8101", "http://10.0.0.7:8100"]
    assert events == ["tcp://127.0.0.1:6000", "tcp://127.0.0.1:6002", "tcp://10.0.0.7:5700"]


def test_bad_plans_are_refused_with_a_reason() -> None:
    out = plan(REMOTE_ENGINES="http://10.0.0.7:8100")
    assert out.returncode == 2 and "expected URL=tcp://HOST:EVENTS=tcp://HOST:REPLAY" in out.stderr
    out = plan(NUM_ENGINES="0")
    assert out.returncode == 2 and "no engines" in out.stderr
    out = plan(NUM_ENGINES="3", TP="2", NUM_GPUS="4")
    assert out.returncode == 2 and "need 6 GPUs" in out.stderr
