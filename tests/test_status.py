"""``dynkv status`` against a real leader's metrics endpoint, and vLLM's ``vllm:dynkv_*`` page of two engines."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from harness import Model, make_leader
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from dynkv.cli import main

pytest.importorskip("vllm", reason="the connector's metrics are vLLM's")
from dynkv.connector.engine import metric_samples
from dynkv.connector.stats import DynKVPromMetrics
from dynkv.keys import block_keys
from dynkv.protocol import WorkerReport
from dynkv.status import parse_metrics
from dynkv.testing.server import free_port


def stored_leader(tmp_path, port: int):
    """A leader with a host tier of 8 pages and a disk tier, 5 pages stored (written through to disk)."""
    model = Model()
    leader = make_leader(model, host_pages=8, disk_gb=0.01, disk_paths=[str(tmp_path)], disk_admit_min_hits=0,
                         metrics_port=port)
    keys = block_keys(model.fingerprint(), list(range(5 * model.block_size)), model.block_size)
    leader.store("r", keys, list(range(5)))
    plan = leader.build_plan()
    leader.update(WorkerReport(done={op.job: 1 for op in plan.stores}))
    while not leader.idle():  # disk writes finish
        leader.build_plan()
    leader.build_plan()  # gauges follow the index
    return leader


def test_status_shows_each_tiers_capacity_use_and_health(tmp_path, capsys) -> None:
    port = free_port()
    leader = stored_leader(tmp_path, port)
    try:
        assert main(["status", str(port), "--json"]) == 0
        tiers = {t["tier"]: t for t in json.loads(capsys.readouterr().out)["tiers"]}
        assert tiers["host"]["capacity"] == 8 and tiers["host"]["stored"] == 5 and tiers["host"]["health"] == "ok"
        assert tiers["disk"]["capacity"] == leader.disk.num_pages and tiers["disk"]["stored"] == 5
        assert abs(tiers["host"]["used"] - 5 / 8) < 1e-9
        assert tiers["host"]["gated"] is False, "auto admission starts ungated"
        leader.metrics.store_errors.labels("disk").inc(2)  # as a failed write through counts it
        assert main(["status", f"127.0.0.1:{port}"]) == 1
        table = capsys.readouterr().out.splitlines()
        assert table[0].split()[:3] == ["engine", "tier", "health"]
        disk = next(line.split() for line in table if line.split()[1] == "disk")
        assert disk[2] == "errors" and disk[-2] == "2" and disk[-1] == "all"
    finally:
        leader.close()
    assert main(["status", str(port)]) == 1  # the engine is gone
    assert "unreachable: http://127.0.0.1:" in capsys.readouterr().out


def test_status_reads_vllms_page_of_several_engines(tmp_path) -> None:
    """vLLM's /metrics carries each engine's dynkv metrics as vllm:dynkv_* under an engine label."""
    leader = stored_leader(tmp_path, None)
    try:
        counters, gauges = metric_samples(leader.metrics.registry)
    finally:
        leader.close()
    reg = CollectorRegistry()
    types = {cls: (lambda cls: lambda *a, **k: cls(*a, registry=reg, **k))(cls) for cls in (Counter, Gauge, Histogram)}
    prom = DynKVPromMetrics(SimpleNamespace(kv_transfer_config=None), types, ["engine"], {0: ["0"], 1: ["1"]})
    for engine in (0, 1):
        prom.observe({"counters": counters, "gauges": gauges}, engine)
    statuses = parse_metrics(generate_latest(reg).decode())
    assert [(t.engine, t.tier, t.stored) for t in statuses] == [("0", "host", 5), ("0", "disk", 5),
                                                                ("1", "host", 5), ("1", "disk", 5)]
