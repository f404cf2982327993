"""Smoke runs of the benchmarks at tiny size on the CPU: they run and report
what they should. Timings are never asserted on; benchmarks live in bench/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, *args], cwd=cwd, env={**os.environ, **env}, capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, f"{' '.join(args)} exited {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def test_bench_kernels_tiny_cpu(tmp_path: Path) -> None:
    out, png = tmp_path / "kernels.json", tmp_path / "kernels.png"
    r = _run(["-m", "dynkv.cli", "bench", "kernels", "--preset", "tiny", "--device", "cpu", "--bytes", "256K",
              "--iters", "3", "--warmup", "1", "--json", str(out), "--plot", str(png)], cwd=tmp_path)
    report = json.loads(out.read_text())
    rows = report["results"]
    assert {(x["direction"], x["backend"]) for x in rows} == {
        (d, b) for d in ("h2d", "d2h") for b in ("memcpy", "kernel", "torch")
    }
    for x in rows:
        assert x["gbps"] > 0 and x["pct_of_memcpy"] > 0, x
        assert len(x["times_s"]) == 3 and x["bytes"] == report["geometry"]["bytes_per_op"], x
    assert set(report["baselines"]) == {"h2d", "d2h"}
    assert report["env"]["dynkv"] and report["config"]["device"] == "cpu"
    assert png.stat().st_size > 0 and png.read_bytes()[:8] == PNG_MAGIC
    assert "% memcpy" in r.stdout and "kernel" in r.stdout


def test_bench_suite_tiny(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # Timed (not --benchmark-disable), so the GB/s bookkeeping runs too; short rounds keep it quick.
    _run(["-m", "pytest", str(ROOT / "bench"), "-q", "-p", "no:cacheprovider", "--benchmark-json", str(out),
          "--benchmark-max-time=0.05", "--benchmark-min-rounds=1", "--benchmark-warmup=off"],
         cwd=ROOT, DYNKV_BENCH_PRESET="tiny", DYNKV_BENCH_MIB="0.25", DYNKV_BENCH_ROUNDS="2")
    copies = [b for b in json.loads(out.read_text())["benchmarks"] if "test_bench_ops.py" in b["fullname"]]
    assert {b["name"].split("[")[0] for b in copies} == {"test_gather", "test_scatter", "test_copy_blocks",
                                                         "test_memcpy_batch"}
    for b in copies:
        assert b["extra_info"]["gbps"] > 0 and b["extra_info"]["pct_of_memcpy"] > 0, b["name"]
