"""Probes of ``dynkv bench e2e``: copy-path variants of one engine, GPU kernel traces, the disk tier's read batches.

- **Variants** (``--variant NAME:key=value,...``): the dynkv engine runs its
  host-tier (and disk-tier) hits of the first prompt length again with
  dynkv's copy knobs changed in place, so several settings are compared in
  one run on one engine; the variants take turns hit by hit. Keys: ``priority`` (CUDA priority of the worker's
  load stream, :meth:`dynkv.worker.Worker.set_load_priority`), ``ctas``
  (CTAs of host-to-GPU copies, :func:`dynkv.ops.set_tuning`), ``threads``
  (their threads per CTA), ``smem_kib`` (shared memory each of their CTAs
  reserves so that it holds its SM alone, :attr:`dynkv.ops.Tuning.smem_bytes`), ``read_chunk``
  (:attr:`dynkv.tiers.disk.DiskTier.read_chunk`), ``io_threads`` (the disk tier's
  I/O threads, :meth:`dynkv.tiers.disk.DiskTier.set_io_threads`), ``disk_wait_ms``
  (:attr:`dynkv.config.DynKVConfig.disk_wait_ms`), ``store_launch_kib``
  (launch size of the stores' copies, :attr:`dynkv.ops.Tuning.launch_bytes`;
  0: one launch), ``early`` (1 or 0: :attr:`dynkv.config.DynKVConfig.early_loads`),
  ``last_block`` (1 or 0: :attr:`dynkv.config.DynKVConfig.load_last_block`), ``copy`` (``kernel`` or
  ``staged``: the worker's copy path of loads and stores, :mod:`dynkv.worker.staging`), ``paths`` (``host``, ``disk``, ``host+disk``, the
  default, or ``decode``: the decode runs again). ``priority`` needs the
  worker in the engine's process (one GPU, ``distributed_executor_backend=uni``).
- **Traces** (``--trace``): one hit per path of the first length under
  ``torch.profiler`` (CUDA kernels with their streams); the Chrome trace is
  written next to the report and summarized by :func:`trace_summary`.
- **Disk batches**: each dynkv TTFT record carries the disk tier's read
  batches of that request (:attr:`dynkv.tiers.disk.DiskTier.read_log`), in ms from
  the request's start, with what each batch's read call cost its thread.
- **Host activity** (:class:`HostSample`): each dynkv TTFT record, ``dd``
  and the disk probe carry what the disk tier's block device, the CPUs and
  this process's threads did meanwhile.
"""

from __future__ import annotations

import gzip
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["KNOBS", "HostSample", "apply_variant", "block_device", "disk_batches", "export_trace", "parse_variant",
           "profiler", "trace_summary", "traced"]

# knob -> (parse, lowest value)
KNOBS: dict[str, tuple[Callable[[str], Any], int | None]] = {
    "priority": (int, None), "ctas": (int, 1), "threads": (int, 32), "smem_kib": (int, 0), "read_chunk": (int, 0),
    "io_threads": (int, 1), "disk_wait_ms": (float, 0), "store_launch_kib": (int, 0), "early": (int, 0), "sched": (int, 0),
    "last_block": (int, 0), "paths": (str, None), "copy": (str, None)}
# knobs of dynkv.ops.Tuning -> (its field, the direction they change, the knob's unit in bytes or 1)
_TUNING_KNOBS = {"ctas": ("ctas", "h2d", 1), "threads": ("threads", "h2d", 1), "smem_kib": ("smem_bytes", "h2d", 1024),
                 "store_launch_kib": ("launch_bytes", "d2h", 1024)}
# on/off knobs -> the connector's attribute they set
_SWITCHES = {"early": "early_loads", "sched": "scheduler_loads", "last_block": "load_last_block"}
_PATHS = {"host": ("host",), "disk": ("disk",), "host+disk": ("host", "disk"), "decode": ("decode",)}
COPY_KERNEL = "copy_tiles_kernel"
ATTENTION_OP = "vllm::unified_attention_with_output"  # vLLM's attention op, once per layer and forward
_REDUCE_KERNELS = ("cross_device_reduce", "AllReduce", "all_reduce", "allreduce")


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
        if key in _SWITCHES and v not in (0, 1):
            raise ValueError(f"{text!r}: {key}={v}: expected 0 or 1")
        if key == "threads" and (v % 32 or v > 1024):
            raise ValueError(f"{text!r}: threads={v}: expected a multiple of 32 up to 1024")
        if key == "copy" and v not in ("kernel", "staged"):
            raise ValueError(f"{text!r}: copy={v!r}: expected kernel or staged")
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
        for knob, (name, direction, scale) in _TUNING_KNOBS.items():
            if knob in knobs:
                old = dict(getattr(ops.get_tuning(), name) or {})
                ops.set_tuning(**{name: {**old, direction: knobs[knob] * scale}})
                undo.append(lambda name=name, old=old: ops.set_tuning(**{name: old}))
        disk = connector.leader.disk
        if ("read_chunk" in knobs or "io_threads" in knobs) and disk is None:
            raise RuntimeError("read_chunk, io_threads: this engine has no disk tier")
        if "read_chunk" in knobs:
            old_chunk = disk.read_chunk
            disk.read_chunk = knobs["read_chunk"]
            undo.append(lambda: setattr(disk, "read_chunk", old_chunk))
        if "disk_wait_ms" in knobs:
            old_wait = connector.disk_wait_s
            connector.disk_wait_s = knobs["disk_wait_ms"] / 1e3
            undo.append(lambda: setattr(connector, "disk_wait_s", old_wait))
        for knob, attr in _SWITCHES.items():
            if knob in knobs:
                undo.append(lambda attr=attr, old=getattr(connector, attr): setattr(connector, attr, old))
                setattr(connector, attr, bool(knobs[knob]))
        if "io_threads" in knobs:
            old_threads = disk.io_threads
            disk.set_io_threads(knobs["io_threads"])
            undo.append(lambda: disk.set_io_threads(old_threads))
        if "copy" in knobs:
            from dynkv.worker.staging import CopyPaths

            worker = _worker()
            old_paths = worker.copy_paths
            if old_paths is None:
                raise RuntimeError("copy: the worker has no GPU copy paths")
            worker.copy_paths = CopyPaths(old_paths.view, h2d=knobs["copy"], d2h=knobs["copy"])
            undo.append(lambda: setattr(worker, "copy_paths", old_paths))
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


def profiler() -> Any:
    """A ``torch.profiler`` of CPU and (where there is one) CUDA activity, not yet started."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else []))


def export_trace(prof: Any, path: Path) -> dict[str, Any]:
    """A stopped profiler's Chrome trace, gzipped to ``path``: its file name and :func:`trace_summary`."""
    raw = path.with_suffix("")
    prof.export_chrome_trace(str(raw))
    data = raw.read_bytes()
    path.write_bytes(gzip.compress(data))
    raw.unlink()
    return {"file": path.name, **trace_summary(json.loads(data))}


def traced(fn: Callable[[], dict[str, Any]], path: Path) -> dict[str, Any]:
    """``fn()`` under ``torch.profiler`` (CPU and CUDA); the trace goes to ``path`` (gzip), its summary in the record."""
    with profiler() as prof:
        rec = fn()
    rec["trace"] = export_trace(prof, path)
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
    # TP: a rank that launches late holds the others in the all-reduce, whose kernels wait for every rank.
    reduce_ms = sum(e["dur"] for e in kernels if any(w in e.get("name", "") for w in _REDUCE_KERNELS)) / 1e3
    if reduce_ms:
        out["allreduce_ms"] = round(reduce_ms, 3)
    # The CPU's pace through the last forward: from one attention layer's launch to the next.
    attn = sorted(e["ts"] for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("name") == ATTENTION_OP)
    if len(attn) > 1:
        last = attn[-_layers_of_last_forward(attn):]
        if len(last) > 1:
            out["cpu_ms_per_layer"] = round((last[-1] - last[0]) / (len(last) - 1) / 1e3, 3)
    return out


def _layers_of_last_forward(starts: list[float]) -> int:
    """Attention launches of the last forward: the run after the last gap far wider than the median step."""
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    typical = sorted(gaps)[len(gaps) // 2]
    n = 1
    for g in reversed(gaps):
        if g > 10 * typical:
            break
        n += 1
    return n


def block_device(path: str) -> str | None:
    """The /proc/diskstats name of the whole device under ``path`` (``vda`` for ``vda1``), or None."""
    try:
        st = os.stat(path)
        sys_dir = os.path.realpath(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    except OSError:
        return None
    if not os.path.isdir(sys_dir):
        return None
    if os.path.exists(os.path.join(sys_dir, "partition")):
        sys_dir = os.path.dirname(sys_dir)
    return os.path.basename(sys_dir)


class HostSample:
    """A snapshot of what the host does: one block device's counters, the CPUs, this process's threads.

    ``HostSample.delta(a, b)`` says what happened between two snapshots: the
    device's MB read, requests, mean request size, busy share and mean queue
    depth (``/proc/diskstats``); the cores busy and in I/O wait
    (``/proc/stat``); and the CPU time of this process's threads, summed by
    thread name (``/proc/self/task``), most first. Linux only; elsewhere the
    parts it cannot read are left out.
    """

    def __init__(self, device: str | None) -> None:
        self.device = device
        self.t = time.perf_counter()
        self.disk = self._diskstats(device)
        self.cpu = self._cpu()
        self.threads = self._threads()

    @staticmethod
    def _diskstats(device: str | None) -> list[int] | None:
        if device is None:
            return None
        try:
            for line in Path("/proc/diskstats").read_text().splitlines():
                f = line.split()
                if len(f) >= 14 and f[2] == device:
                    return [int(x) for x in f[3:14]]
        except OSError:
            pass
        return None

    @staticmethod
    def _cpu() -> list[int] | None:
        try:
            f = Path("/proc/stat").read_text().splitlines()[0].split()
            return [int(x) for x in f[1:9]]  # user nice system idle iowait irq softirq steal
        except (OSError, IndexError, ValueError):
            return None

    @staticmethod
    def _threads() -> dict[int, tuple[str, int]]:
        out: dict[int, tuple[str, int]] = {}
        try:
            tids = os.listdir("/proc/self/task")
        except OSError:
            return out
        # Python threads by their Python names (the kernel knows them all as the process); others by the kernel's.
        named = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
        for tid in tids:
            try:
                raw = Path(f"/proc/self/task/{tid}/stat").read_text()
            except OSError:
                continue  # the thread ended
            name = named.get(int(tid)) or raw[raw.index("(") + 1 : raw.rindex(")")]
            rest = raw[raw.rindex(")") + 2 :].split()
            out[int(tid)] = (name, int(rest[11]) + int(rest[12]))  # utime + stime, clock ticks
        return out

    def since(self) -> dict[str, Any]:
        """What happened from this snapshot until now (:meth:`delta`)."""
        return HostSample.delta(self, HostSample(self.device))

    @staticmethod
    def delta(a: HostSample, b: HostSample) -> dict[str, Any]:
        wall_ms = (b.t - a.t) * 1e3
        out: dict[str, Any] = {"wall_ms": round(wall_ms, 1)}
        if a.disk is not None and b.disk is not None and wall_ms > 0:
            d = [y - x for x, y in zip(a.disk, b.disk)]
            # reads, merged, sectors, ms reading, writes, merged, sectors, ms writing, in flight, ms busy, weighted ms
            out["device"] = {"name": a.device, "read_mb": round(d[2] * 512 / 1e6, 1), "reads": d[0],
                             "mean_read_kb": round(d[2] * 512 / 1024 / d[0], 1) if d[0] else 0.0,
                             "write_mb": round(d[6] * 512 / 1e6, 1), "busy_pct": round(100 * d[9] / wall_ms, 1),
                             "mean_queue": round(d[10] / wall_ms, 2)}
        if a.cpu is not None and b.cpu is not None:
            d = [y - x for x, y in zip(a.cpu, b.cpu)]
            total = sum(d) or 1
            cores = os.cpu_count() or 1
            out["cpu"] = {"busy_cores": round(cores * (total - d[3] - d[4]) / total, 2),
                          "iowait_cores": round(cores * d[4] / total, 2)}
        tick_ms = 1e3 / os.sysconf("SC_CLK_TCK")
        by_name: dict[str, float] = {}
        for tid, (name, ticks) in b.threads.items():
            used = (ticks - a.threads.get(tid, (name, 0))[1]) * tick_ms
            if used > 0:
                key = name.rstrip("0123456789_") or name  # dynkv-disk_3 and dynkv-disk_7 count together
                by_name[key] = by_name.get(key, 0.0) + used
        out["threads_cpu_ms"] = {k: round(v, 1) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:10]}
        return out
