"""Disk tier: write and read passes of whole pages at 1 and 4 I/O threads, with GB/s
and % of the sequential O_DIRECT baseline (``dd``, 64 MiB blocks) in extra_info.

Sizes come from conftest.py's variables (``DYNKV_BENCH_MIB`` per pass, default
64; ``DYNKV_BENCH_ROUNDS``); pages are 2 MiB (a llama3-8b page) unless a pass
is smaller than four of them. ``DYNKV_BENCH_DISK_PATH`` names the directory
(default: pytest's temporary directory, which may be tmpfs: point it at the
NVMe to measure). ``dynkv bench disk`` is the same measurement as a table.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from dynkv.benchmarks.disk import aligned_pages, baseline, timed_pass
from dynkv.tiers.disk import DiskTier

MiB = 1 << 20


@dataclass
class DiskSetup:
    work: str
    page_bytes: int
    pages: int
    base: dict[str, Any]

    @property
    def nbytes(self) -> int:
        return self.pages * self.page_bytes


@pytest.fixture(scope="module")
def disk(bench_size: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DiskSetup]:
    total = int((bench_size.mib or 64) * MiB)
    page_bytes = 2 * MiB if total >= 8 * MiB else max(4096, total // 4 // 4096 * 4096)
    root = os.environ.get("DYNKV_BENCH_DISK_PATH") or str(tmp_path_factory.mktemp("disk"))
    work = tempfile.mkdtemp(prefix="dynkv-bench-disk-", dir=root)
    pages = max(1, total // page_bytes)
    try:
        yield DiskSetup(work, page_bytes, pages, baseline(work, pages * page_bytes, max(1, bench_size.rounds // 3)))
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("direction", ["write", "read"])
def test_disk_pass(benchmark: Any, bench_size: Any, disk: DiskSetup, direction: str, threads: int) -> None:
    window = 2 * threads
    bufs = aligned_pages(window, disk.page_bytes)
    with DiskTier([disk.work], disk.pages, disk.page_bytes, fingerprint=b"bench_disk", io_threads=threads) as tier:
        timed_pass(tier, bufs, True, window)  # the pages a read pass needs, and warm extents for a write pass
        benchmark.extra_info.update(direction=direction, threads=threads, bytes=disk.nbytes,
                                    page_bytes=disk.page_bytes, direct_io=tier.direct_io_active)
        benchmark.pedantic(timed_pass, args=(tier, bufs, direction == "write", window), rounds=bench_size.rounds,
                           warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing timed
        return
    gbps = disk.nbytes / benchmark.stats["median"] / 1e9
    base = disk.base[f"{direction}_gbps"]
    benchmark.extra_info.update(gbps=round(gbps, 3), baseline_gbps=round(base, 3), baseline_tool=disk.base["tool"],
                                pct_of_baseline=round(100 * gbps / base, 1))

