"""memcpy_batch on the CPU: plain runs between raw addresses, through the thread pool."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kvtensors import SENTINEL, assert_bytes_equal, random_bytes

import dynkv
from dynkv import _C


def random_runs(
    rng: np.random.Generator, src_len: int, dst_len: int, count: int, max_len: int
) -> list[tuple[int, int, int]]:
    """(src offset, dst offset, length): odd lengths and offsets, disjoint destinations, zero-length ones included."""
    runs, cursor = [], 0
    for i in range(count):
        n = 0 if i == count // 2 else int(rng.integers(1, max_len + 1))
        gap = int(rng.integers(0, 17))
        if cursor + gap + n > dst_len:
            break
        runs.append((int(rng.integers(0, src_len - n + 1)), cursor + gap, n))
        cursor += gap + n
    return runs


def expected(src: torch.Tensor, dst: torch.Tensor, runs: list[tuple[int, int, int]]) -> torch.Tensor:
    out = dst.clone()
    for s, d, n in runs:
        out[d : d + n] = src[s : s + n]
    return out


@pytest.mark.parametrize(
    "src_len,count,max_len",
    [(1000, 12, 97), (1 << 16, 40, 4000), (3 << 20, 8, 1 << 20)],  # the last one goes over the pool's threshold
    ids=["small", "medium", "large"],
)
@pytest.mark.parametrize("threads", [None, 1, 2])
def test_exact_copy(rng, src_len, count, max_len, threads):
    if threads is not None and threads > _C.max_cpu_threads():
        pytest.skip(f"CPU pool has {_C.max_cpu_threads()} threads")
    src = random_bytes(rng, src_len)
    dst = torch.full((src_len + count * 32,), SENTINEL, dtype=torch.uint8)
    before = src.clone()
    runs = random_runs(rng, src_len, dst.numel(), count, max_len)
    assert len(runs) >= 2
    want = expected(src, dst, runs)
    dynkv.memcpy_batch(
        [src.data_ptr() + s for s, _, _ in runs],
        [dst.data_ptr() + d for _, d, _ in runs],
        [n for _, _, n in runs],
        threads=threads,
    )
    assert_bytes_equal(dst, want, "memcpy_batch destination")
    assert_bytes_equal(src, before, "memcpy_batch source")


def test_numpy_address_arrays(rng):
    src = random_bytes(rng, 4096)
    dst = torch.full((4096,), SENTINEL, dtype=torch.uint8)
    runs = [(0, 4000, 96), (100, 0, 1000), (3000, 2000, 1)]
    dynkv.memcpy_batch(
        np.array([src.data_ptr() + s for s, _, _ in runs], dtype=np.uint64),
        np.array([dst.data_ptr() + d for _, d, _ in runs], dtype=np.uint64),
        np.array([n for _, _, n in runs], dtype=np.int32),
    )
    assert_bytes_equal(dst, expected(src, torch.full((4096,), SENTINEL, dtype=torch.uint8), runs), "numpy inputs")


def test_empty_batch():
    dynkv.memcpy_batch([], [], [])


def test_bad_input_copies_nothing(rng):
    src = random_bytes(rng, 256)
    dst = torch.full((256,), SENTINEL, dtype=torch.uint8)
    s, d = src.data_ptr(), dst.data_ptr()
    cases = [
        (([s, s], [d, d + 64], [16, -1]), {}, r"sizes\[1\]=-1 is negative"),
        (([s, s], [d, d + 64], [16]), {}, r"length mismatch: srcs has 2, dsts 2, sizes 1 entries"),
        (([s], [d, d + 64], [16, 16]), {}, r"length mismatch: srcs has 1, dsts 2, sizes 2 entries"),
        (([s, 0], [d, d + 64], [16, 16]), {}, r"copy 1 has a null pointer"),
        (([s, s], [d, 0], [16, 16]), {}, r"copy 1 has a null pointer"),
        (([[s]], [[d]], [[16]]), {}, r"srcs, dsts and sizes must be one-dimensional"),
        (
            ([s], [d], [16]),
            {"backend": "kernel"},
            r"backend='kernel' is not valid for memcpy_batch: expected 'dma' or 'dma_loop'",
        ),
        (([s], [d], [16]), {"threads": _C.max_cpu_threads() + 1}, r"exceeds the CPU pool size"),
    ]
    for args, kw, match in cases:
        with pytest.raises(ValueError, match=match):
            dynkv.memcpy_batch(*args, **kw)
    assert bool((dst == SENTINEL).all())
    # zero bytes from or to null is no copy, and allowed
    dynkv.memcpy_batch([0, s], [d, 0], [0, 0])
    assert bool((dst == SENTINEL).all())
