"""``bench/run_shared_load_cpu.sh`` at a tiny size: two engines on one redis-server against one engine alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _processes_under(path: Path) -> list[str]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path("/proc", pid, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(path) in cmd:
                out.append(f"{pid}: {cmd[:200]}")
    return out


def test_shared_load_script_alternates_engines_and_stops_what_it_started(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (.ci/run installs it)")
    out, work = tmp_path / "out", tmp_path / "tmp"
    work.mkdir()
    # Every match is read and every lookup answered in time, so the counts below are the store's to serve.
    env = {**os.environ, "OUT": str(out), "TMPDIR": str(work), "CONVERSATIONS": "2", "TURNS": "2",
           "PREFIX_TOKENS": "64", "DYNKV_CONFIG": '{"cost_model": false, "shared_lookup_ms": 2000}'}
    run = subprocess.run([str(ROOT / "bench/run_shared_load_cpu.sh")], env=env, capture_output=True, text=True,
                         timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "ratio 1.000" in (out / "ratio-run1.txt").read_text()
    shared = json.loads((out / "shared-run1.json").read_text())
    reqs = shared["engines"]["shared"]["requests"]
    assert len(shared["endpoints"]["shared"]) == 2
    assert sorted((r["conversation"], r["turn"], r["server"]) for r in reqs) == [(0, 0, 0), (0, 1, 1), (1, 0, 1),
                                                                                 (1, 1, 0)]
    # Turn 1's prompt is turn 0's 96 tokens (3 blocks) and 72 more: the 3 blocks come from the other engine's pages.
    assert [r["cached_tokens"] for r in sorted(reqs, key=lambda r: (r["turn"], r["conversation"]))] == [0, 0, 96, 96]
    s = shared["summaries"]["shared"]
    assert s["hits_blocks"]["shared"] == 6 and s["shared"]["load_errors"] == 0
    single = json.loads((out / "single-run1.json").read_text())["summaries"]["single"]
    assert single["hits_blocks"]["shared"] == 0 and single["cached_share"] == s["cached_share"]
    assert _processes_under(work) == [], "a process the script started outlived it"
    assert list(work.glob("dynkv-shared-load.*")) == [], "the script's work directory was left behind"
