"""dynkv's counters in vLLM: the connector stats (workers -> scheduler -> loggers) and ``vllm:dynkv_*`` metrics.

:class:`DynKVStats` carries the deltas of the leader's ``dynkv_*`` counters and
its gauges; on vLLM versions without the worker -> scheduler metadata channel
it also carries a worker's report. :class:`DynKVPromMetrics` puts them into
vLLM's Prometheus registry, per engine. Used by :mod:`dynkv.connector`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from dynkv.protocol import WorkerReport

if TYPE_CHECKING:
    from vllm.config import VllmConfig

__all__ = ["DynKVPromMetrics", "DynKVStats"]


class DynKVStats(KVConnectorStats):
    """dynkv's counters since the last interval, and its gauges (``data["counters"]``, ``data["gauges"]``).

    Keys are ``metric{label=value,...}`` samples of the leader's registry
    (:mod:`dynkv.metrics`). On vLLM without worker metadata, ``data["report"]``
    carries a worker report to the scheduler.
    """

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> DynKVStats:
        counters = self.data.setdefault("counters", {})
        for k, v in other.data.get("counters", {}).items():
            counters[k] = counters.get(k, 0) + v
        self.data.setdefault("gauges", {}).update(other.data.get("gauges", {}))
        if "report" in other.data:
            self.data["report"] = _pack(self.take_report().merge(_unpack(other.data["report"])))
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {}
        for k, v in self.data.get("counters", {}).items():
            out[k.removeprefix("dynkv_").replace("_total{", "{").replace("{}", "")] = v
        return out

    def is_empty(self) -> bool:
        return not self.data.get("counters") and "report" not in self.data

    @classmethod
    def with_report(cls, report: WorkerReport) -> DynKVStats:
        return cls(data={"report": _pack(report)})

    def take_report(self) -> WorkerReport:
        """The carried worker report (empty if none), removed from the stats."""
        packed = self.data.pop("report", None)
        return WorkerReport() if packed is None else _unpack(packed)


def _pack(r: WorkerReport) -> dict[str, Any]:
    # String keys: stats cross processes through msgpack and JSON.
    return {
        "done": {str(k): v for k, v in r.done.items()},
        "failed": {str(k): v for k, v in r.failed.items()},
        "failed_blocks": sorted(r.failed_blocks),
        "moved": {d: [b, s] for d, (b, s) in r.moved.items()},
    }


def _unpack(d: dict[str, Any]) -> WorkerReport:
    return WorkerReport(
        {int(k): v for k, v in d["done"].items()},
        {int(k): v for k, v in d["failed"].items()},
        set(d["failed_blocks"]),
        {k: (int(b), float(s)) for k, (b, s) in d["moved"].items()},
    )


class DynKVPromMetrics(KVConnectorPromMetrics):
    """dynkv's counters and gauges in vLLM's Prometheus registry, as ``vllm:dynkv_*`` per engine."""

    def __init__(self, vllm_config: VllmConfig, metric_types: dict[type, type], labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._metrics: dict[str, Any] = {}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        engine = list(self.per_engine_labelvalues[engine_idx])
        for kind, cls in (("counters", self._counter_cls), ("gauges", self._gauge_cls)):
            for key, value in transfer_stats_data.get(kind, {}).items():
                name, _, labels = key.partition("{")
                pairs = [p.split("=", 1) for p in labels.rstrip("}").split(",") if p]
                if kind == "counters":
                    name = name.removesuffix("_total")
                metric = self._metrics.get(name)
                if metric is None:
                    metric = self._metrics[name] = cls(
                        name=f"vllm:{name}", documentation=f"dynkv {name.removeprefix('dynkv_')}",
                        labelnames=self._labelnames + [k for k, _ in pairs],
                    )
                bound = metric.labels(*engine, *[v for _, v in pairs])
                bound.inc(value) if kind == "counters" else bound.set(value)
