"""The shared tier in real vLLM (CPU build): engines of different TP sizes and models on one redis-server.

Engines run one after another against one store (``maxmemory`` with LRU
eviction), as in ``test_connector_vllm.py``: a TP=2 engine answers the first
turn of two conversations; a TP=1 engine continues them from the pages the
first wrote (greedy tokens equal plain vLLM's); the values are corrupted
behind dynkv's back (every page a load error, recomputed, then rewritten);
an engine serving other weights at the same path finds none of them, fills
the store past its limit, and keeps answering after the store is shut down.
The same conversation also goes from one engine to the next through a
Mooncake Store, whose pages a standalone ``mooncake_client`` holds.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import BASE_SEED
from stores import MooncakeMaster, RedisServer
from test_connector_vllm import run_engine, sample

from dynkv.testing.model import FIRST_WORD_ID, write_model

pytestmark = pytest.mark.slow

BLOCK = 32
ENGINE = {"num_gpu_blocks_override": 24}
PAGES = 6  # full blocks of a 200-token first turn
# Flips a payload byte of every dynkv value in the store at port argv[1].
CORRUPT = ("import sys, redis; r = redis.Redis(port=int(sys.argv[1]))\n"
           "for k in r.scan_iter('dynkv:*'):\n"
           "    v = bytearray(r.get(k)); v[-100] ^= 0x5A; r.set(k, bytes(v))")


def delta(after: dict, before: dict | None, name: str, **labels: str) -> float:
    return sample(after, name, **labels) - (sample(before, name, **labels) if before else 0.0)


def test_engines_share_pages_through_one_store(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    rng = np.random.default_rng(BASE_SEED)
    print(f"prompt seed {BASE_SEED}")
    first = rng.integers(FIRST_WORD_ID, 1024, size=(2, 200)).tolist()
    turn2 = [p + rng.integers(FIRST_WORD_ID, 1024, 40).tolist() for p in first]  # 7 full blocks each
    fill = rng.integers(FIRST_WORD_ID, 1024, size=(3, 200)).tolist()
    served = tmp_path / "served"
    write_model(served, preset="tiny", seed=0)
    (tmp_path / "redis").mkdir()
    store = RedisServer(tmp_path / "redis", maxmemory="2mb", policy="allkeys-lru").start()
    port = store.ports[0]
    # Every match is read (no cost model), so the hits counted are those the store can serve.
    dynkv = {"host_pages": 32, "remote_url": store.url, "shared_lookup_ms": 2000, "cost_model": False}
    try:
        plain = run_engine(tmp_path / "plain", {"model": str(served), "engine": ENGINE, "dynkv": None,
                                                "phases": [{"name": "turn2", "prompts": turn2}]})["phases"][0]
        before = set(os.listdir("/dev/shm"))
        try:
            a = run_engine(tmp_path / "a", {
                "model": str(served), "engine": {**ENGINE, "tensor_parallel_size": 2}, "dynkv": dynkv,
                "phases": [{"name": "turn1", "prompts": first}],
            }, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
        finally:
            for name in set(os.listdir("/dev/shm")) - before:  # vLLM's CPU TP group may leave these
                if name.startswith("vllm_dist_"):
                    Path("/dev/shm", name).unlink(missing_ok=True)
        assert sample(a["phases"][0], "dynkv_pages_moved_total", direction="host_to_shared") == 2 * PAGES

        b = run_engine(tmp_path / "b", {"model": str(served), "engine": ENGINE, "dynkv": dynkv, "phases": [
            {"name": "turn2", "prompts": turn2},
            {"name": "corrupt", "prompts": turn2, "reset_dynkv": True,
             "before": [[sys.executable, "-c", CORRUPT, str(port)]]},
            {"name": "rewritten", "prompts": turn2, "reset_dynkv": True},
        ]})
        cont, corrupt, rewritten = b["phases"]
        for ph in (cont, corrupt, rewritten):
            assert ph["tokens"] == plain["tokens"], f"phase {ph['name']}: greedy tokens differ from plain vLLM"
        # The TP=1 engine loads the TP=2 engine's pages for each conversation's prefix.
        assert delta(cont, None, "dynkv_hits_total", tier="shared") == 2 * PAGES
        assert delta(cont, None, "dynkv_load_errors_total", reason="shared") == 0
        # Every corrupted page read is a load error, recomputed; the next engine state reads them whole again.
        n = 2 * (PAGES + 1)  # B wrote each turn's seventh block too
        assert delta(corrupt, cont, "dynkv_hits_total", tier="shared") == n
        assert delta(corrupt, cont, "dynkv_load_errors_total", reason="shared") == n
        assert delta(rewritten, corrupt, "dynkv_hits_total", tier="shared") == n
        assert delta(rewritten, corrupt, "dynkv_load_errors_total", reason="shared") == 0

        shutil.rmtree(served)
        write_model(served, preset="tiny", seed=1)  # other weights at the same path
        stats = tmp_path / "redis-stats.txt"
        c = run_engine(tmp_path / "c", {"model": str(served), "engine": ENGINE, "dynkv": dynkv, "phases": [
            {"name": "other", "prompts": turn2},
            {"name": "fill", "prompts": fill},
            {"name": "dead", "prompts": turn2, "reset_dynkv": True, "before": [
                ["sh", "-c", f"redis-cli -p {port} info stats > {stats}; redis-cli -p {port} shutdown nosave || true"]]},
        ]})
        other, filled, dead = c["phases"]
        assert delta(other, None, "dynkv_hits_total", tier="shared") == 0, "another model's pages matched"
        assert other["tokens"] != plain["tokens"], "the two models answer alike: the check above proves nothing"
        evicted = int(next(line.split(":")[1] for line in stats.read_text().splitlines()
                           if line.startswith("evicted_keys:")))
        print(f"store evicted {evicted} pages at its 2 MiB limit")
        assert evicted > 0, "the store never reached its memory limit"
        assert delta(filled, other, "dynkv_store_errors_total", tier="shared") == 0
        # The store is gone: every request recomputes and answers as before.
        assert dead["tokens"] == other["tokens"]
        assert delta(dead, filled, "dynkv_hits_total", tier="shared") == 0
        assert sample(dead, "dynkv_tier_up", tier="shared") == 0
    finally:
        store.stop()


def test_engines_share_pages_through_mooncake(mooncake_master: MooncakeMaster, tmp_path: Path) -> None:
    pytest.importorskip("mooncake.store", reason="no Mooncake client (pip install mooncake-transfer-engine-non-cuda)")
    # The engines mount no memory (segment_mb=0): pages live in a standalone client's segment, so they outlive
    # engine A, which exits before engine B starts.
    mooncake_master.hold(segment_mb=64)
    rng = np.random.default_rng(BASE_SEED)
    print(f"prompt seed {BASE_SEED}")
    first = rng.integers(FIRST_WORD_ID, 1024, size=(2, 200)).tolist()
    turn2 = [p + rng.integers(FIRST_WORD_ID, 1024, 40).tolist() for p in first]
    served = str(write_model(tmp_path / "served", preset="tiny", seed=0))
    dynkv = {"host_pages": 32, "remote_url": mooncake_master.url + "?segment_mb=0&buffer_mb=16",
             "shared_lookup_ms": 2000, "shared_timeout_s": 30.0, "cost_model": False}
    plain = run_engine(tmp_path / "plain", {"model": served, "engine": ENGINE, "dynkv": None,
                                            "phases": [{"name": "turn2", "prompts": turn2}]})["phases"][0]
    a = run_engine(tmp_path / "a", {"model": served, "engine": ENGINE, "dynkv": dynkv,
                                    "phases": [{"name": "turn1", "prompts": first}]})["phases"][0]
    assert sample(a, "dynkv_pages_moved_total", direction="host_to_shared") == 2 * PAGES
    assert sample(a, "dynkv_store_errors_total", tier="shared") == 0
    cont = run_engine(tmp_path / "b", {"model": served, "engine": ENGINE, "dynkv": dynkv,
                                       "phases": [{"name": "turn2", "prompts": turn2}]})["phases"][0]
    assert cont["tokens"] == plain["tokens"], "greedy tokens differ from plain vLLM"
    assert delta(cont, None, "dynkv_hits_total", tier="shared") == 2 * PAGES
    assert delta(cont, None, "dynkv_load_errors_total", reason="shared") == 0
