"""``dynkv_router_*`` Prometheus metrics of the aggregated proxy (served on its ``/metrics``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

__all__ = ["RouterMetrics"]


class RouterMetrics:
    """Counters the proxy updates per request, and gauges read from the router at each scrape.

    ``state`` returns ``(engines, index counts, feeds)``: engine -> (up,
    in flight, parked tokens), engine -> medium -> blocks, engine -> feed
    counters.
    """

    def __init__(self, state: Callable[[], tuple[dict[str, tuple[bool, int, int]], dict[str, dict[str, int]],
                                                 dict[str, dict[str, int]]]]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dynkv_router_requests", "Requests sent to each engine", ["engine", "policy"],
                                registry=r)
        self.failures = Counter("dynkv_router_engine_failures", "Requests or probes an engine failed", ["engine"],
                                registry=r)
        self.prompt_tokens = Counter("dynkv_router_prompt_tokens", "Prompt tokens routed to each engine",
                                     ["engine"], registry=r)
        self.predicted = Counter("dynkv_router_predicted_cached_tokens",
                                 "Prompt tokens the router expected each engine to hold (any medium)", ["engine"],
                                 registry=r)
        self.actual = Counter("dynkv_router_actual_cached_tokens",
                              "Cached prompt tokens each engine reported (usage.prompt_tokens_details)", ["engine"],
                              registry=r)
        self.route_seconds = Histogram("dynkv_router_route_seconds",
                                       "Time to pick an engine (tokenizing and hashing included)",
                                       buckets=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0), registry=r)
        self._state = state
        r.register(self)

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        engines, counts, feeds = self._state()
        up = GaugeMetricFamily("dynkv_router_engine_up", "1 while an engine is in rotation", labels=["engine"])
        busy = GaugeMetricFamily("dynkv_router_in_flight", "Requests in flight per engine", labels=["engine"])
        parked = GaugeMetricFamily("dynkv_router_parked_tokens", "Prompt tokens of the conversations parked on "
                                   "each engine (latest request ended, next turn expected; kv routing counts them "
                                   "as load)", labels=["engine"])
        for e, (is_up, n, p) in engines.items():
            up.add_metric([e], 1.0 if is_up else 0.0)
            busy.add_metric([e], float(n))
            parked.add_metric([e], float(p))
        blocks = GaugeMetricFamily("dynkv_router_indexed_blocks", "Blocks each engine holds, by medium, as the "
                                   "router knows from KV events", labels=["engine", "medium"])
        for e, media in counts.items():
            for m, n in media.items():
                blocks.add_metric([e, m], float(n))
        events = GaugeMetricFamily("dynkv_router_kv_events", "KV event stream of each engine: batches, events, "
                                   "gaps, lost (history past the replay buffer), restarts, bad (undecodable), "
                                   "snapshots (views rebuilt from one)", labels=["engine", "what"])
        for e, c in feeds.items():
            for what, n in c.items():
                events.add_metric([e, what], float(n))
        yield from (up, busy, parked, blocks, events)
