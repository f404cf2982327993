"""Prometheus metrics of one dynkv engine (``dynkv_*``).

Each leader owns a :class:`Metrics` on its own ``CollectorRegistry``, so
several engines (or tests) in one process never collide; the standalone
endpoint (``metrics_port``) and vLLM's hooks both read that registry.

Counters and gauges are plain numbers behind a Prometheus custom collector:
vLLM asks for the connector's stats at every scheduler step, and reading
them is then a version check (nothing changed) or a copy of a small dict,
where collecting Prometheus metric objects cost most of a decode step's
connector time. The latency histogram stays a ``prometheus_client``
``Histogram``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Series:
    """One labelled series of a counter or gauge."""

    __slots__ = ("_family", "key", "labels", "value")

    def __init__(self, family: _Family, labels: tuple[str, ...]) -> None:
        self._family = family
        self.labels = labels
        self.value = 0.0
        pairs = ",".join(f"{k}={v}" for k, v in sorted(zip(family.labelnames, labels)))
        self.key = f"{family.sample}{{{pairs}}}"  # the key metric_samples gives the same sample

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError(f"{self._family.name}: counters only go up (inc by {amount})")
        if amount:
            self._family.owner._update(self, amount, add=True)

    def set(self, value: float) -> None:
        if value != self.value:
            self._family.owner._update(self, float(value), add=False)


class _Family:
    """A counter or gauge and its series, by label values."""

    def __init__(self, owner: Metrics, kind: str, name: str, doc: str, labelnames: tuple[str, ...] = ()) -> None:
        self.owner, self.kind, self.name, self.doc, self.labelnames = owner, kind, name, doc, labelnames
        self.sample = f"{name}_total" if kind == "counter" else name
        self._series: dict[tuple[str, ...], _Series] = {}

    def labels(self, *values: str) -> _Series:
        s = self._series.get(values)
        if s is None:
            if len(values) != len(self.labelnames) or not all(isinstance(v, str) for v in values):
                raise ValueError(f"{self.name} takes string labels {self.labelnames}, got {values!r}")
            s = self._series[values] = _Series(self, values)
        return s

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)

    def series(self) -> list[_Series]:
        return list(self._series.values())

    def family(self) -> CounterMetricFamily | GaugeMetricFamily:
        cls = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        fam = cls(self.name, self.doc, labels=list(self.labelnames))
        for s in self.series():
            fam.add_metric(list(s.labels), s.value)
        return fam


class Metrics:
    """Counters, gauges and histograms named ``dynkv_*``.

    Labels: ``tier`` (``device``/``host``/``disk``/``shared``/``remote``),
    ``direction`` (``h2d``, ``d2h``, ``host_to_disk``, ``disk_to_host``,
    ``staging_to_disk``, ``disk_to_staging``, ``host_to_shared``,
    ``shared_to_host``, ``shared_to_staging``), ``reason``.
    Counters and gauges take ``.labels(...).inc(n)`` / ``.set(v)`` as in
    ``prometheus_client``.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._lock = threading.Lock()
        self.version = 0  # bumped by every change of a counter or gauge
        self.routes: dict[str, Callable[[], tuple[int, bytes]]] = {}  # served beside /metrics (see serve)
        self._families: list[_Family] = []

        def add(kind: str, name: str, doc: str, *labels: str) -> _Family:
            self._families.append(_Family(self, kind, name, doc, labels))
            return self._families[-1]

        self.hits = add("counter", "dynkv_hits", "Blocks found in a tier at lookup", "tier")
        self.misses = add("counter", "dynkv_misses", "Blocks looked up and found in no dynkv tier")
        self.pages = add("counter", "dynkv_pages_moved", "Pages (or page slices) moved", "direction")
        self.bytes = add("counter", "dynkv_bytes_moved", "Bytes moved", "direction")
        self.occupancy = add("gauge", "dynkv_tier_pages", "Pages held per tier and state", "tier", "state")
        self.capacity = add("gauge", "dynkv_tier_capacity_pages", "Capacity of each tier in pages", "tier")
        self.staging = add("gauge", "dynkv_staging_pages", "Host-pool pages outside the host tier that disk and "
                           "shared-tier hits getting no host slot are read into (state=capacity, state=in_use)",
                           "state")
        self.evictions = add("counter", "dynkv_evictions", "Pages evicted", "tier")
        self.gated = add("gauge", "dynkv_tier_admission_gated", "1 while a tier admits new pages only if seen more "
                         "often than the page they would evict (host_admission frequency, or auto on cyclic traffic)",
                         "tier")
        self.refused = add("counter", "dynkv_admissions_refused",
                           "Pages not admitted to a tier (full, filtered, busy, backlog full, or writes off; "
                           "around_* for pages offered to the disk tier past the host tier: filter, backlog, off, "
                           "staging)", "tier", "reason")
        self.load_errors = add("counter", "dynkv_load_errors", "Blocks whose load failed (recomputed)", "reason")
        self.remote_rejected = add("counter", "dynkv_remote_rejected", "Requests whose kv_transfer_params were "
                                   "refused (their prompt recomputed), by reason: params, model, mac, expired, key, "
                                   "not_accepted", "reason")
        self.store_errors = add("counter", "dynkv_store_errors", "Pages whose store failed", "tier")
        self.writes_on = add("gauge", "dynkv_tier_writes_on",
                             "0 while a tier's writes are stopped after failures in a row, else 1", "tier")
        self.cost_tokens = add("counter", "dynkv_cost_tokens", "Tokens of disk- and shared-tier matches the cost "
                               "model read (choice=load) or left to recompute (choice=recompute), read as a probe that "
                               "re-measures a tier the model had refused for a while (choice=probe), and of loads that "
                               "gave up waiting for their disk reads (choice=gave_up)", "choice")
        self.disk_given_up = add("counter", "dynkv_disk_reads_given_up", "Disk pages of loads that stopped waiting "
                                 "for them (recomputed): cancelled before their read started (state=cancelled), or "
                                 "read anyway into the host tier, or into a staging page then freed (state=landed)", "state")
        self.writes_skipped = add("counter", "dynkv_disk_writes_skipped", "Write-through to the disk tier skipped "
                                  "because its write backlog (disk_write_backlog_gb) was full: what=pages, what=bytes "
                                  "(the pages stay in the host tier only)", "what")
        self.cost_rates = add("gauge", "dynkv_cost_estimate", "The cost model's measures: prefill_tokens_per_s, "
                              "disk_bytes_per_s, disk_queue_bytes, shared_bytes_per_s, shared_queue_bytes", "what")
        self.copy_path = add("gauge", "dynkv_copy_path", "1 for the copy path each direction takes (h2d: loads, "
                             "d2h: stores), 0 for the other", "direction", "path")
        self.copy_path_gbps = add("gauge", "dynkv_copy_path_gbps", "GB/s each copy path, and a plain memcpy, "
                                  "reached in the worker's calibration", "direction", "path")
        self.tier_misses = add("counter", "dynkv_tier_misses", "Pages a tier was asked for and did not serve: shared: "
                               "absent at lookup past the local match, or evicted by the store before its read", "tier")
        self.lookup_timeouts = add("counter", "dynkv_lookup_timeouts", "Lookups in a tier that gave up waiting (the "
                                   "store slow, busy or down): the request's pages there count as misses", "tier")
        self.tier_up = add("gauge", "dynkv_tier_up", "1 while a tier's store is connected, 0 while it is down", "tier")
        self.misses.labels()  # exposed at 0 from the start, as prometheus_client does for unlabelled metrics
        self.registry.register(_Collector(self))
        self.latency = Histogram(
            "dynkv_transfer_seconds", "Time of one transfer job", ["direction"], buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def _update(self, series: _Series, value: float, *, add: bool) -> None:
        with self._lock:  # a read-modify-write: increments from two threads both count
            series.value = series.value + value if add else value
            self.version += 1

    def samples(self) -> tuple[dict[str, float], dict[str, float]]:
        """``(counters, gauges)`` of the counters and gauges (no histogram), keyed as ``metric_samples`` keys them."""
        counters: dict[str, float] = {}
        gauges: dict[str, float] = {}
        with self._lock:
            for fam in self._families:
                target = counters if fam.kind == "counter" else gauges
                for s in fam.series():
                    target[s.key] = s.value
        return counters, gauges

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Expose the registry over HTTP (``/metrics``) on ``addr:port`` until :meth:`close`.

        Paths in :attr:`routes` (``path -> () -> (status, body)``, e.g. the
        connector's ``/kv/snapshot``) are answered by their handler, each
        request on a thread of its own.
        """
        from wsgiref.simple_server import WSGIRequestHandler, make_server

        from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app

        self.close()
        metrics_app = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
            route = self.routes.get(environ.get("PATH_INFO", ""))
            if route is None:
                return metrics_app(environ, start_response)
            status, body = route()
            start_response(f"{status} {'OK' if status == 200 else 'Unavailable'}",
                           [("Content-Type", "application/octet-stream" if status == 200 else "text/plain"),
                            ("Content-Length", str(len(body)))])
            return [body]

        class Quiet(WSGIRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

        httpd = make_server(addr, port, app, ThreadingWSGIServer, handler_class=Quiet)
        thread = threading.Thread(target=httpd.serve_forever, name="dynkv-metrics-http", daemon=True)
        thread.start()
        self._server = (httpd, thread)

    def close(self) -> None:
        """Stop serving over HTTP (the port is free again); the metrics stay readable here."""
        served, self._server = getattr(self, "_server", None), None
        if served:
            httpd, thread = served
            httpd.shutdown()
            httpd.server_close()
            thread.join()

    def value(self, name: str, **labels: str) -> float:
        """Current value of a sample, e.g. ``value("dynkv_hits_total", tier="host")``; 0 when absent."""
        v = self.registry.get_sample_value(name, labels or None)
        return 0.0 if v is None else float(v)


class _Collector:
    """The counters and gauges of a :class:`Metrics`, as Prometheus metric families."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterator[Any]:
        return self.collect()  # the registry reads only the names

    def collect(self) -> Iterator[Any]:
        with self._metrics._lock:
            families = [fam.family() for fam in self._metrics._families]
        yield from families
