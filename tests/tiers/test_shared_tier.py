"""The shared tier against real stores on loopback: round trips, verification, eviction, a dead store."""

from __future__ import annotations

import logging
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

redis = pytest.importorskip("redis", reason="the shared tier's Redis client: pip install 'dynkv[shared]'")
from stores import RedisServer, free_port

from crc32c import crc32c
from dynkv.tiers.shared import SharedPageError, SharedPageMissing, SharedTier, StoreUnavailable
from dynkv.tiers.shared.base import redact, scheme_of
from dynkv.tiers.shared.tier import HEADER_BYTES, pack_header, store_key

FP = bytes(range(16))
PAGE = 12 * 1024 + 40  # an odd size


def pages(rng: np.random.Generator, n: int) -> tuple[list[bytes], np.ndarray]:
    keys = [bytes(rng.integers(0, 256, 16, dtype=np.uint8)) for _ in range(n)]
    return keys, rng.integers(0, 256, (n, PAGE), dtype=np.uint8)


def tier_for(url: str, **kw: object) -> SharedTier:
    kw = {"fingerprint": FP, "page_bytes": PAGE, "namespace": "t", "batch_pages": 5, "lookup_timeout_s": 5.0,
          "timeout_s": 2.0, **kw}
    return SharedTier(url, **kw)  # type: ignore[arg-type]


@pytest.fixture
def tier(redis_server: RedisServer) -> Iterator[SharedTier]:
    t = tier_for(redis_server.url)
    yield t
    t.close()


def write(t: SharedTier, keys: list[bytes], data: np.ndarray) -> list[bool]:
    return [f.result(timeout=30) for f in t.write_many([(k, memoryview(row)) for k, row in zip(keys, data)])]


def read(t: SharedTier, keys: list[bytes]) -> tuple[np.ndarray, list[BaseException | None]]:
    out = np.full((len(keys), PAGE), 0xFF, dtype=np.uint8)
    futs = t.read_many([(k, memoryview(row)) for k, row in zip(keys, out)])
    return out, [f.exception(timeout=30) for f in futs]


def test_pages_round_trip_and_lookups_count_the_stored_prefix(tier: SharedTier, redis_server: RedisServer,
                                                              rng: np.random.Generator) -> None:
    keys, data = pages(rng, 13)  # three batches of 5
    assert tier.count_stored(keys) == 0
    assert write(tier, keys[:11], data[:11]) == [True] * 11
    assert tier.count_stored(keys) == 11
    assert tier.count_stored(keys[3:]) == 8
    assert tier.count_stored([keys[12]] + keys[:3]) == 0
    got, errs = read(tier, keys[:11])
    assert errs == [None] * 11
    assert np.array_equal(got, data[:11])
    raw = redis.Redis(port=redis_server.ports[0])
    value = raw.get(store_key("t", FP, keys[0]))
    assert len(value) == HEADER_BYTES + PAGE and value[HEADER_BYTES:] == data[0].tobytes()
    assert sorted(raw.keys("t:*")) == sorted(store_key("t", FP, k).encode() for k in keys[:11])
    # Asked first, a page already held is not sent again (another engine wrote it, say).
    bad = data[:2] ^ 1
    assert write(tier, keys[:2], bad) == [True, True]
    assert np.array_equal(read(tier, keys[:2])[0], data[:2])
    # Unasked, it is replaced.
    futs = tier.write_many([(k, memoryview(row)) for k, row in zip(keys[:2], bad)], check=False)
    assert [f.result(timeout=30) for f in futs] == [True, True]
    assert np.array_equal(read(tier, keys[:2])[0], bad)


def test_headers_are_the_reference_header_and_pages_complete_one_by_one(tier: SharedTier, redis_server: RedisServer,
                                                                          rng: np.random.Generator) -> None:
    keys, data = pages(rng, 7)  # a batch of 5, then 2
    short = data[6, :-24]  # a page shorter than the tier's: its header says so
    writes = [(k, memoryview(row)) for k, row in zip(keys[:6], data)] + [(keys[6], memoryview(short))]
    assert [f.result(timeout=30) for f in tier.write_many(writes, check=False)] == [True] * 7
    raw = redis.Redis(port=redis_server.ports[0])
    for k, (_, page) in zip(keys, writes):  # the batched header is byte for byte the one pack_header builds
        assert raw.get(store_key("t", FP, k)) == pack_header(k, FP, page) + bytes(page)
    raw.delete(store_key("t", FP, keys[3]))
    out = np.full((7, PAGE), 0xFF, dtype=np.uint8)
    dsts = [memoryview(row) for row in out[:6]] + [memoryview(out[6, :-24])]
    futs = tier.read_many(list(zip(keys, dsts)))
    seen: dict[int, BaseException | None] = {}
    for i, f in enumerate(futs):
        f.add_done_callback(lambda page, i=i: seen.__setitem__(i, page.exception()))
    assert [type(f.exception(timeout=30)) for f in futs] == [type(None)] * 3 + [SharedPageMissing] + [type(None)] * 3
    with pytest.raises(SharedPageMissing):
        futs[3].result()
    assert all(f.done() and not f.cancelled() for f in futs)
    assert sorted(seen) == list(range(7)) and isinstance(seen[3], SharedPageMissing)
    assert all(seen[i] is None for i in (0, 1, 2, 4, 5, 6))
    assert np.array_equal(out[[0, 1, 2, 4, 5]], data[[0, 1, 2, 4, 5]]) and np.array_equal(out[6, :-24], short)
    # The short page read into a whole page's room: the wrong size, a load error.
    _, errs = read(tier, keys[6:])
    assert isinstance(errs[0], SharedPageError) and "another size" in str(errs[0])


def test_close_finishes_the_queued_batches_and_later_calls_fail_at_once(tier: SharedTier,
                                                                         rng: np.random.Generator) -> None:
    keys, data = pages(rng, 23)  # five batches for two I/O threads
    futs = tier.write_many([(k, memoryview(row)) for k, row in zip(keys, data)], check=False)
    tier.close()
    assert all(f.done() for f in futs) and [f.result() for f in futs] == [True] * 23
    _, errs = read(tier, keys)
    assert all(isinstance(e, StoreUnavailable) and "closed" in str(e) for e in errs), errs


def test_a_cluster_spreads_pages_over_its_nodes(redis_cluster: RedisServer, rng: np.random.Generator) -> None:
    t = tier_for(redis_cluster.url)
    try:
        keys, data = pages(rng, 40)
        assert write(t, keys, data) == [True] * 40
        assert t.count_stored(keys) == 40
        got, errs = read(t, keys)
        assert errs == [None] * 40 and np.array_equal(got, data)
        per_node = [redis.Redis(port=p).dbsize() for p in redis_cluster.ports]
        print("pages per node", per_node)
        assert sum(per_node) == 40 and all(n > 0 for n in per_node)
    finally:
        t.close()


def test_a_cluster_put_follows_a_slot_that_moved(redis_cluster: RedisServer, rng: np.random.Generator) -> None:
    t = tier_for(redis_cluster.url)
    try:
        keys, data = pages(rng, 10)
        client = t.backend.client  # type: ignore[union-attr]
        # The client's slot map goes stale: every key's slot points at a node that does not own it.
        nodes = client.get_primaries()
        for k in keys:
            slot = client.keyslot(store_key("t", FP, k))
            owner = client.nodes_manager.slots_cache[slot][0]
            client.nodes_manager.slots_cache[slot] = [next(n for n in nodes if n.name != owner.name)]
        # Without asking first (an EXISTS would have the client refresh its map): each SET is answered MOVED,
        # then goes to the owner.
        futs = t.write_many([(k, memoryview(row)) for k, row in zip(keys, data)], check=False)
        assert [f.result(timeout=30) for f in futs] == [True] * 10
        got, errs = read(t, keys)
        assert errs == [None] * 10 and np.array_equal(got, data)
        assert sum(redis.Redis(port=p).dbsize() for p in redis_cluster.ports) == 10
    finally:
        t.close()


def test_a_value_that_is_not_the_page_asked_for_fails_its_read(tier: SharedTier, redis_server: RedisServer,
                                                               rng: np.random.Generator) -> None:
    keys, data = pages(rng, 5)
    write(tier, keys, data)
    raw = redis.Redis(port=redis_server.ports[0])
    k = [store_key("t", FP, key) for key in keys]
    payload = bytearray(raw.get(k[0]))
    payload[HEADER_BYTES + 1000] ^= 0x5A
    raw.set(k[0], bytes(payload))  # a flipped payload byte
    raw.set(k[1], raw.get(k[2]))  # another page's value under this key
    header = bytearray(raw.get(k[3]))
    header[30] ^= 1
    raw.set(k[3], bytes(header))  # a flipped header byte
    raw.set(k[4], raw.get(k[4])[:-1])  # a truncated value
    _, errs = read(tier, keys)
    assert errs[2] is None
    assert all(isinstance(errs[i], SharedPageError) for i in (0, 1, 3, 4)), errs
    assert "payload checksum mismatch" in str(errs[0])
    assert f"holds page {keys[2].hex()}" in str(errs[1])
    assert "header checksum" in str(errs[3])
    assert "another size" in str(errs[4])
    # The bad values are gone, so the next write of those pages replaces them.
    assert [raw.exists(k[i]) for i in range(5)] == [0, 0, 1, 0, 0]
    assert write(tier, keys, data) == [True] * 5
    got, errs = read(tier, keys)
    assert errs == [None] * 5 and np.array_equal(got, data)


def test_in_a_batch_read_back_whole_a_bad_page_fails_alone(tier: SharedTier, redis_server: RedisServer,
                                                            rng: np.random.Generator) -> None:
    keys, data = pages(rng, 5)  # one batch; every value comes back at its size
    write(tier, keys, data)
    raw = redis.Redis(port=redis_server.ports[0])
    k = [store_key("t", FP, key) for key in keys]
    for i, at in ((1, HEADER_BYTES + PAGE - 1), (3, 57)):  # the page's last byte; the header's own checksum
        value = bytearray(raw.get(k[i]))
        value[at] ^= 0x01
        raw.set(k[i], bytes(value))
    got, errs = read(tier, keys)
    assert [e is None for e in errs] == [True, False, True, False, True], errs
    assert "payload checksum mismatch" in str(errs[1]) and "header checksum mismatch" in str(errs[3])
    assert np.array_equal(got[[0, 2, 4]], data[[0, 2, 4]])
    assert [raw.exists(key) for key in k] == [1, 0, 1, 0, 1]


def test_a_page_of_the_zlib_format_is_a_load_error_and_is_replaced(tier: SharedTier, redis_server: RedisServer,
                                                                   rng: np.random.Generator) -> None:
    keys, data = pages(rng, 2)
    write(tier, keys, data)
    raw = redis.Redis(port=redis_server.ports[0])
    # Format 1: the same header with zlib's CRC-32 (as engines before CRC-32C wrote it).
    body = struct.pack("<8sI16s16sQI", b"DYNKVSH\x00", 1, keys[0], FP, PAGE, zlib.crc32(data[0]))
    old = (body + struct.pack("<I", zlib.crc32(body))).ljust(HEADER_BYTES, b"\0") + data[0].tobytes()
    raw.set(store_key("t", FP, keys[0]), old)
    got, errs = read(tier, keys)
    assert isinstance(errs[0], SharedPageError) and "format version 1, expected 2" in str(errs[0])
    assert errs[1] is None and np.array_equal(got[1], data[1])
    assert not raw.exists(store_key("t", FP, keys[0]))
    assert write(tier, keys[:1], data[:1]) == [True]
    got, errs = read(tier, keys[:1])
    assert errs == [None] and np.array_equal(got[0], data[0])
    # What the store holds now: a CRC-32C header over the page.
    value = raw.get(store_key("t", FP, keys[0]))
    assert struct.unpack_from("<I", value, 8)[0] == 2
    assert struct.unpack_from("<I", value, 52)[0] == crc32c(data[0])


def test_another_model_never_sees_the_pages(tier: SharedTier, redis_server: RedisServer,
                                            rng: np.random.Generator) -> None:
    keys, data = pages(rng, 4)
    write(tier, keys, data)
    other = tier_for(redis_server.url, fingerprint=bytes(16))
    try:
        assert other.count_stored(keys) == 0
        _, errs = read(other, keys)
        assert all(isinstance(e, SharedPageMissing) for e in errs)
        # Even a value copied under the other model's key is refused: its header names the first model.
        raw = redis.Redis(port=redis_server.ports[0])
        raw.set(store_key("t", bytes(16), keys[0]), raw.get(store_key("t", FP, keys[0])))
        _, errs = read(other, keys[:1])
        assert isinstance(errs[0], SharedPageError) and "fingerprint" in str(errs[0])
    finally:
        other.close()


def test_a_page_evicted_after_the_lookup_is_a_miss(tier: SharedTier, redis_server: RedisServer,
                                                   rng: np.random.Generator) -> None:
    keys, data = pages(rng, 3)
    write(tier, keys, data)
    assert tier.count_stored(keys) == 3
    redis.Redis(port=redis_server.ports[0]).delete(store_key("t", FP, keys[1]))
    got, errs = read(tier, keys)
    assert errs[0] is None and errs[2] is None and isinstance(errs[1], SharedPageMissing)
    assert np.array_equal(got[[0, 2]], data[[0, 2]])
    assert tier.up


def test_a_full_store_refuses_or_evicts_and_nothing_fails_worse(tmp_path: Path, rng: np.random.Generator) -> None:
    keys, data = pages(rng, 300)  # 3.6 MiB of pages against a 3 MiB store (about 1 MiB of it redis' own)
    for policy in ("noeviction", "allkeys-lru"):
        server = RedisServer(tmp_path / policy, maxmemory="3mb", policy=policy)
        (tmp_path / policy).mkdir()
        server.start()
        t = tier_for(server.url)
        try:
            ok = write(t, keys, data)
            got, errs = read(t, keys)
            good = [i for i, e in enumerate(errs) if e is None]
            print(policy, f"{sum(ok)} of {len(keys)} pages taken, {len(good)} read back")
            assert t.up
            assert all(e is None or isinstance(e, SharedPageMissing) for e in errs), errs
            assert 0 < len(good) < len(keys)
            assert np.array_equal(got[good], data[good])
            if policy == "noeviction":  # the first pages stay, the last are refused
                assert ok[0] and not ok[-1] and good == [i for i, o in enumerate(ok) if o]
            else:  # every page taken; older pages made room for newer ones (redis' LRU is sampled)
                missing = [i for i, e in enumerate(errs) if e is not None]
                assert all(ok) and sum(i < len(keys) // 2 for i in missing) > len(missing) // 2
        finally:
            t.close()
            server.stop()


def test_a_store_down_at_start_is_a_miss_then_reconnects(tmp_path: Path, rng: np.random.Generator,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    (tmp_path / "late").mkdir()
    server = RedisServer(tmp_path / "late", password="s3cret")
    server.ports = [port]
    with caplog.at_level(logging.INFO, logger="dynkv.shared"):
        t = tier_for(server.url)
        try:
            assert not t.up
            keys, data = pages(rng, 3)
            assert t.count_stored(keys) is None
            assert all(isinstance(e, StoreUnavailable) for e in read(t, keys)[1])
            assert all(isinstance(f.exception(timeout=30), StoreUnavailable)
                       for f in t.write_many([(k, memoryview(d)) for k, d in zip(keys, data)]))
            server.start()
            deadline = time.monotonic() + 60
            while not t.up and time.monotonic() < deadline:
                time.sleep(0.1)
            assert t.up, "the tier never reconnected"
            assert write(t, keys, data) == [True] * 3
            assert t.count_stored(keys) == 3
        finally:
            t.close()
            server.stop()
    text = caplog.text
    assert "running without it" in text and "connected to redis://***@127.0.0.1" in text
    assert "s3cret" not in text


def test_connections_the_server_closed_are_replaced_without_going_down(tier: SharedTier, redis_server: RedisServer,
                                                                         rng: np.random.Generator) -> None:
    keys, data = pages(rng, 12)
    assert write(tier, keys[:6], data[:6]) == [True] * 6
    raw = redis.Redis(port=redis_server.ports[0])
    assert raw.client_kill_filter(_type="normal", skipme=True) >= 1  # the tier's pooled connections
    futs = tier.write_many([(k, memoryview(row)) for k, row in zip(keys[6:], data[6:])], check=False)
    assert [f.result(timeout=30) for f in futs] == [True] * 6
    got, errs = read(tier, keys)
    assert errs == [None] * 12 and np.array_equal(got, data)
    assert tier.up and tier.downs == 0


def test_a_store_killed_mid_run_fails_reads_and_lookups_at_once(tier: SharedTier, redis_server: RedisServer,
                                                                 rng: np.random.Generator,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    keys, data = pages(rng, 6)
    write(tier, keys, data)
    redis_server.kill()
    with caplog.at_level(logging.WARNING, logger="dynkv.shared"):
        _, errs = read(tier, keys)
    assert all(isinstance(e, StoreUnavailable) for e in errs)
    assert not tier.up and tier.count_stored(keys) is None
    assert "shared tier down" in caplog.text


def test_wrong_credentials_are_never_shown(redis_server: RedisServer, tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    subprocess.run(["redis-cli", "-p", str(redis_server.ports[0]), "config", "set", "requirepass", "right"],
                   check=True, capture_output=True)
    url = f"redis://user:wr0ng@127.0.0.1:{redis_server.ports[0]}/0"
    with caplog.at_level(logging.INFO, logger="dynkv.shared"):
        t = tier_for(url)
        t.close()
        good = tier_for(url.replace("user:wr0ng", ":right"))
        assert good.up
        good.close()
    assert not t.up
    assert "wr0ng" not in caplog.text and "right@" not in caplog.text and "***@127.0.0.1" in caplog.text


def test_urls_are_checked_and_redacted() -> None:
    assert redact("rediss://u:p@h:1/0") == "rediss://***@h:1/0"
    assert redact("redis+cluster://:pw@a:1,b:2") == "redis+cluster://***@a:1,b:2"
    assert scheme_of("mooncake://127.0.0.1:50051") == "mooncake"
    with pytest.raises(ValueError, match="unknown scheme 'http'"):
        scheme_of("http://h:1")
    with pytest.raises(ValueError, match=r"'b' is not HOST:PORT") as e:
        scheme_of("redis+cluster://:topsecret@a:1,b")
    assert "topsecret" not in str(e.value)


def test_without_the_crc32c_package_the_tier_refuses_to_open_and_the_rest_starts(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """crc32c missing: SharedTier names the package at once (no page is ever checked by anything else), while a
    leader with no remote_url starts as before."""
    from harness import Model, make_leader

    from dynkv.tiers.shared import base

    monkeypatch.setattr(base, "_CRC32C_MISSING", ModuleNotFoundError("No module named 'crc32c'"))
    with pytest.raises(ImportError, match="pip install crc32c"):
        SharedTier("redis://127.0.0.1:1/0", fingerprint=b"\0" * 16, page_bytes=4096)
    leader = make_leader(Model())
    try:
        assert leader.stats()["shared_up"] is False
    finally:
        leader.close()
