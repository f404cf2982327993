"""The engine's side of KV snapshots: ``/kv/snapshot`` on the metrics port lists vLLM's cached device blocks (a
hash once over KV-cache groups) and the pages each tier's events announced, with their parents and tokens."""

from __future__ import annotations

import logging
import urllib.request
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from dynkv.connector.events import KVEvents  # noqa: E402
from dynkv.connector.snapshot import SnapshotDesk, device_block_hashes  # noqa: E402
from dynkv.index import IndexEvent  # noqa: E402
from dynkv.kvsnapshot import decode_snapshot  # noqa: E402
from dynkv.metrics import Metrics  # noqa: E402
from dynkv.testing.server import free_port  # noqa: E402


def test_snapshot_lists_device_blocks_and_the_tiers_pages_over_http() -> None:
    from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash as ext

    on = SimpleNamespace(kv_events_config=SimpleNamespace(enable_kv_cache_events=True))
    ev = KVEvents(on, block_size=2)
    hashes = [bytes([i + 1]) * 32 for i in range(3)]
    ev.remember([b"k0", b"k1", b"k2"], hashes, [10, 11, 12, 13, 14, 15], None, 0, 3)  # k2 is never stored
    ev.convert([IndexEvent("stored", "host", b"k0"), IndexEvent("stored", "host", b"k1"),
                IndexEvent("stored", "disk", b"k1"), IndexEvent("removed", "host", b"k0")])
    desk = SnapshotDesk(ev)
    metrics = Metrics()
    metrics.routes["/kv/snapshot"] = desk.serve
    port = free_port()
    metrics.serve(port)

    def get(path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=60) as r:
            return r.read()

    try:
        snap = decode_snapshot(get("/kv/snapshot"))
        assert snap.device is None and snap.block_size == 2  # no block pool bound: the device is not listed
        k1 = [(ext(hashes[1]), ext(hashes[0]), [12, 13])]
        assert {m: [(p.block_hash, p.parent, p.tokens) for p in pages] for m, pages in snap.media.items()} == {
            "CPU": k1, "STORAGE": k1}
        d0, d1 = bytes([7]) * 32, bytes([8]) * 32
        # vLLM's prefix-cache map: one key per KV-cache group and hash.
        cache = {make_block_hash_with_group_id(d0, 0): object(), make_block_hash_with_group_id(d0, 1): object(),
                 make_block_hash_with_group_id(d1, 0): object()}
        desk.bind_pool(SimpleNamespace(cached_block_hash_to_block=SimpleNamespace(_cache=cache)))
        ev.convert([IndexEvent("removed", "disk", b"k1")])
        snap = decode_snapshot(get("/kv/snapshot"))
        assert snap.device == [ext(d0), ext(d1)]
        assert [p.block_hash for p in snap.media["CPU"]] == [ext(hashes[1])] and snap.media["STORAGE"] == []
        assert b"dynkv_" in get("/metrics")  # the metrics still answer beside it
    finally:
        metrics.close()


@pytest.mark.parametrize("pool", [
    None,  # vLLM never called bind_gpu_block_pool
    SimpleNamespace(cached_block_hash_to_block=[{b"h" * 32: {1: object()}}]),  # an older vLLM's list of dicts
    SimpleNamespace(cached_block_hash_to_block=SimpleNamespace(_cache={7: object()})),  # keys that are no hashes
], ids=["unbound", "other-layout", "other-keys"])
def test_snapshot_without_a_device_view_still_lists_the_tiers_and_warns_once(
        pool: object, caplog: pytest.LogCaptureFixture) -> None:
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash as ext

    on = SimpleNamespace(kv_events_config=SimpleNamespace(enable_kv_cache_events=True))
    ev = KVEvents(on, block_size=2)
    hashes = [bytes([i + 1]) * 32 for i in range(2)]
    ev.remember([b"k0", b"k1"], hashes, [10, 11, 12, 13], None, 0, 2)
    ev.convert([IndexEvent("stored", "host", b"k0"), IndexEvent("stored", "disk", b"k1")])
    desk = SnapshotDesk(ev)
    if pool is not None:
        desk.bind_pool(pool)
    with caplog.at_level(logging.WARNING, logger="dynkv.connector"):
        snaps = [desk.serve() for _ in range(3)]
    for status, body in snaps:
        snap = decode_snapshot(body)
        assert status == 200 and snap.device is None
        assert {m: [(p.block_hash, p.parent, p.tokens) for p in pages] for m, pages in snap.media.items()} == {
            "CPU": [(ext(hashes[0]), None, [10, 11])], "STORAGE": [(ext(hashes[1]), ext(hashes[0]), [12, 13])]}
    warnings = [r for r in caplog.records if "no device view" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


def test_device_block_hashes_lists_each_hash_once_over_groups() -> None:
    from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

    d0, d1 = bytes([7]) * 32, bytes([8]) * 32
    cache = {make_block_hash_with_group_id(d1, 0): object(), make_block_hash_with_group_id(d0, 0): object(),
             make_block_hash_with_group_id(d1, 1): object()}
    assert device_block_hashes(SimpleNamespace(cached_block_hash_to_block=SimpleNamespace(_cache=cache))) == [d1, d0]
    assert device_block_hashes(SimpleNamespace(cached_block_hash_to_block=SimpleNamespace(_cache={}))) == []


def test_device_block_hashes_reads_the_installed_vllms_block_pool() -> None:
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

    pool = BlockPool(num_gpu_blocks=6, enable_caching=True, hash_block_size=2)
    assert device_block_hashes(pool) == []
    blocks = pool.get_new_blocks(3)
    d = [bytes([i + 1]) * 32 for i in range(2)]
    for block, key in zip(blocks, [make_block_hash_with_group_id(d[0], 0), make_block_hash_with_group_id(d[1], 0),
                                   make_block_hash_with_group_id(d[0], 1)]):
        pool.cached_block_hash_to_block.insert(key, block)
    assert device_block_hashes(pool) == d
