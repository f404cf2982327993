"""The shared tier on a real Mooncake Store (``mooncake_master`` on loopback, TCP transfers).

Each tier here is a Mooncake client that mounts a small segment; pages live
in the segments of the clients alive, so writers and readers overlap.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from stores import MooncakeMaster

from dynkv.tiers.shared import SharedPageError, SharedPageMissing, SharedTier, StoreUnavailable
from dynkv.tiers.shared.base import GOT
from dynkv.tiers.shared.tier import HEADER_BYTES, store_key

pytest.importorskip("mooncake.store", reason="no Mooncake client (pip install mooncake-transfer-engine-non-cuda)")

FP = bytes(range(16))
PAGE = 8 * 1024 + 96


def tier_for(url: str, **kw: object) -> SharedTier:
    kw = {"fingerprint": FP, "page_bytes": PAGE, "namespace": "t", "batch_pages": 4, "lookup_timeout_s": 10.0,
          "timeout_s": 10.0, **kw}
    return SharedTier(url + "?segment_mb=16&buffer_mb=16", **kw)  # type: ignore[arg-type]


@pytest.fixture
def pair(mooncake_master: MooncakeMaster) -> Iterator[tuple[SharedTier, SharedTier]]:
    a, b = tier_for(mooncake_master.url), tier_for(mooncake_master.url)
    assert a.up and b.up
    yield a, b
    a.close()
    b.close()


def pages(rng: np.random.Generator, n: int) -> tuple[list[bytes], np.ndarray]:
    keys = [bytes(rng.integers(0, 256, 16, dtype=np.uint8)) for _ in range(n)]
    return keys, rng.integers(0, 256, (n, PAGE), dtype=np.uint8)


def test_pages_written_by_one_client_are_read_by_another(pair, rng: np.random.Generator) -> None:
    a, b = pair
    pool = np.zeros((12, PAGE), dtype=np.uint8)  # a host pool, registered: pages go out and come in place
    a.register(memoryview(pool).cast("B"))
    keys, data = pages(rng, 10)
    pool[:10] = data
    assert [f.result(timeout=60) for f in a.write_many([(k, memoryview(pool[i])) for i, k in enumerate(keys)])] \
        == [True] * 10
    assert b.count_stored(keys) == 10 and b.count_stored([bytes(16)] + keys) == 0
    out = np.full((10, PAGE), 0xFF, dtype=np.uint8)
    errs = [f.exception(timeout=60) for f in b.read_many([(k, memoryview(out[i])) for i, k in enumerate(keys)])]
    assert errs == [None] * 10 and np.array_equal(out, data)
    # A value that is not the page asked for (here: another page's) fails its read and is removed.
    client = b._backend.client  # type: ignore[union-attr]
    value = client.get(store_key("t", FP, keys[1]))
    assert len(value) == HEADER_BYTES + PAGE
    client.remove(store_key("t", FP, keys[0]), True)
    assert client.put(store_key("t", FP, keys[0]), value) == 0
    client.remove(store_key("t", FP, keys[2]), True)  # gone since the lookup: a miss
    errs = [f.exception(timeout=60) for f in b.read_many([(k, memoryview(out[i])) for i, k in enumerate(keys[:3])])]
    assert isinstance(errs[0], SharedPageError) and f"holds page {keys[1].hex()}" in str(errs[0])
    assert errs[1] is None and isinstance(errs[2], SharedPageMissing)
    assert client.is_exist(store_key("t", FP, keys[0])) == 0


class Recording:
    """A mooncake client that records the sizes of the buffers registered through it."""

    def __init__(self, client: object) -> None:
        self._client, self.registered = client, []

    def register_buffer(self, addr: int, n: int) -> int:
        self.registered.append(n)
        return self._client.register_buffer(addr, n)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._client, name)


def test_pages_and_headers_move_in_place_from_registered_memory(mooncake_master: MooncakeMaster,
                                                                  rng: np.random.Generator) -> None:
    t = tier_for(mooncake_master.url, io_threads=1)
    try:
        pool = np.zeros((16, PAGE), dtype=np.uint8)
        t.register(memoryview(pool).cast("B"))
        keys, data = pages(rng, 16)
        pool[:8] = data[:8]
        first = [(k, memoryview(pool[i])) for i, k in enumerate(keys[:4])]
        assert [f.result(timeout=60) for f in t.write_many(first, check=False)] == [True] * 4
        backend = t.backend
        assert backend is not None
        rec = Recording(backend._store)  # type: ignore[attr-defined]
        backend._store = rec  # type: ignore[attr-defined]
        # The I/O thread's header buffer is registered by now: no batch needs a scratch buffer.
        writes = [(k, memoryview(pool[i])) for i, k in enumerate(keys[:8])]
        assert [f.result(timeout=60) for f in t.write_many(writes, check=False)] == [True] * 8
        reads = [(k, memoryview(pool[8 + i])) for i, k in enumerate(keys[:8])]
        assert [f.exception(timeout=60) for f in t.read_many(reads)] == [None] * 8
        assert rec.registered == [] and np.array_equal(pool[8:], data[:8])
        # Into memory nobody registered, pages still come back whole, through a scratch buffer.
        out = np.full((8, PAGE), 0xFF, dtype=np.uint8)
        errs = [f.exception(timeout=60) for f in t.read_many([(k, memoryview(out[i])) for i, k in enumerate(keys[:8])])]
        assert errs == [None] * 8 and np.array_equal(out, data[:8])
        assert rec.registered == [4 * PAGE, 4 * PAGE]
        # Headers outside registered memory too, pages on either side (one read-only): one scratch buffer a call.
        rec.registered.clear()
        heads = memoryview(bytearray(range(2 * HEADER_BYTES)))
        skeys = ["raw:a", "raw:b"]
        assert backend.put(skeys, heads, [memoryview(pool[0]), memoryview(bytes(data[1]))]) == [True, True]
        back, dst = memoryview(bytearray(2 * HEADER_BYTES)), np.zeros((2, PAGE), dtype=np.uint8)
        assert backend.get(skeys, back, [memoryview(pool[9]), memoryview(dst[1])]) == [GOT, GOT]
        assert back == heads and np.array_equal(pool[9], pool[0]) and np.array_equal(dst[1], data[1])
        assert rec.registered == [2 * HEADER_BYTES + PAGE] * 2
        backend.remove(skeys)
    finally:
        t.close()


def test_a_dead_master_takes_the_tier_down(pair, mooncake_master: MooncakeMaster, rng: np.random.Generator,
                                           caplog: pytest.LogCaptureFixture) -> None:
    a, _ = pair
    keys, data = pages(rng, 3)
    mooncake_master.kill()
    with caplog.at_level(logging.WARNING, logger="dynkv.shared"):
        errs = [f.exception(timeout=120) for f in a.read_many([(k, memoryview(d)) for k, d in zip(keys, data)])]
    assert all(isinstance(e, StoreUnavailable) for e in errs), errs
    assert not a.up and a.count_stored(keys) is None
    assert "shared tier down" in caplog.text


def test_a_master_down_at_start_leaves_the_tier_down(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The backend gives up before the client's setup (which would hold the process for about 90 s)."""
    if MooncakeMaster.binary() is None:
        pytest.skip("mooncake_master is not installed")
    from stores import free_port

    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="dynkv.shared"):
        t = tier_for(f"mooncake://127.0.0.1:{free_port()}", timeout_s=1.0)
    try:
        print(f"start against no master took {time.monotonic() - t0:.1f} s")
        assert not t.up and t.count_stored([bytes(16)]) is None
        assert time.monotonic() - t0 < 60, "start waited on the client's setup against no master"
        assert "running without it" in caplog.text
    finally:
        t.close()
