"""dynkv's metrics: plain-number counters and gauges behind a Prometheus collector."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from dynkv.connector.engine import metric_samples
from dynkv.metrics import Metrics


def test_counters_and_gauges_read_as_prometheus_samples() -> None:
    m = Metrics()
    m.hits.labels("host").inc(3)
    m.hits.labels("host").inc()
    m.misses.inc(2)
    m.occupancy.labels("host", "stored").set(7)
    m.refused.labels("disk", "filter").inc(5)
    m.latency.labels("d2h").observe(0.01)
    assert m.value("dynkv_hits_total", tier="host") == 4
    assert m.value("dynkv_misses_total") == 2
    assert m.value("dynkv_tier_pages", tier="host", state="stored") == 7
    assert m.value("dynkv_admissions_refused_total", tier="disk", reason="filter") == 5
    assert m.value("dynkv_transfer_seconds_count", direction="d2h") == 1
    assert m.value("dynkv_hits_total", tier="disk") == 0  # never touched
    text = generate_latest(m.registry).decode()
    assert 'dynkv_hits_total{tier="host"} 4.0' in text
    assert "# TYPE dynkv_tier_pages gauge" in text and "# TYPE dynkv_hits_total counter" in text
    assert 'dynkv_admissions_refused_total{reason="filter",tier="disk"} 5.0' in text


def test_samples_match_the_registry_without_the_histogram() -> None:
    m = Metrics()
    m.pages.labels("d2h").inc(4)
    m.bytes.labels("d2h").inc(4096)
    m.capacity.labels("host").set(16)
    m.refused.labels("host", "full").inc(1)
    m.latency.labels("d2h").observe(0.5)
    counters, gauges = m.samples()
    all_counters, all_gauges = metric_samples(m.registry)
    assert counters == {k: v for k, v in all_counters.items() if not k.startswith("dynkv_transfer_seconds")}
    assert gauges == all_gauges
    assert counters["dynkv_admissions_refused_total{reason=full,tier=host}"] == 1
    assert counters["dynkv_misses_total{}"] == 0


def test_version_moves_only_when_a_value_changes() -> None:
    m = Metrics()
    v = m.version
    m.evictions.labels("host").inc(0)
    m.capacity.labels("host").set(0)
    assert m.version == v, "no change, no new version"
    m.capacity.labels("host").set(8)
    m.capacity.labels("host").set(8)
    assert m.version == v + 1
    m.evictions.labels("host").inc(2)
    assert m.version == v + 2


def test_bad_updates_are_refused() -> None:
    m = Metrics()
    with pytest.raises(ValueError, match="only go up"):
        m.pages.labels("d2h").inc(-1)
    with pytest.raises(ValueError, match=r"string labels \('tier', 'state'\)"):
        m.occupancy.labels("host")
    with pytest.raises(ValueError, match="string labels"):
        m.hits.labels(3)
    assert m.value("dynkv_pages_moved_total", direction="d2h") == 0
