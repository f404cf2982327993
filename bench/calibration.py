"""Time the worker's copy-path calibration on this GPU, for each preset geometry, with no cache.

``python bench/calibration.py [preset ...]``: per preset, the GB/s of memcpy,
kernel and staged per direction, the path chosen, and how long the
calibration took (what a worker's start pays once per GPU and driver).
"""

from __future__ import annotations

import sys
import time

import torch

from dynkv.benchmarks.kernels_setup import PRESETS, build_setup
from dynkv.worker import calibrate


def main(names: list[str]) -> None:
    for name in names or ["llama3-8b", "llama3-70b-tp8", "deepseek-mla"]:
        s = build_setup(PRESETS[name], device="cuda", blocks=8)
        try:
            t0 = time.perf_counter()
            choice = calibrate.choose(s.view, use_cache=False)
            torch.cuda.synchronize()
            took = time.perf_counter() - t0
            print(f"calibration {name}: {calibrate.describe(choice)}; {took:.3f} s")
        finally:
            s.close()


if __name__ == "__main__":
    main(sys.argv[1:])
