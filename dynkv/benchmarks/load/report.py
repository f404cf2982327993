"""Results of ``dynkv bench load``: per-engine summaries, the table, the plot.

Works on the request records of :mod:`dynkv.benchmarks.load.engine` and of
the endpoint mode (:mod:`dynkv.benchmarks.load.endpoint`): dicts with
``conversation``, ``turn``, ``prompt_tokens``, ``ttft_s``, ``latency_s``,
``cached_tokens`` (None where the server does not say), ``output_tokens`` and
``error`` (absent or None when it succeeded).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dynkv.benchmarks.serve_results import percentile, plot_turns

__all__ = ["format_table", "plot", "summarize"]

_TIERS = ("device", "host", "disk", "shared")
_DIRECTIONS = ("h2d", "d2h", "disk_to_host", "host_to_disk", "shared_to_host", "host_to_shared", "disk_to_staging",
               "staging_to_disk", "shared_to_staging")


def _stats(xs: list[float]) -> dict[str, float | None]:
    return {"p50": percentile(xs, 50), "p90": percentile(xs, 90), "mean": sum(xs) / len(xs) if xs else None,
            "n": len(xs)}


def summarize(engine: Mapping[str, Any]) -> dict[str, Any]:
    """One engine's figures: TTFT of first and later turns, throughput, cached share, dynkv's tiers, the KV check."""
    reqs: Sequence[Mapping[str, Any]] = engine.get("requests", [])
    ok = [r for r in reqs if not r.get("error") and r.get("ttft_s") is not None and r.get("latency_s") is not None]
    wall = engine.get("wall_s") or 0.0
    out_tokens = sum(r["output_tokens"] for r in ok)
    cached = [r for r in ok if r.get("cached_tokens") is not None]
    s: dict[str, Any] = {
        "status": engine.get("status", "ok"),
        "requests": len(reqs), "errors": len(reqs) - len(ok),
        "ttft_first_turn_s": _stats([r["ttft_s"] for r in ok if r["turn"] == 0]),
        "ttft_later_turns_s": _stats([r["ttft_s"] for r in ok if r["turn"] > 0]),
        "wall_s": wall,
        "output_tok_s": out_tokens / wall if wall > 0 else None,
        "prompt_tok_s": sum(r["prompt_tokens"] for r in ok) / wall if wall > 0 else None,
        "cached_share": (sum(r["cached_tokens"] for r in cached) / sum(r["prompt_tokens"] for r in cached)
                         if cached and sum(r["prompt_tokens"] for r in cached) else None),
        "cached_share_later_turns": None,
    }
    later = [r for r in cached if r["turn"] > 0]
    if later and sum(r["prompt_tokens"] for r in later):
        s["cached_share_later_turns"] = sum(r["cached_tokens"] for r in later) / sum(r["prompt_tokens"] for r in later)
    samples = engine.get("samples") or {}
    if samples:
        s["hits_blocks"] = {t: samples.get(f"dynkv_hits_total{{tier={t}}}", 0.0) for t in _TIERS}
        s["misses_blocks"] = samples.get("dynkv_misses_total", 0.0)
        s["bytes"] = {d: samples.get(f"dynkv_bytes_moved_total{{direction={d}}}", 0.0) for d in _DIRECTIONS}
        s["cost_tokens"] = {c: samples.get(f"dynkv_cost_tokens_total{{choice={c}}}", 0.0)
                            for c in ("load", "recompute", "gave_up", "probe")}
        s["disk_reads_given_up"] = {k: samples.get(f"dynkv_disk_reads_given_up_total{{state={k}}}", 0.0)
                                    for k in ("cancelled", "landed")}
        s["load_errors"] = sum(v for k, v in samples.items() if k.startswith("dynkv_load_errors_total"))
        # The shared tier: pages past the local match the store lacked (or lost before their read), lookups that
        # gave up waiting, and host pages not written behind (filter: seen fewer than shared_admit_min_hits times).
        s["shared"] = {"misses": samples.get("dynkv_tier_misses_total{tier=shared}", 0.0),
                       "lookup_timeouts": samples.get("dynkv_lookup_timeouts_total{tier=shared}", 0.0),
                       "load_errors": samples.get("dynkv_load_errors_total{reason=shared}", 0.0),
                       "store_errors": samples.get("dynkv_store_errors_total{tier=shared}", 0.0),
                       "not_written": {r: samples.get(f"dynkv_admissions_refused_total{{tier=shared,reason={r}}}",
                                                      0.0) for r in ("filter", "busy", "down", "full")}}
    if "kv" in engine:
        s["kv"] = engine["kv"]
    return s


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 1e3:.0f}"


def _sum(nbytes: dict[str, float], *directions: str) -> float | None:
    """Bytes moved in these directions together (a disk read lands in a host or a staging page, a disk write
    leaves from either); None where the engine reported none of them."""
    got = [nbytes[d] for d in directions if nbytes.get(d) is not None]
    return sum(got) if got else None


def _gb(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 1e9:.2f}"


def _recomputed(s: Mapping[str, Any]) -> str:
    cost, gave = s.get("cost_tokens"), s.get("disk_reads_given_up")
    if not cost:
        return "n/a"
    return (f"{cost['recompute']:.0f}/{cost.get('gave_up', 0):.0f} "
            f"({gave['cancelled']:.0f}, {gave['landed']:.0f})")


def format_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per engine; TTFT in ms, bytes in GB (dynkv's counters; n/a for engines without them)."""
    header = ["engine", "reqs", "err", "TTFT1 p50", "p90", "mean", "TTFT>1 p50", "p90", "mean", "wall s",
              "out tok/s", "cached", "cached>1", "host hits", "disk hits", "shared hits", "h2d GB", "disk rd GB", "disk wr GB",
              "disk->recompute", "KV check"]
    rows = []
    for name, s in summaries.items():
        f, later = s["ttft_first_turn_s"], s["ttft_later_turns_s"]
        hits, nbytes = s.get("hits_blocks") or {}, s.get("bytes") or {}
        kv = s.get("kv")
        kv_text = "n/a" if kv is None else (f"{'pass' if kv['passed'] else 'FAIL'} "
                                             f"{kv['requests'] - kv['failed_requests']}/{kv['requests']}")
        share = s["cached_share"]
        share_later = s["cached_share_later_turns"]
        rows.append([name, str(s["requests"]), str(s["errors"]), _ms(f["p50"]), _ms(f["p90"]), _ms(f["mean"]),
                     _ms(later["p50"]), _ms(later["p90"]), _ms(later["mean"]), f"{s['wall_s']:.1f}",
                     "n/a" if s["output_tok_s"] is None else f"{s['output_tok_s']:.1f}",
                     "n/a" if share is None else f"{share:.3f}", "n/a" if share_later is None else f"{share_later:.3f}",
                     f"{hits['host']:.0f}" if hits else "n/a", f"{hits['disk']:.0f}" if hits else "n/a",
                     f"{hits['shared']:.0f}" if hits else "n/a",
                     _gb(nbytes.get("h2d")), _gb(_sum(nbytes, "disk_to_host", "disk_to_staging")),
                     _gb(_sum(nbytes, "host_to_disk", "staging_to_disk")),
                     _recomputed(s), kv_text])
        if s.get("status", "ok") != "ok":
            rows[-1][0] += f" ({s['status']})"
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(wd) if i == 0 else c.rjust(wd) for i, (c, wd) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), *(line(r) for r in rows),
                      "TTFT in ms (1: first turns, >1: later turns); cached: share of prompt tokens the engine did "
                      "not compute; hits in blocks; disk->recompute: tokens of disk hits the cost model left to "
                      "recompute at lookup / after giving up on their reads (pages cancelled, landed anyway)"])


def plot(engines: Mapping[str, Mapping[str, Any]], path: Path, title: str) -> None:
    """PNG: TTFT p50/p90 per turn and engine, and each engine's TTFT CDF (needs matplotlib)."""
    plot_turns({name: [(r["turn"], r["ttft_s"]) for r in e.get("requests") or ()
                       if r.get("ttft_s") is not None and not r.get("error")]
                for name, e in engines.items()}, path, title)
