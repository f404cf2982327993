"""Prometheus metrics of one dynkv engine (``dynkv_*``).

Each leader owns a :class:`Metrics` on its own ``CollectorRegistry``, so
several engines (or tests) in one process never collide; the standalone
endpoint (``metrics_port``) and vLLM's hooks both read that registry.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Counters, gauges and histograms named ``dynkv_*``.

    Labels: ``tier`` (``device``/``host``/``disk``), ``direction``
    (``h2d``, ``d2h``, ``host_to_disk``, ``disk_to_host``), ``reason``.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.hits = Counter("dynkv_hits", "Blocks found in a tier at lookup", ["tier"], registry=r)
        self.misses = Counter("dynkv_misses", "Blocks looked up and found in no dynkv tier", registry=r)
        self.pages = Counter("dynkv_pages_moved", "Pages (or page slices) moved", ["direction"], registry=r)
        self.bytes = Counter("dynkv_bytes_moved", "Bytes moved", ["direction"], registry=r)
        self.latency = Histogram(
            "dynkv_transfer_seconds", "Time of one transfer job", ["direction"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.occupancy = Gauge("dynkv_tier_pages", "Pages held per tier and state", ["tier", "state"], registry=r)
        self.capacity = Gauge("dynkv_tier_capacity_pages", "Capacity of each tier in pages", ["tier"], registry=r)
        self.evictions = Counter("dynkv_evictions", "Pages evicted", ["tier"], registry=r)
        self.refused = Counter(
            "dynkv_admissions_refused", "Pages not admitted to a tier (full, filtered, or busy)", ["tier", "reason"],
            registry=r,
        )
        self.load_errors = Counter("dynkv_load_errors", "Blocks whose load failed (recomputed)", ["reason"], registry=r)
        self.store_errors = Counter("dynkv_store_errors", "Pages whose store failed", ["tier"], registry=r)
        # The same counters and gauges without the histogram: cheap enough to read at every step.
        self.steady = CollectorRegistry(auto_describe=False)
        for m in (self.hits, self.misses, self.pages, self.bytes, self.occupancy, self.capacity, self.evictions,
                  self.refused, self.load_errors, self.store_errors):
            self.steady.register(m)

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Expose the registry over HTTP (``/metrics``) on ``addr:port``."""
        start_http_server(port, addr=addr, registry=self.registry)

    def value(self, name: str, **labels: str) -> float:
        """Current value of a sample, e.g. ``value("dynkv_hits_total", tier="host")``; 0 when absent."""
        v = self.registry.get_sample_value(name, labels or None)
        return 0.0 if v is None else float(v)
