"""Probes of ``dynkv bench e2e``: copy-path variants of one engine, GPU kernel traces, the disk tier's read batches.

- **Variants** (``--variant NAME:key=value,...``): the dynkv engine runs its
  host-tier (and disk-tier) hits of the first prompt length again with
  dynkv's copy knobs changed in place, so several settings are compared in
  one run on one engine. Keys: ``priority`` (CUDA priority of the worker's
  load stream, :meth:`dynkv.worker.Worker.set_load_priority`), ``ctas``
  (CTAs of host-to-GPU copies, :func:`dynkv.ops.set_tuning`), ``read_chunk``
  (:attr:`dynkv.disk.DiskTier.read_chunk`), ``paths`` (``host``, ``disk`` or
  ``host+disk``, the default). ``priority`` needs the worker in the engine's
  process (one GPU, ``distributed_executor_backend=uni``).
- **Traces** (``--trace``): one hit per path of the first length under
  ``torch.profiler`` (CUDA kernels with their streams); the Chrome trace is
  written next to the report and summarized by :func:`trace_summary`.
- **Disk batches**: each dynkv TTFT record carries the disk tier's read
  batches of that request (:attr:`dynkv.disk.DiskTier.read_log`), in ms from
  the request's start.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["KNOBS", "apply_variant", "disk_batches", "parse_variant", "trace_summary", "traced"]

# knob -> (parse, lowest value)
KNOBS: dict[str, tuple[Callable[[str], Any], int | None]] = {
    "priority": (int, None), "ctas": (int, 1), "read_chunk": (int, 0), "paths": (str, None)}
_PATHS = {"host": ("host",), "disk": ("disk",), "host+disk": ("host", "disk")}
COPY_KERNEL = "copy_tiles_kernel"


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME:key=value,...`` -> ``(NAME, knobs)``; ValueError naming what is wrong."""
    name, sep, rest = text.partition(":")
    if not sep or not name.strip() or not rest.strip():
        raise ValueError(f"{text!r}: expected NAME:key=value[,key=value...], e.g. normal:priority=0")
    knobs: dict[str, Any] = {}
    for item in rest.split(","):
        key, eq, value = (x.strip() for x in item.partition("="))
        if not eq or key not in KNOBS:
            raise ValueError(f"{text!r}: {item!r} is not key=value with a key among {', '.join(KNOBS)}")
        parse, low = KNOBS[key]
        try:
            v = parse(value)
        except ValueError:
            raise ValueError(f"{text!r}: {key}={value!r} is not a {parse.__name__}") from None
        if low is not None and v < low:
            raise ValueError(f"{text!r}: {key}={v} is below {low}")
        if key == "paths" and v not in _PATHS:
            raise ValueError(f"{text!r}: paths={v!r}: expected one of {', '.join(_PATHS)}")
        knobs[key] = v
    return name.strip(), knobs


def variant_paths(knobs: dict[str, Any]) -> tuple[str, ...]:
    return _PATHS[knobs.get("paths", "host+disk")]


def _worker() -> Any:
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    worker = getattr(get_kv_transfer_group(), "worker", None) if has_kv_transfer_group() else None
    if worker is None:
        raise RuntimeError("dynkv's worker is not in this process (TP > 1 runs it apart): "
                           "the priority knob needs one GPU and distributed_executor_backend=uni")
    return worker


def apply_variant(connector: Any, knobs: dict[str, Any]) -> Callable[[], None]:
    """Set the knobs on the running engine; returns what puts the old values back."""
    from dynkv import ops

    undo: list[Callable[[], None]] = []
    try:
        if "ctas" in knobs:
            old_ctas = dict(ops.get_tuning().ctas)
            ops.set_tuning(ctas={**old_ctas, "h2d": knobs["ctas"]})
            undo.append(lambda: ops.set_tuning(ctas=old_ctas))
        if "read_chunk" in knobs:
            disk = connector.leader.disk
            if disk is None:
                raise RuntimeError("read_chunk: this engine has no disk tier")
            old_chunk = disk.read_chunk
            disk.read_chunk = knobs["read_chunk"]
            undo.append(lambda: setattr(disk, "read_chunk", old_chunk))
        if "priority" in knobs:
            worker = _worker()
            old_priority = worker.load_priority
            worker.set_load_priority(knobs["priority"])
            undo.append(lambda: worker.set_load_priority(old_priority))
    except BaseException:
        for fn in reversed(undo):
            fn()
        raise

    def restore() -> None:
        for fn in reversed(undo):
            fn()

    return restore


def disk_batches(connector: Any, since: float) -> list[list[float]]:
    """The disk tier's read batches submitted after ``since`` (perf_counter): ms from it, pages, runs."""
    disk = getattr(getattr(connector, "leader", None), "disk", None)
    if disk is None:
        return []
    return [[round((t - since) * 1e3, 3) for t in row[:4]] + list(row[4:])
            for row in list(disk.read_log) if row[0] >= since]


def traced(fn: Callable[[], dict[str, Any]], path: Path) -> dict[str, Any]:
    """``fn()`` under ``torch.profiler`` (CPU and CUDA); the trace goes to ``path`` (gzip), its summary in the record."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        rec = fn()
    raw = path.with_suffix("")
    prof.export_chrome_trace(str(raw))
    data = raw.read_bytes()
    path.write_bytes(gzip.compress(data))
    raw.unlink()
    rec["trace"] = {"file": path.name, **trace_summary(json.loads(data))}
    return rec


def _union(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def trace_summary(trace: dict[str, Any]) -> dict[str, Any]:
    """GPU kernels of a Chrome trace: per stream, dynkv's copies, and the compute stream's idle time.

    Times in ms. ``compute`` is the stream with the most non-copy kernel
    time; its ``idle_ms`` is the time inside its first-to-last kernel span
    with no kernel of its own running (waits on a copy show up there).
    ``copy`` spans dynkv's copy kernels on every stream.
    """
    kernels = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and e.get("cat") == "kernel"]
    if not kernels:
        return {"kernels": 0}
    t0 = min(e["ts"] for e in kernels)
    streams: dict[int, dict[str, Any]] = {}
    copies: list[tuple[float, float]] = []
    other_ms: dict[int, float] = {}  # per stream: time in kernels that are not dynkv's copies
    for e in kernels:
        a, b = (e["ts"] - t0) / 1e3, (e["ts"] + e["dur"] - t0) / 1e3
        sid = int((e.get("args") or {}).get("stream", -1))
        s = streams.setdefault(sid, {"kernels": 0, "busy_ms": 0.0, "first_ms": a, "last_ms": b, "copy_kernels": 0,
                                     "spans": []})
        s["kernels"] += 1
        s["busy_ms"] += b - a
        s["first_ms"], s["last_ms"] = min(s["first_ms"], a), max(s["last_ms"], b)
        s["spans"].append((a, b))
        if COPY_KERNEL in e.get("name", ""):
            s["copy_kernels"] += 1
            copies.append((a, b))
        else:
            other_ms[sid] = other_ms.get(sid, 0.0) + b - a
    compute_id = max(other_ms, key=other_ms.__getitem__, default=None)
    out: dict[str, Any] = {"kernels": len(kernels), "streams": {}}
    for k, s in streams.items():
        spans = s.pop("spans")
        s["span_ms"] = s["last_ms"] - s["first_ms"]
        s["idle_ms"] = s["span_ms"] - _union(spans)
        out["streams"][str(k)] = {kk: round(v, 3) if isinstance(v, float) else v for kk, v in s.items()}
    if compute_id is not None:
        out["compute_stream"] = compute_id
    if copies:
        out["copy"] = {"kernels": len(copies), "first_ms": round(min(a for a, _ in copies), 3),
                       "last_ms": round(max(b for _, b in copies), 3), "busy_ms": round(_union(copies), 3)}
    return out
