"""`dynkv bench e2e` on vLLM's CPU build: every path runs, and dynkv's hits give vLLM's own tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_bench_e2e_cpu_smoke(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "dynkv.cli", "bench", "e2e", "--device", "cpu", "--lengths", "256",
           "--repeat", "1", "--check-tokens", "8", "--decode-requests", "2", "--decode-tokens", "16",
           "--decode-repeat", "1", "--work-dir", str(tmp_path / "work"), "--out", str(out), "--no-plot",
           "--variant", "chunk1:read_chunk=1,priority=0", "--variant", "whole:store_launch_kib=0,paths=decode",
           "--variant", "lb:last_block=1,paths=disk",
           "--trace", "--disk-probe"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((out / "e2e.json").read_text())
    paths = report["summary"]["lengths"]["256"]["paths"]
    for path in ("vllm/recompute", "vllm/device", "dynkv/host", "dynkv/disk"):
        assert path in paths, f"path {path} missing from {sorted(paths)}"
    greedy = {t["target"]: t["met"] for t in report["summary"]["targets"] if t["target"].startswith("greedy")}
    assert greedy and all(greedy.values()), greedy
    assert report["summary"]["decode"]["dynkv"]["tok_s"] > 0
    assert report["summary"]["decode"]["variants"]["whole"]["tok_s"] > 0, "the decode variant ran the decode again"
    assert "dynkv/disk@whole" not in report["summary"]["lengths"]["256"]["paths"], "a decode variant runs no hits"
    assert "variant whole:" in run.stdout
    choice = report["summary"]["lengths"]["256"]["prompt_choice"]
    gaps = choice["min_top2_gaps"]
    assert len(gaps) == 2 and None not in gaps, choice
    assert gaps[choice["chosen"]] == max(gaps), "the measured prompt is the candidate with the widest top-2 gap"
    assert paths["dynkv/disk"]["disk_read_s"] > 0 and not paths["dynkv/host"]["disk_read_s"]
    assert paths["dynkv/host"]["hits"]["host"] == [256 // 32 - 1] * 1, "a sync hit leaves the last block to compute"
    # The host hit's copy was launched by the scheduler (one CPU rank, in this process), and its launch was timed.
    assert paths["dynkv/host"]["launch_sites"] == ["scheduler"] and paths["dynkv/host"]["launch_ms"] > 0, paths
    assert "CPU time of dynkv's sync-load launches" in run.stdout
    for path in ("vllm/turn_device", "dynkv/turn_host"):
        assert path in paths, f"next-turn path {path} missing"
    assert paths["dynkv/turn_host"]["hits"]["host"] == [256 // 32], "the next turn loads the whole cached prompt"
    assert paths["vllm/turn_device"]["cached_tokens"] == [256], "vLLM's own cache serves the prompt of the next turn"
    # The variant ran both hits with its knobs: one page per run of the disk tier's reads (dealt round-robin).
    assert paths["dynkv/host@chunk1"]["hits"]["host"] == [256 // 32 - 1]
    pages = paths["dynkv/disk"]["hits"]["disk"]
    assert paths["dynkv/disk@chunk1"]["hits"]["disk"] == pages and pages[0] > 1
    assert pages == [256 // 32 - 1], "a disk hit leaves the last block to compute, as vLLM's own hit does"
    assert paths["dynkv/disk@lb"]["hits"]["disk"] == [256 // 32], "load_last_block: every full block loads"
    assert "dynkv/host@lb" not in paths
    chunked, whole = paths["dynkv/disk@chunk1"]["disk_batches"], paths["dynkv/disk"]["disk_batches"]
    assert sum(b[4] for b in chunked) == sum(b[4] for b in whole) == pages[0]
    assert all(b[5] == b[4] for b in chunked) and len(chunked) > 1, chunked
    assert all(b[5] == 1 for b in whole), "by default each thread reads one run of adjacent records"
    traces = report["summary"]["lengths"]["256"]["traces"]
    assert {"vllm/device", "dynkv/host", "dynkv/disk"} <= set(traces), sorted(traces)
    for name in ("vllm-device", "dynkv-host", "dynkv-disk"):
        assert (out / "logs" / f"trace-{name}-256.json.gz").stat().st_size > 0
    for b in whole:  # each batch says what its read call cost its thread
        assert b[6]["read_ms"] > 0 and b[6]["user_ms"] + b[6]["sys_ms"] >= 0, b
    host = paths["dynkv/disk"]["host"]
    assert host["wall_ms"] > 0 and isinstance(host["threads_cpu_ms"], dict), host
    probe = report["summary"]["lengths"]["256"]["disk_probe"]
    # Into scratch memory and into the host-tier pages the hits left (the destination of a disk hit).
    assert probe["pages"] == pages[0] and probe["host tier"] > 0 and probe["pinned"] > 0, probe
    assert set(probe["host"]) == {"anonymous", "pinned", "host tier", "pinned, engine stepping",
                                  "pinned, after fillers"}, probe["host"]
    summary = report["summary"]["lengths"]["256"]
    assert summary["dd"]["median_s"] > 0 and summary["dd_after_fillers"]["median_s"] > 0
    targets = [t["target"] for t in report["summary"]["targets"] if t["target"].startswith("disk-tier hit")]
    assert len(targets) == 2 and "after the same filler pass" in targets[1], targets
    # The KV check: dynkv stored what vLLM computed and loaded what it stored, block for block; its first prefill
    # and its hits hold vLLM's own KV of the prompt (a CRC-32 per block on the one CPU rank).
    kv = summary["kv"]
    assert kv["dynkv/miss"]["stored"] == {"equal": 256 // 32, "of": 256 // 32, "first_differing": None}, kv
    for path in ("dynkv/host", "dynkv/disk"):
        assert kv[path]["loaded"] == {"equal": 256 // 32 - 1, "of": 256 // 32 - 1, "first_differing": None}, kv
    for path in ("dynkv/miss", "dynkv/host", "dynkv/disk"):
        assert kv[path]["vs_reference"]["first_differing"] is None, kv
    # The disk hit stores the last block again (the filler pass pushed its page out of the host tier).
    assert kv["dynkv/disk"]["stored"]["of"] == 1 and "stored" not in kv["dynkv/host"], kv
    checks = [t for t in report["summary"]["targets"] if t["target"].startswith("KV check")]
    assert len(checks) == 4 and all(t["met"] for t in checks), checks
    assert "KV dynkv/host (CRC-32 per block, every rank): blocks loaded = pages 7 of 7" in run.stdout
    # Both engines ran eager kernels (the CPU defaults), so their KV and tokens can be held to each other's.
    assert report["summary"]["kernels"]["alike"] is True, report["summary"]["kernels"]
    assert {e["compiled"] for e in report["summary"]["kernels"]["engines"].values()} == {False}
    assert "kernels: eager in every engine" in run.stdout
