"""``worker/agg_router.sh``'s plan (``DRY_RUN=1``): engines with KV events, KV snapshots and matching hash
settings, the proxy over them and over engines elsewhere."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
from pathlib import Path

from dynkv.proxy.server import _snapshots, add_arguments

SCRIPT = Path(__file__).resolve().parents[2] / "worker" / "agg_router.sh"


def plan(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), "--max-model-len", "4096"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "DRY_RUN": "1", "NUM_GPUS": "0", **env})


def test_engines_publish_events_and_the_proxy_follows_them_and_remote_engines() -> None:
    out = plan(NUM_ENGINES="2", EVENTS_PORT="6000", METRICS_PORT="9300", HASH_SEED="7", ROUTER_POLICY="least-loaded",
               PARK_WEIGHT="0.25",
               REMOTE_ENGINES="http://10.0.0.7:8100=tcp://10.0.0.7:5700=tcp://10.0.0.7:5701 http://10.0.0.8:8100="
                              "tcp://10.0.0.8:5700=tcp://10.0.0.8:5701=http://10.0.0.8:9100/kv/snapshot")
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(":", 1) for line in out.stdout.splitlines())
    assert sorted(lines) == ["engine0", "engine1", "proxy"]
    for i in (0, 1):
        argv = shlex.split(lines[f"engine{i}"])
        assert f"PORT={8100 + i}" in argv and "PYTHONHASHSEED=7" in argv and argv[-2:] == ["--max-model-len", "4096"]
        assert f"DYNKV_METRICS_PORT={9300 + i}" in argv  # where its /kv/snapshot is
        cfg = json.loads(argv[argv.index("--kv-events-config") + 1])
        assert cfg["endpoint"] == f"tcp://*:{6000 + 2 * i}"
        assert cfg["replay_endpoint"] == f"tcp://127.0.0.1:{6001 + 2 * i}"
        assert argv[argv.index("--prefix-caching-hash-algo") + 1] == "sha256"
    proxy = shlex.split(lines["proxy"])
    assert proxy[proxy.index("--policy") + 1] == "least-loaded" and proxy[proxy.index("--hash-seed") + 1] == "7"
    engines = [proxy[k + 1] for k, a in enumerate(proxy) if a == "--engine"]
    events = [proxy[k + 1] for k, a in enumerate(proxy) if a == "--kv-events"]
    snapshots = [proxy[k + 1] for k, a in enumerate(proxy) if a == "--kv-snapshot"]
    assert engines == ["http://127.0.0.1:8100", "http://127.0.0.1:8101", "http://10.0.0.7:8100", "http://10.0.0.8:8100"]
    assert events == ["tcp://127.0.0.1:6000", "tcp://127.0.0.1:6002", "tcp://10.0.0.7:5700", "tcp://10.0.0.8:5700"]
    # One per engine, in order: the local engines' on loopback, none for the remote engine that gave none.
    assert snapshots == ["http://127.0.0.1:9300/kv/snapshot", "http://127.0.0.1:9301/kv/snapshot", "",
                         "http://10.0.0.8:9100/kv/snapshot"]
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(proxy[proxy.index("dynkv.proxy") + 1:])
    assert (args.park_weight, args.session_ttl) == (0.25, 300.0)
    assert _snapshots(args) == {
        "http://127.0.0.1:8100": "http://127.0.0.1:9300/kv/snapshot",
        "http://127.0.0.1:8101": "http://127.0.0.1:9301/kv/snapshot",
        "http://10.0.0.8:8100": "http://10.0.0.8:9100/kv/snapshot"}


def test_bad_plans_are_refused_with_a_reason() -> None:
    out = plan(REMOTE_ENGINES="http://10.0.0.7:8100")
    assert out.returncode == 2 and "expected URL=tcp://HOST:EVENTS=tcp://HOST:REPLAY" in out.stderr
    out = plan(NUM_ENGINES="0")
    assert out.returncode == 2 and "no engines" in out.stderr
    out = plan(NUM_ENGINES="3", TP="2", NUM_GPUS="4")
    assert out.returncode == 2 and "need 6 GPUs" in out.stderr
