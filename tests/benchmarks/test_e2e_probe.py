"""The probes of `dynkv bench e2e` that run without vLLM: variant parsing, trace summaries, host samples."""

from __future__ import annotations

import threading
import time

import pytest

from dynkv.benchmarks.e2e.probe import HostSample, parse_variant, trace_summary


def test_parse_variant_reads_knobs_and_names_what_is_wrong() -> None:
    assert parse_variant("hi:priority=-1,ctas=16") == ("hi", {"priority": -1, "ctas": 16})
    assert parse_variant("d:paths=disk,read_chunk=0") == ("d", {"paths": "disk", "read_chunk": 0})
    assert parse_variant("w:store_launch_kib=0,paths=decode") == ("w", {"store_launch_kib": 0, "paths": "decode"})
    assert parse_variant("late:early=0,paths=host") == ("late", {"early": 0, "paths": "host"})
    assert parse_variant("lb:last_block=1,paths=disk") == ("lb", {"last_block": 1, "paths": "disk"})
    assert parse_variant("x:ctas=4,threads=1024,smem_kib=200") == ("x", {"ctas": 4, "threads": 1024, "smem_kib": 200})
    assert parse_variant("k:copy=kernel,paths=host") == ("k", {"copy": "kernel", "paths": "host"})
    for bad, words in (("nocolon", "NAME:key=value"), ("x:color=red", "'color=red'"), ("x:ctas=0", "below 1"),
                       ("x:early=2", "expected 0 or 1"), ("x:last_block=3", "last_block=3: expected 0 or 1"),
                       ("x:ctas=many", "not a int"), ("x:paths=gpu", "paths='gpu'"), ("x:threads=16", "below 32"),
                       ("x:threads=100", "multiple of 32"), ("x:threads=2048", "up to 1024"),
                       ("x:smem_kib=-1", "below 0"), ("x:copy=dma", "copy='dma': expected kernel or staged")):
        with pytest.raises(ValueError, match=words):
            parse_variant(bad)


def test_trace_summary_finds_the_compute_stream_and_its_idle_time() -> None:
    def k(name: str, ts: float, dur: float, stream: int) -> dict:
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}

    trace = {"traceEvents": [
        k("copy_tiles_kernel<8>", 0, 1000, 20), k("gemm", 1000, 500, 7), k("copy_tiles_kernel<8>", 1000, 1000, 20),
        k("attention", 2000, 1000, 7), {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 9}]}
    s = trace_summary(trace)
    assert s["kernels"] == 4 and s["compute_stream"] == 7
    assert s["streams"]["7"]["span_ms"] == 2.0 and s["streams"]["7"]["idle_ms"] == 0.5
    assert s["copy"] == {"kernels": 2, "first_ms": 0.0, "last_ms": 2.0, "busy_ms": 2.0}
    assert trace_summary({"traceEvents": []}) == {"kernels": 0}
    assert "allreduce_ms" not in s and "cpu_ms_per_layer" not in s


def test_trace_summary_measures_the_all_reduce_and_the_cpu_pace_of_the_last_forward() -> None:
    def ev(name: str, ts: float, dur: float = 10, cat: str = "cpu_op") -> dict:
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"stream": 7}}

    attn = "vllm::unified_attention_with_output"
    # Two forwards of 3 layers: the first 100 us a layer, the last 500 us; 50 ms between them.
    events = [ev(attn, t) for t in (0, 100, 200, 50_000, 50_500, 51_000)]
    events += [ev("void vllm::cross_device_reduce_1stage<bf16, 2>", 0, 2000, "kernel"),
               ev("ncclDevKernel_AllReduce_RING_LL", 3000, 1000, "kernel"), ev("gemm", 5000, 100, "kernel")]
    s = trace_summary({"traceEvents": events})
    assert s["allreduce_ms"] == 3.0
    assert s["cpu_ms_per_layer"] == 0.5


def test_host_sample_charges_cpu_to_the_thread_that_used_it() -> None:
    stop = threading.Event()

    def spin() -> None:
        x = 0
        while not stop.is_set():
            x += 1

    a = HostSample(None)
    spinners = [threading.Thread(target=spin, name=f"probe-spin_{i}") for i in range(2)]
    for t in spinners:
        t.start()
    time.sleep(0.3)
    b = HostSample(None)  # while they run: a thread that ended has left /proc
    stop.set()
    for t in spinners:
        t.join()
    d = HostSample.delta(a, b)
    assert d["wall_ms"] >= 300 and "device" not in d
    # Python threads show up under their own names; both spinners count under one.
    assert sum(v for k, v in d["threads_cpu_ms"].items() if k.startswith("probe-spin")) >= 100, d
    assert 0 <= d["cpu"]["busy_cores"] and 0 <= d["cpu"]["iowait_cores"]


def test_host_sample_device_arithmetic() -> None:
    a, b = object.__new__(HostSample), object.__new__(HostSample)
    for s, t, disk in ((a, 10.0, [0] * 11), (b, 10.5, [100, 0, 204800, 0, 0, 0, 2048, 0, 0, 400, 8000])):
        s.device, s.t, s.disk, s.cpu, s.threads = "vdz", t, disk, None, {}
    d = HostSample.delta(a, b)["device"]
    # 100 reads of 204800 sectors: 104.9 MB, 1024 KiB each; busy 400 of 500 ms; 8000 weighted ms / 500 ms.
    assert d == {"name": "vdz", "read_mb": 104.9, "reads": 100, "mean_read_kb": 1024.0, "write_mb": 1.0,
                 "busy_pct": 80.0, "mean_queue": 16.0}


def test_io_threads_variant_swaps_the_disk_pool_and_puts_it_back(tmp_path) -> None:
    from types import SimpleNamespace

    from dynkv.tiers.disk import DiskTier
    from dynkv.benchmarks.e2e.probe import apply_variant

    disk = DiskTier([str(tmp_path)], 8, 4096, fingerprint=b"f" * 16, direct_io=False, io_threads=4)
    try:
        conn = SimpleNamespace(leader=SimpleNamespace(disk=disk))
        restore = apply_variant(conn, {"io_threads": 2, "read_chunk": 1})
        assert disk.io_threads == 2 and disk.read_chunk == 1
        key = bytes(range(16))
        disk.write(3, key, memoryview(bytearray(b"x" * 4096))).result()
        dst = bytearray(4096)
        [f] = disk.read_many([(3, key, memoryview(dst))])
        f.result()
        assert dst == b"x" * 4096
        restore()
        assert disk.io_threads == 4 and disk.read_chunk == 0
        with pytest.raises(ValueError, match="io_threads=0"):
            disk.set_io_threads(0)
    finally:
        disk.close()
    with pytest.raises(RuntimeError, match="no disk tier"):
        apply_variant(SimpleNamespace(leader=SimpleNamespace(disk=None)), {"io_threads": 2})


def test_store_launch_variant_sets_the_stores_launch_size_and_puts_it_back() -> None:
    from types import SimpleNamespace

    from dynkv import ops
    from dynkv.benchmarks.e2e.probe import apply_variant

    before = ops.get_tuning()
    restore = apply_variant(SimpleNamespace(leader=SimpleNamespace(disk=None)), {"store_launch_kib": 8192})
    try:
        assert ops.get_tuning().for_direction("d2h")[3] == 8 << 20
        assert ops.get_tuning().for_direction("h2d")[3] == before.for_direction("h2d")[3]
    finally:
        restore()
    assert ops.get_tuning() == before


def test_switch_variants_set_the_connectors_attributes_and_put_them_back() -> None:
    from types import SimpleNamespace

    from dynkv.benchmarks.e2e.probe import apply_variant

    conn = SimpleNamespace(leader=SimpleNamespace(disk=None), early_loads=True, load_last_block=False)
    restore = apply_variant(conn, {"early": 0, "last_block": 1})
    assert conn.early_loads is False and conn.load_last_block is True
    restore()
    assert conn.early_loads is True and conn.load_last_block is False
    with pytest.raises(RuntimeError, match="no disk tier"):  # a failed variant leaves nothing changed
        apply_variant(conn, {"last_block": 1, "read_chunk": 4})
    assert conn.load_last_block is False


def test_variant_hits_take_turns_and_put_the_knobs_back() -> None:
    """`bench e2e`'s variants run one hit each per round (a drifting host touches them alike)."""
    from types import SimpleNamespace

    from dynkv.benchmarks.e2e import engine as e2e_engine

    order: list[tuple[str, bool]] = []
    conn = SimpleNamespace(leader=SimpleNamespace(disk=None), early_loads=True)

    class FakeEngine:
        spec = {"connector": "dynkv", "name": "dynkv", "lengths": [64], "variants": {
            "late": {"early": 0, "paths": "host"}, "early": {"early": 1, "paths": "host"},
            "dec": {"early": 0, "paths": "decode"}}}
        connector = conn
        report: dict = {"errors": []}
        watch = None  # no KV check

        def ttft(self, prompt: list[int]) -> dict:
            order.append(("hit", conn.early_loads))
            return {"ttft_s": 0.01}

        def check(self, prompt: list[int]) -> dict:
            return {}

        def reset_device_cache(self) -> None: ...
        def flush_host_tier(self) -> None: ...
        def save(self) -> None: ...

    rec: dict = {}
    e2e_engine._paths(FakeEngine(), [1, 2, 3], rec, 3, 64)
    assert len(rec["host@late"]) == len(rec["host@early"]) == 3 and "host@dec" not in rec
    variant_hits = order[-6:]  # after the default paths' hits: late, early, late, early, ...
    assert variant_hits == [("hit", False), ("hit", True)] * 3, variant_hits
    assert conn.early_loads is True, "every variant's knobs were put back"


def test_copy_footprint_variant_sets_the_loads_threads_and_reserved_smem_and_puts_them_back() -> None:
    """``threads`` and ``smem_kib`` change host-to-GPU copies only, and the old tuning comes back whole."""
    from types import SimpleNamespace

    from dynkv import ops
    from dynkv.benchmarks.e2e.probe import apply_variant

    before = ops.get_tuning()
    restore = apply_variant(SimpleNamespace(leader=SimpleNamespace(disk=None)), {"threads": 1024, "smem_kib": 200})
    try:
        h2d, d2h = ops.get_tuning().for_direction("h2d"), ops.get_tuning().for_direction("d2h")
        assert h2d[1] == 1024 and h2d[4] == 200 << 10
        assert d2h[1] == before.for_direction("d2h")[1] and d2h[4] == before.for_direction("d2h")[4] == 0
    finally:
        restore()
    assert ops.get_tuning() == before


def test_launch_timing_reads_only_dynkv_workers_in_this_process() -> None:
    """vLLM's own connectors have no dynkv pool: the bench's launch timing finds no worker there, and no error."""
    from types import SimpleNamespace

    from dynkv.benchmarks.e2e.engine import _Engine

    for connector in (None, SimpleNamespace(), SimpleNamespace(pool_name="dynkv-no-such-pool")):
        engine = SimpleNamespace(connector=connector)
        engine.dynkv_worker = lambda engine=engine: _Engine.dynkv_worker(engine)
        assert _Engine.dynkv_worker(engine) is None
        assert _Engine.sync_launch_s(engine) == {}
