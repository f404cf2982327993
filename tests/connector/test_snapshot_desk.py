"""The engine's side of KV snapshots: ``/kv/snapshot`` on the metrics port waits for the scheduler's next step,
which copies the state and hands out the marker for its batch; what changes after that step is not in it."""

from __future__ import annotations

import threading
import time
import urllib.request
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from dynkv.connector.events import KVEvents  # noqa: E402
from dynkv.connector.snapshot import SnapshotDesk  # noqa: E402
from dynkv.index import IndexEvent  # noqa: E402
from dynkv.kvsnapshot import MARKER_PREFIX, decode_snapshot  # noqa: E402
from dynkv.metrics import Metrics  # noqa: E402
from dynkv.testing.server import free_port  # noqa: E402


def test_snapshot_is_the_state_of_the_step_that_carries_its_marker(tmp_path) -> None:
    from vllm.distributed.kv_events import BlockRemoved
    from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash as ext

    on = SimpleNamespace(kv_events_config=SimpleNamespace(enable_kv_cache_events=True))
    ev = KVEvents(on, block_size=2)
    hashes = [bytes([i + 1]) * 32 for i in range(3)]
    ev.remember([b"k0", b"k1", b"k2"], hashes, [10, 11, 12, 13, 14, 15], None, 0, 3)
    ev.convert([IndexEvent("stored", "host", b"k0"), IndexEvent("stored", "host", b"k1"),
                IndexEvent("stored", "disk", b"k1")])
    desk = SnapshotDesk(ev)
    d0, d1 = bytes([7]) * 32, bytes([8]) * 32
    # vLLM's prefix-cache map: one key per KV-cache group and hash.
    cache = {make_block_hash_with_group_id(d0, 0): object(), make_block_hash_with_group_id(d0, 1): object(),
             make_block_hash_with_group_id(d1, 0): object()}
    desk.bind_pool(SimpleNamespace(cached_block_hash_to_block=SimpleNamespace(_cache=cache)))
    metrics = Metrics()
    metrics.routes["/kv/snapshot"] = desk.serve
    port = free_port()
    metrics.serve(port)
    got: dict[str, bytes] = {}

    def client() -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/kv/snapshot", timeout=60) as r:
            got["body"] = r.read()

    t = threading.Thread(target=client)
    try:
        assert not desk.wanted() and desk.take() == []  # nobody asked: no marker
        t.start()
        deadline = time.monotonic() + 60
        while not desk.wanted():
            assert time.monotonic() < deadline, "the request never reached the desk"
            time.sleep(0.01)
        # The scheduler's step: its tier events, then the snapshot and its marker, last in the batch.
        out = ev.convert([IndexEvent("removed", "host", b"k0")]) + desk.take()
        assert isinstance(out[-1], BlockRemoved) and out[-1].block_hashes == []
        assert out[-1].medium.startswith(MARKER_PREFIX)
        ev.convert([IndexEvent("stored", "host", b"k2")])  # a later step: not in the snapshot
        cache.clear()
        t.join(60)
        snap = decode_snapshot(got["body"])
        assert snap.marker == out[-1].medium and snap.block_size == 2 and not desk.wanted()
        assert snap.device == [ext(d0), ext(d1)]
        assert [(p.block_hash, p.parent, p.tokens) for p in snap.media["CPU"]] == [(ext(hashes[1]), ext(hashes[0]),
                                                                                     [12, 13])]
        assert [(p.block_hash, p.parent, p.tokens) for p in snap.media["STORAGE"]] == [
            (ext(hashes[1]), ext(hashes[0]), [12, 13])]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as r:
            assert b"dynkv_" in r.read()  # the metrics still answer beside it
    finally:
        t.join(60)
        metrics.close()


def test_snapshot_without_a_step_answers_503_and_forgets_the_request() -> None:
    on = SimpleNamespace(kv_events_config=SimpleNamespace(enable_kv_cache_events=True))
    desk = SnapshotDesk(KVEvents(on, block_size=2), timeout_s=0.2)
    status, body = desk.serve()
    assert status == 503 and b"did not step" in body and not desk.wanted() and desk.take() == []
