"""Fixtures of the pytest-benchmark suites: model-shaped buffers, and the
contiguous memcpy each benchmark is compared with, measured in the same run.

Sizes come from the environment, so the same suite runs at tiny size in the
test suite's smoke run and at full size on a GPU machine:

``DYNKV_BENCH_PRESET``  a preset of ``dynkv bench kernels`` (default ``llama3-8b``)
``DYNKV_BENCH_MIB``     MiB moved per op (default 64 on CPU, 256 on GPU)
``DYNKV_BENCH_LAYOUT``  KV cache layout (default ``LBHNC``)
``DYNKV_BENCH_ROUNDS``  timed rounds per benchmark (default 10)
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import dynkv
from dynkv.benchmarks.kernels_setup import PRESETS, Setup, baseline_fns, build_setup

MiB = 1 << 20
_HERE = Path(__file__).resolve().parent


def gpu_available() -> bool:
    """A GPU is visible and this dynkv build carries the CUDA ops."""
    return dynkv.cuda_compiled() and torch.cuda.is_available()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU and dynkv's CUDA ops (skipped otherwise)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if gpu_available():
        return
    why = (f"needs a CUDA GPU and the CUDA ops (GPU visible: {torch.cuda.is_available()}, "
           f"CUDA ops: {dynkv.cuda_compiled()})")
    for item in items:
        if "gpu" in item.keywords and _HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.skip(reason=why))


@dataclass(frozen=True)
class BenchSize:
    preset: str
    mib: float | None
    layout: str
    rounds: int

    def blocks(self, device: str) -> int:
        preset = PRESETS[self.preset]
        slice_bytes = preset.geometry().head_slice(*preset.heads())[1]
        mib = self.mib if self.mib is not None else (64 if device == "cpu" else 256)
        return max(1, int(mib * MiB) // slice_bytes)


@pytest.fixture(scope="session")
def bench_size() -> BenchSize:
    preset = os.environ.get("DYNKV_BENCH_PRESET", "llama3-8b")
    if preset not in PRESETS:
        raise pytest.UsageError(f"DYNKV_BENCH_PRESET={preset!r} is not valid: expected one of {', '.join(PRESETS)}")
    mib = os.environ.get("DYNKV_BENCH_MIB")
    return BenchSize(preset=preset, mib=float(mib) if mib else None,
                     layout=os.environ.get("DYNKV_BENCH_LAYOUT", "LBHNC"),
                     rounds=int(os.environ.get("DYNKV_BENCH_ROUNDS", "10")))


def _setup(size: BenchSize, device: str) -> Iterator[Setup]:
    s = build_setup(PRESETS[size.preset], device=device, blocks=size.blocks(device), layout=size.layout,
                    concurrent=True, device_pages=device == "cuda")
    yield s
    s.close()


@pytest.fixture(scope="session")
def cpu_setup(bench_size: BenchSize) -> Iterator[Setup]:
    yield from _setup(bench_size, "cpu")


@pytest.fixture(scope="session")
def gpu_setup(bench_size: BenchSize) -> Iterator[Setup]:
    yield from _setup(bench_size, "cuda")


def synced(fn: Callable[[], Any], device: torch.device) -> Callable[[], None]:
    """``fn`` made to return only once its work is done (GPU ops are stream-ordered).

    On a GPU it runs on a stream of its own: on the legacy default stream the
    ``dma`` backend falls back to the per-run loop, which would bench the wrong path.
    """
    if device.type == "cpu":
        return fn
    stream = torch.cuda.Stream(device)

    def run() -> None:
        with torch.cuda.stream(stream):
            fn()
        stream.synchronize()

    return run


@pytest.fixture(scope="session")
def memcpy_gbps(bench_size: BenchSize) -> Callable[[Setup, str], float]:
    """GB/s of the contiguous memcpy of ``setup.nbytes`` in a direction, timed like the benchmarks."""
    cache: dict[tuple[int, str], float] = {}

    def get(s: Setup, direction: str) -> float:
        key = (id(s), direction)
        if key not in cache:
            fn = synced(baseline_fns(s, "h2d" if direction == "h2h" else direction)[0], s.device)
            times = []
            for i in range(bench_size.rounds + 2):
                t0 = time.perf_counter()
                fn()
                if i >= 2:
                    times.append(time.perf_counter() - t0)
            cache[key] = s.nbytes / statistics.median(times) / 1e9
        return cache[key]

    return get


@pytest.fixture
def measure(benchmark: Any, bench_size: BenchSize, memcpy_gbps: Callable[[Setup, str], float]) -> Callable[..., None]:
    """Benchmark ``fn`` moving ``nbytes`` and record GB/s and % of memcpy in ``extra_info``."""

    def run(fn: Callable[[], Any], s: Setup, direction: str, nbytes: int | None = None) -> None:
        nbytes = nbytes or s.nbytes
        benchmark.extra_info.update(preset=bench_size.preset, layout=bench_size.layout, direction=direction,
                                    bytes=nbytes, blocks=s.blocks)
        benchmark.pedantic(synced(fn, s.device), rounds=bench_size.rounds, warmup_rounds=2)
        if benchmark.stats is None:  # --benchmark-disable: ran once, nothing timed
            return
        gbps = nbytes / benchmark.stats["median"] / 1e9
        base = memcpy_gbps(s, direction)
        benchmark.extra_info.update(gbps=round(gbps, 3), memcpy_gbps=round(base, 3),
                                    pct_of_memcpy=round(100 * gbps / base, 1))

    return run
