"""``dynkv status``: each tier's health, capacity and use, read from running engines' metrics.

An engine exposes its ``dynkv_*`` metrics on its own ``metrics_port`` and, as
``vllm:dynkv_*`` labelled by engine, on vLLM's ``/metrics``; either page
works (vLLM's names every engine of a data-parallel server). For each engine
and tier the table shows capacity, pages stored / being written / pinned by
loads in flight, use, hits, evictions, and errors: pages whose store failed
on that tier, and loads that failed because of it (disk: a page failed its
checks or could not be read; host: a worker's copy failed). A tier is
``ok`` while it has no error, ``errors`` once one happened, ``writes-off``
while its writes are stopped after failures in a row (the disk tier: a full
file system, a dying disk).

The exit status is 0 when every engine answered and every tier is ``ok``,
1 otherwise, so the command serves as a health check.
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["TierStatus", "add_arguments", "parse_metrics", "render", "run_from_args"]

DESCRIPTION = __doc__.split("\n\n")[0]

# load_errors' reason -> the tier whose failure it counts
_LOAD_ERROR_TIER = {"disk": "disk", "worker": "host"}


@dataclass
class TierStatus:
    """One tier of one engine, as its metrics tell."""

    engine: str
    tier: str
    capacity: int = 0
    stored: int = 0
    pending: int = 0
    pinned: int = 0
    hits: int = 0
    evictions: int = 0
    store_errors: int = 0
    load_errors: int = 0
    writes_on: bool = True
    gated: bool = False  # admission frequency-gated now (host_admission)

    @property
    def used(self) -> float:
        """Share of the capacity holding pages (stored or being written)."""
        return (self.stored + self.pending) / self.capacity if self.capacity else 0.0

    @property
    def health(self) -> str:
        if not self.writes_on:
            return "writes-off"
        return "errors" if self.store_errors or self.load_errors else "ok"


def parse_metrics(text: str, source: str = "") -> list[TierStatus]:
    """Tier status of every engine in a Prometheus text page (``dynkv_*`` or ``vllm:dynkv_*``).

    ``source`` names the engine of a page without an engine label.

    Raises
    ------
    ValueError
        When the page holds no dynkv tier (not an engine with dynkv, or not
        a metrics page).
    """
    from prometheus_client.parser import text_string_to_metric_families

    tiers: dict[tuple[str, str], TierStatus] = {}

    def tier(labels: dict[str, str], name: str) -> TierStatus:
        engine = labels.get("engine", source)
        key = (engine, name)
        if key not in tiers:
            tiers[key] = TierStatus(engine, name)
        return tiers[key]

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name = s.name.removeprefix("vllm:")
            labels, value = dict(s.labels), s.value
            if name == "dynkv_tier_capacity_pages":
                tier(labels, labels["tier"]).capacity = int(value)
            elif name == "dynkv_tier_pages" and labels.get("state") in ("stored", "pending", "pinned"):
                setattr(tier(labels, labels["tier"]), labels["state"], int(value))
            elif name in ("dynkv_hits_total", "dynkv_hits") and labels.get("tier") not in (None, "device", "remote"):
                tier(labels, labels["tier"]).hits = int(value)
            elif name == "dynkv_tier_writes_on":
                tier(labels, labels["tier"]).writes_on = value > 0
            elif name == "dynkv_tier_admission_gated":
                tier(labels, labels["tier"]).gated = value > 0
            elif name in ("dynkv_evictions_total", "dynkv_evictions"):
                tier(labels, labels["tier"]).evictions = int(value)
            elif name in ("dynkv_store_errors_total", "dynkv_store_errors"):
                tier(labels, labels["tier"]).store_errors += int(value)
            elif name in ("dynkv_load_errors_total", "dynkv_load_errors") and labels.get("reason") in _LOAD_ERROR_TIER:
                tier(labels, _LOAD_ERROR_TIER[labels["reason"]]).load_errors += int(value)
    found = [t for t in tiers.values() if t.capacity]
    if not found:
        raise ValueError(f"{source or 'the page'}: no dynkv tier in these metrics (is dynkv's connector on, and "
                         "is this its metrics_port or vLLM's /metrics?)")
    return sorted(found, key=lambda t: (t.engine, t.tier != "host", t.tier))


def render(statuses: list[TierStatus]) -> str:
    """A table: one line per engine and tier."""
    head = ("engine", "tier", "health", "capacity", "stored", "pending", "pinned", "used", "hits", "evicted",
            "errors", "admission")
    rows = [head] + [(t.engine, t.tier, t.health, str(t.capacity), str(t.stored), str(t.pending), str(t.pinned),
                      f"{100 * t.used:.0f}%", str(t.hits), str(t.evictions), str(t.store_errors + t.load_errors),
                      "gated" if t.gated else "all")
                     for t in statuses]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


def _url(target: str) -> str:
    if target.isdigit():
        target = f"127.0.0.1:{target}"
    if "://" not in target:
        target = "http://" + target
    return target if target.rstrip("/").endswith("/metrics") else target.rstrip("/") + "/metrics"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("targets", nargs="+", metavar="URL",
                   help="an engine's metrics: a port (on this host), host:port, or a URL (/metrics is added); "
                        "dynkv's metrics_port or vLLM's server port")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each engine (default 5)")


def run_from_args(args: argparse.Namespace) -> int:
    statuses: list[TierStatus] = []
    failed: list[str] = []
    for target in args.targets:
        url = _url(target)
        try:
            with urllib.request.urlopen(url, timeout=args.timeout) as r:
                statuses += parse_metrics(r.read().decode(), source=target)
        except (OSError, urllib.error.URLError, ValueError) as e:
            failed.append(f"{url}: {getattr(e, 'reason', None) or e}")
    if args.json:
        out: dict[str, Any] = {"tiers": [{**asdict(t), "used": t.used, "health": t.health} for t in statuses],
                               "unreachable": failed}
        print(json.dumps(out, indent=2))
    else:
        if statuses:
            print(render(statuses))
        for line in failed:
            print(f"unreachable: {line}")
    return 1 if failed or any(t.health != "ok" for t in statuses) else 0
