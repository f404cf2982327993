"""Leader-side bookkeeping speed: prefix lookup in a 100k-page index, key hashing."""

from __future__ import annotations

import numpy as np
import pytest

from dynkv.index import PageIndex
from dynkv.keys import ModelFingerprint, block_keys

PAGES = 100_000


@pytest.fixture(scope="module")
def big_index() -> tuple[PageIndex, list[bytes]]:
    idx = PageIndex({"host": PAGES})
    keys = [int(x).to_bytes(16, "little") for x in np.random.default_rng(0).integers(0, 2**63, size=PAGES)]
    for i in range(0, PAGES, 4096):
        chunk = keys[i : i + 4096]
        idx.allocate("host", chunk)
        idx.commit("host", chunk)
    return idx, keys


@pytest.mark.parametrize("touch", [False, True])
def test_lookup_256_in_100k(benchmark, big_index, touch: bool) -> None:
    idx, keys = big_index
    query = keys[5000:5256]
    m = benchmark(idx.lookup, query, touch=touch)
    assert m.num_keys == 256


def test_block_keys_throughput(benchmark) -> None:
    fp = ModelFingerprint("bench", "bfloat16", 32, 8, 128, 16)
    tokens = np.random.default_rng(0).integers(0, 128_000, size=128 * 1024, dtype=np.uint32)
    keys = benchmark(block_keys, fp, tokens, 16)
    assert len(keys) == len(tokens) // 16
    if benchmark.stats:  # None under --benchmark-disable
        benchmark.extra_info["GB/s of token ids"] = tokens.nbytes / benchmark.stats["median"] / 1e9
